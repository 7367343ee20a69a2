"""``find_latest_checkpoint``: the newest checkpoint directory under a root that will restore.

Order, newest first:

1. by step: the manifest's ``metadata["step"]`` (an int) when there is one, else the last
   integer in the directory name (``step_2000`` -> 2000, ``epoch3_step200`` -> 200);
   directories with no step come after every directory that has one;
2. then by time: the manifest's ``created_unix``, else the directory's mtime;
3. then by name.

Each candidate must pass :func:`check_checkpoint` (complete, right world size, sizes,
and checksums with ``verify``) and every rank file's zip directory and ``data.pkl`` must
parse (:func:`dist_restore.read_index`). A skipped directory is logged as a warning with
the reason; subdirectories with neither a manifest nor a ``checkpoint_*.pt`` are not
checkpoints and are ignored.

It reads every rank file's index: call it on one rank and broadcast the result, so that
all ranks restore the same directory.

An object-store URL (``s3://bucket/run``) is searched the same way among its sub-prefixes,
and each candidate checked as far as a listing allows without reading the rank objects:
the manifest is there and valid, every rank object it lists is there with its size (or,
without a manifest, every rank object and no marker of an unfinished write), the world
size; ``verify`` streams every object and checks its CRC32. There is no mtime: a
checkpoint without a manifest orders by step, then name.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from pathlib import Path

from dist_restore._base.source import Location, is_url, local_path, location
from dist_restore._format.index import read_index
from dist_restore._format.manifest import (
    MANIFEST_NAME,
    IncompleteCheckpointError,
    Manifest,
    check_checkpoint,
    read_manifest,
)
from dist_restore._types import rank_file_name
from dist_restore.errors import CheckpointError, CorruptCheckpointError

logger = logging.getLogger(__name__)

_RANK_FILE = re.compile(r"^checkpoint_(\d+)\.pt$")
_INT = re.compile(r"\d+")


def find_latest_checkpoint(root: str | os.PathLike[str], *, world_size: int | None = None,
                           verify: bool = False) -> Path | str | None:
    """The newest subdirectory of ``root`` that holds a restorable checkpoint.

    Args:
        root: The directory whose subdirectories are checkpoints (``step_100``, ...), or an
            object-store URL of a prefix whose sub-prefixes are.
        world_size: Skip checkpoints written by another number of ranks (``None``: any).
        verify: Also compare every rank file's CRC32 with the manifest (reads all data).

    Returns:
        The checkpoint directory (a ``Path``; for a URL ``root``, the checkpoint's URL as a
        ``str``), or ``None`` if none qualifies.

    Raises:
        FileNotFoundError: ``root`` does not exist (a URL: no object under it).
        OSError: an object store could not be listed (naming the URL).
    """
    if is_url(root):
        return _find_latest_remote(location(root), world_size, verify)
    base = local_path(root)
    if not base.is_dir():
        raise FileNotFoundError(f"checkpoint root not found (or not a directory): {str(base)!r}")
    candidates = []
    for entry in os.scandir(base):
        if not entry.is_dir():
            continue
        try:
            names = os.listdir(entry.path)
        except OSError as e:
            logger.warning("skipping checkpoint %s (unreadable): %s", entry.path, e)
            continue
        if MANIFEST_NAME in names or any(_RANK_FILE.match(n) for n in names):
            d = Path(entry.path)
            candidates.append((_order_key(d, d.name, lambda d=d: d.stat().st_mtime), d))
    candidates.sort(reverse=True)
    for _key, d in candidates:
        reason = _why_not(lambda d=d: _check_local(d, world_size, verify))
        if reason is None:
            logger.info("latest checkpoint under %s: %s", base, d)
            return d
        logger.warning("skipping checkpoint %s (%s)", d, reason)
    logger.info("no restorable checkpoint under %s (%d candidate(s))", base, len(candidates))
    return None


def _find_latest_remote(base: Location, world_size: int | None, verify: bool) -> str | None:
    """:func:`find_latest_checkpoint` among the sub-prefixes of an object-store prefix."""
    names = base.subdirs()  # one listing of the root
    if not names and not base.files():
        raise FileNotFoundError(f"checkpoint root not found (no objects under it): {base.name!r}")
    candidates = []
    for name in names:
        loc = base.sub(name)
        try:
            files = loc.files()
        except OSError as e:
            logger.warning("skipping checkpoint %s (unreadable): %s", loc.name, e)
            continue
        if MANIFEST_NAME in files or any(_RANK_FILE.match(n) for n in files):
            candidates.append((_order_key(loc, name, lambda: 0.0), name))
    candidates.sort(reverse=True)
    for _key, name in candidates:
        loc = base.sub(name)  # listed afresh: the check sees the prefix as it is now
        reason = _why_not(lambda loc=loc: check_checkpoint(loc, world_size=world_size, verify=verify))
        if reason is None:
            logger.info("latest checkpoint under %s: %s", base.name, loc.name)
            return str(loc.name)
        logger.warning("skipping checkpoint %s (%s)", loc.name, reason)
    logger.info("no restorable checkpoint under %s (%d candidate(s))", base.name, len(candidates))
    return None


def _order_key(d: Path | Location, name: str, mtime: Callable[[], float]) -> tuple[bool, int, float, str]:
    """``(has step, step, time, name)``: sorts older before newer."""
    manifest: Manifest | None
    try:
        manifest = read_manifest(d)
    except (CheckpointError, OSError):
        manifest = None  # ordered by name and mtime; the check rejects it later
    step = manifest.metadata.get("step") if manifest is not None else None
    if not isinstance(step, int) or isinstance(step, bool):
        ints = _INT.findall(name)
        step = int(ints[-1]) if ints else None
    if manifest is not None:
        t = manifest.created_unix
    else:
        try:
            t = mtime()
        except OSError:
            t = 0.0
    return (step is not None, step if step is not None else 0, t, name)


def _check_local(d: Path, world_size: int | None, verify: bool) -> None:
    """(local) :func:`check_checkpoint`, then every rank file's index."""
    manifest = check_checkpoint(d, world_size=world_size, verify=verify)
    if manifest is not None:
        files = [d / info.file for info in manifest.ranks]
    else:
        ranks = (range(world_size) if world_size is not None else
                 sorted(int(m.group(1)) for m in map(_RANK_FILE.match, os.listdir(d)) if m))
        files = [d / rank_file_name(r) for r in ranks]
    for f in files:
        read_index(f)


def _why_not(check: Callable[[], object]) -> str | None:
    """Why a candidate cannot be restored (``"kind: message"``): what ``check`` raised, or
    ``None`` if it passed."""
    try:
        check()
    except IncompleteCheckpointError as e:
        kind = "world size mismatch" if e.reason.startswith("world size mismatch") else "incomplete"
        return f"{kind}: {e}"
    except CorruptCheckpointError as e:
        return f"corrupt: {e}"
    except CheckpointError as e:
        return f"unreadable: {type(e).__name__}: {e}"
    except OSError as e:  # e.g. deleted or permissions changed while we looked
        return f"unreadable: {type(e).__name__}: {e}"
    return None
