"""CRC32 implementations against zlib (the oracle): isal or zlib for small buffers, libdeflate
(through the ``deflate`` package) for large ranges, and ``crc32_combine``."""

from __future__ import annotations

import array
import ctypes
import mmap
import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dist_restore._base import crc as C


def test_libdeflate_is_found_where_deflate_is_installed() -> None:
    """The package depends on ``deflate``: its CRC32 must be found and used, not silently lost."""
    pytest.importorskip("deflate")
    assert C.libdeflate_crc32 is not None


@settings(max_examples=80, deadline=None)
@given(n=st.integers(0, 300_000), start=st.integers(0, 64), seed=st.integers(0, 2**32 - 1))
def test_every_entry_point_matches_zlib(n: int, start: int, seed: int) -> None:
    data = os.urandom(n + start)
    want = zlib.crc32(data[start:], seed)
    buf = ctypes.create_string_buffer(data, len(data))
    assert C.crc32_at(ctypes.addressof(buf) + start, n, seed) == want
    assert C.crc32_buf(memoryview(data)[start:], seed) == want
    assert C.crc32_buf(bytearray(data[start:]), seed) == want
    assert C.crc32_buf((ctypes.c_char * n).from_address(ctypes.addressof(buf) + start), seed) == want
    assert C.crc32(data[start:], seed) == want


def test_buffers_of_other_kinds(tmp_path: Path) -> None:
    """A read-only mapping's slice, an array of ints (itemsize 4) and a non-contiguous view."""
    data = os.urandom(200_003)
    f = tmp_path / "d.bin"
    f.write_bytes(data)
    with open(f, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        mv = memoryview(mm)
        assert C.crc32_buf(mv[5:150_000]) == zlib.crc32(data[5:150_000])
        mv.release()
    a = array.array("i", range(50_000))
    assert C.crc32_buf(a, 7) == zlib.crc32(a.tobytes(), 7)
    strided = memoryview(data)[::2]  # not contiguous: the fallback takes it (or refuses it as zlib does)
    try:
        want = zlib.crc32(strided)
    except (BufferError, TypeError, ValueError):
        with pytest.raises((BufferError, TypeError, ValueError)):
            C.crc32_buf(strided)
    else:
        assert C.crc32_buf(strided) == want


def test_crc32_combine_matches_zlib() -> None:
    a, b = os.urandom(1000), os.urandom(70_001)
    assert C.crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)
    assert C.crc32_combine(zlib.crc32(a), zlib.crc32(b""), 0) == zlib.crc32(a)


def test_isal_only_when_asked() -> None:
    """``DIST_RESTORE_CRC=isal`` turns libdeflate off (a benchmark's comparison); the
    results are the same."""
    code = ("import os, zlib; from dist_restore._base import crc as C; d = os.urandom(100_000); "
            "print(C.libdeflate_crc32 is None, C.crc32_buf(d) == zlib.crc32(d))")
    env = dict(os.environ, DIST_RESTORE_CRC="isal")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["True", "True"], out.stderr
