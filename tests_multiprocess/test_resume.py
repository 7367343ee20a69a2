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


def _flat(sd: dict) -> dict:
    from dist_restore._format.index import iter_leaves

    return {k: v for k, _p, v in iter_leaves(sd)}


@pytest.mark.timeout(300)
def test_fsdp_run_saved_on_4_ranks_resumes_on_2_bit_exact(tmp_path: Path) -> None:
    """FSDP2 at 4 ranks saves step 4; resumed at 2 ranks, the model, optimizer and scheduler
    state right after the restore equal the full values saved, bit for bit (the losses after
    that need not match: other ranks, other data). Then the checkpoint restores with
    launch/restore.py on 2 ranks and consolidates to the same full values."""
    from dist_restore import consolidate

    ck = tmp_path / "ck"
    common = ("--fsdp", "--save-every", "4", "--timeout", "60", "--ckpt-root", str(ck))
    p = subprocess.Popen(_cmd(*common, "--steps", "4", "--out", str(tmp_path / "a.pt"), nproc=4), cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _finish(p)
    p = subprocess.Popen(_cmd(*common, "--steps", "6", "--resume", "--restored-out", str(tmp_path / "r.pt"),
                              "--out", str(tmp_path / "b.pt"), nproc=2), cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = _finish(p)
    assert "resumed at step 4" in out, out
    assert "resharded: checkpoint written by 4 rank(s), restored on 2" in out, out
    a = torch.load(tmp_path / "a.pt", weights_only=True)
    r = torch.load(tmp_path / "r.pt", weights_only=True)
    b = torch.load(tmp_path / "b.pt", weights_only=True)
    assert r["step"] == 4 and (b["first_step"], b["last_step"]) == (5, 6)
    for part in ("model", "optimizer", "scheduler"):
        _assert_tensor_tree_equal(r[part], a[part], part)
    assert len(_flat(a["optimizer"]["state"])) == 4 * 3  # Adam's step, exp_avg, exp_avg_sq per parameter

    rs = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                         f"--master_port={free_port()}", str(ROOT / "launch" / "restore.py"), "--checkpoint",
                         str(ck / "step_4"), "--per-rank", "rng", "--timeout", "60"],
                        cwd=ROOT, capture_output=True, text=True, timeout=_TIMEOUT)
    assert rs.returncode == 0, rs.stdout + rs.stderr
    assert "resharded: checkpoint written by 4 rank(s), restored on 2" in rs.stdout + rs.stderr

    consolidate(ck / "step_4", tmp_path / "full.pt")
    full = torch.load(tmp_path / "full.pt", weights_only=True)
    _assert_tensor_tree_equal(dict(full["models"]["net"]), dict(a["model"]), "consolidated model")
    _assert_tensor_tree_equal(full["optimizers"]["adam"], a["optimizer"], "consolidated optimizer")


@pytest.mark.timeout(120)
def test_trainer_hooks_grow_from_1_to_2_ranks_rng_per_rank(tmp_path: Path) -> None:
    """A 1-rank checkpoint restored by 2 ranks, strict: rank 0 takes file 0's RNG state,
    rank 1 (no file of its own) keeps its own; model, optimizer and extra come to both."""
    from dist_restore.trainer import TrainingState, save_training_state
    from tests_multiprocess import _workers_trainer as wt
    from tests_multiprocess.harness import run_ranks

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    torch.manual_seed(7)
    saved_rng = torch.get_rng_state()
    save_training_state(tmp_path / "ck", TrainingState(models={"net": model}, optimizers={"adam": opt},
                                                       extra={"step": 3}))
    out = run_ranks(wt.restore_grown, 2, args=(str(tmp_path / "ck"),), timeout=90)
    for r, o in enumerate(out):
        _assert_tensor_tree_equal(dict(o["model"]), dict(model.state_dict()), f"rank {r} model")
        _assert_tensor_tree_equal(o["opt"], opt.state_dict(), f"rank {r} optimizer")
        assert o["step"] == 3
    assert torch.equal(out[0]["rng_after"], saved_rng)
    assert torch.equal(out[1]["rng_after"], out[1]["rng_before"])
    assert out[1]["missing"] and all(k.startswith("rng.") for k in out[1]["missing"])
    assert out[0]["missing"] == []
