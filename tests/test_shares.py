"""Checking a record from the pieces several ranks read: the CRC32 arithmetic against zlib, and
the combination (replicas once, gaps and overlaps unchecked, a flipped byte named)."""

from __future__ import annotations

import random
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dist_restore._base.crc import crc32_zeros, fold_fragments, record_crc, shift
from dist_restore._bytes.shares import check_records, grid_of, starts
from dist_restore._base.regions import Box


@pytest.mark.parametrize("n", [0, 1, 2, 3, 7, 8, 100, 4096, 100_003])
def test_crc32_of_zeros(n: int) -> None:
    assert crc32_zeros(n) == zlib.crc32(bytes(n))


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=3000), st.lists(st.integers(1, 2999), max_size=12), st.randoms())
def test_fragments_in_any_order_give_the_record_crc(data: bytes, cuts: list[int], rnd: random.Random) -> None:
    bounds = sorted({0, len(data), *(c for c in cuts if c < len(data))})
    frags = [(a, b - a) for a, b in zip(bounds, bounds[1:])]
    rnd.shuffle(frags)
    shares = [fold_fragments([o], [zlib.crc32(data[o:o + n])], n, len(data)) for o, n in frags]
    assert record_crc(shares, len(data)) == zlib.crc32(data)


def test_column_pieces_of_rows() -> None:
    rows, cols = 50, 40
    data = random.Random(0).randbytes(rows * cols)
    shares = []
    for c0, w in ((0, 13), (13, 20), (33, 7)):  # three ranks, each a column piece of every row
        offs = [r * cols + c0 for r in range(rows)]
        shares.append(fold_fragments(offs, [zlib.crc32(data[o:o + w]) for o in offs], w, rows * cols))
    assert record_crc(shares, rows * cols) == zlib.crc32(data)


def test_shift_is_a_raw_crc_followed_by_zeros() -> None:
    raw = zlib.crc32(b"abc") ^ crc32_zeros(3)  # the raw CRC of b"abc"
    for d in (0, 1, 5, 1000):
        assert shift(raw, d) ^ crc32_zeros(3 + d) == zlib.crc32(b"abc" + bytes(d))


def test_grid_of_a_column_box() -> None:
    g = grid_of(storage_offset=2, stride=(10, 1), box=Box((1, 3), (0, 0), (4, 5)), isz=4)
    assert g == ((2 + 13) * 4, 20, (4,), (40,))
    assert starts(g).tolist() == [60, 100, 140, 180]
    assert grid_of(0, (1, 10), Box((0, 0), (0, 0), (3, 3)), 4) == (0, 4, (3, 3), (4, 40))  # transposed: per element


def _report(data: bytes, pieces: list[tuple[int, int]], file: str = "f", want: int | None = None):
    groups = [((o, n, (), ()), fold_fragments([o], [zlib.crc32(data[o:o + n])], n, len(data))) for o, n in pieces]
    return (file, "0", "model.w", len(data), zlib.crc32(data) if want is None else want, groups)


def test_check_records_tiled_replicated_gapped_and_flipped() -> None:
    data = random.Random(1).randbytes(1000)
    # two ranks split it, a third holds a replica of the first half: checked, counted per rank
    bad, ver = check_records([[_report(data, [(0, 500)])], [_report(data, [(500, 500)])],
                              [_report(data, [(0, 500)])]])
    assert bad == {} and ver == [500, 500, 500]
    # a gap (a partial restore): unchecked, no error
    bad, ver = check_records([[_report(data, [(0, 400)])], [_report(data, [(500, 500)])]])
    assert bad == {} and ver == [0, 0]
    # overlapping, not the same: unchecked
    bad, ver = check_records([[_report(data, [(0, 600)])], [_report(data, [(400, 600)])]])
    assert bad == {} and ver == [0, 0]
    # rank 1's half read from a file with a flipped byte: every reader of the record is named
    flipped = bytearray(data)
    flipped[700] ^= 1
    bad, ver = check_records([[_report(data, [(0, 500)])], None, [_report(bytes(flipped), [(500, 500)])]])
    assert set(bad) == {0, 2} and "CRC32 mismatch" in bad[0] and "'model.w'" in bad[0] and "'f'" in bad[0]
    # two replicas of one piece that disagree: corrupt, even if nothing tiles
    bad, _ = check_records([[_report(data, [(0, 500)])], [_report(bytes(flipped[:500]) + data[500:], [(0, 500)])]])
    assert bad == {}  # same bytes in the first half: no conflict there
    flipped2 = bytearray(data)
    flipped2[10] ^= 1
    bad, _ = check_records([[_report(data, [(0, 500)])], [_report(bytes(flipped2), [(0, 500)])]])
    assert set(bad) == {0, 1}
