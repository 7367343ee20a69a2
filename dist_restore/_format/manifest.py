"""The commit manifest of a checkpoint directory, file checksums, and the completeness check.

A checkpoint directory holds one ``checkpoint_{rank}.pt`` per rank and, once every rank's
file is durably in place, ``dist_restore_manifest.json``: the world size, each rank file's
size and CRC32, the creation time and user metadata (step, epoch). The manifest is the
commit record: it is written last, atomically, by rank 0, so a directory that has one is
complete. A directory without one is either a plain ``torch.save`` / torch experimental
``CheckpointWriter`` directory (accepted when every rank file is there and no temp file is
left) or an interrupted write (rejected by :func:`check_checkpoint`).

Temp files: every file is first written as ``.{final_name}.{pid}.{token}.tmp`` in the same
directory (``token`` = 8 random hex digits), fsynced and renamed over ``final_name``.
:func:`is_temp_file` recognises any name that starts with ``.`` and ends with ``.tmp``,
which covers these and the writer's other scratch files; a leftover one marks an
interrupted write.

Checksum throughput: :func:`file_checksum` reads 4 MiB chunks into one reused buffer and
runs isal's CRC32 over them. On a 1 GiB file, warm page cache, this project's 2-core dev
VM (other jobs running): ~5 GB/s median of 5 (4.6-5.8); 16 MiB chunks: ~4.1 GB/s (a
buffer that fits the cache is refilled and checksummed faster); the zlib fallback:
~1.8 GB/s. The CRC alone runs at ~8 GB/s (isal) / ~1.8-3 GB/s (zlib) on memory.

Caps (a hostile directory costs no more than these allow):

* the manifest is at most :data:`MAX_MANIFEST_BYTES` (64 MiB: some 350,000 ranks with index
  files); a larger one, or one nested too deeply for the JSON parser, is a
  :class:`~dist_restore.errors.CorruptCheckpointError` naming it;
* a rank file name's number must be below :data:`MAX_RANK_FILES` (2^20): a
  ``checkpoint_{rank}.pt`` beyond it is refused with an error naming it (it only counts where no
  manifest says which files make the checkpoint). Missing ranks are found from the gaps
  between the rank files present, never by listing every rank.

Object stores: :func:`read_manifest`, :func:`check_checkpoint` and :func:`rank_file_count`
also take an ``s3://`` / ``gs://`` / ``az://`` URL (or a :class:`~dist_restore._base.source.Location`)
of a checkpoint prefix. The prefix is listed once; the manifest is read as that listing shows it
(the request pinned to its ETag) and the rank objects' sizes are the listing's. A writer deletes
the manifest before it replaces any rank object and puts the new one only after every rank object
is uploaded, so the listed rank objects are the ones that manifest commits. ``verify`` streams
each object (pinned to its listed ETag) and checks its CRC32.
"""

from __future__ import annotations

import ctypes
import json
import logging
import math
import os
import re
import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from dist_restore._base.crc import crc32_at, crc32_buf
from dist_restore._base.source import ByteSource, Location, UrlPath, is_url, local_path, location
from dist_restore._paths import raise_with_path
from dist_restore._base.ranks import format_ranks
from dist_restore.errors import CheckpointError, CorruptCheckpointError

logger = logging.getLogger(__name__)

MANIFEST_NAME = "dist_restore_manifest.json"
FORMAT_VERSION = 1
TMP_SUFFIX = ".tmp"
CHECKSUM_ALGORITHM = "crc32"

_CHUNK = 4 << 20  # measured faster than 16 MiB: see the module docstring
#: Bytes of an object checksummed at a time: large reads are split and fetched in parallel.
_REMOTE_CHUNK = 64 << 20
_RANK_FILE = re.compile(r"^checkpoint_(\d+)\.pt$")
_CHECKSUM = re.compile(r"^crc32:[0-9a-f]{8}$")
#: A temp file of :func:`temp_path` for a rank file or the manifest (safe for rank 0 to sweep).
_OUR_TEMP = re.compile(r"^\.(checkpoint_\d+\.(?:pt|idx)|" + re.escape(MANIFEST_NAME) + r")\.\d+\.[0-9a-f]{8}\.tmp$")
_MAX_NAMES = 10
#: Largest commit manifest read (bytes); JSON objects cost ~20x their text in memory.
MAX_MANIFEST_BYTES = 64 << 20
#: Rank file numbers must be below this (a directory without a manifest is as large as its
#: highest-numbered rank file says).
MAX_RANK_FILES = 1 << 20
_RANKS_SLOT = "\x00ranks\x00"  # placeholder; "ranks" precedes "metadata", so replacing the first is safe


class IncompleteCheckpointError(CheckpointError):
    """A checkpoint directory was never committed, lost rank files, or has another world size."""


@dataclass(frozen=True)
class RankFileInfo:
    """One rank file as the manifest records it.

    Attributes:
        rank: The rank that wrote it.
        file: Its name inside the checkpoint directory (``checkpoint_{rank}.pt``).
        size: Its size in bytes.
        checksum: ``"crc32:%08x"`` of the whole file.
        index_file: Its index file (``checkpoint_{rank}.idx``), when one was written.
        index_size: The index file's size in bytes.
        index_checksum: ``"crc32:%08x"`` of the index file but its last 4 bytes (see
            :func:`dist_restore._format.indexfile.index_checksum`).
    """

    rank: int
    file: str
    size: int
    checksum: str
    index_file: str | None = None
    index_size: int | None = None
    index_checksum: str | None = None


@dataclass(frozen=True)
class Manifest:
    """The commit record of a checkpoint directory.

    Attributes:
        format_version: :data:`FORMAT_VERSION` when written by this version.
        world_size: Number of ranks (and rank files).
        created_unix: Creation time, seconds since the epoch.
        created: The same time as ISO 8601 UTC, for people.
        checksum_algorithm: ``"crc32"``.
        ranks: Every rank's file, in rank order.
        metadata: JSON-serialisable user data, e.g. ``{"step": 2000, "epoch": 3}``.
    """

    format_version: int
    world_size: int
    created_unix: float
    created: str
    checksum_algorithm: str
    ranks: tuple[RankFileInfo, ...]
    metadata: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def create(cls, ranks: Sequence[RankFileInfo], metadata: dict[str, Any] | None = None, *,
               now: float | None = None) -> Manifest:
        """A manifest for ``ranks`` (one per rank, in rank order), stamped ``now``."""
        if not ranks or [r.rank for r in ranks] != list(range(len(ranks))):
            raise ValueError(f"a manifest needs one entry per rank 0..N-1 in order, got ranks "
                             f"{[r.rank for r in ranks]}")
        t = time.time() if now is None else now
        iso = datetime.fromtimestamp(t, tz=timezone.utc).isoformat(timespec="milliseconds")
        return cls(FORMAT_VERSION, len(ranks), t, iso.replace("+00:00", "Z"), CHECKSUM_ALGORITHM,
                   tuple(ranks), dict(metadata or {}))

    def to_json(self) -> str:
        """Indented JSON; raises ``TypeError``/``ValueError`` if the metadata is not JSON."""
        doc = {
            "format_version": self.format_version,
            "world_size": self.world_size,
            "created": self.created,
            "created_unix": self.created_unix,
            "checksum_algorithm": self.checksum_algorithm,
            "ranks": _RANKS_SLOT,
            "metadata": self.metadata,
        }
        text = json.dumps(doc, indent=2, allow_nan=False)
        # one line per rank: a 1000-rank manifest stays readable
        ranks = ",\n".join("    " + json.dumps(_rank_doc(r)) for r in self.ranks)
        return text.replace(json.dumps(_RANKS_SLOT), f"[\n{ranks}\n  ]", 1) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, *, file: object = MANIFEST_NAME) -> Manifest:
        """Parse and validate a manifest.

        Raises:
            CorruptCheckpointError: malformed JSON, a missing or ill-typed field, an unknown
                format version or checksum algorithm; the message names ``file``.
        """
        def bad(why: str) -> CorruptCheckpointError:
            return CorruptCheckpointError(f"invalid commit manifest: {why}", file=file)

        if len(text) > MAX_MANIFEST_BYTES:
            raise bad(f"{len(text)} bytes, more than the {MAX_MANIFEST_BYTES} accepted")
        try:
            doc = json.loads(text)
        except (ValueError, UnicodeDecodeError) as e:
            raise bad(f"not JSON ({e})") from None
        except RecursionError:
            raise bad("nested too deeply to parse") from None
        if not isinstance(doc, dict):
            raise bad(f"expected a JSON object, got {type(doc).__name__}")
        version = doc.get("format_version")
        if not _is_int(version):
            raise bad("no integer 'format_version'")
        if version != FORMAT_VERSION:
            raise bad(f"unsupported format_version {version} (this dist_restore reads version "
                      f"{FORMAT_VERSION}; a newer dist_restore may have written it)")
        world = _field(doc, "world_size", int, bad)
        created_unix = _field(doc, "created_unix", float, bad)
        created = _field(doc, "created", str, bad)
        algo = _field(doc, "checksum_algorithm", str, bad)
        metadata = _field(doc, "metadata", dict, bad)
        ranks_doc = _field(doc, "ranks", list, bad)
        if algo != CHECKSUM_ALGORITHM:
            raise bad(f"unsupported checksum_algorithm {algo!r} (expected {CHECKSUM_ALGORITHM!r})")
        if world < 1 or len(ranks_doc) != world:
            raise bad(f"world_size {world} but {len(ranks_doc)} rank entries")
        ranks = []
        for i, r in enumerate(ranks_doc):
            if not isinstance(r, dict):
                raise bad(f"ranks[{i}] is not an object")
            idx = r.get("index")
            if idx is not None and not isinstance(idx, dict):
                raise bad(f"ranks[{i}].index is not an object")
            info = RankFileInfo(_field(r, "rank", int, bad), _field(r, "file", str, bad),
                                _field(r, "size", int, bad), _field(r, "checksum", str, bad),
                                *((_field(idx, "file", str, bad), _field(idx, "size", int, bad),
                                   _field(idx, "checksum", str, bad)) if idx is not None else ()))
            if info.index_file is not None and (
                    info.index_file != os.path.basename(info.index_file) or info.index_file in ("", ".", "..")
                    or info.index_size < 0 or not _CHECKSUM.match(info.index_checksum)):
                raise bad(f"ranks[{i}].index is {idx!r}")
            if info.rank != i:
                raise bad(f"ranks[{i}] is for rank {info.rank}")
            if info.file != os.path.basename(info.file) or info.file in ("", ".", ".."):
                raise bad(f"ranks[{i}].file {info.file!r} is not a plain file name")
            if info.size < 0 or not _CHECKSUM.match(info.checksum):
                raise bad(f"ranks[{i}] has size {info.size} / checksum {info.checksum!r}")
            ranks.append(info)
        return cls(version, world, float(created_unix), created, algo, tuple(ranks), metadata)


def _rank_doc(r: RankFileInfo) -> dict[str, Any]:
    doc: dict[str, Any] = {"rank": r.rank, "file": r.file, "size": r.size, "checksum": r.checksum}
    if r.index_file is not None:
        doc["index"] = {"file": r.index_file, "size": r.index_size, "checksum": r.index_checksum}
    return doc


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _field(doc: dict[str, Any], name: str, typ: type, bad: Any) -> Any:
    v = doc.get(name)
    if typ is int:
        ok = _is_int(v)
    elif typ is float:
        ok = (_is_int(v) or isinstance(v, float)) and math.isfinite(v)
    else:
        ok = isinstance(v, typ)
    if not ok:
        raise bad(f"field {name!r} is missing or not a {typ.__name__} (got {type(v).__name__})")
    return v


# -- files ------------------------------------------------------------------------------

def is_temp_file(name: str) -> bool:
    """Whether ``name`` (a base name) is a temp/scratch file of an unfinished write."""
    return len(name) > 1 + len(TMP_SUFFIX) and name.startswith(".") and name.endswith(TMP_SUFFIX)


def temp_path(final: str | os.PathLike[str]) -> Path:
    """A fresh temp name for ``final``, in its directory: ``.{name}.{pid}.{token}.tmp``."""
    p = Path(final)
    return p.with_name(f".{p.name}.{os.getpid()}.{secrets.token_hex(4)}{TMP_SUFFIX}")


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Make renames and unlinks in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        raise_with_path(e, directory, "fsync of the directory")
    finally:
        os.close(fd)


def checksum_fileobj(f: Any) -> tuple[int, str]:
    """``(bytes read, "crc32:%08x")`` of a binary file object from its current position."""
    buf = bytearray(_CHUNK)
    mv = memoryview(buf)
    crc = total = 0
    while True:
        n = f.readinto(mv)
        if not n:
            break
        crc = crc32_buf(mv[:n], crc)
        total += n
    return total, f"crc32:{crc & 0xFFFFFFFF:08x}"


def file_checksum(path: str | os.PathLike[str]) -> str:
    """``"crc32:%08x"`` of the whole file, streamed in 4 MiB chunks (see module docstring)."""
    with open(path, "rb", buffering=0) as f:
        try:
            return checksum_fileobj(f)[1]
        except OSError as e:
            raise_with_path(e, path, "reading it for its checksum")


def write_synced(path: Path, data: bytes) -> None:
    """Write ``data`` to the new file ``path`` and fsync it; errors name the path."""
    try:
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:  # write, flush, fsync: errors that name no file (a full disk)
        raise_with_path(e, path)


def atomic_write_bytes(path: Path, data: bytes, *, tmp: Path | None = None) -> None:
    """Write ``data`` to ``path`` so a reader sees the old file or the whole new one.

    Writes ``tmp`` (default: a fresh :func:`temp_path`), fsyncs it, renames it over
    ``path`` and fsyncs the directory. ``tmp`` is removed if anything fails.
    """
    tmp = temp_path(path) if tmp is None else tmp
    try:
        write_synced(tmp, data)
        try:
            os.replace(tmp, path)
        except OSError as e:
            raise_with_path(e, tmp)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    fsync_dir(path.parent)


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:  # pragma: no cover - best effort cleanup
        logger.warning("could not remove %s: %s", path, e)


def write_manifest(directory: str | os.PathLike[str], manifest: Manifest, *,
                   tmp: Path | None = None) -> Path:
    """Atomically write ``directory/dist_restore_manifest.json``; returns its path.

    Args:
        tmp: The temp file to write through (the writer passes the marker it created when
            the write began); default a fresh one.
    """
    path = Path(directory) / MANIFEST_NAME
    atomic_write_bytes(path, manifest.to_json().encode("utf-8"), tmp=tmp)
    return path


def read_manifest(directory: str | os.PathLike[str] | Location) -> Manifest | None:
    """The directory's manifest, or ``None`` if it has none.

    Args:
        directory: A directory, or an object-store URL or :class:`Location` of a prefix.

    Raises:
        CorruptCheckpointError: the manifest exists but is not valid, or is larger than
            :data:`MAX_MANIFEST_BYTES`.
        IncompleteCheckpointError: (object store) the listed manifest was gone when read.
        OSError: an object store could not be listed or read (naming the URL).
    """
    remote = _remote(directory)
    if remote is not None:
        return _read_remote_manifest(remote)
    path = _local(directory) / MANIFEST_NAME
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_MANIFEST_BYTES + 1)  # never more than the cap, whatever stat says
    except FileNotFoundError:
        return None
    except OSError as e:
        raise_with_path(e, path)
    if len(data) > MAX_MANIFEST_BYTES:
        raise _too_large(path)
    return Manifest.from_json(data, file=path)


def _too_large(path: object) -> CorruptCheckpointError:
    return CorruptCheckpointError(f"invalid commit manifest: larger than the {MAX_MANIFEST_BYTES} bytes "
                                  "accepted", file=path)


def _remote(directory: str | os.PathLike[str] | Location) -> Location | None:
    """The object-store :class:`Location` of ``directory`` (a URL or a remote Location), or
    ``None`` for a local directory."""
    if isinstance(directory, Location):
        return directory if directory.is_remote else None
    return location(directory) if is_url(directory) else None


def _local(directory: str | os.PathLike[str] | Location) -> Path:
    return Path(directory.root) if isinstance(directory, Location) else local_path(directory)


def _read_remote_manifest(loc: Location) -> Manifest | None:
    """The manifest of an object-store prefix: the version its listing shows (a manifest
    replaced since fails the read rather than meet rank objects of another write)."""
    size = loc.files().get(MANIFEST_NAME)
    if size is None:
        return None
    url = loc.join(MANIFEST_NAME)
    if size > MAX_MANIFEST_BYTES:  # refused from the listing, before any byte is fetched
        raise _too_large(url)
    try:
        data = loc.read_bytes(MANIFEST_NAME, MAX_MANIFEST_BYTES)
    except FileNotFoundError:  # not "no manifest": the listed rank objects may be replaced now
        raise IncompleteCheckpointError("the commit manifest was deleted while it was being read: the "
                                        "checkpoint is being overwritten", file=url) from None
    return Manifest.from_json(data, file=url)


def remove_stale_temp_files(directory: Path) -> list[str]:
    """Remove the rank-file and manifest temp files an earlier, interrupted write left."""
    removed = []
    for name in sorted(os.listdir(directory)):
        if _OUR_TEMP.match(name):
            _unlink_quietly(directory / name)
            removed.append(name)
    return removed


# -- the check --------------------------------------------------------------------------

def check_checkpoint(directory: str | os.PathLike[str] | Location, *, world_size: int | None,
                     ranks: Iterable[int] | None = None, verify: bool = False) -> Manifest | None:
    """Check that a checkpoint directory is complete (and, optionally, intact) before restoring.

    With a manifest: the world size must equal ``world_size`` (unless ``None``), and each
    rank file of ``ranks`` (default: all) must exist with the recorded size and, with
    ``verify``, the recorded CRC32 (reads the whole file). Temp files are ignored then.

    Without one, the directory must hold ``checkpoint_{r}.pt`` for every ``r`` in
    ``range(world_size)`` (``world_size=None``: up to the highest rank file present), none
    for a rank outside it, and no temp file; such a directory (``torch.save`` / torch's
    experimental writer) passes with ``None``: there is nothing to check sizes or
    checksums against, so ``ranks`` and ``verify`` do not apply.

    An object-store URL (or remote :class:`Location`) is checked the same way against one
    listing of the prefix, taken before the manifest is read: the sizes are the listing's;
    ``verify`` streams every chosen object (each request pinned to the listed ETag).

    Returns:
        The manifest, or ``None`` for a complete directory without one.

    Raises:
        FileNotFoundError: ``directory`` does not exist (a prefix: holds no object).
        ValueError: a rank in ``ranks`` is outside the checkpoint's world.
        IncompleteCheckpointError: uncommitted (missing rank files, temp files), a rank
            file listed in the manifest is gone, or the world size differs.
        CorruptCheckpointError: invalid manifest, size or checksum mismatch.
        OSError: an object store could not be listed or read (naming the URL).
    """
    remote = _remote(directory)
    if remote is not None:
        return _check_remote(remote, world_size, ranks, verify)
    d = _local(directory)
    if not d.is_dir():
        if d.exists():
            raise NotADirectoryError(f"checkpoint path is not a directory: {str(d)!r}")
        raise FileNotFoundError(f"checkpoint directory not found: {str(d)!r}")
    manifest = read_manifest(d)
    if manifest is None:
        _check_uncommitted(d, world_size)
        return None

    def size_of(file: str) -> int | None:
        try:
            return os.stat(d / file).st_size
        except FileNotFoundError:
            return None

    return _check_against(manifest, d, world_size, ranks, verify, size_of=size_of,
                          checksum_of=lambda file: file_checksum(d / file),
                          read=lambda file, _size: (d / file).read_bytes())


def _check_remote(loc: Location, world_size: int | None, ranks: Iterable[int] | None,
                  verify: bool) -> Manifest | None:
    """:func:`check_checkpoint` of an object-store prefix, against one listing of it."""
    d = UrlPath(loc.name)
    files = loc.files()  # listed before the manifest is read: see the module docstring
    if not files and not loc.subdirs():
        raise FileNotFoundError(f"checkpoint not found: no objects under {loc.name!r}")
    manifest = _read_remote_manifest(loc)
    if manifest is None:
        _check_uncommitted(d, world_size, names=list(files))
        return None
    return _check_against(manifest, d, world_size, ranks, verify, size_of=files.get,
                          checksum_of=lambda file: _object_checksum(loc, file),
                          read=loc.read_bytes)


def _check_against(manifest: Manifest, d: Path | UrlPath, world_size: int | None, ranks: Iterable[int] | None,
                   verify: bool, *, size_of: Callable[[str], int | None], checksum_of: Callable[[str], str],
                   read: Callable[[str, int], bytes]) -> Manifest:
    """The checks of a committed checkpoint: world size, then every chosen rank file's size,
    then (``verify``) checksums and index files, each file reached through the callables."""
    if world_size is not None and world_size != manifest.world_size:
        raise IncompleteCheckpointError(
            f"world size mismatch: checkpoint was written by {manifest.world_size} ranks, this job "
            f"has {world_size}", file=d)
    chosen = sorted(set(range(manifest.world_size) if ranks is None else ranks))
    outside = [r for r in chosen if not 0 <= r < manifest.world_size]
    if outside:
        raise ValueError(f"ranks {format_ranks(outside)} are not in the checkpoint at {str(d)!r}, "
                         f"which has ranks 0-{manifest.world_size - 1}")
    for r in chosen:  # sizes first: cheap, and they catch truncation before any long read
        info = manifest.ranks[r]
        size = size_of(info.file)
        if size is None:
            raise IncompleteCheckpointError("rank file listed in the commit manifest is missing",
                                            file=d / info.file, rank=r)
        if size != info.size:
            raise CorruptCheckpointError(
                f"size mismatch: the commit manifest says {info.size} bytes, the file has {size} "
                "(truncated or overwritten after the commit)", file=d / info.file, rank=r)
    if verify:
        for r in chosen:
            info = manifest.ranks[r]
            got = checksum_of(info.file)
            if got != info.checksum:
                raise CorruptCheckpointError(
                    f"checksum mismatch: the commit manifest says {info.checksum}, the file has {got}",
                    file=d / info.file, rank=r)
            _check_index_file(d, info, read)
    return manifest


def _object_checksum(loc: Location, file: str) -> str:
    """``"crc32:%08x"`` of a file of ``loc``, streamed (an object: in parallel range requests)."""
    with loc.open(file) as src:
        return source_checksum(src)


def source_checksum(src: ByteSource) -> str:
    """``"crc32:%08x"`` of a whole :class:`ByteSource`, read in :data:`_REMOTE_CHUNK` pieces
    into one reused buffer (an object's pieces split into parallel range requests)."""
    n = min(_REMOTE_CHUNK, src.size)
    buf = (ctypes.c_char * max(n, 1))()
    addr = ctypes.addressof(buf)
    crc = off = 0
    while off < src.size:
        k = min(n, src.size - off)
        src.read_into(addr, k, off, key=None)
        crc = crc32_at(addr, k, crc)
        off += k
    return f"crc32:{crc & 0xFFFFFFFF:08x}"


def _check_index_file(d: Path | UrlPath, info: RankFileInfo, read: Callable[[str, int], bytes]) -> None:
    """Warn when a rank's committed index file is gone or differs: restores then read the
    rank file's pickle instead (an index file is never needed, and never trusted unchecked)."""
    if info.index_file is None:
        return
    from dist_restore._format.indexfile import index_checksum

    try:
        got = index_checksum(read(info.index_file, info.index_size or 0))
    except FileNotFoundError:
        got = "missing"
    except (OSError, CheckpointError) as e:  # CheckpointError: an object above its committed size
        got = f"unreadable ({e})"
    if got != info.index_checksum:
        logger.warning("%s: index file %s is %s, the commit manifest says %s; restores of rank %d read "
                       "its pickle instead", d, info.index_file, got, info.index_checksum, info.rank)


def rank_file_count(directory: str | os.PathLike[str] | Location) -> int:
    """How many ranks wrote the checkpoint: the manifest's world size, else one more than
    the highest ``checkpoint_{rank}.pt`` present (0 if none). Opens no rank file. Takes an
    object-store URL or :class:`Location` too.

    Raises:
        CorruptCheckpointError: no manifest, and a rank file numbered :data:`MAX_RANK_FILES`
            or more (naming it).
    """
    remote = _remote(directory)
    d: Path | UrlPath = _local(directory) if remote is None else UrlPath(remote.name)
    manifest = read_manifest(d if remote is None else remote)
    if manifest is not None:
        return manifest.world_size
    present = _rank_files(d, os.listdir(d) if remote is None else list(remote.files()))
    return present[-1] + 1 if present else 0


def _rank_files(d: Path | UrlPath, names: Iterable[str]) -> list[int]:
    """The ranks of the ``checkpoint_{rank}.pt`` among ``names``, sorted; one numbered
    :data:`MAX_RANK_FILES` or more is refused (a directory without a manifest is as large as
    its highest rank file says)."""
    present = set()
    for name in names:
        m = _RANK_FILE.match(name)
        if not m:
            continue
        r = int(m.group(1))
        if r >= MAX_RANK_FILES:
            raise CorruptCheckpointError(
                f"a rank file numbered {r}, beyond the {MAX_RANK_FILES} ranks accepted: not a rank file of this "
                "checkpoint (remove it, or commit the checkpoint with a manifest)", file=d / name)
        present.add(r)
    return sorted(present)


def _gaps(present: list[int], expected: int) -> list[tuple[int, int]]:
    """``[first, last]`` of every run of ranks in ``range(expected)`` that ``present``
    (sorted) lacks: from the gaps between them, without listing every rank."""
    out = []
    nxt = 0
    for r in present:
        if r >= expected:
            break
        if r > nxt:
            out.append((nxt, r - 1))
        nxt = r + 1
    if nxt < expected:
        out.append((nxt, expected - 1))
    return out


def _check_uncommitted(d: Path | UrlPath, world_size: int | None, *, names: list[str] | None = None) -> None:
    if names is None:
        names = os.listdir(d)
    if world_size is None:  # as many ranks as the highest rank file says: capped
        ranks = _rank_files(d, names)
    else:  # the job's world size bounds the work; higher numbers are 'extra' below
        ranks = sorted({int(m.group(1)) for m in map(_RANK_FILE.match, names) if m})
    temps = sorted(n for n in names if is_temp_file(n))
    expected = world_size if world_size is not None else (ranks[-1] + 1 if ranks else 0)
    extra = [r for r in ranks if r >= expected]
    if extra:  # restoring fewer ranks would silently drop the others' shards
        raise IncompleteCheckpointError(
            f"world size mismatch: checkpoint has files for ranks up to {extra[-1]} (no commit manifest), "
            f"this job has {expected}", file=d)
    missing = _gaps(ranks, expected)
    parts = []
    if missing:
        text = ",".join(str(a) if a == b else f"{a}-{b}" for a, b in missing)
        parts.append(f"rank {text} has no file" if missing == [(missing[0][0], missing[0][0])]
                     else f"ranks {text} have no file")
    elif not ranks:
        parts.append("no rank files (checkpoint_{rank}.pt)")
    if temps:
        shown = ", ".join(temps[:_MAX_NAMES])
        more = f" ... and {len(temps) - _MAX_NAMES} more" if len(temps) > _MAX_NAMES else ""
        parts.append(f"temp files present: {shown}{more}")
    if parts:
        raise IncompleteCheckpointError(
            "incomplete checkpoint: no commit manifest; " + "; ".join(parts), file=d)
    logger.debug("%s has no commit manifest; accepting its %d rank files as a plain torch.save "
                 "checkpoint", d, len(ranks))
