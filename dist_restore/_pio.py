"""Reading file bytes straight into memory by ``preadv``, in large requests, CRC'd as they land.

Used for large records: a cold file is read in requests of several MiB (what a disk serves
fastest), the kernel copies each straight into the target (no mapping, so no page faults and no
mapped pages adding to the RSS), and each request's CRC32 runs right after it landed, while a
second thread's request is in flight. ``preadv`` and the CRC32 both release the GIL.
"""

from __future__ import annotations

import ctypes
import os
from concurrent.futures import Executor

from dist_restore._crc import crc32, crc32_combine

__all__ = ["hint", "read_into"]


def hint(fd: int, lo: int, hi: int) -> None:
    """Ask the kernel to start reading file bytes ``[lo, hi)`` now (asynchronous readahead)."""
    if hi > lo:
        os.posix_fadvise(fd, lo, hi - lo, os.POSIX_FADV_WILLNEED)


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
            running = crc32((ctypes.c_char * n).from_address(addr + o), running)
    return running


def read_into(fd: int, addr: int, file_off: int, nbytes: int, *, crc: bool, chunk: int, parts: int,
              pool: Executor | None) -> int | None:
    """File bytes ``[file_off, +nbytes)`` into memory at ``addr``: ``parts`` contiguous parts,
    all but the first on ``pool``, each read in ``chunk``-byte requests.

    Returns:
        The CRC32 of the bytes (the parts' CRCs combined), or ``None`` without ``crc``.
    """
    if parts <= 1 or pool is None:
        running = read_part(fd, addr, file_off, 0, nbytes, chunk, crc)
        return running if crc else None
    step = -(-nbytes // parts // chunk) * chunk
    bounds = [(i * step, min(nbytes, (i + 1) * step)) for i in range(parts) if i * step < nbytes]
    futures = [pool.submit(read_part, fd, addr, file_off, lo, hi, chunk, crc) for lo, hi in bounds[1:]]
    try:
        crcs = [read_part(fd, addr, file_off, *bounds[0], chunk, crc)]
    finally:
        crcs += [f.result() for f in futures]  # always wait: the workers write into the target
    if not crc:
        return None
    total = crcs[0]
    for (lo, hi), part in zip(bounds[1:], crcs[1:]):
        total = crc32_combine(total, part, hi - lo)
    return total
