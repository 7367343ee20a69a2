"""Moving the bytes of a catalogue plan: boxes of row-major chunks into target tensors, by ``pread``.

A box of a row-major chunk is a set of equal *runs*, contiguous byte ranges of the file: the
trailing dimensions the box covers whole join the first one it does not into one run, and the
leading ones enumerate the runs. A run lands straight in the target (``pread`` into its
memory) when the target slice holds it contiguously, on the CPU, in the file's dtype;
otherwise the box is read into a small staging tensor and copied (``copy_``: strided, other
devices, casts, conj/neg views). Only the bytes of the runs are read: never a whole tensor or
file for a slice, never a page fault on a mapping. Large boxes are split into parts of at
most ``_PART`` bytes (which bounds staging too); parts run on a few I/O threads (``pread``
through ctypes releases the GIL). Every file is opened read-only and must still have the size
it had when planned.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from dist_restore._base.crc import crc32_at, crc32_combine, fold_fragments
from dist_restore._base.regions import Box
from dist_restore._base.source import ByteSource
from dist_restore._bytes.read import _io_pool
from dist_restore._bytes.shares import RecordPieces, grid_of, share_at
from dist_restore._format.catalog import Catalog, Chunk
from dist_restore._planning.catalog import CatalogJob
from dist_restore.errors import CorruptCheckpointError

_PART = 8 << 20  # bytes of one part (a task of the I/O pool; the largest staging buffer)
_BATCH = 4 << 20  # small parts are handed to the pool together, up to this many bytes
_MAX_THREADS = 4


def io_threads() -> int:
    """I/O threads per rank: ``DIST_RESTORE_IO_THREADS``, else the cores this rank's share of the
    host gives (``os.sched_getaffinity`` over the ranks on it, ``LOCAL_WORLD_SIZE`` as torchrun
    sets it), between 1 and 4: more threads than cores only contend for the memory bus on data
    in the page cache."""
    env = os.environ.get("DIST_RESTORE_IO_THREADS")
    if env:
        return max(1, int(env))
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(1, min(_MAX_THREADS, cores // local))



def split_box(box: Box, isz: int, limit: int = _PART) -> list[Box]:
    """``box`` cut along its leading dimensions into boxes of at most ``limit`` bytes (or one
    element's row, when that alone is larger: cut further along the next dimension)."""
    if box.numel * isz <= limit or not box.size:
        return [box]
    d = next((i for i, n in enumerate(box.size) if n > 1), None)
    if d is None:
        return [box]
    unit = math.prod(box.size[d + 1:]) * isz  # bytes of one step along d
    per = max(1, limit // unit) if unit else box.size[d]
    out: list[Box] = []
    for a in range(0, box.size[d], per):
        n = min(per, box.size[d] - a)
        sub = Box(box.src_start[:d] + (box.src_start[d] + a,) + box.src_start[d + 1:],
                  box.dst_start[:d] + (box.dst_start[d] + a,) + box.dst_start[d + 1:],
                  box.size[:d] + (n,) + box.size[d + 1:])
        out.extend(split_box(sub, isz, limit) if n == 1 and unit > limit else [sub])
    return out


def box_runs(chunk: Chunk, box: Box, isz: int) -> tuple[np.ndarray, int, int]:
    """The runs of ``box`` in ``chunk``: ``(file offsets, bytes per run, k)``; runs are
    enumerated row-major over the box's dims ``[0, k)`` and each covers dims ``[k, ndim)``."""
    size = chunk.size
    nd = len(size)
    if nd == 0:
        return np.array([chunk.offset], dtype=np.int64), isz, 0
    k = nd - 1
    while k > 0 and box.size[k] == size[k]:
        k -= 1
    strides = [1] * nd
    for i in range(nd - 2, -1, -1):
        strides[i] = strides[i + 1] * size[i + 1]
    run = box.size[k] * strides[k] * isz
    base = chunk.offset + isz * sum(s * st for s, st in zip(box.src_start, strides))
    if k == 0:
        return np.array([base], dtype=np.int64), run, 0
    offs = _grid(box.size[:k]) @ (np.asarray(strides[:k], dtype=np.int64) * isz) + base
    return offs, run, k


def _grid(lead: Sequence[int]) -> np.ndarray:
    return np.indices(tuple(lead), dtype=np.int64).reshape(len(lead), -1).T


def _slices(start: Sequence[int], size: Sequence[int]) -> tuple[slice, ...]:
    return tuple(slice(a, a + n) for a, n in zip(start, size))


def _holds_runs(d: torch.Tensor, k: int) -> bool:
    """Whether each run (dims ``[k, ndim)`` of ``d``) is contiguous in ``d``'s memory."""
    expect = 1
    for n, st in zip(reversed(d.shape[k:]), reversed(d.stride()[k:])):
        if n > 1 and st != expect:
            return False
        expect *= n
    return True


class _Whole:
    """A chunk read whole whose CRC32 the format records: its parts' CRCs, combined in file order
    once every part has landed (parts run on several threads)."""

    __slots__ = ("chunk", "key", "parts")

    def __init__(self, chunk: Chunk, key: str) -> None:
        self.chunk, self.key = chunk, key
        self.parts: list[tuple[int, int, int]] = []  # (file offset, bytes, crc32)

    def check(self, path: object) -> None:
        parts = sorted(self.parts)
        crc = parts[0][2] if parts else 0
        for _off, n, c in parts[1:]:
            crc = crc32_combine(crc, c, n)
        if crc != self.chunk.crc32:
            raise CorruptCheckpointError(f"CRC32 mismatch in the record at byte {self.chunk.offset}: the bytes read "
                                         f"hash to {crc:#010x}, the file records {self.chunk.crc32:#010x} "
                                         "(corrupted on disk or in transit?)", file=path, key=self.key)


@dataclass(slots=True)
class _Part:
    job: CatalogJob
    chunk: Chunk
    box: Box
    nbytes: int
    whole: _Whole | None = None
    record: RecordPieces | None = None  # a record read in part: this part's CRC32 share goes here


def _row_major(size: Sequence[int]) -> list[int]:
    st = [1] * len(size)
    for i in range(len(size) - 2, -1, -1):
        st[i] = st[i + 1] * size[i + 1]
    return st


def _share(p: _Part, offs: np.ndarray, run: int, k: int, crcs: list[int]) -> None:
    """Record the CRC32 share of a part of a record read in part: its runs (file offsets ``offs``,
    ``run`` bytes each, enumerated over the box's dims ``[0, k)``) as a grid of the record."""
    rec, chunk, box, isz = p.record, p.chunk, p.box, p.job.dtype.itemsize
    assert rec is not None
    st = _row_major(chunk.size)
    lead = [j for j in range(k) if box.size[j] > 1]
    grid = (int(offs[0]) - chunk.offset, run, tuple(box.size[j] for j in lead), tuple(st[j] * isz for j in lead))
    rel = [o - chunk.offset for o in offs.tolist()]
    rec.groups.append((grid, fold_fragments(rel, crcs, run, rec.total)))


def _do_part(p: _Part, src: ByteSource) -> None:
    """(I/O thread) One part: its runs straight into the target, or through staging; with
    ``p.whole``, the CRC32 of its bytes recorded."""
    job, isz = p.job, p.job.dtype.itemsize
    d = job.target[_slices(p.box.dst_start, p.box.size)]
    if p.chunk.strides is not None:
        _do_strided(p, d, src)
        return
    offs, run, k = box_runs(p.chunk, p.box, isz)
    direct = (d.device.type == "cpu" and d.dtype == job.dtype and not d.is_conj() and not d.is_neg()
              and _holds_runs(d, k))
    if direct:
        base = d.data_ptr()
        if k == 0:
            src.read_into(base, run, int(offs[0]), job.key)
            if p.whole is not None:
                p.whole.parts.append((int(offs[0]), run, crc32_at(base, run)))
            elif p.record is not None:
                _share(p, offs, run, 0, [crc32_at(base, run)])
            return
        dst = _grid(d.shape[:k]) @ (np.asarray(d.stride()[:k], dtype=np.int64) * isz) + base
        src.read_runs(dst.tolist(), offs.tolist(), run, job.key)  # rows of a column slice
        if p.whole is not None:  # a whole chunk's runs follow each other in the file
            crc = 0
            for a in dst.tolist():
                crc = crc32_at(a, run, crc)
            p.whole.parts.append((int(offs[0]), run * len(dst), crc))
        elif p.record is not None:
            _share(p, offs, run, k, [crc32_at(a, run) for a in dst.tolist()])
        return
    stage = torch.empty(p.box.size, dtype=job.dtype)
    addr = stage.data_ptr()
    src.read_runs([addr + i * run for i in range(len(offs))], offs.tolist(), run, job.key)
    if p.whole is not None:
        p.whole.parts.append((int(offs[0]), run * len(offs), crc32_at(addr, run * len(offs))))
    elif p.record is not None:
        _share(p, offs, run, k, [crc32_at(addr + i * run, run) for i in range(len(offs))])
    with torch.no_grad():
        d.copy_(stage)


def _do_strided(p: _Part, d: torch.Tensor, src: ByteSource) -> None:
    """A box of a chunk stored with other strides: its element span read into staging, viewed
    with the file's strides, copied."""
    job, chunk, box, isz = p.job, p.chunk, p.box, p.job.dtype.itemsize
    strides = chunk.strides or ()
    lo = sum(a * st for a, st in zip(box.src_start, strides))
    span = 1 + sum((n - 1) * st for n, st in zip(box.size, strides)) if box.numel else 0
    stage = torch.empty(span, dtype=job.dtype)
    if span:
        src.read_into(stage.data_ptr(), span * isz, chunk.offset + lo * isz, job.key)
    if p.whole is not None:
        p.whole.parts.append((chunk.offset, span * isz, crc32_at(stage.data_ptr(), span * isz)))
    elif p.record is not None and span:  # the bytes of the box, where the span holds them
        g = grid_of(0, strides, box, isz)
        if g is None:
            p.record.groups.append(((-1, 0, (), ()), 0))  # never tiles: the record stays unchecked
        else:
            p.record.groups.append((g, share_at(stage.data_ptr() - lo * isz, g, p.record.total)))
    with torch.no_grad():
        d.copy_(torch.as_strided(stage, box.size, strides, 0))



def _batches(parts: list[_Part]) -> Iterator[list[_Part]]:
    batch: list[_Part] = []
    size = 0
    for p in parts:
        batch.append(p)
        size += p.nbytes
        if size >= _BATCH:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def read_catalog_jobs(catalog: Catalog, jobs: Sequence[CatalogJob], *, threads: int | None = None,
                      verify: bool = True, pieces: dict[tuple[str, str], RecordPieces] | None = None,
                      ) -> tuple[int, int, int]:
    """Fill every job's target from its chunks; returns ``(bytes read, files opened, bytes
    whose CRC32 was checked)``.

    With ``verify``, a chunk read whole whose CRC32 the format records (DCP's items) is checked
    against it; of one read in part, with ``pieces`` given, the CRC32 shares of the bytes read
    are put there (``{(file, record): RecordPieces}``, as the rank-file reader does) to be
    combined with the other ranks' (:func:`dist_restore._bytes.shares.check_records`).

    Raises:
        CorruptCheckpointError: a file whose size changed since it was planned, or that ended
            early, or a CRC32 mismatch, naming the file and the key.
        OSError: an I/O error, naming the file and the key.
    """
    by_file: dict[str, list[_Part]] = {}
    wholes: list[tuple[_Whole, str]] = []
    for job in jobs:
        isz = job.dtype.itemsize
        for chunk, boxes in job.pieces:
            whole = record = None
            if verify and chunk.crc32 is not None and len(boxes) == 1 and boxes[0].size == chunk.size:
                whole = _Whole(chunk, job.key)
                wholes.append((whole, chunk.file))
            elif verify and chunk.crc32 is not None and pieces is not None:
                fname, skey = str(catalog.path(chunk.file)), f"0 at byte {chunk.offset}"
                record = pieces.get((fname, skey))
                if record is None:
                    record = pieces[(fname, skey)] = RecordPieces(fname, skey, job.key, chunk.span(job.dtype),
                                                                  chunk.crc32)
            parts = by_file.setdefault(chunk.file, [])
            for box in boxes:
                if chunk.strides is not None:  # read as one span (see _do_strided)
                    span = 1 + sum((n - 1) * st for n, st in zip(box.size, chunk.strides)) if box.numel else 0
                    parts.append(_Part(job, chunk, box, span * isz, whole, record))
                    continue
                for b in split_box(box, isz):
                    parts.append(_Part(job, chunk, b, b.numel * isz, whole, record))
    if not by_file:
        return 0, 0, 0
    threads = io_threads() if threads is None else threads
    fds: dict[str, ByteSource] = {}
    total = 0
    try:
        for f, parts in by_file.items():
            path = catalog.path(f)
            src = fds[f] = catalog.open(f)
            size = src.size
            if size != catalog.file_sizes[f]:
                raise CorruptCheckpointError(f"file is {size} bytes, it was {catalog.file_sizes[f]} when the "
                                             "restore was planned: it changed under the restore",
                                             file=path, key=parts[0].job.key)
            parts.sort(key=lambda p: p.chunk.offset)
            total += sum(p.nbytes for p in parts)
        work = [(batch, fds[f]) for f, parts in by_file.items() for batch in _batches(parts)]
        remote = any(src.remote for src in fds.values())
        if remote:  # an object store: batches on their own threads, the GETs in flight (GIL released)
            from dist_restore._base.objstore import IN_FLIGHT, work_pool

            threads = IN_FLIGHT
        if len(work) == 1 or threads <= 1:
            for batch, src in work:
                _run_batch(batch, src)
        else:
            # (shared: it may have more threads; `threads` tasks use them)
            pool = work_pool() if remote else _io_pool(threads)
            n = min(threads, len(work))
            futures = [pool.submit(_run_batches, work[i::n]) for i in range(n)]
            try:
                for fut in futures:
                    fut.result()
            finally:  # reads write into targets: every one has ended before this returns
                for fut in futures:
                    fut.exception()
    finally:
        for src in fds.values():
            src.close()
    for whole, f in wholes:
        whole.check(catalog.path(f))
    return total, len(fds), sum(n for whole, _f in wholes for _o, n, _c in whole.parts)


def _run_batches(work: list[tuple[list[_Part], ByteSource]]) -> None:
    for batch, src in work:
        _run_batch(batch, src)


def _run_batch(batch: list[_Part], src: ByteSource) -> None:
    if src.remote:
        _run_remote_batch(batch, src)
        return
    for p in batch:
        _do_part(p, src)


def _run_remote_batch(batch: list[_Part], src: ByteSource) -> None:
    """A batch from an object store: every part that is one run straight into its target
    fetched together (runs close in the file share a request, several requests in flight),
    then their CRC32s recorded as :func:`_do_part` records them; the other parts one by one."""
    direct: list[tuple[_Part, int, int, int]] = []  # (part, address, file offset, bytes)
    rest: list[_Part] = []
    for p in batch:
        job = p.job
        if p.chunk.strides is None:
            d = job.target[_slices(p.box.dst_start, p.box.size)]
            offs, run, k = box_runs(p.chunk, p.box, job.dtype.itemsize)
            if (k == 0 and d.device.type == "cpu" and d.dtype == job.dtype and not d.is_conj() and not d.is_neg()
                    and _holds_runs(d, 0)):
                direct.append((p, d.data_ptr(), int(offs[0]), run))
                continue
        rest.append(p)
    if direct:
        direct.sort(key=lambda x: x[2])
        src.read_many([(a, o, n) for _p, a, o, n in direct], direct[0][0].job.key)
        for p, a, o, n in direct:
            if p.whole is not None:
                p.whole.parts.append((o, n, crc32_at(a, n)))
            elif p.record is not None:
                _share(p, np.asarray([o], dtype=np.int64), n, 0, [crc32_at(a, n)])
    for p in rest:
        _do_part(p, src)


__all__ = ["box_runs", "read_catalog_jobs", "split_box"]
