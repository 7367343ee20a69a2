"""Moving bytes for resharding: copy boxes of mapped source records into target shards.

Each source file is mapped once (private, read-only in effect); a source local tensor is a
strided view of its record in the mapping, and each :class:`dist_restore._base.regions.Box` is one
``copy_`` from a slice of that view into a slice of the target. Only the pages under the
slices are touched: a rank reads the byte ranges its shard overlaps, never whole records
or files. Copied pages of large pieces are unmapped again, so RSS does not grow by the
bytes read. Nothing here plans or talks to other ranks.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import numpy as np
import torch

from dist_restore._bytes import iovec as _iovec
from dist_restore._base.crc import crc32_at, crc32_buf
from dist_restore._format.index import CheckpointIndex
from dist_restore._bytes.read import _CHUNK, _SMALL, ReadStats, _file_view, _RankFile
from dist_restore._bytes.shares import RecordPieces, grid_of, share_at, share_of_range
from dist_restore._base.regions import Box
from dist_restore._planning.reshard import ShardJob
from dist_restore._format.unpickle import TensorRef
from dist_restore.errors import CorruptCheckpointError

logger = logging.getLogger(__name__)

_DROP = 32 << 20  # unmap a source's pages once this many bytes have been copied from it
_PIECE_DROP = 1 << 20  # a piece this large is unmapped right after its copy
_MIN_ROW = 256  # target rows shorter than this are not worth an iovec each: copy_ instead


def _slices(start: tuple[int, ...], size: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(slice(a, a + n) for a, n in zip(start, size))


def copy_boxes(src: torch.Tensor, dst: torch.Tensor, boxes: Sequence[Box], fd: int | None = None,
               file_size: int = 0, submit: Any = None) -> int:
    """``dst[box] = src[box]`` for every box; returns the bytes copied.

    With ``fd`` (the ``file_size``-byte file ``src`` maps, from offset 0) and a plain CPU
    target, a box whose source bytes are one contiguous range of the file is read by
    ``preadv`` straight into the target: into one buffer when the target slice is contiguous
    too, else into each of its rows (a column slice of a row-major target: one iovec per
    row). No page faults on the mapping, which only the ``copy_`` fallback touches. With
    ``submit`` (``submit(fn, *args, nbytes=)``: run a read on an I/O pool), the rows of a large
    box go there in groups of about ``_CHUNK`` bytes, in flight together."""
    n = 0
    isz = src.element_size()
    for b in boxes:
        if b.numel == 0:
            continue
        d = dst[_slices(b.dst_start, b.size)]
        s = src[_slices(b.src_start, b.size)]
        nbytes = b.numel * isz
        plain = fd is not None and s.is_contiguous() and d.device.type == "cpu" \
            and not (d.is_conj() or d.is_neg() or s.is_conj() or s.is_neg())
        if plain and d.is_contiguous():
            _pread_exact(fd, d.data_ptr(), nbytes, s.storage_offset() * isz)
        elif plain and (rows := _row_iovecs(d)) is not None:
            iov, row = rows
            if submit is not None and nbytes >= _SMALL:
                per = max(1, _CHUNK // row)  # rows per request
                for i in range(0, len(iov), per):
                    part = iov[i:i + per]
                    submit(_iovec.vectored, fd, 0, part, s.storage_offset() * isz + i * row, file_size,
                           nbytes=len(part) * row)
            else:
                _iovec.vectored(fd, 0, iov, s.storage_offset() * isz, file_size)
        else:
            d.copy_(s)
        n += nbytes
    return n


def _pread_exact(fd: int, addr: int, nbytes: int, offset: int) -> None:
    view = memoryview((ctypes.c_char * nbytes).from_address(addr)).cast("B")
    done = 0
    while done < nbytes:  # Linux moves at most ~2 GiB per call: resume
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise CorruptCheckpointError(f"file ended at byte {offset + done}, {nbytes - done} bytes short")
        done += got


def _pooled(rf: _RankFile, src: torch.Tensor, job: ShardJob, boxes: Sequence[Box], rec: Any, skey: str,
            verify: bool, off: int) -> bool:
    """Read a large piece that is one contiguous byte range into one contiguous target
    slice on the file's I/O pool (CPU targets: :meth:`_RankFile._pipelined`, straight into
    the target; CUDA targets: :meth:`_RankFile._staged`, through pinned buffers): requests in
    flight across pieces, each CRC'd by its thread as it lands. ``False``: not such a piece."""
    if len(boxes) != 1 or boxes[0].numel * src.element_size() < _SMALL:
        return False
    b = boxes[0]
    d = job.target[_slices(b.dst_start, b.size)]
    s = src[_slices(b.src_start, b.size)]
    if not (s.is_contiguous() and d.is_contiguous()) or d.is_conj() or d.is_neg() or s.is_conj() or s.is_neg():
        return False
    if d.device.type not in ("cpu", "cuda"):
        return False
    nbytes = b.numel * src.element_size()
    file_off = s.storage_offset() * src.element_size()
    read = rf._pipelined if d.device.type == "cpu" else rf._staged
    read(d, file_off, nbytes, verify, rec, skey, job.key,
         sink=None if nbytes == rec.size else _sink(rf, rec, skey, job.key, file_off - off, nbytes))
    rf.stats.bytes_read += nbytes
    return True


def _pieces(rf: _RankFile, rec: Any, skey: str, key: str) -> RecordPieces:
    """This rank's pieces of a record it reads in part (checked with the other ranks')."""
    k = (str(rf.index.file), skey)
    got = rf.stats.pieces.get(k)
    if got is None:
        got = rf.stats.pieces[k] = RecordPieces(str(rf.index.file), skey, key, rec.size, rec.crc32)
    return got


def _sink(rf: _RankFile, rec: Any, skey: str, key: str, base: int, nbytes: int) -> Any:
    """Where the CRC32 of a contiguous piece of a record goes, once its reads settle."""
    pieces = _pieces(rf, rec, skey, key)
    return lambda crc: pieces.groups.append(share_of_range(base, nbytes, crc, rec.size))


def _row_iovecs(d: torch.Tensor) -> tuple[np.ndarray, int] | None:
    """One iovec per row of ``d`` (a CPU tensor whose rows are contiguous: last stride 1),
    and the row's bytes; ``None`` when ``d`` is not such a tensor, its rows are too short
    to be worth an iovec each (``_MIN_ROW``), or the platform lacks vectored reads."""
    isz = d.element_size()
    if d.dim() < 2 or d.stride(-1) != 1 or d.shape[-1] * isz < _MIN_ROW or not _iovec.available():
        return None
    lead = d.shape[:-1]
    steps = np.asarray(d.stride()[:-1], dtype=np.int64) * isz
    starts = np.indices(lead, dtype=np.int64).reshape(len(lead), -1).T @ steps + d.data_ptr()
    row = d.shape[-1] * isz
    return _iovec.iovecs(starts.tolist(), [row] * len(starts)), row


def _rows_part(fd: int, file_off: int, iov: np.ndarray, file_size: int, rf: _RankFile | None) -> int:
    """(I/O thread) The file bytes at ``file_off`` into the rows ``iov`` names (one
    ``preadv``); with ``rf`` (the file, mapped) the CRC32 of those file bytes, read through
    the mapping while the CPU's cache still holds them, whose pages are then unmapped again
    (the page cache keeps them)."""
    _iovec.vectored(fd, 0, iov, file_off, file_size)
    if rf is None:
        return 0
    n = int(iov[:, 1].sum())
    crc = crc32_at(rf.whole.data_ptr() + file_off, n)
    rf._drop(file_off, file_off + n)
    return crc


def _pooled_rows(rf: _RankFile, src: torch.Tensor, job: ShardJob, boxes: Sequence[Box], rec: Any, skey: str,
                 verify: bool, off: int) -> bool:
    """Read a large piece whose source bytes are one contiguous range of the file and whose
    target is a set of rows (a column slice of a row-major shard: tensor-parallel weights
    split by columns) on the file's I/O pool, in groups of about ``_CHUNK`` bytes of rows
    (:func:`_rows_part`). A piece that is its whole record is CRC-checked, the groups' CRCs
    combined in file order. ``False``: not such a piece."""
    if len(boxes) != 1 or boxes[0].numel * src.element_size() < _SMALL:
        return False
    b = boxes[0]
    d = job.target[_slices(b.dst_start, b.size)]
    s = src[_slices(b.src_start, b.size)]
    if not s.is_contiguous() or d.device.type != "cpu" or d.is_conj() or d.is_neg() or s.is_conj() or s.is_neg():
        return False
    rows = _row_iovecs(d)
    if rows is None:
        return False
    iov, row = rows
    nbytes = b.numel * src.element_size()
    per = max(1, _CHUNK // row)  # rows per request
    base = s.storage_offset() * src.element_size()
    parts = [(rf.fd, base + i * row, iov[i:i + per], rf.index.file_size, rf if verify else None)
             for i in range(0, len(iov), per)]
    sizes = [len(p[2]) * row for p in parts]
    sink = None if not verify or nbytes == rec.size else _sink(rf, rec, skey, job.key, base - off, nbytes)
    rf.submit_parts(_rows_part, parts, sizes, key=job.key, rec=rec if verify else None, skey=skey, sink=sink)
    rf.stats.bytes_read += nbytes
    return True


def _span_bytes(ref: TensorRef, boxes: Sequence[Box]) -> tuple[int, int]:
    """``[lo, hi)`` byte span of the record that ``boxes`` of ``ref``'s view touch."""
    lo, hi = None, 0
    isz = ref.dtype.itemsize
    for b in boxes:
        if b.numel == 0:
            continue
        first = ref.storage_offset + sum(s * st for s, st in zip(b.src_start, ref.stride))
        last = ref.storage_offset + sum((s + n - 1) * st for s, n, st in zip(b.src_start, b.size, ref.stride))
        lo = first if lo is None else min(lo, first)
        hi = max(hi, last + 1)
    return ((lo or 0) * isz, hi * isz)


def _record_bytes(rf: _RankFile, off: int, dst: torch.Tensor, boxes: Sequence[Box], n: int) -> Any:
    """A record's bytes after it was copied whole: from the target when one contiguous box
    holds them (still in cache), else from the mapping."""
    if len(boxes) == 1 and dst.device.type == "cpu":
        d = dst[_slices(boxes[0].dst_start, boxes[0].size)]
        if d.is_contiguous():
            return (ctypes.c_char * n).from_address(d.data_ptr())
    return (ctypes.c_char * n).from_address(rf.whole.data_ptr() + off)


def _add_shares(rf: _RankFile, off: int, ref: TensorRef, boxes: Sequence[Box], rec: Any, key: str) -> None:
    """The shares of the bytes ``boxes`` of ``ref`` covered, from the mapped record (the copy
    has just brought its pages in); a piece too scattered to describe is left unchecked."""
    pieces = _pieces(rf, rec, ref.storage.key, key)
    isz = ref.dtype.itemsize
    addr = rf.whole.data_ptr() + off
    for b in boxes:
        if b.numel == 0:
            continue
        g = grid_of(ref.storage_offset, ref.stride, b, isz)
        if g is None:
            pieces.groups.append(((-1, 0, (), ()), 0))  # never tiles: the record stays unchecked
            continue
        pieces.groups.append((g, share_at(addr, g, rec.size)))


def _add_margins(rf: _RankFile, off: int, ref: TensorRef, boxes: Sequence[Box], rec: Any, key: str) -> None:
    """The shares of the record's bytes outside its view (FSDP2 pads uneven shards' storage):
    taken by the rank whose piece holds the view's first (last) element, so that the ranks'
    pieces can cover the whole record."""
    isz = ref.dtype.itemsize
    lo, hi = ref.element_span()
    lo_b, hi_b = lo * isz, hi * isz
    first = any(b.numel and not any(b.src_start) for b in boxes)
    last = any(b.numel and all(a + n == m for a, n, m in zip(b.src_start, b.size, ref.size)) for b in boxes)
    addr = rf.whole.data_ptr() + off
    if first and lo_b > 0:
        g = (0, lo_b, (), ())
        _pieces(rf, rec, ref.storage.key, key).groups.append((g, share_at(addr, g, rec.size)))
    if last and rec.size > hi_b:
        g = (hi_b, rec.size - hi_b, (), ())
        _pieces(rf, rec, ref.storage.key, key).groups.append((g, share_at(addr, g, rec.size)))


def read_jobs(jobs: Sequence[ShardJob], indexes: Mapping[int, CheckpointIndex],
              entries: Mapping[tuple[int, str], Any], stats: ReadStats, *, verify: bool = True) -> None:
    """Fill every job's target from its pieces.

    Args:
        jobs: The planned targets.
        indexes: ``{file rank: index}`` of every file a piece names (opened in the plan).
        entries: ``{(file rank, key): local TensorRef}`` checked in the plan.
        stats: ``bytes_read`` grows by the bytes copied.
        verify: Check the zip CRC32 of every record a piece copies whole; of a record read
            in part, collect the CRC32 shares of the bytes read in ``stats.pieces``, to be
            checked with the other ranks' (:func:`dist_restore._bytes.shares.check_records`).
    """
    by_file: dict[int, list[tuple[ShardJob, Any]]] = defaultdict(list)
    for job in jobs:
        for piece in job.pieces:
            by_file[piece.file].append((job, piece))
    with torch.no_grad():
        for f in sorted(by_file):
            index = indexes[f]
            with _RankFile(index, {}, None, False, stats) as rf:
                items = by_file[f]
                items.sort(key=lambda jp: index.records[entries[(f, jp[0].key)].storage.key].header_offset)
                skeys = [entries[(f, job.key)].storage.key for job, _p in items]
                index.prefetch_headers(rf.fd, skeys)  # a cold file: the headers' reads in parallel
                offsets = [index.data_offset(k, rf.mm) for k in skeys]
                since_drop = 0
                for (job, piece), off in zip(items, offsets):
                    ref: TensorRef = entries[(f, job.key)]
                    lo, hi = ref.element_span()
                    src = _file_view(rf.whole, off, ref, lo, hi)
                    # (a record not aligned for its dtype is a copy, not the mapping: no preadv then)
                    direct = rf.fd if src.untyped_storage().data_ptr() == rf.whole.data_ptr() else None
                    rec = index.records[ref.storage.key]
                    if verify and sum(b.numel for b in piece.boxes) * ref.dtype.itemsize != rec.size:
                        _add_margins(rf, off, ref, piece.boxes, rec, job.key)  # a piece: the record's ends too
                    if direct is not None and (_pooled(rf, src, job, piece.boxes, rec, ref.storage.key, verify, off)
                                               or _pooled_rows(rf, src, job, piece.boxes, rec, ref.storage.key,
                                                               verify, off)):
                        continue
                    n = copy_boxes(src, job.target, piece.boxes, direct, index.file_size,
                                   submit=partial(rf.submit, key=job.key))
                    stats.bytes_read += n
                    if verify and n and n == rec.size:  # the whole record was copied: check it
                        if crc32_buf(_record_bytes(rf, off, job.target, piece.boxes, n)) != rec.crc32:
                            raise CorruptCheckpointError(
                                f"CRC32 mismatch in storage record data/{ref.storage.key}: tensor data is corrupt",
                                file=index.file, key=job.key)
                        stats.bytes_verified += n
                    elif verify and n:  # a piece of the record: its CRC32 shares, through the mapping
                        _add_shares(rf, off, ref, piece.boxes, rec, job.key)
                    since_drop += n
                    if n >= _PIECE_DROP:  # a large piece: its pages go at once
                        blo, bhi = _span_bytes(ref, piece.boxes)
                        rf._drop(off + blo, off + bhi)
                    elif since_drop >= _DROP:  # many small ones: the whole mapping, now and then
                        rf._drop(0, index.file_size)
                        since_drop = 0
                rf.drain()  # the pooled reads' CRCs, in file order, before the file is closed
