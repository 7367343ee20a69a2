"""Module-level rank workers for the object-store ``CheckpointWriter`` tests.

They run in spawned processes (``harness.run_ranks``, gloo group initialised) and inherit
the moto server's ``AWS_*`` variables from the test process.
"""

from __future__ import annotations

import time
from typing import Any

from dist_restore._base import objstore
from dist_restore._base.source import location
from dist_restore._format.manifest import MANIFEST_NAME
from dist_restore.writer import CheckpointWriter
from tests_multiprocess._workers_writer import Explodes, _error, rank_state


def _names(url: str) -> list[str]:
    """The objects directly under ``url`` now (a fresh listing)."""
    return sorted(location(url).files())


def write_overwrite_fail(rank: int, world: int, url: str, victim: int) -> dict[str, Any]:
    """Commit step 1 at ``url``; overwrite it with step 2, recording what the store held when
    this rank uploaded and (rank 0) when it committed, the last rank uploading slowly; then
    overwrite with step 3 while ``victim`` fails to pickle."""
    writer = CheckpointWriter(timeout=30)
    first = writer.write(url, rank_state(rank, 1), metadata={"step": 1})
    seen: dict[str, Any] = {}
    real_put_file, real_put_bytes = objstore.ObjectDir.put_file, objstore.ObjectDir.put_bytes

    def put_file(self: objstore.ObjectDir, local: Any, file: str) -> None:
        seen["at_upload"] = _names(url)
        if rank == world - 1:
            time.sleep(1.0)  # a slow rank: the commit must wait for it
        real_put_file(self, local, file)

    def put_bytes(self: objstore.ObjectDir, file: str, data: bytes) -> None:
        if file == MANIFEST_NAME:
            seen["at_commit"] = _names(url)
        real_put_bytes(self, file, data)

    objstore.ObjectDir.put_file, objstore.ObjectDir.put_bytes = put_file, put_bytes  # this process only
    try:
        second = writer.write(url, rank_state(rank, 2), metadata={"step": 2})
    finally:
        objstore.ObjectDir.put_file, objstore.ObjectDir.put_bytes = real_put_file, real_put_bytes
    seen["after_return"] = _names(url)

    sd = rank_state(rank, 3)
    if rank == victim:
        sd["optim"]["bad"] = Explodes()
    t0 = time.monotonic()
    try:
        writer.write(url, sd, metadata={"step": 3})
        err = None
    except Exception as e:  # noqa: BLE001 - the test asserts what it is
        err = _error(e)
    return {"first": first.to_json(), "second": second.to_json(), "seen": seen, "error": err,
            "seconds": time.monotonic() - t0, "after_failure": _names(url)}
