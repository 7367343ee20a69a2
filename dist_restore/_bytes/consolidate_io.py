"""Making and writing a consolidated file's records: the bytes side of :mod:`.consolidate`.

A record whose bytes are whole ranges of the rank files (:mod:`dist_restore._bytes.segments`) is copied file to
file by the kernel, its CRC32 combined from the source records'; any other is assembled in
memory with the resharding machinery (:func:`dist_restore._planning.reshard.plan_shards` against a full target,
:func:`dist_restore._bytes.slices.read_jobs`), a batch at a time, handed to the writer and freed. Every source
record a tensor comes from is checked against its zip CRC32 once, whole.
"""

from __future__ import annotations

import ctypes
import dataclasses
import mmap
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Any

import torch

from dist_restore._planning.consolidate_plan import Unit
from dist_restore._base.fcopy import new_buffer, range_crc32, start_writeback
from dist_restore._format.index import CheckpointIndex, read_index
from dist_restore._paths import open_regular
from dist_restore._planning.plan import PlannedLeaf
from dist_restore._bytes.read import ReadStats, produce
from dist_restore._base.regions import LayoutError
from dist_restore._planning.reshard import plan_shards
from dist_restore._bytes.segments import Segment, box_segments, tensor_segments
from dist_restore._bytes.slices import read_jobs
from dist_restore._types import rank_file_name
from dist_restore._format.unpickle import StorageRef, TensorRef
from dist_restore.errors import CheckpointError, CorruptCheckpointError

__all__ = ["ConsolidateProgress", "open_index", "stream"]

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


def open_index(d: Path, rank: int) -> CheckpointIndex:
    file = d / rank_file_name(rank)
    try:
        index = read_index(file)
        index.entries  # noqa: B018 - parse every entry now: a damaged file fails here
        return index
    except CheckpointError as e:
        if e.rank is None:
            raise type(e)(e.reason, file=e.file or file, rank=rank, key=e.key) from e
        raise


def _batches(units: Sequence[Unit], limit: int) -> Iterator[list[Unit]]:
    batch: list[Unit] = []
    size = 0
    for u in units:
        if batch and size + u.nbytes > limit:
            yield batch
            batch, size = [], 0
        batch.append(u)
        size += u.nbytes
    if batch:
        yield batch


class _Arena:
    """One buffer, reused batch after batch, for the tensors a batch makes in memory.

    A batch's tensors are written and dropped before the next batch is made, so the next
    one can take the same bytes. Allocating and freeing tens of MB per batch instead let
    glibc's heap keep some of them (its mmap threshold rises after such frees): the peak RSS
    of one consolidate varied by ~40 MiB from run to run.
    """

    _ALIGN = 64

    def __init__(self) -> None:
        self._buf: torch.Tensor | None = None
        self._pos = 0

    @classmethod
    def span(cls, nbytes: int) -> int:
        return -(-nbytes // cls._ALIGN) * cls._ALIGN

    def start(self, nbytes: int) -> None:
        """A new batch that needs ``nbytes`` (sum of :meth:`span` of its tensors)."""
        self._pos = 0
        if nbytes and (self._buf is None or self._buf.numel() < nbytes):
            self._buf = None  # the old buffer goes before the larger one comes
            self._buf = torch.empty(nbytes, dtype=torch.uint8)

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A contiguous tensor in the buffer (its own allocation if empty or it does not fit)."""
        n = prod(shape) * dtype.itemsize
        buf = self._buf
        if n == 0 or buf is None or self._pos + n > buf.numel():
            return torch.empty(shape, dtype=dtype)
        t = buf[self._pos : self._pos + n].view(dtype).view(shape)
        self._pos += self.span(n)
        return t


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
            self.indexes[f] = open_index(self.d, f)
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


def stream(d: Path, units: Sequence[Unit], indexes: dict[int, CheckpointIndex], nfiles: int, writer: Any,
            stats: ReadStats, *, verify: bool, batch_bytes: int,
            progress: Callable[[ConsolidateProgress], None] | None, fd: int) -> int:
    """Make every unit's bytes, a batch at a time, and hand them to ``writer`` in order;
    returns the bytes copied file to file.

    A unit whose bytes are whole ranges of the rank files (see :mod:`dist_restore._bytes.segments`) is copied
    file to file by the kernel; the others are made in memory (a batch of at most
    ``batch_bytes``, or one larger tensor), written and freed.
    """
    total = sum(u.nbytes for u in units)
    done = done_bytes = 0
    copied = 0
    flushed = 0
    arena = _Arena()
    with _Sources(d, indexes[0], stats) as src:
        try:
            for batch in _batches(units, batch_bytes):
                ways = _plan_batch(batch, src, nfiles, stats, verify, arena)
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


def _plan_batch(batch: Sequence[Unit], src: _Sources, nfiles: int, stats: ReadStats,
                verify: bool, arena: _Arena | None = None) -> list[list[Segment] | torch.Tensor]:
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
        arena = arena if arena is not None else _Arena()
        arena.start(sum(_Arena.span(lf.source.nbytes) for _i, lf in fill_plain)
                    + sum(_Arena.span(j.target.numel() * j.target.element_size()) for j in fill_jobs))
        if fill_plain:
            leaves = []
            for i, lf in fill_plain:
                if verify:
                    src.verify(0, lf.source.storage.key, lf.key)
                ways[i] = arena.take(tuple(lf.source.size), lf.source.dtype)
                leaves.append(PlannedLeaf(lf.key, lf.path, lf.source, ways[i]))
            produce(index0, leaves, verify="none", stats=stats)
        if fill_jobs:
            assert shards is not None
            real = []
            for job in fill_jobs:
                if verify:
                    for p in job.pieces:
                        src.verify(p.file, shards.entries[(p.file, job.key)].storage.key, job.key)
                ways[at[job.key]] = arena.take(tuple(job.target.shape), job.target.dtype)
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
