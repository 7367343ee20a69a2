"""The real torchrun launch script, in a subprocess: exit codes and output."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests_multiprocess import _workers as w
from tests_multiprocess.harness import free_port

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.multiprocess


def _torchrun(*args: str, nproc: int = 2, timeout: float = 150) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}", str(ROOT / "launch" / "restore.py"), *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.mark.timeout(180)
def test_demo_runs_and_reports() -> None:
    p = _torchrun("--demo-mib", "2", "--timeout", "60")
    out = p.stdout + p.stderr
    assert p.returncode == 0, out
    assert "restore report (2 ranks): no missing, unexpected or mismatched keys" in out
    assert "MiB/s" in out


@pytest.mark.timeout(180)
def test_restore_existing_checkpoint_with_report_json(tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    w.write_checkpoint(ck, 2)
    report = tmp_path / "report.json"
    p = _torchrun("--checkpoint", str(ck), "--shared", "shared", "--mode", "spread",
                  "--report-json", str(report), "--timeout", "60")
    assert p.returncode == 0, p.stdout + p.stderr
    import json

    assert json.loads(report.read_text()) == {"world_size": 2, "issues": []}


@pytest.mark.timeout(180)
def test_failure_exits_nonzero_on_every_rank(tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    w.write_checkpoint(ck, 2)
    (ck / "checkpoint_1.pt").unlink()
    p = _torchrun("--checkpoint", str(ck), "--timeout", "30")
    out = p.stdout + p.stderr
    assert p.returncode != 0
    # every rank raises the same error; torchrun may stop one worker before it prints, so one line
    assert "restore failed" in out, out
    assert "incomplete checkpoint: no commit manifest; rank 1 has no file" in out, out


@pytest.mark.timeout(180)
def test_restore_safetensors_directory(tmp_path: Path) -> None:
    """A Hugging Face directory through the real launch script: each rank reads its rows' bytes."""
    save_file = pytest.importorskip("safetensors.torch").save_file
    import json

    import torch

    hf = tmp_path / "hf"
    hf.mkdir()
    save_file({"a": torch.randn(512, 512)}, hf / "model-00001-of-00002.safetensors")
    save_file({"b": torch.randn(512, 128), "c": torch.randn(3)}, hf / "model-00002-of-00002.safetensors")
    wm = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors",
          "c": "model-00002-of-00002.safetensors"}
    (hf / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    report = tmp_path / "report.json"
    p = _torchrun("--checkpoint", str(hf), "--report-json", str(report), "--timeout", "60")
    out = p.stdout + p.stderr
    assert p.returncode == 0, out
    assert json.loads(report.read_text())["issues"] == []
    # half of every tensor's rows per rank: (512*512 + 512*128) * 4 / 2 bytes = 0.625 MiB (+ c's rows)
    lines = [ln for ln in out.splitlines() if "MiB read from file" in ln]
    assert len(lines) == 2 and all("(0.6 MiB read from file, 0.0 MiB received" in ln for ln in lines), out


@pytest.mark.timeout(180)
def test_restore_dcp_directory(tmp_path: Path) -> None:
    """A DCP directory (one process's ``dcp.save``) through the real launch script on 2 ranks: each
    rank reads its rows' bytes of each record, and the values load on every rank."""
    import json
    import warnings

    import torch
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": {"a": torch.randn(512, 512), "b": torch.randn(512, 128)}, "step": 5},
                 checkpoint_id=str(tmp_path / "dcp"))
    report = tmp_path / "report.json"
    p = _torchrun("--checkpoint", str(tmp_path / "dcp"), "--report-json", str(report), "--timeout", "60")
    out = p.stdout + p.stderr
    assert p.returncode == 0, out
    assert json.loads(report.read_text())["issues"] == []
    # half of every tensor's rows per rank: (512*512 + 512*128) * 4 / 2 bytes = 0.625 MiB, + the value's item
    lines = [ln for ln in out.splitlines() if "MiB read from file" in ln]
    assert len(lines) == 2 and all("(0.6 MiB read from file, 0.0 MiB received" in ln for ln in lines), out
