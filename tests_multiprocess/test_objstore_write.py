"""``CheckpointWriter`` on 2 gloo ranks writing to a real S3 server (moto, in this process,
reached over HTTP through obstore): commit order, the same manifest everywhere, a failing rank."""

from __future__ import annotations

import io
import zlib

import pytest
import torch

from dist_restore._format.manifest import (
    MANIFEST_NAME,
    IncompleteCheckpointError,
    Manifest,
    check_checkpoint,
    read_manifest,
)
from dist_restore.discovery import find_latest_checkpoint
from tests._s3 import s3_server
from tests_multiprocess import _workers_objstore_write as wo
from tests_multiprocess._workers_writer import rank_state
from tests_multiprocess.harness import run_ranks
from tests_multiprocess.test_writer_mp import _assert_state_equal

pytestmark = pytest.mark.multiprocess


@pytest.mark.timeout(180)
def test_two_ranks_commit_last_and_a_failing_rank_commits_nothing() -> None:
    world, victim = 2, 1
    with s3_server() as s3:
        url = s3.url("run", "step")
        out = run_ranks(wo.write_overwrite_fail, world, args=(url, victim), timeout=150)
        ours = sorted([MANIFEST_NAME] + [f"checkpoint_{r}.{ext}" for r in range(world) for ext in ("pt", "idx")])
        # the same manifest on every rank, the one in the store
        second = Manifest.from_json(out[0]["second"])
        assert {o["second"] for o in out} == {second.to_json()}
        assert {o["first"] for o in out} == {out[0]["first"]}
        assert second.metadata == {"step": 2} and second.world_size == world
        for r, o in enumerate(out):
            seen = o["seen"]
            assert MANIFEST_NAME not in seen["at_upload"], (r, seen)  # the old one went before any upload
            assert any(n.startswith(f".{MANIFEST_NAME}.") for n in seen["at_upload"]), (r, seen)  # the marker
            assert seen["after_return"] == ours  # no rank returns before the commit; the marker is gone
        # rank 0 committed only once the slow rank's objects were there
        assert set(ours) - {MANIFEST_NAME} <= set(out[0]["seen"]["at_commit"])

        # step 3: the victim failed to pickle; every rank raises, nothing is committed
        for r, o in enumerate(out):
            err = o["error"]
            assert err is not None and err["type"] == "RestoreError", (r, err)
            assert err["phase"] == "write" and err["ranks"] == [victim], (r, err)
            assert "boom while pickling" in err["text"]
            assert o["seconds"] < 20  # failures travel with the statuses, not by timeout
            assert MANIFEST_NAME not in o["after_failure"]
        assert read_manifest(url) is None
        with pytest.raises(IncompleteCheckpointError, match="temp files present"):
            check_checkpoint(url, world_size=world)
        assert find_latest_checkpoint(s3.url("run"), world_size=world) is None
        # rank 0 uploaded step 3; the victim's object is still step 2's
        objs = {r: s3.get(f"run/step/checkpoint_{r}.pt") for r in range(world)}
        _assert_state_equal(torch.load(io.BytesIO(objs[0]), weights_only=True), rank_state(0, 3))
        _assert_state_equal(torch.load(io.BytesIO(objs[victim]), weights_only=True), rank_state(victim, 2))
        assert second.ranks[victim].checksum == f"crc32:{zlib.crc32(objs[victim]):08x}"
