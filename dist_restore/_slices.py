"""Moving bytes for resharding: copy boxes of mapped source records into target shards.

Each source file is mapped once (private, read-only in effect); a source local tensor is a
strided view of its record in the mapping, and each :class:`._regions.Box` is one
``copy_`` from a slice of that view into a slice of the target. Only the pages under the
slices are touched: a rank reads the byte ranges its shard overlaps, never whole records
or files. Copied pages of large pieces are unmapped again, so RSS does not grow by the
bytes read. Nothing here plans or talks to other ranks.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from dist_restore._index import CheckpointIndex
from dist_restore._read import ReadStats, _file_view, _RankFile
from dist_restore._regions import Box
from dist_restore._reshard import ShardJob
from dist_restore._unpickle import TensorRef

logger = logging.getLogger(__name__)

_DROP = 32 << 20  # unmap a source's pages once this many bytes have been copied from it
_PIECE_DROP = 1 << 20  # a piece this large is unmapped right after its copy


def _slices(start: tuple[int, ...], size: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(slice(a, a + n) for a, n in zip(start, size))


def copy_boxes(src: torch.Tensor, dst: torch.Tensor, boxes: Sequence[Box]) -> int:
    """``dst[box] = src[box]`` for every box; returns the bytes copied."""
    n = 0
    for b in boxes:
        if b.numel == 0:
            continue
        dst[_slices(b.dst_start, b.size)].copy_(src[_slices(b.src_start, b.size)])
        n += b.numel * src.element_size()
    return n


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


def read_jobs(jobs: Sequence[ShardJob], indexes: Mapping[int, CheckpointIndex],
              entries: Mapping[tuple[int, str], Any], stats: ReadStats) -> None:
    """Fill every job's target from its pieces.

    Args:
        jobs: The planned targets.
        indexes: ``{file rank: index}`` of every file a piece names (opened in the plan).
        entries: ``{(file rank, key): local TensorRef}`` checked in the plan.
        stats: ``bytes_read`` grows by the bytes copied.
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
                since_drop = 0
                for job, piece in items:
                    ref: TensorRef = entries[(f, job.key)]
                    off = index.data_offset(ref.storage.key, rf.mm)
                    lo, hi = ref.element_span()
                    src = _file_view(rf.whole, off, ref, lo, hi)
                    n = copy_boxes(src, job.target, piece.boxes)
                    stats.bytes_read += n
                    since_drop += n
                    if n >= _PIECE_DROP:  # a large piece: its pages go at once
                        blo, bhi = _span_bytes(ref, piece.boxes)
                        rf._drop(off + blo, off + bhi)
                    elif since_drop >= _DROP:  # many small ones: the whole mapping, now and then
                        rf._drop(0, index.file_size)
                        since_drop = 0
