"""Errors on paths name the path.

``open`` and ``os.open`` put the file name in their ``OSError``; ``os.pread``, ``os.fstat``,
``mmap``, ``write`` and ``fsync`` on an open file do not ("[Errno 28] No space left on
device": of which file?). Every place that reads or writes checkpoint files passes its
``OSError`` through :func:`raise_with_path`, which keeps the errno, and so the subclass
(``IsADirectoryError``, ``PermissionError``, ...), and adds the path.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import NoReturn


def raise_with_path(e: OSError, path: str | os.PathLike[str], doing: str | None = None) -> NoReturn:
    """Raise ``e`` naming ``path`` (call it in the ``except`` block that caught ``e``): ``e``
    itself if it names a file already, else an error of the same errno, and so the same
    subclass, with ``path`` as its ``filename`` (caused by ``e``).

    Args:
        e: The error.
        path: The file or directory being read or written.
        doing: What was being done, e.g. ``"writing checkpoint_3.pt"``, added to the message.
    """
    if e.filename is not None:
        raise e
    reason = e.strerror or str(e) or type(e).__name__
    if doing:
        reason = f"{reason} ({doing})"
    if e.errno is None:
        raise OSError(f"{reason}: {str(path)!r}") from e
    raise OSError(e.errno, reason, str(path)) from e  # OSError(errno, ...) is the errno's subclass


def not_found(path: str | os.PathLike[str], what: str = "checkpoint file") -> FileNotFoundError:
    """``FileNotFoundError`` naming ``path``, and the target of a dangling symbolic link."""
    p = Path(path)
    message = f"{what} not found: {str(p)!r}"
    if p.is_symlink():
        try:
            message += f" (a symbolic link to {os.readlink(p)!r}, which does not exist)"
        except OSError:
            message += " (a dangling symbolic link)"
    return FileNotFoundError(message)  # the message names the path (no "[Errno 2]" prefix: as before)


def open_regular(path: str | os.PathLike[str], what: str = "checkpoint file") -> int:
    """``os.open(path, O_RDONLY)`` of a regular file; the descriptor.

    Raises:
        FileNotFoundError: no such file (or a dangling symbolic link); names the path.
        IsADirectoryError: ``path`` is a directory.
        OSError: not a regular file (a FIFO, a device: opened without blocking), or
            unreadable; every one names the path.
    """
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer (no effect on regular files)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise not_found(path, what) from None
    except OSError as e:
        raise_with_path(e, path)
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, f"{what} is a directory, not a file", str(path))
        if not stat.S_ISREG(mode):
            raise OSError(errno.EINVAL, f"{what} is not a regular file (mode {stat.filemode(mode)})", str(path))
        os.set_blocking(fd, True)
    except OSError as e:
        os.close(fd)
        raise_with_path(e, path)
    except BaseException:
        os.close(fd)
        raise
    return fd
