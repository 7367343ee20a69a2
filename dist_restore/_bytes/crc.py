"""CRC32 helpers: the fastest available implementation, and combining two CRCs.

``crc32_combine`` lets two threads check two halves of one zip record and still compare
one CRC with the record's (zlib's ``crc32_combine``, which Python's ``zlib`` does not
expose; this is the same arithmetic over GF(2), a few dozen microseconds a call).
"""

from __future__ import annotations

import zlib

try:  # 5-9 GB/s on the 2-core dev machine, vs ~2-3 GB/s for zlib; both release the GIL
    from isal.isal_zlib import crc32
except ImportError:  # pragma: no cover - exercised only without isal
    crc32 = zlib.crc32

__all__ = ["crc32", "crc32_combine"]

_POLY = 0xEDB88320  # CRC-32 (zip), reflected


def _multmodp(a: int, b: int) -> int:
    """``a * b`` modulo the CRC polynomial (reflected bit order)."""
    m = 1 << 31
    p = 0
    while True:
        if a & m:
            p ^= b
            if a & (m - 1) == 0:
                return p
        m >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1


def _x2n_table() -> list[int]:
    table, p = [], 1 << 30  # x^1
    for _ in range(32):
        table.append(p)
        p = _multmodp(p, p)
    return table


_X2N = _x2n_table()  # x^(2^k) mod P


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """The CRC32 of ``A + B`` from ``crc32(A)``, ``crc32(B)`` and ``len(B)``."""
    if len2 < 0:
        raise ValueError(f"len2 must be >= 0, got {len2}")
    p, k, n = 1 << 31, 3, len2  # x^(8 * len2) mod P: 8 bits per byte -> start at 2^3
    while n:
        if n & 1:
            p = _multmodp(_X2N[k & 31], p)
        n >>= 1
        k += 1
    return _multmodp(p, crc1) ^ (crc2 & 0xFFFFFFFF)
