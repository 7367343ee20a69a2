"""The byte mover of resharding: every copy path against plain tensor slicing."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dist_restore._base.regions import Box
from dist_restore._bytes.slices import copy_boxes


def _mapped(path: Path, t: torch.Tensor, pad: int = 0) -> tuple[int, torch.Tensor]:
    """``t`` written at byte ``pad`` of a file; (fd, a view of it over the mapping)."""
    path.write_bytes(b"\0" * pad + t.reshape(-1).view(torch.uint8).numpy().tobytes())
    fd = os.open(path, os.O_RDONLY)
    mm = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)
    whole = torch.frombuffer(mm, dtype=torch.uint8)
    view = whole[pad:].view(t.dtype).view(t.shape)
    return fd, view


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_every_path_matches_slicing(tmp_path_factory, data) -> None:
    rows, cols = data.draw(st.integers(1, 12)), data.draw(st.integers(1, 200))
    src = torch.arange(rows * cols, dtype=torch.float32).reshape(rows, cols)
    path = tmp_path_factory.mktemp("slices") / "src.bin"
    fd, view = _mapped(path, src, pad=64)
    try:
        r0 = data.draw(st.integers(0, rows - 1))
        nr = data.draw(st.integers(1, rows - r0))
        full_cols = data.draw(st.booleans())  # contiguous source range, or a column slice
        c0 = 0 if full_cols else data.draw(st.integers(0, cols - 1))
        nc = cols if full_cols else data.draw(st.integers(1, cols - c0))
        extra = data.draw(st.integers(0, 80))  # a wider target: its rows are strided
        dst = torch.full((nr + 3, nc + extra), -1.0)
        box = Box((r0, c0), (2, extra // 2), (nr, nc))
        for use_fd in (fd, None):
            dst.fill_(-1.0)
            n = copy_boxes(view, dst, [box], use_fd, path.stat().st_size)
            expect = torch.full_like(dst, -1.0)
            expect[2:2 + nr, extra // 2:extra // 2 + nc] = src[r0:r0 + nr, c0:c0 + nc]
            assert n == nr * nc * 4
            assert torch.equal(dst, expect)
    finally:
        os.close(fd)


def test_zero_d_and_empty_boxes(tmp_path: Path) -> None:
    fd, view = _mapped(tmp_path / "s.bin", torch.tensor(3.5))
    try:
        dst = torch.zeros(())
        assert copy_boxes(view, dst, [Box((), (), ())], fd, 4) == 4
        assert dst.item() == 3.5
        assert copy_boxes(view.reshape(1), torch.zeros(1), [Box((0,), (0,), (0,))], fd, 4) == 0
    finally:
        os.close(fd)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.int8, torch.float64, torch.bool])
def test_dtypes_by_preadv(tmp_path: Path, dtype: torch.dtype) -> None:
    src = (torch.arange(64 * 70) % 7).to(dtype).reshape(64, 70)
    fd, view = _mapped(tmp_path / "s.bin", src)
    try:
        dst = torch.zeros(70, 300, dtype=dtype)
        copy_boxes(view, dst, [Box((0, 0), (3, 5), (64, 70))], fd, src.numel() * src.element_size())
        assert torch.equal(dst[3:67, 5:75], src)
    finally:
        os.close(fd)


def test_large_row_slices_go_to_the_pool_in_groups(tmp_path: Path) -> None:
    """A column slice of a row-major target, 1 MiB in all: its rows go to ``submit`` in groups
    of about ``_CHUNK`` bytes (made 64 KiB here: 16 rows of 4 KiB), and every byte lands where
    slicing puts it."""
    import dist_restore._bytes.slices as S

    src = torch.arange(256 * 1024, dtype=torch.float32).reshape(256, 1024)
    fd, view = _mapped(tmp_path / "s.bin", src)
    calls = []

    def submit(fn, *args, nbytes):
        calls.append(nbytes)
        fn(*args)

    try:
        dst = torch.zeros(256, 3000)
        old = S._CHUNK
        S._CHUNK = 64 << 10  # 16 rows of 4 KiB per request
        try:
            n = copy_boxes(view, dst, [Box((0, 0), (0, 7), (256, 1024))], fd, src.nbytes, submit=submit)
        finally:
            S._CHUNK = old
        assert n == src.nbytes and torch.equal(dst[:, 7:1031], src)
        assert calls == [16 * 4096] * 16
        small = torch.zeros(8, 3000)  # 32 KiB: below the pool's threshold, read at once
        calls.clear()
        copy_boxes(view, small, [Box((0, 0), (0, 7), (8, 1024))], fd, src.nbytes, submit=submit)
        assert calls == [] and torch.equal(small[:, 7:1031], src[:8])
    finally:
        os.close(fd)


@pytest.mark.parametrize("chunk", [64 << 10, 8 << 20])
def test_whole_record_into_a_column_slice_is_crc_checked(tmp_path: Path, monkeypatch, chunk: int) -> None:
    """A whole record (a tensor-parallel shard split by columns) read into a column slice of
    a row-major target goes by the I/O pool in row groups, each group's CRC32 taken there and
    combined in file order (several groups with a 64 KiB chunk): the target matches slicing,
    every byte counts as verified, and a flipped byte anywhere in the record is caught, named
    by file and key. Oracle: ``torch.load`` of the same file."""
    import dist_restore._bytes.slices as S
    from dist_restore._bytes.read import ReadStats
    from dist_restore._format.index import read_index
    from dist_restore._planning.reshard import Piece, ShardJob
    from dist_restore.errors import CorruptCheckpointError

    src = torch.randn(256, 512)  # 512 KiB: large enough for the pool; rows of 2 KiB
    good = tmp_path / "checkpoint_0.pt"
    torch.save({"w": src}, good)
    monkeypatch.setattr(S, "_CHUNK", chunk)
    parts: list[int] = []
    real = S._rows_part
    monkeypatch.setattr(S, "_rows_part", lambda *a: parts.append(len(a[2])) or real(*a))

    def restore(path: Path) -> tuple[torch.Tensor, ReadStats]:
        index = read_index(path)
        target = torch.zeros(256, 1024)
        job = ShardJob("w", ("w",), target, (Piece(0, None, (Box((0, 0), (0, 512), (256, 512)),)),), None)
        stats = ReadStats()
        S.read_jobs([job], {0: index}, {(0, "w"): index.tree["w"]}, stats, verify=True)
        return target, stats

    target, stats = restore(good)
    assert torch.equal(target[:, 512:], torch.load(good, weights_only=True)["w"])
    assert torch.count_nonzero(target[:, :512]) == 0
    assert stats.bytes_read == stats.bytes_verified == src.nbytes
    assert sum(parts) == 256 and len(parts) == (256 // 32 if chunk == 64 << 10 else 1)

    index = read_index(good)
    off = index.data_offset(index.tree["w"].storage.key, good.read_bytes())
    for where in (0, src.nbytes // 2 + 3, src.nbytes - 1):  # first group, a middle one, the last
        bad = tmp_path / f"bad_{where}" / "checkpoint_0.pt"
        bad.parent.mkdir()
        raw = bytearray(good.read_bytes())
        raw[off + where] ^= 0x10
        bad.write_bytes(bytes(raw))
        with pytest.raises(CorruptCheckpointError, match="CRC32") as e:
            restore(bad)
        assert e.value.key == "w" and str(bad) in str(e.value)

    def fail(*a):  # what a vectored read of a file that shrank raises
        raise OSError("preadv moved 0 of 2048 bytes")

    monkeypatch.setattr(S._iovec, "vectored", fail)
    with pytest.raises(CorruptCheckpointError, match="reading the file failed") as e:
        restore(good)
    assert e.value.key == "w" and str(good) in str(e.value)
