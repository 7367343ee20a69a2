"""Helpers shared by the ``dist-restore`` subcommands: scanning a directory, the manifest,
and plain-text formatting."""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

from dist_restore._format.manifest import MANIFEST_NAME, Manifest, is_temp_file, read_manifest
from dist_restore.errors import CheckpointError

_RANK_FILE = re.compile(r"checkpoint_(0|[1-9][0-9]*)\.pt")


def _scan(directory: Path) -> tuple[dict[int, Path], list[str]]:
    """The rank files ``{rank: path}`` (sorted) and the leftover temp file names in ``directory``."""
    ranks: dict[int, Path] = {}
    temps: list[str] = []
    for name in sorted(os.listdir(directory)):
        if m := _RANK_FILE.fullmatch(name):
            ranks[int(m.group(1))] = directory / name
        elif is_temp_file(name):
            temps.append(name)
    return dict(sorted(ranks.items())), temps


def _try_manifest(directory: Path) -> tuple[Manifest | None, str | None]:
    try:
        return read_manifest(directory), None
    except (CheckpointError, OSError, ValueError) as e:
        return None, _msg(e)


def _manifest_dict(manifest: Manifest | None, error: str | None) -> dict[str, Any] | None:
    if error is not None:
        return {"error": error}
    return None if manifest is None else json.loads(manifest.to_json())


def _manifest_line(m: dict[str, Any] | None) -> str:
    if m is None:
        return f"none ({MANIFEST_NAME} not found)"
    if "error" in m:
        return f"unreadable: {m['error']}"
    return (f"{MANIFEST_NAME} (format {m.get('format_version')}, world size {m.get('world_size')}, "
            f"created {m.get('created')}, checksums {m.get('checksum_algorithm')})")


def _not_a_file(path: Path) -> str:
    """Why ``path`` (not a regular file) is no rank file: a directory, a dangling link, absent."""
    if path.is_symlink() and not path.exists():
        try:
            return f"a symbolic link to {os.readlink(path)!r}, which does not exist"
        except OSError:
            return "a dangling symbolic link"
    if path.is_dir():
        return "a directory, not a rank file"
    if path.exists():
        return "not a regular file"
    return "rank file not found"


def _name(rank: int) -> str:
    return f"checkpoint_{rank}.pt"


def _msg(e: BaseException) -> str:
    """The message of ``e`` without the file path our errors append (the line names the file)."""
    if isinstance(e, CheckpointError):
        return e.reason
    return f"{type(e).__name__}: {e}"


def _fail(message: str) -> int:
    print(f"dist-restore: error: {message}", file=sys.stderr)
    return 1


def _dtype(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def _shape(shape: Sequence[int]) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def _short_repr(value: Any, limit: int = 40) -> str:
    r = repr(value)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover - unreachable


def _table(rows: list[tuple[str, ...]], *, indent: int, right: Collection[int] = ()) -> None:
    """Prints ``rows`` as aligned columns (columns in ``right`` right-aligned)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        print((" " * indent + "  ".join(cells)).rstrip())
