"""Hugging Face safetensors directories (written by transformers' ``save_pretrained`` into several
shard files + ``model.safetensors.index.json``) restored into real FSDP2, TP, FSDP2+TP, HSDP and
plain models on 2-4 gloo ranks; every parameter's ``full_tensor()`` equals
``safetensors.torch.load_file`` of the same files, and each rank reads about its shard's bytes.

Starting ranks is what costs here, so the restores run in one spawn per world size (``jobs.on``: a
:class:`~tests_multiprocess._batch.Batch` each, started by the first test that needs it); each
test checks its own job's per-rank results."""

from __future__ import annotations

import importlib.util
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests_multiprocess import _workers_hf as w
from tests_multiprocess._batch import Batch

pytestmark = pytest.mark.multiprocess


def _save(path: Path, dtype: torch.dtype) -> Path:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**w.CONFIG)
    model = transformers.LlamaForCausalLM(cfg).to(dtype)
    model.save_pretrained(path, max_shard_size="60KB")
    return path


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {"f32": _save(root / "f32", torch.float32), "bf16": _save(root / "bf16", torch.bfloat16)}


_LAYOUTS_4 = ["fsdp", "tp", "fsdp_tp", "hsdp"]

#: Seconds for a test that may start a spawn (and save the directories first).
_SPAWNS_TIMEOUT = 480


@dataclass
class _Jobs:
    """One :class:`Batch` per world size (``on``); what ``w.save_odd`` saved (``odd``); the
    damaged file of job ``corrupt`` (``victim``)."""

    on: dict[int, Batch]
    odd: dict[str, torch.Tensor]
    victim: Path | None = None


@pytest.fixture(scope="module")
def jobs(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> _Jobs:
    """Every restore of the module, queued. The jobs on ``save_pretrained`` directories are
    queued only where transformers is installed (their tests skip without it; ``odd`` needs none)."""
    root = tmp_path_factory.mktemp("hf_jobs")
    b = {world: Batch(world, timeout=360, pg_timeout=60) for world in (2, 3, 4)}
    odd = root / "odd.safetensors"
    out = _Jobs(b, w.save_odd(str(odd)))
    b[4].add("odd", w.restore_odd, str(odd))
    if importlib.util.find_spec("transformers") is not None:
        hf_dirs = request.getfixturevalue("hf_dirs")
        b[4].add("layouts", w.restore, str(hf_dirs["f32"]), _LAYOUTS_4)
        b[3].add("uneven", w.restore, str(hf_dirs["f32"]), ["fsdp", "plain"])
        b[2].add("cast", w.restore, str(hf_dirs["bf16"]), ["fsdp", "fsdp_tp"], True)
        b[2].add("dtype", w.restore_bad, str(hf_dirs["bf16"]), "dtype")
        # a damaged file seen by rank 1 only: w.restore_bad sends rank 1 to the sibling "corrupt"
        bad = root / "corrupt"
        shutil.copytree(hf_dirs["f32"], bad)
        out.victim = sorted(bad.glob("*.safetensors"))[1]
        raw = bytearray(out.victim.read_bytes())
        raw[8:9] = b"["  # the JSON header no longer parses
        out.victim.write_bytes(bytes(raw))
        shutil.copytree(hf_dirs["f32"], root / "f32")
        b[2].add("corrupt", w.restore_bad, str(root / "f32"), "corrupt")
    return out


def _check(out: list[dict], layouts: list[str]) -> None:
    for r, o in enumerate(out):
        for layout in layouts:
            got = o[layout]
            assert got["bad"] == [], (r, layout, got["bad"])
            # only its shard's bytes (plus nothing): the file bytes are the target bytes x scale
            assert got["bytes_read"] <= 1.1 * got["shard_bytes"] * got["scale"], (r, layout, got)
            assert got["collectives"] <= 4, (r, layout, got)


@pytest.mark.timeout(240)
def test_hf_dir_is_sharded_with_index(hf_dirs: dict[str, Path]) -> None:
    d = hf_dirs["f32"]
    files = sorted(d.glob("*.safetensors"))
    assert len(files) >= 3 and (d / "model.safetensors.index.json").is_file()


@pytest.mark.timeout(_SPAWNS_TIMEOUT)
def test_hf_four_ranks_every_layout(hf_dirs: dict[str, Path], jobs: _Jobs) -> None:
    out = jobs.on[4].results("layouts")  # f32 into each of _LAYOUTS_4
    _check(out, _LAYOUTS_4)
    # TP: a rank opens only the files holding its keys; every rank holds part of every key here
    index = json.loads((hf_dirs["f32"] / "model.safetensors.index.json").read_text())
    assert all(o["tp"]["files_opened"] <= len(set(index["weight_map"].values())) for o in out)
    assert "safetensors checkpoint" in out[0]["fsdp"]["report"]


@pytest.mark.timeout(_SPAWNS_TIMEOUT)
def test_hf_uneven_three_ranks_and_plain(hf_dirs: dict[str, Path], jobs: _Jobs) -> None:
    out = jobs.on[3].results("uneven")  # f32 into fsdp, then plain
    _check(out, ["fsdp", "plain"])


@pytest.mark.timeout(_SPAWNS_TIMEOUT)
def test_hf_bf16_cast_into_fp32_fsdp_and_errors(hf_dirs: dict[str, Path], jobs: _Jobs) -> None:
    out = jobs.on[2].results("cast")  # bf16 into fp32 fsdp, then fsdp_tp, cast=True
    _check(out, ["fsdp", "fsdp_tp"])
    # without cast=True: the same RestoreError on every rank, naming a key and both dtypes; nothing touched
    out = jobs.on[2].results("dtype")
    for o in out:
        assert o["phase"] == "plan" and o["failed"] == [0, 1] and o["untouched"], o
        assert "torch.bfloat16" in o["error"] and "torch.float32" in o["error"] and "cast=True" in o["error"]
    assert out[0]["error"] == out[1]["error"]
    # a damaged file seen by rank 1 only: every rank fails in the plan phase, naming the file
    victim = jobs.victim  # its JSON header no longer parses
    out = jobs.on[2].results("corrupt")
    for o in out:
        assert o["phase"] == "plan" and o["failed"] == [1] and o["untouched"], o
        assert victim.name in o["error"] and "not valid JSON" in o["error"]


@pytest.mark.timeout(_SPAWNS_TIMEOUT)
def test_odd_dtensor_targets_empty_shards_strided_cast(jobs: _Jobs) -> None:
    want = jobs.odd  # w.save_odd: one safetensors file
    out = jobs.on[4].results("odd")
    assert any(0 in o["locals"]["tiny"] for o in out)  # some rank's shard of 2 rows over 4 is empty
    for o in out:
        for k, v in want.items():
            exp = v.to(torch.float32) if k == "bf" else v
            assert o["full"][k].dtype == exp.dtype and torch.equal(o["full"][k], exp), k
        # the bf16 file bytes are half the fp32 target bytes: bounded by the targets
        assert o["bytes_read"] <= o["shard_bytes"]
