"""Consolidate a sharded checkpoint directory into one ``torch.save`` or safetensors file.

:func:`consolidate` writes the full (unsharded) state dict of ``DIR/checkpoint_{rank}.pt``:
every DTensor entry becomes a plain tensor of its global shape, assembled from the byte
ranges of the rank files that hold it (the resharding plan of :mod:`._reshard`, the byte
mover of :mod:`._slices`); every other entry comes from rank 0's file. It streams: tensors
are made in pickle order, a batch of at most ``batch_bytes`` (or one larger tensor) at a
time, written out and freed, so the memory it needs is about the largest tensor plus one
batch, however large the checkpoint. Nothing else is loaded: rank 0's file is indexed, the
others only as a tensor needs them.

Steps, in order:

1. Check the checkpoint is committed (manifest sizes, or every rank file present and no
   temp file), index rank 0's file, and check its DeviceMeshes span as many ranks as there
   are rank files. Plan the output from the index alone (``torch``: the nested tree and its
   storage records; ``safetensors``: the header). Nothing is written before this succeeds.
2. Write to a temp file next to the output: ``data.pkl`` (or the header) first, then every
   tensor's bytes as they are made.
3. ``fsync`` the temp file, rename it over the output, ``fsync`` the directory. On any
   failure the temp file is removed: no partial output is ever left under the output name.
"""

from __future__ import annotations

import collections
import ctypes
import dataclasses
import logging
import math
import mmap
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from dist_restore._dtensor import DTensorRef
from dist_restore._fcopy import new_buffer, range_crc32, start_writeback
from dist_restore._gc import paused
from dist_restore._index import SOURCE_TENSOR_TYPES, CheckpointIndex, iter_leaves, read_index
from dist_restore._keypath import RawPath, join_index, join_key
from dist_restore._manifest import (MANIFEST_NAME, IncompleteCheckpointError, check_checkpoint, fsync_dir,
                                    rank_file_count, temp_path)
from dist_restore._paths import open_regular, raise_with_path
from dist_restore._plan import PlannedLeaf, view_out_of_bounds
from dist_restore._read import ReadStats, produce
from dist_restore._regions import LayoutError
from dist_restore._reshard import plan_shards
from dist_restore._safetensors import SafetensorsWriter, TensorSpec, unsupported
from dist_restore._shared import SharedSpec, make_selector
from dist_restore._segments import Segment, box_segments, contiguous_strides, tensor_segments
from dist_restore._slices import read_jobs
from dist_restore._torchzip import StorageOut, TensorOut, TorchZipWriter
from dist_restore._types import rank_file_name
from dist_restore._unpickle import StorageRef, TensorRef
from dist_restore.errors import CheckpointError, CorruptCheckpointError

logger = logging.getLogger(__name__)

__all__ = ["ConsolidateProgress", "ConsolidateResult", "Format", "consolidate"]

Format = Literal["torch", "safetensors"]
_FORMATS = ("torch", "safetensors")
_BATCH = 32 << 20  # small tensors are made and written in batches of about this many bytes
_WRITEBACK = 64 << 20  # the output's pages are sent to disk (and dropped) every this many bytes


@dataclass(frozen=True)
class ConsolidateProgress:
    """Where a :func:`consolidate` stands, after each tensor written.

    Attributes:
        done: Storage records (``torch``) or tensors (``safetensors``) written so far.
        total: How many there are.
        bytes_done: Their bytes written so far.
        bytes_total: Their bytes in all.
        key: The key of the last one written.
    """

    done: int
    total: int
    bytes_done: int
    bytes_total: int
    key: str


@dataclass(frozen=True)
class ConsolidateResult:
    """What :func:`consolidate` wrote.

    Attributes:
        out: The output file.
        format: ``"torch"`` or ``"safetensors"``.
        tensors: Tensor entries written.
        tensor_bytes: Bytes of tensor data written (storage records or tensors).
        file_bytes: Size of the output file.
        rank_files: Rank files in the checkpoint.
        files_read: Rank files opened (indexed or read).
        bytes_read: Bytes of tensor data read from the rank files.
        bytes_copied: Part of them copied file to file by the kernel (whole rows of shards,
            whole records), never held in this process's memory; the rest was assembled
            in memory.
        skipped: Keys of non-tensor values not written (``safetensors`` holds tensors only).
        seconds: Wall time of the whole call.
    """

    out: Path
    format: Format
    tensors: int
    tensor_bytes: int
    file_bytes: int
    rank_files: int
    files_read: int
    bytes_read: int
    bytes_copied: int
    skipped: tuple[str, ...]
    seconds: float


@dataclass(frozen=True, slots=True, eq=False)
class _Unit:
    """One record of the output and where its bytes come from.

    ``source``: a :class:`DTensorRef` (assembled from the rank files), a :class:`TensorRef`
    (read from rank 0's file into a contiguous tensor) or a :class:`StorageRef` (rank 0's
    storage record, copied as it is)."""

    key: str
    path: RawPath
    source: Any
    out: StorageOut | TensorSpec
    nbytes: int


def consolidate(
    directory: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    format: Format = "torch",
    keys: SharedSpec = None,
    force: bool = False,
    verify: bool = True,
    batch_bytes: int = _BATCH,
    progress: Callable[[ConsolidateProgress], None] | None = None,
) -> ConsolidateResult:
    """Write the full state dict of a sharded checkpoint directory as one file.

    Args:
        directory: The checkpoint directory (``checkpoint_{rank}.pt`` per rank).
        out: The file to write.
        format: ``"torch"``: a ``torch.save`` file with the checkpoint's nesting, every
            DTensor a plain tensor of its global shape, loadable by
            ``torch.load(weights_only=True)`` (views of one storage in rank 0's file stay
            views of one storage; every tensor is saved as a CPU tensor).
            ``"safetensors"``: one tensor per dotted key (``model.up.weight``,
            ``optim.state.0.exp_avg``); non-tensor values are left out (see ``skipped``).
        keys: Only the entries these patterns select (key prefixes or globs, as the
            ``shared=`` of a restore; or a predicate on dotted keys). Containers with no
            selected entry are left out, and so are unselected list items.
        force: Replace ``out`` if it exists.
        verify: Check every storage record a tensor is taken from against its zip CRC32
            (the whole record, once, whatever part of it the tensor needs).
        batch_bytes: Tensors smaller than this are made and written in batches of about
            this many bytes; peak memory is about ``max(largest tensor, batch_bytes)``.
        progress: Called after every record written.

    Returns:
        What was written.

    Raises:
        ValueError: a bad argument, a pattern that selects nothing, a dtype the format
            cannot hold, or an entry consolidate cannot write (quantized, sparse, ...).
        FileExistsError: ``out`` exists and ``force`` is false.
        FileNotFoundError: no checkpoint directory, no rank file, or no directory for ``out``.
        IncompleteCheckpointError: uncommitted checkpoint, or rank files missing.
        CorruptCheckpointError: a truncated or corrupt rank file, a CRC32 mismatch, or rank
            files whose layouts do not fit together.
        CheckpointError: a layout consolidate cannot map (names the key).
    """
    t0 = time.perf_counter()
    if format not in _FORMATS:
        raise ValueError(f"format must be one of {_FORMATS}, got {format!r}")
    if batch_bytes < 0:
        raise ValueError(f"batch_bytes must be >= 0, got {batch_bytes}")
    d, dst = Path(directory), Path(out)
    _check_out(d, dst, force)
    with paused():
        check_checkpoint(d, world_size=None)
        nfiles = rank_file_count(d)
        if nfiles == 0:
            raise FileNotFoundError(f"no rank files (checkpoint_<rank>.pt) in {str(d)!r}")
        indexes: dict[int, CheckpointIndex] = {0: _open_index(d, 0)}
        index0 = indexes[0]
        _check_index(index0, nfiles)
        select = make_selector(keys) if keys is not None else (lambda k: True)
        if format == "torch":
            tree, units, skipped = _plan_torch(index0, select)
        else:
            tree, units, skipped = None, *_plan_safetensors(index0, select)
        n_tensors = sum(1 for e in index0 if e.kind in ("tensor", "dtensor") and select(e.key))
        if n_tensors == 0 and not (format == "torch" and _has_values(index0, select)):
            if keys is None:
                raise ValueError(f"{index0.file} holds no tensor to write")
            shown = "a predicate" if callable(keys) else repr(keys)
            what = "no entry" if format == "torch" else "no tensor"
            raise ValueError(f"keys {shown} select {what} of {index0.file}")
        stats = ReadStats()
        tmp = temp_path(dst)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            try:
                if format == "torch":
                    writer: Any = TorchZipWriter(fd, tree)
                else:
                    writer = SafetensorsWriter(fd, [u.out for u in units], {"format": "pt"})
                copied = _stream(d, units, indexes, nfiles, writer, stats, verify=verify,
                                 batch_bytes=batch_bytes, progress=progress, fd=fd)
                file_bytes = writer.finish()
                os.fsync(fd)
            except OSError as e:  # write, fsync: errors that name no file (a full disk)
                raise_with_path(e, tmp)
            finally:
                os.close(fd)
            os.replace(tmp, dst)
        except BaseException:
            _unlink_quietly(tmp)
            raise
        fsync_dir(dst.parent)
    result = ConsolidateResult(dst, format, n_tensors, sum(u.nbytes for u in units), file_bytes, nfiles,
                               len(indexes), stats.bytes_read, copied, tuple(skipped), time.perf_counter() - t0)
    logger.info("consolidated %s (%d rank files) into %s: %d tensors, %d bytes in %.2fs", d, nfiles, dst,
                result.tensors, result.tensor_bytes, result.seconds)
    return result


# -- checks ----------------------------------------------------------------------------------


def _check_out(d: Path, dst: Path, force: bool) -> None:
    if dst.is_dir():
        raise IsADirectoryError(f"output path is a directory: {str(dst)!r}")
    if (dst.exists() or dst.is_symlink()) and not force:
        raise FileExistsError(f"output file exists: {str(dst)!r} (use --force / force=True to replace it)")
    if not dst.parent.is_dir():
        raise FileNotFoundError(f"output directory does not exist: {str(dst.parent)!r}")
    if d.is_dir() and dst.parent.resolve() == d.resolve() and (
            dst.name == MANIFEST_NAME or (dst.name.startswith("checkpoint_") and dst.name.endswith(".pt"))):
        raise ValueError(f"output {str(dst)!r} would replace a file of the checkpoint itself")


def _open_index(d: Path, rank: int) -> CheckpointIndex:
    file = d / rank_file_name(rank)
    try:
        index = read_index(file)
        index.entries  # noqa: B018 - parse every entry now: a damaged file fails here
        return index
    except CheckpointError as e:
        if e.rank is None:
            raise type(e)(e.reason, file=e.file or file, rank=rank, key=e.key) from e
        raise


def _check_index(index: CheckpointIndex, nfiles: int) -> None:
    if index.format != "zip" or not index.native_order:
        why = "a legacy (non-zip) torch.save file" if index.format != "zip" else "of the other byte order"
        raise ValueError(f"{index.file} is {why}; consolidate reads zip-format files of this machine's byte "
                         "order: re-save it with torch.save's defaults")
    sizes = {e.layout.mesh.root_size for e in index if e.kind == "dtensor"} - {None}
    if sizes and max(sizes) != nfiles:
        raise IncompleteCheckpointError(
            f"the saved DeviceMesh spans {max(sizes)} ranks, but the checkpoint has {nfiles} rank file(s)"
            + (": rank files are missing" if max(sizes) > nfiles else ""), file=index.file.parent)


def _has_values(index: CheckpointIndex, select: Callable[[str], bool]) -> bool:
    return any(select(e.key) for e in index)


def _not_writable(key: str, value: Any, file: Path) -> CheckpointError:
    kind = getattr(value, "kind", type(value).__name__)
    return CheckpointError(f"a {kind} tensor: consolidate writes dense tensors and DTensors only", file=file,
                           key=key)


# -- planning the output -----------------------------------------------------------------------


def _plan_torch(index: CheckpointIndex, select: Callable[[str], bool]) -> tuple[Any, list[_Unit], list[str]]:
    """The output tree (``TensorOut`` leaves) and its storage records, in pickle order."""
    units: list[_Unit] = []
    storages: dict[str, StorageOut] = {}  # rank 0's storage key -> its record in the output
    dropped = object()

    def new_key() -> str:
        return str(len(units))

    def leaf(v: Any, key: str, path: RawPath) -> Any:
        if isinstance(v, DTensorRef):
            st = StorageOut(new_key(), v.dtype, math.prod(v.size))
            units.append(_Unit(key, path, v, st, st.nbytes))
            return TensorOut(st, 0, tuple(v.size), contiguous_strides(v.size), v.requires_grad, v.is_parameter)
        if isinstance(v, TensorRef):
            problem = view_out_of_bounds(v)
            if problem:
                raise CorruptCheckpointError(problem, file=index.file, rank=0, key=key)
            st = storages.get(v.storage.key)
            if st is None:
                nbytes = v.storage.nbytes
                if nbytes % v.dtype.itemsize:
                    raise CorruptCheckpointError(f"storage of {nbytes} bytes does not hold whole {v.dtype} "
                                                 "elements", file=index.file, rank=0, key=key)
                st = storages[v.storage.key] = StorageOut(new_key(), v.dtype, nbytes // v.dtype.itemsize)
                units.append(_Unit(key, path, v.storage, st, nbytes))
            elif st.dtype != v.dtype:
                raise ValueError(f"{index.file}: key {key!r} views a storage as {v.dtype} that another entry "
                                 f"views as {st.dtype}; torch.save cannot write that")
            if v.state:
                logger.warning("%s: key %r: the Parameter's Python attributes %s are not written", index.file,
                               key, sorted(v.state) if isinstance(v.state, Mapping) else "")
            return TensorOut(st, v.storage_offset, tuple(v.size), tuple(v.stride), v.requires_grad,
                             v.is_parameter, v.metadata)
        if isinstance(v, SOURCE_TENSOR_TYPES):
            raise _not_writable(key, v, index.file)
        if type(v).__module__.startswith("dist_restore"):  # a stand-in (a DeviceMesh saved as a value)
            raise CheckpointError(f"a {getattr(v, 'kind', type(v).__name__)} value outside a DTensor: "
                                  "consolidate cannot write it", file=index.file, key=key)
        return v

    def keep(kept: Any, original: Any, key: str) -> bool:
        """A container stays if anything below it does, or it is empty and selected (or the root)."""
        return bool(kept) or (not original and select(key)) or not key

    def build(v: Any, key: str, path: RawPath) -> Any:
        if isinstance(v, Mapping):
            m = type(v)() if type(v) in (dict, collections.OrderedDict) else {}
            if isinstance(m, collections.OrderedDict):  # a state dict's _metadata rides along
                m.__dict__.update(getattr(v, "__dict__", {}))
            for k, c in v.items():
                sub = build(c, join_key(key, k), path + (k,))
                if sub is not dropped:
                    m[k] = sub
            return m if keep(m, v, key) else dropped
        if isinstance(v, (list, tuple)) and not isinstance(v, torch.Size):
            kept = [x for i, c in enumerate(v) if (x := build(c, join_index(key, i), path + (i,))) is not dropped]
            return (kept if isinstance(v, list) else tuple(kept)) if keep(kept, v, key) else dropped
        return leaf(v, key, path) if select(key) else dropped

    tree = build(index.tree, "", ())
    return tree, units, []


def _plan_safetensors(index: CheckpointIndex, select: Callable[[str], bool]) -> tuple[list[_Unit], list[str]]:
    """One tensor per selected tensor entry, in pickle order; the non-tensor keys skipped."""
    units: list[_Unit] = []
    skipped: list[str] = []
    for key, path, v in iter_leaves(index.tree):
        if not select(key):
            continue
        if isinstance(v, (DTensorRef, TensorRef)):
            problem = unsupported(v.dtype)
            if problem:
                raise ValueError(f"{index.file}: key {key!r}: {problem}")
            bounds = view_out_of_bounds(v)
            if bounds:
                raise CorruptCheckpointError(bounds, file=index.file, rank=0, key=key)
            spec = TensorSpec(key, v.dtype, tuple(v.size))
            units.append(_Unit(key, path, v, spec, spec.nbytes))
        elif isinstance(v, SOURCE_TENSOR_TYPES):
            raise _not_writable(key, v, index.file)
        else:
            skipped.append(key)
    return units, skipped


# -- streaming the data ------------------------------------------------------------------------


def _batches(units: Sequence[_Unit], limit: int) -> Iterator[list[_Unit]]:
    batch: list[_Unit] = []
    size = 0
    for u in units:
        if batch and size + u.nbytes > limit:
            yield batch
            batch, size = [], 0
        batch.append(u)
        size += u.nbytes
    if batch:
        yield batch


class _Sources:
    """The rank files one consolidate reads: indexed on first use, each opened once."""

    def __init__(self, d: Path, index0: CheckpointIndex, stats: ReadStats) -> None:
        self.d = d
        self.stats = stats
        self.indexes: dict[int, CheckpointIndex] = {0: index0}
        self._open: dict[int, tuple[int, mmap.mmap]] = {}
        self._verified: set[tuple[int, str]] = set()
        self._buf = new_buffer()

    def __enter__(self) -> _Sources:
        return self

    def __exit__(self, *exc: Any) -> None:
        for fd, mm in self._open.values():
            mm.close()
            os.close(fd)
        self._open.clear()

    def index(self, f: int) -> CheckpointIndex:
        if f not in self.indexes:
            self.indexes[f] = _open_index(self.d, f)
        return self.indexes[f]

    def _handle(self, f: int) -> tuple[int, mmap.mmap]:
        if f not in self._open:
            index = self.index(f)
            fd = open_regular(index.file)
            try:
                size = os.fstat(fd).st_size
                if size != index.file_size:
                    raise CorruptCheckpointError(f"file changed size since it was indexed ({index.file_size} -> "
                                                 f"{size} bytes)", file=index.file, rank=f)
                self._open[f] = (fd, mmap.mmap(fd, size, access=mmap.ACCESS_READ))  # local headers only
            except BaseException:
                os.close(fd)
                raise
        return self._open[f]

    def fd(self, f: int) -> int:
        return self._handle(f)[0]

    def data_offset(self, f: int, skey: str) -> int:
        return self.index(f).data_offset(skey, self._handle(f)[1])

    def record_size(self, f: int, skey: str) -> int:
        return self.index(f).records[skey].size

    def crc(self, f: int, offset: int, nbytes: int, key: str) -> int:
        """CRC32 of a byte range of rank file ``f``."""
        try:
            return range_crc32(self.fd(f), offset, nbytes, self._buf)
        except EOFError as e:
            raise CorruptCheckpointError(str(e), file=self.index(f).file, rank=f, key=key) from None

    def verify(self, f: int, skey: str, key: str) -> None:
        """Check a whole storage record against its zip CRC32, once: whatever part of it a
        tensor takes, its bytes are then known good."""
        if (f, skey) in self._verified:
            return
        rec = self.index(f).records[skey]
        if self.crc(f, self.data_offset(f, skey), rec.size, key) != rec.crc32:
            raise CorruptCheckpointError(f"CRC32 mismatch in storage record data/{skey}: tensor data is corrupt",
                                         file=self.index(f).file, rank=f, key=key)
        self._verified.add((f, skey))
        self.stats.bytes_verified += rec.size


def _stream(d: Path, units: Sequence[_Unit], indexes: dict[int, CheckpointIndex], nfiles: int, writer: Any,
            stats: ReadStats, *, verify: bool, batch_bytes: int,
            progress: Callable[[ConsolidateProgress], None] | None, fd: int) -> int:
    """Make every unit's bytes, a batch at a time, and hand them to ``writer`` in order;
    returns the bytes copied file to file.

    A unit whose bytes are whole ranges of the rank files (see :mod:`._segments`) is copied
    file to file by the kernel; the others are made in memory (a batch of at most
    ``batch_bytes``, or one larger tensor), written and freed.
    """
    total = sum(u.nbytes for u in units)
    done = done_bytes = 0
    copied = 0
    flushed = 0
    with _Sources(d, indexes[0], stats) as src:
        try:
            for batch in _batches(units, batch_bytes):
                ways = _plan_batch(batch, src, nfiles, stats, verify)
                for u, way in zip(batch, ways):
                    writer.begin(u.out)
                    if isinstance(way, list):
                        for seg in way:
                            crc = _segment_crc(src, seg, u.key, verify=verify, needed=writer.needs_crc)
                            writer.copy(src.fd(seg.file), seg.offset, seg.nbytes, crc)
                            stats.bytes_read += seg.nbytes
                            copied += seg.nbytes
                    elif u.nbytes:
                        writer.write((ctypes.c_char * u.nbytes).from_address(way.data_ptr()))
                    writer.end()
                    if writer.pos - flushed >= _WRITEBACK:
                        start_writeback(fd, flushed, writer.pos)
                        flushed = writer.pos
                    done += 1
                    done_bytes += u.nbytes
                    if progress is not None:
                        progress(ConsolidateProgress(done, len(units), done_bytes, total, u.key))
                del ways, way  # the batch's tensors are freed before the next batch is made
        finally:
            indexes.update(src.indexes)
    return copied


def _segment_crc(src: _Sources, seg: Segment, key: str, *, verify: bool, needed: bool) -> int | None:
    """The CRC32 of a segment's bytes when the writer needs it; its record checked first with
    ``verify``."""
    if verify:
        src.verify(seg.file, seg.record, key)
    if seg.whole:
        return src.index(seg.file).records[seg.record].crc32
    if not needed:
        return None
    return src.crc(seg.file, seg.offset, seg.nbytes, key)


def _plan_batch(batch: Sequence[_Unit], src: _Sources, nfiles: int, stats: ReadStats,
                verify: bool) -> list[list[Segment] | torch.Tensor]:
    """For every unit of ``batch``: its file ranges, or a tensor made in memory and filled."""
    index0 = src.indexes[0]
    ways: list[Any] = [None] * len(batch)
    fill_plain: list[tuple[int, PlannedLeaf]] = []
    dtensors: list[PlannedLeaf] = []
    at: dict[str, int] = {}
    for i, u in enumerate(batch):
        if isinstance(u.source, StorageRef):  # a record of rank 0's, copied as it is
            skey = u.source.key
            ways[i] = [Segment(0, src.data_offset(0, skey), src.record_size(0, skey), skey, True)] if u.nbytes else []
        elif isinstance(u.source, TensorRef):
            skey = u.source.storage.key
            segs = tensor_segments(0, u.source, src.data_offset(0, skey), src.record_size(0, skey))
            if segs is None:
                fill_plain.append((i, PlannedLeaf(u.key, u.path, u.source, None)))
            ways[i] = segs
        else:
            at[u.key] = i
            dtensors.append(PlannedLeaf(u.key, u.path, u.source, torch.empty(u.source.size, dtype=u.source.dtype,
                                                                          device="meta")))
    try:
        fill_jobs = []
        shards = None
        if dtensors:
            try:
                shards = plan_shards(dtensors, home=0, home_index=index0, own=0, nfiles=nfiles,
                                     open_index=src.index, spread=0)
            except LayoutError as e:
                raise CheckpointError(str(e), file=src.d) from None
            for job in shards.jobs:
                pieces = [(p.file, shards.entries[(p.file, job.key)], p.boxes) for p in job.pieces]
                segs = box_segments(tuple(job.target.shape), job.target.element_size(), pieces, src.data_offset,
                                    src.record_size)
                if segs is None:
                    fill_jobs.append(job)
                ways[at[job.key]] = segs
        if fill_plain:
            leaves = []
            for i, lf in fill_plain:
                if verify:
                    src.verify(0, lf.source.storage.key, lf.key)
                ways[i] = torch.empty(lf.source.size, dtype=lf.source.dtype)
                leaves.append(PlannedLeaf(lf.key, lf.path, lf.source, ways[i]))
            produce(index0, leaves, verify="none", stats=stats)
        if fill_jobs:
            assert shards is not None
            real = []
            for job in fill_jobs:
                if verify:
                    for p in job.pieces:
                        src.verify(p.file, shards.entries[(p.file, job.key)].storage.key, job.key)
                ways[at[job.key]] = torch.empty(tuple(job.target.shape), dtype=job.target.dtype)
                real.append(dataclasses.replace(job, target=ways[at[job.key]]))
            read_jobs(real, shards.indexes, shards.entries, stats, verify=False)
    except CheckpointError as e:
        if e.rank is None and e.file is not None and Path(e.file).name.startswith("checkpoint_"):
            raise type(e)(e.reason, file=e.file, rank=_rank_of(Path(e.file).name), key=e.key) from e
        raise
    return ways


def _rank_of(name: str) -> int | None:
    try:
        return int(name.removeprefix("checkpoint_").removesuffix(".pt"))
    except ValueError:
        return None


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:  # pragma: no cover - best effort cleanup
        logger.warning("could not remove %s: %s", path, e)
