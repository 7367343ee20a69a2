"""A real S3 endpoint for tests: moto's ``ThreadedMotoServer`` on 127.0.0.1 in this process.

``s3_server()`` starts it, points the AWS environment variables at it (children spawned by the
test inherit them) and creates a bucket; ``upload_dir`` copies a local checkpoint into it.
Nothing here is a mock of the client: dist_restore talks HTTP to the server through obstore.
"""

from __future__ import annotations

import contextlib
import os
import socket
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_ALLOW_HTTP",
       "AWS_EC2_METADATA_DISABLED")


@dataclass
class S3:
    endpoint: str
    bucket: str
    server: object

    def url(self, *parts: str) -> str:
        return "/".join([f"s3://{self.bucket}", *parts])

    def store(self):  # noqa: ANN201 - an obstore store of the bucket (for test set-up only)
        from obstore.store import from_url

        return from_url(f"s3://{self.bucket}", client_options={"allow_http": True})

    def put(self, key: str, data: bytes) -> None:
        import obstore

        obstore.put(self.store(), key, data)

    def get(self, key: str) -> bytes:
        import obstore

        return bytes(obstore.get(self.store(), key).bytes())

    def delete(self, key: str) -> None:
        import obstore

        obstore.delete(self.store(), key)

    def keys(self, prefix: str = "") -> list[str]:
        import obstore

        return sorted(m["path"] for batch in obstore.list(self.store(), prefix or None) for m in batch)

    def upload_dir(self, local: str | os.PathLike[str], prefix: str) -> str:
        """Every file under ``local`` put under ``prefix``; returns the prefix's URL."""
        base = Path(local)
        for p in sorted(base.rglob("*")):
            if p.is_file():
                self.put(f"{prefix}/{p.relative_to(base).as_posix()}", p.read_bytes())
        return self.url(prefix)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def s3_server() -> Iterator[S3]:
    moto_server = pytest.importorskip("moto.server")
    pytest.importorskip("obstore")
    saved = {k: os.environ.get(k) for k in ENV}
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_REGION="us-east-1", AWS_ALLOW_HTTP="true", AWS_EC2_METADATA_DISABLED="true")
    from dist_restore._base import objstore

    objstore._stores.clear()  # stores are cached per bucket: a new server, a new store
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/{bucket}", method="PUT"), timeout=30).read()
    try:
        yield S3(endpoint, bucket, server)
    finally:
        with contextlib.suppress(Exception):
            server.stop()
        objstore._stores.clear()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
