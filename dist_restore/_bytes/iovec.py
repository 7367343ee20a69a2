"""Scatter/gather between one flat buffer and many small tensors, in a few system calls.

Copying 10,000 small tensors one by one costs about 1 us each in Python or in the torch
dispatcher (10-25 ms in all), several times a broadcast of their bytes. Here the flat buffer
lives in a memory file (``memfd``) mapped into the process: one ``preadv`` on that file copies
a range of it into up to ``IOV_MAX`` separate buffers, one ``pwritev`` gathers them into it,
all inside the kernel (about 0.7 ms for 10,000 tensors of 256 bytes on the 2-core dev
machine). The iovec arrays are built with numpy from the tensors' addresses beforehand.
The exchange uses this for buckets holding hundreds of tensors whose sizes occur once;
:mod:`dist_restore._bytes.rows` (one numpy copy per size, about twice as fast) for the others.

Linux only in practice (``memfd_create``, ``preadv``, ``pwritev``): :func:`available` is
false elsewhere and callers copy tensor by tensor.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import mmap
import os
import weakref
from collections.abc import Sequence

import numpy as np
import torch

logger = logging.getLogger(__name__)

IOV_MAX = 1024  # the Linux limit of iovecs per call (sysconf(_SC_IOV_MAX))


def _load_libc() -> tuple[object, object] | None:
    if not hasattr(os, "memfd_create"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fns = libc.preadv, libc.pwritev
    except (OSError, AttributeError):
        return None
    for fn in fns:
        fn.restype = ctypes.c_ssize_t
        fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64]
    return fns


_FNS = _load_libc()


def available() -> bool:
    """Whether this platform has memory files and vectored file I/O."""
    return _FNS is not None


def iovecs(addresses: Sequence[int], sizes: Sequence[int]) -> np.ndarray:
    """A C ``struct iovec[]`` (base, length) as an ``(n, 2)`` uint64 array."""
    iov = np.empty((len(addresses), 2), dtype=np.uint64)
    if len(addresses):
        iov[:, 0] = addresses
        iov[:, 1] = sizes
    return iov


class MemBuffer:
    """A flat byte buffer backed by an anonymous memory file, for vectored copies.

    Args:
        nbytes: Size of the buffer (> 0).
        populate: Allocate and map every page now, in bulk (``fallocate`` + ``MAP_POPULATE``),
            instead of one page fault per page on first touch.
        seal: Seal the file's size (``F_SEAL_SHRINK``, ``F_SEAL_GROW``), so that a process
            that maps it can never fault past its end.

    :attr:`tensor` is a CPU ``uint8`` tensor over the whole buffer (what a collective
    sends or receives into). Call :meth:`close` when done.
    """

    def __init__(self, nbytes: int, populate: bool = False, seal: bool = False) -> None:
        if _FNS is None:
            raise OSError("vectored memory-file copies are not available on this platform")
        if nbytes <= 0:
            raise ValueError(f"nbytes must be > 0, got {nbytes}")
        self.nbytes = nbytes
        flags = getattr(os, "MFD_CLOEXEC", 0) | (getattr(os, "MFD_ALLOW_SEALING", 0) if seal else 0)
        self._fd = os.memfd_create("dist_restore_bucket", flags)
        try:
            os.ftruncate(self._fd, nbytes)
            if seal:
                fcntl.fcntl(self._fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
            flags = mmap.MAP_SHARED
            if populate:
                os.posix_fallocate(self._fd, 0, nbytes)  # the pages, in one call
                flags |= getattr(mmap, "MAP_POPULATE", 0)
            self._mm = mmap.mmap(self._fd, nbytes, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(self._fd)
            raise
        self.tensor = torch.frombuffer(self._mm, dtype=torch.uint8)
        self._closer = weakref.finalize(self, os.close, self._fd)  # dropped without close(): still closed

    def scatter(self, iov: np.ndarray, offset: int = 0) -> None:
        """Buffer bytes from ``offset`` on, back to back, into the buffers of ``iov``."""
        self._vectored(0, iov, offset)

    def gather(self, iov: np.ndarray, offset: int = 0) -> None:
        """The buffers of ``iov``, back to back, into the buffer from ``offset`` on."""
        self._vectored(1, iov, offset)

    def _vectored(self, which: int, iov: np.ndarray, offset: int) -> None:
        vectored(self._fd, which, iov, offset, self.nbytes)

    def close(self) -> None:
        """Close the file. The mapping is never unmapped here: it goes with the last tensor
        over it (a collective still in flight may hold one; unmapping under it would crash)."""
        if self._fd >= 0:
            self._closer()  # closes the fd once
            self._fd = -1
        self.tensor = None  # type: ignore[assignment]
        self._mm = None  # type: ignore[assignment]

    def __enter__(self) -> MemBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def vectored(fd: int, which: int, iov: np.ndarray, offset: int, size: int) -> None:
    """``preadv`` (``which`` 0: file -> buffers) or ``pwritev`` (1: buffers -> file) of all of
    ``iov`` from ``offset`` of the ``size``-byte file ``fd``, resuming partial transfers."""
    assert _FNS is not None
    fn = _FNS[which]
    iov = np.ascontiguousarray(iov, dtype=np.uint64)
    total = int(iov[:, 1].sum()) if len(iov) else 0
    if offset < 0 or offset + total > size:
        raise ValueError(f"{total} bytes at offset {offset} do not fit a {size}-byte buffer")
    i = 0
    while i < len(iov):
        k = min(IOV_MAX, len(iov) - i)
        want = int(iov[i : i + k, 1].sum())
        got = fn(fd, iov.ctypes.data + i * 16, k, offset)
        if got < 0:
            err = ctypes.get_errno()
            if err == errno.EINTR:
                continue
            raise OSError(err, f"{'pwritev' if which else 'preadv'} on a memory file: {os.strerror(err)}")
        if got == 0 and want > 0:  # cannot happen within the file's size
            raise OSError(f"{'pwritev' if which else 'preadv'} on a memory file moved 0 of {want} bytes")
        offset += got
        if got == want:
            i += k
            continue
        # partial (Linux moves at most ~2 GiB per call): skip what went, resume mid-iovec
        ends = np.cumsum(iov[i : i + k, 1], dtype=np.uint64)
        j = int(np.searchsorted(ends, got, side="right"))  # first iovec not fully moved
        done_in_j = got - (int(ends[j - 1]) if j else 0)
        iov = iov[i + j :].copy()
        iov[0, 0] += np.uint64(done_in_j)
        iov[0, 1] -= np.uint64(done_in_j)
        i = 0
