"""A DDP run stopped and resumed with the trainer hooks matches an uninterrupted one bit for bit.

Runs the real ``launch/train.py`` under torchrun (2 ranks, gloo) in subprocesses.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests_multiprocess.harness import free_port

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.multiprocess

_TIMEOUT = 120


def _cmd(*args: str, nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            f"--master_port={free_port()}", str(ROOT / "launch" / "train.py"), *args]


def _finish(p: subprocess.Popen[str]) -> str:
    try:
        out, _ = p.communicate(timeout=_TIMEOUT)
    except subprocess.TimeoutExpired:
        p.kill()
        out, _ = p.communicate()
        raise AssertionError(f"torchrun timed out after {_TIMEOUT}s:\n{out}") from None
    assert p.returncode == 0, out
    return out


def _start(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(_cmd(*args), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _assert_tensor_tree_equal(a: object, b: object, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            _assert_tensor_tree_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_tensor_tree_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.timeout(240)
def test_stopped_and_resumed_run_matches_uninterrupted(tmp_path: Path) -> None:
    common = ("--steps", "8", "--save-every", "4", "--timeout", "60")
    # (a) uninterrupted and (b1) "crashed" after step 4 run side by side: independent roots
    full = _start(*common, "--ckpt-root", str(tmp_path / "full"), "--out", str(tmp_path / "full.pt"))
    crashed = _start(*common, "--ckpt-root", str(tmp_path / "b"), "--out", str(tmp_path / "b1.pt"),
                     "--stop-after", "4")
    try:
        _finish(crashed)
        _finish(full)
    finally:
        for p in (full, crashed):
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert not (tmp_path / "b" / "step_8").exists()
    # (b2) resume from b/step_4 up to step 8
    out = _finish(_start(*common, "--ckpt-root", str(tmp_path / "b"), "--out", str(tmp_path / "b2.pt"),
                         "--resume"))
    assert "resumed at step 4" in out, out

    a = torch.load(tmp_path / "full.pt", weights_only=True)
    b1 = torch.load(tmp_path / "b1.pt", weights_only=True)
    b2 = torch.load(tmp_path / "b2.pt", weights_only=True)
    assert (a["first_step"], a["last_step"]) == (1, 8)
    assert (b1["first_step"], b1["last_step"]) == (1, 4)
    assert (b2["first_step"], b2["last_step"]) == (5, 8)
    for rank in (0, 1):
        assert b1["losses"][rank] == {s: a["losses"][rank][s] for s in range(1, 5)}, rank
        assert b2["losses"][rank] == {s: a["losses"][rank][s] for s in range(5, 9)}, rank
    # ranks see different data and RNG streams: rank 1's own RNG state came back too
    assert a["losses"][0] != a["losses"][1]
    _assert_tensor_tree_equal(a["model"], b2["model"], "model")
    _assert_tensor_tree_equal(a["optimizer"], b2["optimizer"], "optimizer")
    _assert_tensor_tree_equal(a["scheduler"], b2["scheduler"], "scheduler")
    assert b2["scheduler"]["last_epoch"] == 8
