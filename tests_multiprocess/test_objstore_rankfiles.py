"""Our own rank files restored from a real S3 server (moto in this process, reached over HTTP
through obstore): FSDP2 and FSDP2+TP checkpoints saved with ``torch.save`` on one world size,
uploaded, restored on another; every entry compared bit for bit with the values saved, and
each rank reading about its own shard's bytes."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests._s3 import s3_server
from tests_multiprocess import _workers_dtensor as w
from tests_multiprocess import _workers_objstore_rankfiles as wo
from tests_multiprocess.harness import run_ranks

pytestmark = pytest.mark.multiprocess


@pytest.fixture(scope="module")
def s3_ckpts(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("objstore_rf")
    with s3_server() as s3:
        made = {}
        for kind, world in (("fsdp", 2), ("fsdp_tp", 4)):
            path = root / f"{kind}{world}"
            run_ranks(w.save, world, args=(str(path), kind), timeout=120)
            made[(kind, world)] = (s3.upload_dir(path, f"{kind}{world}"), str(root / f"{kind}{world}_full.pt"))
        yield s3, made


@pytest.mark.timeout(240)
@pytest.mark.parametrize("src,dst_kind,dst_world", [
    (("fsdp", 2), "fsdp", 2),      # same layout: each rank its own file
    (("fsdp", 2), "fsdp", 3),      # grow, uneven
    (("fsdp_tp", 4), "fsdp", 2),   # 2-D (_StridedShard) source onto 1-D
])
def test_rank_files_from_s3_bit_exact(s3_ckpts, src, dst_kind: str, dst_world: int) -> None:
    _s3, made = s3_ckpts
    url, full = made[src]
    out = run_ranks(wo.restore, dst_world, args=(url, full, dst_kind), timeout=180)
    for r, o in enumerate(out):
        assert o["bad"] == [], f"rank {r}: {o['bad']}"
        assert o["step"] == 7
        assert o["missing"] == []
        assert o["bytes_read"] <= 1.1 * o["shard_bytes"] + 64, (r, o["bytes_read"], o["shard_bytes"])
        if src[0] == "fsdp":  # 1-D shards: every record read whole or in pieces the ranks check together
            assert o["bytes_verified"] >= o["bytes_read"], (r, o)
    if src[1] == dst_world:  # the same world size: plain per-rank entries from each rank's own file
        assert [o["rank_value"] for o in out] == [float(r) for r in range(dst_world)]
    else:  # another world size: from file 0, as a DDP checkpoint holds them
        assert all(o["rank_value"] == 0.0 for o in out)
