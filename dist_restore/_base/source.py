"""Where a checkpoint's bytes come from: a local directory, or a prefix in an object store.

The seam between *which* byte ranges a restore needs (the formats and the planner) and *how*
they are fetched. A :class:`Location` is a checkpoint directory: it lists its files with their
sizes and opens one as a :class:`ByteSource`, which reads ranges of it: ``pread`` for headers
and metadata, ``read_into`` / ``read_runs`` straight into a target's memory.

Local paths are plain files read with ``pread`` (no new dependency, the speed they had).
``s3://``, ``gs://`` and ``az://`` URLs go through obstore (Rust ``object_store``: range
requests with the GIL released, retries with backoff), imported only for such URLs; see
:mod:`dist_restore._base.objstore`.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import errno
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from dist_restore.errors import CorruptCheckpointError

#: URL schemes of object stores (``file://`` is a local path).
URL = re.compile(r"^(s3|s3a|gs|gcs|az|azure|abfs|abfss|adl)://", re.IGNORECASE)

_libc = ctypes.CDLL(None, use_errno=True)
_pread = _libc.pread
_pread.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int64]
_pread.restype = ctypes.c_ssize_t


class UrlPath(str):
    """A URL that joins like a ``Path`` (``url / "file"``) and has a ``name``: what a format keeps
    as its root and names in errors when the checkpoint is in an object store."""

    def __truediv__(self, other: str) -> UrlPath:
        return UrlPath(f"{self.rstrip('/')}/{other}")

    @property
    def name(self) -> str:
        return self.rstrip("/").rsplit("/", 1)[-1]


def is_url(path: Any) -> bool:
    """Whether ``path`` names an object in an object store (``s3://``, ``gs://``, ``az://``, ...)."""
    return isinstance(path, str) and URL.match(path) is not None


def local_path(path: str | os.PathLike[str]) -> Path:
    """``path`` as a local path (``file://`` stripped)."""
    if isinstance(path, str) and path.lower().startswith("file://"):
        return Path(path[len("file://"):])
    return Path(path)


class ByteSource:
    """One file or object, open for range reads. ``name`` (its path or URL) is what errors name."""

    name: str
    size: int
    #: Fetched by range requests (an object store): reads are batched and kept in flight.
    remote = False

    def pread(self, n: int, off: int, key: str | None = None) -> bytes:
        """Exactly ``n`` bytes at ``off``.

        Raises:
            CorruptCheckpointError: the file ends before them (truncated, or changed).
        """
        raise NotImplementedError

    def read_into(self, addr: int, n: int, off: int, key: str) -> None:
        """``n`` bytes at ``off`` into memory at ``addr``."""
        raise NotImplementedError

    def pread_many(self, ranges: Sequence[tuple[int, int]], key: str | None = None) -> list[tuple[int, bytes]]:
        """``[(offset, bytes)]`` of each ``(n, offset)`` (an object store fetches them concurrently)."""
        return [(off, self.pread(n, off, key)) for n, off in ranges]

    def read_runs(self, addrs: Sequence[int], offs: Sequence[int], run: int, key: str) -> None:
        """``run`` bytes at each of ``offs`` (increasing) into memory at the matching ``addrs``."""
        for a, o in zip(addrs, offs):
            self.read_into(a, run, o, key)

    def read_many(self, items: Sequence[tuple[int, int, int]], key: str) -> None:
        """``n`` bytes at each file offset into memory at each address, ``(addr, offset, n)``."""
        for a, o, n in items:
            self.read_into(a, n, o, key)

    def close(self) -> None:
        pass

    def __enter__(self) -> ByteSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LocalFile(ByteSource):
    """A local file, read with ``pread``."""

    def __init__(self, path: str | os.PathLike[str], fd: int | None = None) -> None:
        self.name = str(path)
        self.fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)) if fd is None else fd
        self._own = fd is None
        try:
            self.size = os.fstat(self.fd).st_size
        except BaseException:
            self.close()
            raise

    def pread(self, n: int, off: int, key: str | None = None) -> bytes:
        parts, got = [], 0
        while got < n:
            b = os.pread(self.fd, n - got, off + got)
            if not b:
                raise CorruptCheckpointError(f"file ended at byte {off + got}, {n - got} bytes short of what "
                                             "it should hold (truncated, or changed under the restore?)",
                                             file=self.name, key=key)
            parts.append(b)
            got += len(b)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def read_into(self, addr: int, n: int, off: int, key: str) -> None:
        got = 0
        while got < n:
            r = _pread(self.fd, addr + got, n - got, off + got)
            if r < 0:
                e = ctypes.get_errno()
                if e == errno.EINTR:
                    continue
                raise OSError(e, f"{os.strerror(e)} reading {n} bytes at {off} of {self.name!r} for key {key!r}")
            if r == 0:
                raise CorruptCheckpointError(f"file ended at byte {off + got}, {n - got} bytes short of the "
                                             "tensor's data (it shrank since it was planned?)", file=self.name,
                                             key=key)
            got += r

    def read_runs(self, addrs: Sequence[int], offs: Sequence[int], run: int, key: str) -> None:
        fd, pread = self.fd, _pread
        for a, o in zip(addrs, offs):  # rows of a column slice: one pread each
            if pread(fd, a, run, o) != run:
                self.read_into(a, run, o, key)  # short, interrupted or failed: retried, or named

    def close(self) -> None:
        if self._own and self.fd >= 0:
            os.close(self.fd)
        self.fd = -1


class Location:
    """A checkpoint directory (or one file's directory): local, or a prefix in an object store.

    ``name`` is the path or URL as errors name it; :meth:`join` names a file in it.
    """

    name: str
    is_remote: bool = False

    @property
    def root(self) -> Path | UrlPath:
        """The directory as a path that joins with ``/`` (a :class:`UrlPath` for a URL)."""
        return UrlPath(self.name)

    def join(self, file: str) -> str:
        return f"{self.name.rstrip('/')}/{file}"

    def exists(self) -> bool:
        """Whether the directory exists (an object-store prefix: holds any object)."""
        raise NotImplementedError

    def files(self) -> dict[str, int]:
        """``{name: size}`` of the files directly in it."""
        raise NotImplementedError

    def is_file(self, file: str) -> bool:
        raise NotImplementedError

    def open(self, file: str) -> ByteSource:
        """``file`` open for range reads (its size and version pinned now).

        Raises:
            FileNotFoundError: no such file, naming it.
        """
        raise NotImplementedError

    def subdirs(self) -> list[str]:
        """Names of the directories (object-store: common prefixes) directly in it."""
        raise NotImplementedError

    def sub(self, name: str) -> Location:
        """The directory ``name`` inside this one."""
        return location(self.join(name))

    def put_file(self, local: str | os.PathLike[str], file: str) -> None:
        """Store the local file ``local`` as ``file`` (object stores: multipart when large; the
        object appears whole or not at all)."""
        raise NotImplementedError

    def put_bytes(self, file: str, data: bytes) -> None:
        """Store ``data`` as ``file``, atomically."""
        raise NotImplementedError

    def delete(self, file: str) -> None:
        """Remove ``file`` (no error if it is not there)."""
        raise NotImplementedError

    def read_bytes(self, file: str, cap: int) -> bytes:
        """The whole of a small file (JSON, metadata).

        Raises:
            CorruptCheckpointError: it is larger than ``cap`` bytes.
        """
        with self.open(file) as src:
            if src.size > cap:
                raise CorruptCheckpointError(f"{src.size}-byte file is above the {cap}-byte cap",
                                             file=src.name)
            return src.pread(src.size, 0)


class LocalDir(Location):
    """A local directory."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = local_path(path)
        self.name = str(self.path)

    @property
    def root(self) -> Path:
        return self.path

    def join(self, file: str) -> str:
        return str(self.path / file)

    def exists(self) -> bool:
        return self.path.is_dir()

    def files(self) -> dict[str, int]:
        out = {}
        with os.scandir(self.path) as it:
            for e in it:
                if e.is_file():
                    out[e.name] = e.stat().st_size
        return out

    def is_file(self, file: str) -> bool:
        return (self.path / file).is_file()

    def open(self, file: str) -> ByteSource:
        return LocalFile(self.path / file)

    def subdirs(self) -> list[str]:
        with os.scandir(self.path) as it:
            return sorted(e.name for e in it if e.is_dir())

    def put_file(self, local: str | os.PathLike[str], file: str) -> None:
        import shutil

        tmp = self.path / f".{file}.{os.getpid()}.tmp"
        shutil.copyfile(local, tmp)
        os.replace(tmp, self.path / file)

    def put_bytes(self, file: str, data: bytes) -> None:
        tmp = self.path / f".{file}.{os.getpid()}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, self.path / file)

    def delete(self, file: str) -> None:
        try:
            os.unlink(self.path / file)
        except FileNotFoundError:
            pass


_pinned: contextvars.ContextVar[dict[str, Location] | None] = contextvars.ContextVar("dist_restore_pinned",
                                                                                   default=None)


@contextlib.contextmanager
def pinned_listings() -> Iterator[None]:
    """Within it, each object-store directory is listed once: one restore sees one version of
    every object (their sizes and ETags pinned when first listed), and does not list again."""
    token = _pinned.set({}) if _pinned.get() is None else None
    try:
        yield
    finally:
        if token is not None:
            _pinned.reset(token)


def location(path: str | os.PathLike[str]) -> Location:
    """The :class:`Location` of a directory path or URL (object stores import their client here)."""
    if is_url(path):
        from dist_restore._base.objstore import ObjectDir

        url = str(path).rstrip("/")
        seen = _pinned.get()
        if seen is None:
            return ObjectDir(url)
        loc = seen.get(url)
        if loc is None:
            loc = seen[url] = ObjectDir(url)
        return loc
    return LocalDir(path)


def split(path: str | os.PathLike[str]) -> tuple[Location, str]:
    """``(its directory, its name)`` of a file path or URL."""
    if is_url(path):
        s = str(path).rstrip("/")
        head, _, tail = s.rpartition("/")
        return location(head), tail
    p = local_path(path)
    return LocalDir(p.parent), p.name


__all__ = ["ByteSource", "LocalDir", "LocalFile", "Location", "UrlPath", "is_url", "local_path", "location", "pinned_listings", "split"]
