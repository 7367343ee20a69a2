"""Hugging Face safetensors directories (written by transformers' ``save_pretrained`` into several
shard files + ``model.safetensors.index.json``) restored into real FSDP2, TP, FSDP2+TP, HSDP and
plain models on 2-4 gloo ranks; every parameter's ``full_tensor()`` equals
``safetensors.torch.load_file`` of the same files, and each rank reads about its shard's bytes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests_multiprocess import _workers_hf as w
from tests_multiprocess.harness import run_ranks

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


@pytest.mark.timeout(240)
def test_hf_four_ranks_every_layout(hf_dirs: dict[str, Path]) -> None:
    layouts = ["fsdp", "tp", "fsdp_tp", "hsdp"]
    out = run_ranks(w.restore, 4, args=(str(hf_dirs["f32"]), layouts), timeout=200)
    _check(out, layouts)
    # TP: a rank opens only the files holding its keys; every rank holds part of every key here
    index = json.loads((hf_dirs["f32"] / "model.safetensors.index.json").read_text())
    assert all(o["tp"]["files_opened"] <= len(set(index["weight_map"].values())) for o in out)
    assert "safetensors checkpoint" in out[0]["fsdp"]["report"]


@pytest.mark.timeout(240)
def test_hf_uneven_three_ranks_and_plain(hf_dirs: dict[str, Path]) -> None:
    out = run_ranks(w.restore, 3, args=(str(hf_dirs["f32"]), ["fsdp", "plain"]), timeout=200)
    _check(out, ["fsdp", "plain"])


@pytest.mark.timeout(240)
def test_hf_bf16_cast_into_fp32_fsdp_and_errors(hf_dirs: dict[str, Path], tmp_path: Path) -> None:
    out = run_ranks(w.restore, 2, args=(str(hf_dirs["bf16"]), ["fsdp", "fsdp_tp"], True), timeout=200)
    _check(out, ["fsdp", "fsdp_tp"])
    # without cast=True: the same RestoreError on every rank, naming a key and both dtypes; nothing touched
    out = run_ranks(w.restore_bad, 2, args=(str(hf_dirs["bf16"]), "dtype"), timeout=200)
    for o in out:
        assert o["phase"] == "plan" and o["failed"] == [0, 1] and o["untouched"], o
        assert "torch.bfloat16" in o["error"] and "torch.float32" in o["error"] and "cast=True" in o["error"]
    assert out[0]["error"] == out[1]["error"]
    # a damaged file seen by rank 1 only: every rank fails in the plan phase, naming the file
    bad = tmp_path / "corrupt"
    shutil.copytree(hf_dirs["f32"], bad)
    victim = sorted(bad.glob("*.safetensors"))[1]
    raw = bytearray(victim.read_bytes())
    raw[8:9] = b"["  # the JSON header no longer parses
    victim.write_bytes(bytes(raw))
    f32_copy = tmp_path / "f32"
    shutil.copytree(hf_dirs["f32"], f32_copy)
    out = run_ranks(w.restore_bad, 2, args=(str(f32_copy), "corrupt"), timeout=200)
    for o in out:
        assert o["phase"] == "plan" and o["failed"] == [1] and o["untouched"], o
        assert victim.name in o["error"] and "not valid JSON" in o["error"]


@pytest.mark.timeout(240)
def test_odd_dtensor_targets_empty_shards_strided_cast(tmp_path: Path) -> None:
    f = tmp_path / "odd.safetensors"
    want = w.save_odd(str(f))
    out = run_ranks(w.restore_odd, 4, args=(str(f),), timeout=200)
    assert any(0 in o["locals"]["tiny"] for o in out)  # some rank's shard of 2 rows over 4 is empty
    for o in out:
        for k, v in want.items():
            exp = v.to(torch.float32) if k == "bf" else v
            assert o["full"][k].dtype == exp.dtype and torch.equal(o["full"][k], exp), k
        # the bf16 file bytes are half the fp32 target bytes: bounded by the targets
        assert o["bytes_read"] <= o["shard_bytes"]
