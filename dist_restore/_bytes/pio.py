"""Reading file bytes straight into memory by ``preadv``, in large requests, CRC'd as they land.

Used for large records: a cold file is read in requests of several MiB (what a disk serves
fastest), the kernel copies each straight into the target (no mapping, so no page faults and no
mapped pages adding to the RSS), and each request's CRC32 runs right after it landed, while
other threads' requests are in flight. ``preadv`` and the CRC32 both release the GIL.
"""

from __future__ import annotations

import ctypes
import os

from dist_restore._base.crc import crc32_at

__all__ = ["read_part"]


def read_part(fd: int, addr: int, file_off: int, lo: int, hi: int, chunk: int, crc: bool) -> int:
    """(any thread) Bytes ``[lo, hi)`` of a range at ``file_off`` into ``addr + lo``, in requests
    of ``chunk`` bytes; their CRC32 (0 without ``crc``).

    Raises:
        EOFError: the file ended first (it shrank since it was indexed).
    """
    running = 0
    for o in range(lo, hi, chunk):
        n = min(chunk, hi - o)
        got = 0
        while got < n:  # a regular file reads short only at its end (or on a signal)
            r = os.preadv(fd, [(ctypes.c_char * (n - got)).from_address(addr + o + got)], file_off + o + got)
            if r == 0:
                raise EOFError(f"file ended at byte {file_off + o + got}, "
                               f"{hi - o - got} bytes before the end of a tensor's data")
            got += r
        if crc:
            running = crc32_at(addr + o, n, running)
    return running
