"""Restores from a real S3 server on 2 gloo ranks: moto's ``ThreadedMotoServer`` runs in this
pytest process (``tests/_s3.py``); the spawned ranks and the torchrun launch script inherit its
endpoint and credentials through the environment and read over HTTP with obstore.

An FSDP2 model is restored from a safetensors directory (several shards and an index) and from
a DCP checkpoint (model and AdamW state, saved by one process) uploaded to the server, and
compared through ``full_tensor()`` with the local copies; each rank reads about its shard's
bytes, well under the whole checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests._s3 import ENV, S3, s3_server
from tests_multiprocess import _workers_objstore as w
from tests_multiprocess.harness import free_port, run_ranks

pytestmark = pytest.mark.multiprocess
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def s3() -> Iterator[S3]:
    with s3_server() as server:
        yield server


@pytest.fixture(scope="module")
def ckpts(s3: S3, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The local checkpoints and their URLs: a safetensors directory of several shards with
    ``model.safetensors.index.json`` (the sharding ``save_pretrained`` uses), and a DCP
    checkpoint of the tiny Llama and its AdamW state saved by one process."""
    import torch.distributed.checkpoint as dcp

    save_torch_state_dict = pytest.importorskip("huggingface_hub").save_torch_state_dict
    from tests_multiprocess import _workers_dcp as wd

    root = tmp_path_factory.mktemp("objstore_mp")
    (root / "hf").mkdir()
    save_torch_state_dict(w.safetensors_state_dict(), root / "hf", max_shard_size="60KB")
    assert len(list((root / "hf").glob("*.safetensors"))) >= 3
    m, opt = wd.build("plain", 1, wd.SAVED)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled ... single process"
        dcp.save(wd.state(m, opt, wd.SAVED), checkpoint_id=str(root / "dcp"))
    return {"hf": str(root / "hf"), "dcp": str(root / "dcp"),
            "hf_url": s3.upload_dir(root / "hf", "mp/hf"), "dcp_url": s3.upload_dir(root / "dcp", "mp/dcp")}


def _env() -> dict[str, str]:
    """The S3 endpoint and credentials s3_server() set (spawned ranks inherit them anyway)."""
    return {k: os.environ[k] for k in ENV if k in os.environ}


@pytest.mark.timeout(120)
def test_fsdp2_from_safetensors_and_dcp_urls(ckpts: dict[str, str]) -> None:
    out = run_ranks(w.restore_fsdp, 2, args=(ckpts["hf_url"], ckpts["hf"], ckpts["dcp_url"], ckpts["dcp"]),
                    timeout=100, env=_env())
    for r, o in enumerate(out):
        hf, dc = o["hf"], o["dcp"]
        assert hf["bad"] == [] and dc["bad"] == [], (r, hf["bad"], dc["bad"])
        assert dc["missing"] == [] and dc["unexpected"] == [] and dc["same_before"] == [], (r, dc)
        # only its shard: the bytes of its rows, well under the whole checkpoint
        assert hf["shard_bytes"] <= hf["bytes_read"] <= 1.05 * hf["shard_bytes"], (r, hf)
        assert hf["bytes_read"] < 0.6 * hf["whole_bytes"], (r, hf)
        assert dc["shard_bytes"] <= dc["bytes_read"] <= 1.05 * dc["shard_bytes"] + (16 << 10), (r, dc)
        assert dc["bytes_read"] < 0.6 * dc["whole_bytes"], (r, dc)


@pytest.mark.timeout(120)
def test_launch_script_restores_from_s3(ckpts: dict[str, str], tmp_path: Path) -> None:
    """``launch/restore.py --checkpoint s3://...`` under torchrun, 2 ranks: exit 0, no issue, each
    rank reading half of every tensor's rows."""
    report = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(ROOT / "launch" / "restore.py"), "--checkpoint", ckpts["hf_url"], "--report-json", str(report),
           "--timeout", "60"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=100)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out
    assert json.loads(report.read_text())["issues"] == []
    whole = sum(Path(f).stat().st_size for f in Path(ckpts["hf"]).glob("*.safetensors")) / 2**20
    lines = [ln for ln in out.splitlines() if "MiB read from file" in ln]
    assert len(lines) == 2, out
    for ln in lines:
        got = float(ln.split("(")[1].split(" MiB read from file")[0])
        assert 0.4 * whole <= got <= 0.6 * whole, (ln, whole)
