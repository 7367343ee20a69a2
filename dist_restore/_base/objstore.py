"""Checkpoints in object stores (``s3://``, ``gs://``, ``az://``) through obstore.

obstore wraps Rust's ``object_store``: range requests with the GIL released, retries of
throttling, 5xx and timeouts with exponential backoff. It is an optional extra
(``pip install "dist_restore[s3]"``), imported only when a URL is used.

Endpoint and credentials come from the environment as AWS, Google and Azure tools take them
(``AWS_ENDPOINT_URL``, ``AWS_REGION``, ``AWS_ACCESS_KEY_ID``, ``GOOGLE_SERVICE_ACCOUNT``,
``AZURE_STORAGE_ACCOUNT_NAME``, ...; ``AWS_ALLOW_HTTP=true`` for a plain-HTTP endpoint), or
from :func:`configure_object_store`.

Consistency: each object's size and ETag are pinned when it is opened (planned); every range
request carries ``If-Match`` with that ETag, so an object replaced or truncated under a
restore fails that request (an error naming the URL), and bytes of two versions are never
mixed. Large reads are split into parts of :data:`PART` bytes, runs close together merged
into one request, and up to :data:`IN_FLIGHT` requests kept in flight per read.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import numpy as np

from dist_restore._base.source import ByteSource, Location
from dist_restore.errors import CorruptCheckpointError

logger = logging.getLogger(__name__)

#: Largest single range request (a larger read is split into parts this big, fetched at once).
PART = 32 << 20
#: Runs less than this apart are fetched in one request (the gap read and dropped).
MERGE_GAP = 1 << 20
#: Range requests in flight at once, per process.
IN_FLIGHT = 16
#: Smallest part of a multipart upload (S3 refuses smaller parts but the last).
_MIN_UPLOAD_PART = 5 << 20

_DEFAULT_CLIENT = {"connect_timeout": timedelta(seconds=5), "timeout": timedelta(seconds=60)}
_DEFAULT_RETRY = {"max_retries": 5, "retry_timeout": timedelta(seconds=60),
                  "backoff": {"init_backoff": timedelta(milliseconds=100), "max_backoff": timedelta(seconds=5),
                              "base": 2}}

_lock = threading.Lock()
_stores: dict[str, Any] = {}
_options: dict[str, dict[str, Any]] = {}
_pool: ThreadPoolExecutor | None = None
_work: ThreadPoolExecutor | None = None


def _obstore() -> Any:
    try:
        import obstore
    except ImportError:
        raise ImportError("reading or writing s3://, gs:// or az:// checkpoints needs obstore: "
                          "pip install \"dist_restore[s3]\" (or pip install obstore)") from None
    return obstore


def configure_object_store(url: str, **options: Any) -> None:
    """Options for the stores of URLs starting with ``url`` (e.g. ``"s3://my-bucket"``), passed
    to ``obstore.store.from_url`` on top of the environment: ``config={...}`` (``endpoint``,
    ``region``, ``access_key_id``, ...), ``client_options={...}`` (``timeout``,
    ``allow_http``, ...), ``retry_config={...}``, ``credential_provider=...``. Call it before
    the restore, on every rank. The longest matching prefix wins."""
    if not isinstance(url, str) or "://" not in url:
        raise ValueError(f"configure_object_store takes a URL prefix such as 's3://bucket', not {url!r}")
    with _lock:
        _options[url.rstrip("/")] = dict(options)
        _stores.clear()


def _default_client(base: str) -> dict[str, Any]:
    """Our client defaults. (Passing client options drops the environment's ``*_ALLOW_HTTP``:
    it is read here; a plain-HTTP endpoint given in the environment allows HTTP too.)"""
    out: dict[str, Any] = dict(_DEFAULT_CLIENT)
    scheme = base.partition("://")[0].lower()
    env = {"s3": ("AWS_ALLOW_HTTP", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT"),
           "s3a": ("AWS_ALLOW_HTTP", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT"),
           "gs": ("GOOGLE_ALLOW_HTTP", "GOOGLE_STORAGE_EMULATOR_HOST"),
           "gcs": ("GOOGLE_ALLOW_HTTP", "GOOGLE_STORAGE_EMULATOR_HOST")}.get(scheme, ("AZURE_ALLOW_HTTP",
                                                                                     "AZURE_STORAGE_ENDPOINT"))
    flag = os.environ.get(env[0], os.environ.get("ALLOW_HTTP", ""))
    if flag.lower() in ("1", "true", "yes") or any(os.environ.get(v, "").startswith("http://") for v in env[1:]):
        out["allow_http"] = True
    return out


def _bucket_url(url: str) -> tuple[str, str]:
    """``("scheme://bucket", "key/inside")`` of a URL."""
    scheme, _, rest = url.partition("://")
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise ValueError(f"no bucket in {url!r}: expected {scheme}://bucket/prefix")
    return f"{scheme}://{bucket}", key.strip("/")


def store_for(url: str) -> tuple[Any, str]:
    """``(obstore store of the URL's bucket, the key it names)``; stores are built once per
    bucket and options."""
    base, key = _bucket_url(url)
    with _lock:
        st = _stores.get(base)
        if st is None:
            obstore = _obstore()
            opts = {"client_options": _default_client(base), "retry_config": dict(_DEFAULT_RETRY)}
            match = max((p for p in _options if url.startswith(p) or base.startswith(p)), key=len, default=None)
            if match is not None:
                for k, v in _options[match].items():
                    if k in ("client_options", "retry_config") and isinstance(v, dict):
                        opts[k] = {**opts[k], **v}
                    else:
                        opts[k] = v
            try:
                st = obstore.store.from_url(base, **opts)
            except Exception as e:  # noqa: BLE001 - a bad option or URL: name both
                raise ValueError(f"cannot open the object store for {url!r}: {type(e).__name__}: "
                                 f"{_short(e)}") from None
            _stores[base] = st
    return st, key


_S3_CODE = re.compile(r"<Code>([^<]{1,100})</Code>(?:<Message>([^<]{0,300})</Message>)?")


def _short(e: BaseException) -> str:
    """The first line of an obstore error (its debug dump follows), with the store's own error
    code and message where the response body holds them (``NoSuchBucket: ...``, on the next line)."""
    text = str(e).strip()
    s = text.splitlines()
    first = s[0][:500].removesuffix('<?xml version="1.0" encoding="utf-8"?>').rstrip(" :") if s else type(e).__name__
    m = _S3_CODE.search(text)
    return f"{first} [{m.group(1)}{': ' + m.group(2) if m.group(2) else ''}]" if m else first


def os_error(e: BaseException, url: str, doing: str, key: str | None = None) -> OSError:
    """An obstore error as an ``OSError`` subclass naming the URL (and the key read)."""
    what = f"{url!r}" + (f" (key {key!r})" if key else "")
    msg = f"{doing} {what}: {_short(e)}"
    name = type(e).__name__
    if isinstance(e, FileNotFoundError) or name == "NotFoundError":
        return FileNotFoundError(f"not found: {what} ({doing})")
    code = _S3_CODE.search(str(e))
    if code is not None and code.group(1) == "NoSuchBucket":  # (obstore: a generic error)
        return FileNotFoundError(f"no such bucket: {doing} {url!r}: {_short(e)}")
    if name in ("PermissionDeniedError", "UnauthenticatedError") or " 403 Forbidden" in str(e):
        return PermissionError(msg)
    if isinstance(e, OSError):
        return type(e)(msg)
    return OSError(msg)


def work_pool() -> ThreadPoolExecutor:
    """Threads that each drive a batch of a restore's reads from an object store (their range
    requests run on :func:`_in_flight`'s threads, never on these: no pool waits on itself)."""
    global _work
    with _lock:
        if _work is None:
            _work = ThreadPoolExecutor(IN_FLIGHT, thread_name_prefix="dist_restore-objwork")
        return _work


def _in_flight() -> ThreadPoolExecutor:
    global _pool
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(IN_FLIGHT, thread_name_prefix="dist_restore-get")
        return _pool


class ObjectFile(ByteSource):
    """One object, its size and ETag pinned: every range request asks for that version."""

    remote = True

    def __init__(self, store: Any, key: str, url: str, size: int, etag: str | None) -> None:
        self.store, self.key, self.name, self.size, self.etag = store, key, url, size, etag

    @classmethod
    def open(cls, url: str) -> ObjectFile:
        obstore = _obstore()
        store, key = store_for(url)
        try:
            meta = obstore.head(store, key)
        except Exception as e:  # noqa: BLE001
            raise os_error(e, url, "opening") from None
        return cls(store, key, url, int(meta["size"]), meta.get("e_tag"))

    def _get(self, lo: int, hi: int, key: str | None) -> Any:
        """Bytes ``[lo, hi)`` of this version of the object (a buffer)."""
        if hi > self.size:
            raise CorruptCheckpointError(f"object ends at byte {self.size}, a read asks for [{lo}, {hi})",
                                         file=self.name, key=key)
        obstore = _obstore()
        opts: dict[str, Any] = {"range": (lo, hi)}
        if self.etag:
            opts["if_match"] = self.etag
        try:
            buf = obstore.get(self.store, self.key, options=opts).bytes()
        except Exception as e:  # noqa: BLE001
            if type(e).__name__ == "PreconditionError":
                raise CorruptCheckpointError(f"object changed since the restore was planned (its ETag is no "
                                             f"longer {self.etag}): replaced or rewritten under the restore",
                                             file=self.name, key=key) from None
            raise os_error(e, self.name, f"reading bytes [{lo}, {hi}) of", key) from None
        if len(buf) != hi - lo:
            raise CorruptCheckpointError(f"asked for bytes [{lo}, {hi}), the store returned {len(buf)} "
                                         "(changed under the restore?)", file=self.name, key=key)
        return buf

    def pread(self, n: int, off: int, key: str | None = None) -> bytes:
        if n == 0:
            return b""
        if off + n > self.size:
            raise CorruptCheckpointError(f"object ended at byte {self.size}, {off + n - self.size} bytes short "
                                         "of what it should hold (truncated?)", file=self.name, key=key)
        return bytes(self._get(off, off + n, key))

    def read_into(self, addr: int, n: int, off: int, key: str) -> None:
        self.read_runs([addr], [off], n, key)

    def pread_many(self, ranges: Sequence[tuple[int, int]], key: str | None = None) -> list[tuple[int, bytes]]:
        if len(ranges) <= 1:
            return [(off, self.pread(n, off, key)) for n, off in ranges]
        pool = _in_flight()
        futures = [pool.submit(self.pread, n, off, key) for n, off in ranges]
        return [(off, f.result()) for (_n, off), f in zip(ranges, futures)]

    def read_runs(self, addrs: Sequence[int], offs: Sequence[int], run: int, key: str) -> None:
        if run > 0:
            self.read_many([(int(a), int(o), run) for a, o in zip(addrs, offs)], key)

    def read_many(self, items: Sequence[tuple[int, int, int]], key: str) -> None:
        """``(addr, file offset, n)`` each (in increasing file order): runs less than
        :data:`MERGE_GAP` apart fetched in one request of at most :data:`PART` bytes, a larger
        run split into parts, up to :data:`IN_FLIGHT` requests at once."""
        spans: list[tuple[int, int, list[tuple[int, int, int]]]] = []  # (lo, hi, [(addr, file off, n)])
        for a, o, run in items:
            if run <= 0:
                continue
            if spans and 0 <= o - spans[-1][1] <= MERGE_GAP and o + run - spans[-1][0] <= PART:
                lo, _hi, pieces = spans[-1]
                pieces.append((a, o, run))
                spans[-1] = (lo, o + run, pieces)
                continue
            done = 0
            while done < run:
                n = min(PART, run - done)
                spans.append((o + done, o + done + n, [(a + done, o + done, n)]))
                done += n

        def fetch(span: tuple[int, int, list[tuple[int, int, int]]]) -> None:
            lo, hi, pieces = span
            buf = memoryview(self._get(lo, hi, key))
            for a, o, n in pieces:
                ctypes.memmove(a, _address(buf, o - lo), n)

        if not spans:
            return
        if len(spans) == 1:
            fetch(spans[0])
            return
        pool = _in_flight()
        futures = [pool.submit(fetch, s) for s in spans]
        try:
            for f in futures:
                f.result()
        finally:  # every request has ended (written or not) before the target is given back
            for f in futures:
                f.cancel()
            for f in futures:
                if not f.cancelled():
                    f.exception()


def _address(buf: memoryview, at: int) -> int:
    """The address of byte ``at`` of a read-only buffer."""
    return int(np.frombuffer(buf, dtype=np.uint8).ctypes.data) + at


class ObjectDir(Location):
    """A prefix in an object store, listed once: the sizes and ETags seen then are pinned."""

    is_remote = True

    def __init__(self, url: str) -> None:
        self.name = url.rstrip("/")
        self.store, self.prefix = store_for(self.name)
        self._listing: dict[str, tuple[int, str | None]] | None = None
        self._dirs: list[str] = []

    def _list(self) -> dict[str, tuple[int, str | None]]:
        if self._listing is None:
            self._listing, self._dirs = self._fetch_listing()
        return self._listing

    def refresh(self) -> None:
        """Forget the pinned listing (the next call lists again)."""
        self._listing = None

    def _fetch_listing(self) -> tuple[dict[str, tuple[int, str | None]], list[str]]:
        obstore = _obstore()
        try:
            res = obstore.list_with_delimiter(self.store, self.prefix + "/" if self.prefix else None)
        except Exception as e:  # noqa: BLE001
            raise os_error(e, self.name, "listing") from None
        out: dict[str, tuple[int, str | None]] = {}
        for m in res["objects"]:
            name = m["path"].rsplit("/", 1)[-1]
            out[name] = (int(m["size"]), m.get("e_tag"))
        dirs = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in res["common_prefixes"])
        return out, dirs

    def exists(self) -> bool:
        return bool(self._list())

    def files(self) -> dict[str, int]:
        return {k: v[0] for k, v in self._list().items()}

    def is_file(self, file: str) -> bool:
        return file in self._list()

    def subdirs(self) -> list[str]:
        self._list()
        return list(self._dirs)

    def _key(self, file: str) -> str:
        return f"{self.prefix}/{file}" if self.prefix else file

    def put_file(self, local: str | os.PathLike[str], file: str) -> None:
        from pathlib import Path

        obstore = _obstore()
        try:
            obstore.put(self.store, self._key(file), Path(local), chunk_size=max(PART // 4, _MIN_UPLOAD_PART),
                        max_concurrency=IN_FLIGHT)
        except Exception as e:  # noqa: BLE001
            raise os_error(e, self.join(file), "uploading") from None
        self._listing = None

    def put_bytes(self, file: str, data: bytes) -> None:
        obstore = _obstore()
        try:
            obstore.put(self.store, self._key(file), data, use_multipart=False)
        except Exception as e:  # noqa: BLE001
            raise os_error(e, self.join(file), "writing") from None
        self._listing = None

    def delete(self, file: str) -> None:
        obstore = _obstore()
        try:
            obstore.delete(self.store, self._key(file))
        except FileNotFoundError:
            pass
        except Exception as e:  # noqa: BLE001
            if type(e).__name__ != "NotFoundError":
                raise os_error(e, self.join(file), "deleting") from None
        self._listing = None

    def open(self, file: str) -> ByteSource:
        got = self._list().get(file)
        if got is None:
            raise FileNotFoundError(f"not found: {self.join(file)!r}")
        return ObjectFile(self.store, self._key(file), self.join(file), got[0], got[1])


__all__ = ["IN_FLIGHT", "MERGE_GAP", "PART", "ObjectDir", "ObjectFile", "configure_object_store", "store_for"]
