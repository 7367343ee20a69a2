"""Publishing a checkpoint as Hugging Face safetensors shards (``consolidate --max-shard-size``)
and inspecting safetensors directories: the output loads with transformers' ``from_pretrained``
and with ``safetensors.torch.load_file``, equal to the model saved."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dist_restore import consolidate
from dist_restore.cli import main
from dist_restore.consolidate import parse_size

transformers = pytest.importorskip("transformers")
load_file = pytest.importorskip("safetensors.torch").load_file

CFG = dict(vocab_size=120, hidden_size=32, intermediate_size=48, num_attention_heads=2, num_key_value_heads=1,
           num_hidden_layers=2, tie_word_embeddings=False)


@pytest.fixture()
def trained(tmp_path: Path) -> tuple[Path, object]:
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CFG))
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    torch.save({"model": model.state_dict(), "step": 3}, ckpt / "checkpoint_0.pt")
    return ckpt, model


def test_sharded_export_loads_with_from_pretrained(trained, tmp_path: Path, capsys) -> None:
    ckpt, model = trained
    out = tmp_path / "hf"
    rc = main(["consolidate", str(ckpt), str(out), "--format", "safetensors", "--max-shard-size", "40KB",
               "--strip-prefix", "model."])
    assert rc == 0
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {f.name for f in shards}
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in model.state_dict().values())
    for f in shards[:-1]:  # at most 40 KB of tensors each, unless one tensor alone is larger
        sizes = [t.nbytes for t in load_file(f).values()]
        assert sum(sizes) <= 40_000 or len(sizes) == 1
    model.config.save_pretrained(out)
    loaded = transformers.LlamaForCausalLM.from_pretrained(out)
    want = model.state_dict()
    got = loaded.state_dict()
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    # inspect lists the directory: keys, dtypes, shapes, files, bytes, metadata
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert {e["key"] for e in doc["entries"]} == set(want)
    assert doc["tensor_nbytes"] == index["metadata"]["total_size"]
    assert all(f["metadata"] == {"format": "pt"} for f in doc["files"])
    e = next(e for e in doc["entries"] if e["key"] == "lm_head.weight")
    assert e["shape"] == [120, 32] and e["dtype"] == "float32" and e["file"] == index["weight_map"]["lm_head.weight"]
    assert main(["inspect", str(out), "--keys", "lm_head"]) == 0
    text = capsys.readouterr().out
    assert "lm_head.weight" in text and "model.norm.weight" not in text and "safetensors checkpoint" in text


def test_export_refuses_and_replaces(trained, tmp_path: Path) -> None:
    ckpt, _model = trained
    out = tmp_path / "hf"
    consolidate(ckpt, out, format="safetensors", max_shard_size="20KB", strip_prefix="model.")
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(FileExistsError):
        consolidate(ckpt, out, format="safetensors", max_shard_size="20KB")
    res = consolidate(ckpt, out, format="safetensors", max_shard_size="1GB", force=True, strip_prefix="model.")
    after = sorted(p.name for p in out.iterdir())
    assert after == ["model.safetensors", "model.safetensors.index.json"] and before != after
    assert res.tensors == len(load_file(out / "model.safetensors"))
    with pytest.raises(ValueError, match="format='safetensors' only"):
        consolidate(ckpt, tmp_path / "x.pt", max_shard_size="1GB")


@pytest.mark.parametrize("text,n", [("5GB", 5 * 10**9), ("500MiB", 500 * 2**20), ("1000", 1000), (7, 7),
                                    ("1.5kb", 1500)])
def test_parse_size(text, n) -> None:
    assert parse_size(text) == n


@pytest.mark.parametrize("text", ["", "GB", "-1GB", "0", "5 parsecs", True])
def test_parse_size_refuses(text) -> None:
    with pytest.raises(ValueError):
        parse_size(text)
