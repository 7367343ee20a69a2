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
