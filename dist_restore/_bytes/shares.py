"""Checking records that several ranks read in pieces: each rank folds the CRC32s of its pieces
into a few numbers, the read agreement carries them, and every rank combines them the same way.

A resharding restore splits a storage record between ranks (an FSDP2 shard saved on 2 ranks
and restored on 4: each reads half of it), so no rank holds the bytes the zip's CRC32 covers.
Each rank describes the bytes it read of such a record as *grids* (a run of bytes repeated over
a few strided dimensions: a contiguous range, or the column piece of every row) with one
:func:`~dist_restore._base.crc.fold_fragments` share each. After the read agreement every rank
has every rank's grids: duplicates (replicas read by several ranks) count once, and when the
rest tile the record exactly, the shares give its CRC32 (:func:`~dist_restore._base.crc.record_crc`),
compared with the zip's. Bytes nobody read (a partial restore), or pieces that overlap without
being the same, leave the record unchecked. Nothing here talks to other ranks.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dist_restore._base.crc import crc32_at, fold_fragments, record_crc
from dist_restore._base.regions import Box

#: ``(base, run, counts, strides)``: ``run`` bytes at ``base + sum(i_j * strides_j)`` for every
#: index ``i`` below ``counts`` (record-relative byte offsets).
Grid = tuple[int, int, tuple[int, ...], tuple[int, ...]]

_MAX_RUNS = 1 << 20  # a piece of more runs than this (element by element) is left unchecked


@dataclass
class RecordPieces:
    """What one rank read of one record it did not read whole.

    Attributes:
        file: The rank file's path (for messages).
        skey: The storage record's name (``data/{skey}``).
        key: A key the record holds (for messages).
        total: The record's size in bytes.
        want: Its CRC32 in the zip directory.
        groups: ``(grid, share)`` of each group of bytes read.
    """

    file: str
    skey: str
    key: str
    total: int
    want: int
    groups: list[tuple[Grid, int]] = field(default_factory=list)


def grid_of(storage_offset: int, stride: Sequence[int], box: Box, isz: int) -> Grid | None:
    """The bytes of ``box`` of a view (``storage_offset``, ``stride`` in elements) of a
    record, as a grid; ``None`` when they are too scattered to describe (or strides are odd)."""
    nd = len(box.size)
    if any(s < 0 for s in stride):
        return None
    base = (storage_offset + sum(a * st for a, st in zip(box.src_start, stride))) * isz
    k, expect = nd, 1
    while k > 0:  # the trailing dims that form one contiguous block
        j = k - 1
        if box.size[j] != 1 and stride[j] != expect:
            break
        expect *= box.size[j]
        k -= 1
    lead = [(box.size[j], stride[j] * isz) for j in range(k) if box.size[j] > 1]
    if math.prod(c for c, _s in lead) > _MAX_RUNS:
        return None
    return base, expect * isz, tuple(c for c, _s in lead), tuple(s for _c, s in lead)


def starts(g: Grid) -> np.ndarray:
    """Every run's offset, ascending for positive strides in row-major order."""
    base, _run, counts, strides = g
    if not counts:
        return np.array([base], dtype=np.int64)
    idx = np.indices(counts, dtype=np.int64).reshape(len(counts), -1).T
    return idx @ np.asarray(strides, dtype=np.int64) + base


def share_at(addr: int, g: Grid, total: int) -> int:
    """The share of grid ``g`` of a record whose byte 0 is at memory address ``addr``."""
    offs = np.sort(starts(g)).tolist()
    run = g[1]
    return fold_fragments(offs, [crc32_at(addr + o, run) for o in offs], run, total)


def share_of_range(base: int, nbytes: int, crc: int, total: int) -> tuple[Grid, int]:
    """``(grid, share)`` of one contiguous range whose CRC32 is known."""
    return (base, nbytes, (), ()), fold_fragments([base], [crc], nbytes, total)


def check_records(reports: Sequence[Iterable[Any] | None]) -> tuple[dict[int, str], list[int]]:
    """Combine every rank's pieces (``reports[r]``: rank ``r``'s :class:`RecordPieces`, as
    tuples) into the records' CRC32s.

    Returns:
        ``({rank: message}`` for every rank that read part of a record whose combined CRC32 is
        not the zip's (naming the file, record and key), ``bytes each rank read of records so
        checked)``. The same on every rank, given the same reports.
    """
    by_record: dict[tuple[str, str], list[tuple[int, Any]]] = {}
    for r, rep in enumerate(reports):
        for p in rep or ():
            by_record.setdefault((p[0], p[1]), []).append((r, p))
    failures: dict[int, str] = {}
    verified = [0] * len(reports)
    for (file, skey), items in sorted(by_record.items()):
        total, want, key = items[0][1][3], items[0][1][4], items[0][1][2]
        unique: dict[Grid, int] = {}
        readers: dict[Grid, list[int]] = {}
        conflict = False
        for r, p in items:
            for grid, share in p[5]:
                grid = (grid[0], grid[1], tuple(grid[2]), tuple(grid[3]))
                if grid in unique and unique[grid] != share:
                    conflict = True  # the same bytes read twice gave two CRCs
                unique.setdefault(grid, share)
                readers.setdefault(grid, []).append(r)
        runs = sorted((int(o), g[1]) for g in unique for o in starts(g))
        pos, tiled = 0, True
        for o, n in runs:
            if o != pos:
                tiled = False
                break
            pos += n
        tiled = tiled and pos == total
        if not tiled and not conflict:
            continue  # bytes nobody read, or pieces that overlap: not checkable
        if conflict or record_crc(unique.values(), total) != want:
            msg = (f"CRC32 mismatch in storage record data/{skey} of {file!r} (key {key!r}), checked from the "
                   "pieces the ranks read: tensor data is corrupt")
            for r, _p in items:
                failures.setdefault(r, msg)
            continue
        for grid, rs in readers.items():
            n = grid[1] * math.prod(grid[2])
            for r in set(rs):
                verified[r] += n
    return failures, verified


__all__ = ["Grid", "RecordPieces", "check_records", "grid_of", "share_at", "share_of_range", "starts"]
