"""Moving file bytes without holding them: positional writes, kernel copies, CRC32 of a range.

Pure byte helpers over file descriptors; nothing here knows about checkpoints.
"""

from __future__ import annotations

import errno
import os
from typing import Any

from dist_restore._base.crc import crc32_buf

_CHUNK = 8 << 20  # buffer of the read/write fallback and of range checksums
# copy_file_range says "not here" with these (another filesystem on old kernels, special files)
_NO_KERNEL_COPY = (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM)


def pwrite_all(fd: int, data: Any, pos: int) -> int:
    """Write every byte of ``data`` at ``pos``; returns how many."""
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], pos + done)
    return done


def copy_range(src_fd: int, src_offset: int, dst_fd: int, dst_offset: int, nbytes: int) -> None:
    """Copy ``nbytes`` from ``src_fd`` at ``src_offset`` to ``dst_fd`` at ``dst_offset``.

    ``copy_file_range``: the kernel moves the bytes page cache to page cache (or shares the
    extents, on filesystems with reflinks); nothing is mapped or copied into this process.
    Falls back to reads and writes through one small buffer where the kernel cannot.

    Raises:
        EOFError: the source ends before ``nbytes`` were copied.
    """
    done = 0
    kernel = True
    buf: bytearray | None = None
    while done < nbytes:
        n = 0
        if kernel:
            try:
                n = os.copy_file_range(src_fd, dst_fd, nbytes - done, src_offset + done, dst_offset + done)
            except OSError as e:
                if e.errno not in _NO_KERNEL_COPY:
                    raise
                kernel = False
        if not kernel:
            buf = buf if buf is not None else bytearray(min(nbytes, _CHUNK))
            view = memoryview(buf)[: min(len(buf), nbytes - done)]
            n = os.preadv(src_fd, [view], src_offset + done)
            if n > 0:
                pwrite_all(dst_fd, view[:n], dst_offset + done)
        if n <= 0:
            raise EOFError(f"file ended at byte {src_offset + done}, {nbytes - done} bytes short")
        done += n


def range_crc32(fd: int, offset: int, nbytes: int, buf: bytearray) -> int:
    """CRC32 of ``nbytes`` of ``fd`` at ``offset``, read through ``buf``.

    Raises:
        EOFError: the file ends first.
    """
    crc = done = 0
    view = memoryview(buf)
    while done < nbytes:
        part = view[: min(len(buf), nbytes - done)]
        n = os.preadv(fd, [part], offset + done)
        if n <= 0:
            raise EOFError(f"file ended at byte {offset + done}, {nbytes - done} bytes short")
        crc = crc32_buf(part[:n], crc)
        done += n
    return crc & 0xFFFFFFFF


def new_buffer() -> bytearray:
    """A buffer for :func:`range_crc32`."""
    return bytearray(_CHUNK)


def start_writeback(fd: int, start: int, end: int) -> None:
    """Start writing ``[start, end)`` of ``fd`` to disk now and let its pages go once written
    (``POSIX_FADV_DONTNEED``): a large output neither piles up dirty in the page cache nor
    leaves one long ``fsync`` to the end. A hint only; errors are ignored."""
    if end > start and hasattr(os, "posix_fadvise"):
        try:
            os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass
