"""``consolidate`` and ``inspect`` of real FSDP2 / FSDP2+TP checkpoints (saved once, 4 ranks, gloo).

Oracle: the state dict every rank saved, with each DTensor replaced by its ``full_tensor()``
(gathered at save time, saved by rank 0). Peak memory is measured in a fresh interpreter.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from dist_restore import consolidate, read_index
from dist_restore._format.index import iter_leaves
from dist_restore.cli import main
from tests_multiprocess import _workers_consolidate as wc
from tests_multiprocess.harness import run_ranks

pytestmark = pytest.mark.multiprocess

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("consolidate")
    run_ranks(wc.save_all, 4, args=(str(root),), timeout=240)
    return root


def _same(a: Any, b: Any, where: str = "") -> None:
    assert type(a) is type(b), (where, type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        assert getattr(a, "__dict__", {}) == getattr(b, "__dict__", {}), where
        for k in a:
            _same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)) and not isinstance(a, torch.Size):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", ["fsdp", "fsdp_tp"])
def test_consolidate_equals_the_full_state_dict(saved: Path, tmp_path: Path, kind: str) -> None:
    from safetensors.torch import load_file

    full = torch.load(saved / f"{kind}_full.pt", weights_only=True)
    res = consolidate(saved / kind, tmp_path / "out.pt")
    _same(torch.load(tmp_path / "out.pt", weights_only=True), full)
    assert res.rank_files == 4 and res.files_read == 4
    if kind == "fsdp":  # Shard(0) everywhere: every byte copied file to file
        assert res.bytes_copied == res.bytes_read == res.tensor_bytes
    else:  # _StridedShard rows and Shard(1) columns: assembled in memory
        assert res.bytes_copied < res.tensor_bytes
    consolidate(saved / kind, tmp_path / "out.safetensors", format="safetensors")
    st = load_file(tmp_path / "out.safetensors")
    flat = {k: v for k, _p, v in iter_leaves(full) if isinstance(v, torch.Tensor)}
    assert list(st) == list(flat)
    for k, v in flat.items():
        assert st[k].dtype == v.dtype and torch.equal(st[k], v), k


@pytest.mark.timeout(120)
def test_inspect_shows_dtensor_layouts(saved: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(saved / "fsdp_tp"), "--rank", "1", "--keys", "model.up.weight", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    (entry,) = doc["ranks"][0]["entries"]
    assert entry["kind"] == "dtensor" and entry["shape"] == [14, 10]
    t = entry["dtensor"]
    assert t["global_shape"] == [14, 10] and t["local_shape"] == [4, 10]
    assert t["placements"] == ["_StridedShard(dim=0, sf=2)", "Shard(dim=0)"]
    assert t["mesh"] == {"shape": [2, 2], "dim_names": ["dp", "tp"], "coordinate": [0, 1], "rank": 1, "ranks": 4}
    assert main(["inspect", str(saved / "fsdp")]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if "model.up.weight" in ln and "@ (1)" in ln)
    assert "[14, 10]" in line and "at [4:8, 0:10] of [Shard(dim=0)] on mesh (dp=4) @ (1)" in line
    assert "model.up.weight" not in out[out.index("replicated across"):]  # shards are not replicas


def _cli_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert main(["consolidate", *argv]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dist-restore: error: "), err
    return err[0]


@pytest.mark.timeout(120)
def test_errors_missing_corrupt_and_uncommitted(saved: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    lost = shutil.copytree(saved / "fsdp", tmp_path / "lost")
    (lost / "checkpoint_3.pt").unlink()  # the last file: only the saved mesh tells it is gone
    line = _cli_error(capsys, str(lost), str(out / "o.pt"))
    assert "DeviceMesh spans 4 ranks, but the checkpoint has 3 rank file(s)" in line

    for kind in ("fsdp", "fsdp_tp"):  # a flipped byte in rank 2's shard: kernel copy / in-memory paths
        bad = shutil.copytree(saved / kind, tmp_path / f"bad_{kind}")
        index = read_index(bad / "checkpoint_2.pt")
        entry = index["model.up.weight"]
        with open(bad / "checkpoint_2.pt", "r+b") as f:
            f.seek(entry.file_offset + 5)
            b = f.read(1)
            f.seek(entry.file_offset + 5)
            f.write(bytes([b[0] ^ 0x55]))
        line = _cli_error(capsys, str(bad), str(out / "o.pt"))
        assert "CRC32 mismatch" in line and "checkpoint_2.pt" in line and "rank 2" in line
        assert "model.up.weight" in line
        assert os.listdir(out) == []  # no output, no temp file

    pending = shutil.copytree(saved / "fsdp", tmp_path / "pending")
    (pending / ".checkpoint_2.pt.77.beef.tmp").write_bytes(b"")  # a writer still at work
    line = _cli_error(capsys, str(pending), str(out / "o.pt"))
    assert "incomplete checkpoint" in line and "temp files present" in line
    assert os.listdir(out) == []


_MEASURE = r"""
import json, sys
import torch
from dist_restore import consolidate

def status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

out = {}
for fmt in ("torch", "safetensors"):
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak to the current RSS
    base = status("VmRSS")
    res = consolidate(sys.argv[1], sys.argv[2] + "." + fmt, format=fmt)
    out[fmt] = {"peak": status("VmHWM") - base, "bytes": res.tensor_bytes, "copied": res.bytes_copied}
print(json.dumps(out))
"""


@pytest.mark.timeout(180)
def test_peak_memory_is_the_largest_tensor_plus_64_mib(saved: Path, tmp_path: Path) -> None:
    """FSDP2+TP, a 32 MiB weight in blocks (assembled in memory) and its AdamW state, 144 MiB in all."""
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux's /proc/self/clear_refs")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-c", _MEASURE, str(saved / "big"), str(tmp_path / "big")],
                       capture_output=True, text=True, env=env, timeout=150)
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout.strip().splitlines()[-1])
    largest = wc.BIG_IN * wc.BIG_OUT * 4
    for fmt, r in got.items():
        assert r["bytes"] >= 4 * largest, r  # 32 MiB x (param, exp_avg, exp_avg_sq) + 16 MiB x 3
        assert r["copied"] < r["bytes"] // 2, r  # the 32 MiB ones: the in-memory path
        assert r["peak"] <= largest + (64 << 20), (fmt, r["peak"] / 2**20)
    full = torch.load(tmp_path / "big.torch", weights_only=True, mmap=True)
    assert full["model"]["0.weight"].shape == (wc.BIG_OUT, wc.BIG_IN)
