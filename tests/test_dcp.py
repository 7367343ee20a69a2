"""DCP checkpoints in one process: the reader and the coordinator (no process group) against
``dcp.load`` and ``dcp_to_torch_save`` of the same directory (the oracles); ``.metadata`` read
without running anything in it; a flipped, truncated or missing item, and metadata that lies,
refused with an error naming the file and key before any target is touched."""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import random
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from dist_restore import (
    CheckpointReader,
    CorruptCheckpointError,
    RankInfo,
    RestoreCoordinator,
    RestoreError,
    StateDictMismatchError,
    UnsafeCheckpointError,
    read_catalog,
)
from dist_restore._format import dcp_meta
from tests._util import assert_same

READER = CheckpointReader(RankInfo(0, 1))
warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")


def _state() -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    return {
        "model": {
            "w": torch.randn(40, 24, generator=g),
            "b": torch.arange(5, dtype=torch.bfloat16),
            "t": torch.randn(24, 8, generator=g).t(),  # saved with its strides (not cloned)
            "i": torch.randint(0, 9, (3, 4, 5), generator=g, dtype=torch.int32),
            "scalar": torch.tensor(2.5, dtype=torch.float64),
            "empty": torch.empty(0, 7),
            "flag": torch.tensor([True, False]),
        },
        "optim": {
            "state": {"w": {"exp_avg": torch.randn(40, 24, generator=g), "step": torch.tensor(3.0)}},
            "param_groups": [{"lr": 0.01, "betas": (0.9, 0.99), "params": ["w", "b"], "foreach": None}],
        },
        "train": {"step": 7, "name": "run-1", "sizes": [1, 2, 3]},
    }


def _target(sd: dict[str, Any]) -> dict[str, Any]:
    """A target of the same structure with other values (tensors zeroed, values changed)."""
    def blank(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return torch.zeros_like(v.contiguous())
        if isinstance(v, dict):
            return {k: blank(x) for k, x in v.items()}
        if isinstance(v, list):
            return [blank(x) for x in v]
        return None if not isinstance(v, (int, float)) else type(v)(0)
    return blank(sd)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("dcp") / "ckpt"
    dcp.save(_state(), checkpoint_id=str(path))
    return path


def _dcp_load(path: Path, target: dict[str, Any]) -> dict[str, Any]:
    dcp.load(target, checkpoint_id=str(path))
    return target


def test_into_a_target_as_dcp_load(ckpt: Path) -> None:
    want = _dcp_load(ckpt, _target(_state()))
    tgt = _target(_state())
    w = tgt["model"]["w"]
    res = READER.load(ckpt, tgt)
    assert res.state_dict is tgt and tgt["model"]["w"] is w  # tensors filled in place
    assert res.missing_keys == [] and res.unexpected_keys == []
    assert_same(tgt, want)
    assert tgt["train"] == {"step": 7, "name": "run-1", "sizes": [1, 2, 3]}
    assert tgt["optim"]["param_groups"][0]["betas"] == (0.9, 0.99)
    assert res.bytes_verified > 0


def test_no_target_as_dcp_to_torch_save(ckpt: Path, tmp_path: Path) -> None:
    dcp_to_torch_save(str(ckpt), str(tmp_path / "all.pt"))
    want = torch.load(tmp_path / "all.pt", weights_only=False)  # our own test file
    got = READER.load(ckpt, None).state_dict
    assert_same(got, want)
    assert list(got) == list(want)


def test_partial_target_reads_only_its_items(ckpt: Path) -> None:
    full = _state()
    tgt = {"model": {"w": torch.zeros(40, 24)}, "extra": torch.zeros(2)}
    res = READER.load(ckpt, tgt)
    assert torch.equal(tgt["model"]["w"], full["model"]["w"])
    assert res.missing_keys == ["extra"]
    assert "model.b" in res.unexpected_keys and "train.step" in res.unexpected_keys
    assert res.bytes_read == 40 * 24 * 4
    with pytest.raises(StateDictMismatchError, match="extra"):
        READER.load(ckpt, {"model": {"w": torch.zeros(40, 24)}, "extra": torch.zeros(2)}, strict=True)


def test_coordinator_without_group(ckpt: Path) -> None:
    want = _dcp_load(ckpt, _target(_state()))
    tgt = _target(_state())
    res = RestoreCoordinator().restore(ckpt, tgt)
    assert_same(tgt, want)
    assert res.missing_keys == [] and res.unexpected_keys == []
    assert "dcp checkpoint" in res.report.render()


def test_mismatches_refused_before_any_target_is_touched(ckpt: Path) -> None:
    tgt = _target(_state())
    tgt["model"]["w"] = torch.zeros(40, 25)
    with pytest.raises(StateDictMismatchError, match=r"\(40, 25\).*\(40, 24\)"):
        READER.load(ckpt, tgt)
    assert not tgt["model"]["b"].any() and tgt["train"]["step"] == 0
    tgt = _target(_state())
    tgt["train"]["step"] = torch.zeros(1)  # a tensor where the checkpoint holds a value
    with pytest.raises(StateDictMismatchError, match="non-tensor"):
        READER.load(ckpt, tgt)
    tgt = _target(_state())
    tgt["model"]["b"] = torch.zeros(5)
    with pytest.raises(StateDictMismatchError, match="cast=True"):
        READER.load(ckpt, tgt)
    res = READER.load(ckpt, tgt, cast=True)
    assert torch.equal(tgt["model"]["b"], torch.arange(5.0))
    assert res.missing_keys == []


def _items(path: Path) -> dict[str, Any]:
    md = FileSystemReader(str(path)).read_metadata()
    return {k.fqn: v for k, v in md.storage_data.items()}


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_flipped_byte_names_file_and_key_where_dcp_load_returns_it(ckpt: Path, tmp_path: Path) -> None:
    bad = _copy(ckpt, tmp_path / "bad")
    info = _items(bad)["model.w"]
    f = bad / info.relative_path
    raw = bytearray(f.read_bytes())
    want = _state()["model"]["w"]
    # the storage record's data: a byte in the middle of the tensor's 3840 bytes
    pos = bytes(raw).find(want.numpy().tobytes()[:64], info.offset, info.offset + info.length) + 1000
    raw[pos] ^= 0x40
    f.write_bytes(bytes(raw))
    tgt = _target(_state())
    with pytest.raises(CorruptCheckpointError, match="CRC32 mismatch") as e:
        READER.load(bad, tgt)
    assert e.value.key == "model.w" and str(f) in str(e.value)
    # DCP checks nothing: it returns the changed value
    got = _dcp_load(bad, _target(_state()))
    assert not torch.equal(got["model"]["w"], want)
    # verify="none": read as stored
    CheckpointReader(RankInfo(0, 1), verify="none").load(bad, tgt)
    assert not torch.equal(tgt["model"]["w"], want)


def test_truncated_and_missing_files(ckpt: Path, tmp_path: Path) -> None:
    bad = _copy(ckpt, tmp_path / "trunc")
    (f,) = bad.glob("*.distcp")
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CorruptCheckpointError, match="past the end") as e:
        READER.load(bad, _target(_state()))
    assert str(f) in str(e.value)
    f.unlink()
    with pytest.raises(CorruptCheckpointError, match="does not exist") as e:
        READER.load(bad, _target(_state()))
    assert f.name in str(e.value)


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


def test_malicious_metadata_never_runs(ckpt: Path, tmp_path: Path) -> None:
    bad = _copy(ckpt, tmp_path / "evil")
    marker = tmp_path / "marker"
    md = FileSystemReader(str(bad)).read_metadata()
    md.planner_data = {"x": _Evil(marker)}
    (bad / ".metadata").write_bytes(pickle.dumps(md, protocol=4))
    tgt = _target(_state())
    with pytest.raises(UnsafeCheckpointError, match="builtins.exec") as e:
        READER.load(bad, tgt)
    assert ".metadata" in str(e.value)
    with pytest.raises(RestoreError, match="builtins.exec"):
        RestoreCoordinator().restore(bad, tgt)
    with pytest.raises(UnsafeCheckpointError):
        read_catalog(bad)
    assert not marker.exists() and not tgt["model"]["w"].any()
    dcp.load(_target(_state()), checkpoint_id=str(bad))  # what dcp.load does with it
    assert marker.read_text() == "ran"


def test_memo_and_opcode_bombs_refused_fast(tmp_path: Path) -> None:
    (tmp_path / ".metadata").write_bytes(b"\x80\x04N\x72\xff\xff\xff\x7f.")  # LONG_BINPUT 2^31-1
    with pytest.raises(CorruptCheckpointError, match="memo index"):
        read_catalog(tmp_path)
    (tmp_path / ".metadata").write_bytes(pickle.dumps(bytearray(b"x"), protocol=5))
    with pytest.raises((UnsafeCheckpointError, CorruptCheckpointError)):
        read_catalog(tmp_path)


class _Opaque:
    pass


def test_value_needing_another_class_is_refused_naming_the_key(tmp_path: Path) -> None:
    path = tmp_path / "obj"
    dcp.save({"w": torch.ones(3), "cfg": {"obj": _Opaque()}}, checkpoint_id=str(path))
    tgt = {"w": torch.zeros(3), "cfg": {"obj": None}}
    with pytest.raises(UnsafeCheckpointError, match="_Opaque") as e:
        READER.load(path, tgt)
    assert e.value.key == "cfg.obj" and not tgt["w"].any()
    READER.load(path, {"w": tgt["w"]})  # without that value: fine
    assert tgt["w"].eq(1).all()


def _edit_metadata(src: Path, dst: Path, edit: Any) -> Path:
    out = _copy(src, dst)
    md = FileSystemReader(str(out)).read_metadata()
    edit(md)
    (out / ".metadata").write_bytes(pickle.dumps(md, protocol=4))
    return out


def _info(md: Any, fqn: str) -> Any:
    return next(v for k, v in md.storage_data.items() if k.fqn == fqn)


def _chunk(md: Any, fqn: str) -> Any:
    return md.state_dict_metadata[fqn].chunks[0]


LIES = {
    "path leaves the directory": (lambda md: setattr(_info(md, "model.w"), "relative_path", "../x.distcp"),
                                  "relative path"),
    "absolute path": (lambda md: setattr(_info(md, "model.w"), "relative_path", "/etc/passwd"), "relative path"),
    "item past the end": (lambda md: setattr(_info(md, "model.w"), "length", 10**12), "past the end"),
    "negative offset": (lambda md: setattr(_info(md, "model.w"), "offset", -1), "non-negative"),
    "chunk outside": (lambda md: setattr(_chunk(md, "model.w"), "sizes", torch.Size([41, 24])), "outside"),
    "uncovered": (lambda md: setattr(_chunk(md, "model.w"), "sizes", torch.Size([20, 24])), "elements"),
    "items share bytes": (lambda md: setattr(_info(md, "model.b"), "offset", _info(md, "model.w").offset),
                          "share bytes"),
    "compressed": (lambda md: setattr(_info(md, "model.w"), "transform_descriptors", ["stream.zstd"]),
                   "transforms"),
    "wrong dtype": (lambda md: setattr(md.state_dict_metadata["model.w"].properties, "dtype", torch.float64),
                    "metadata says"),
    "not a dict": (lambda md: setattr(md, "state_dict_metadata", [1, 2]), "state_dict_metadata"),
}


@pytest.mark.parametrize("case", sorted(LIES))
def test_lying_metadata_names_file_and_key(ckpt: Path, tmp_path: Path, case: str) -> None:
    edit, match = LIES[case]
    bad = _edit_metadata(ckpt, tmp_path / "lie", edit)
    tgt = _target(_state())
    if case == "wrong dtype":
        tgt["model"]["w"] = tgt["model"]["w"].double()
    with pytest.raises(CorruptCheckpointError, match=match) as e:
        READER.load(bad, tgt)
    assert (e.value.key == "model.w" or case in ("not a dict", "items share bytes")), e.value
    assert not tgt["model"]["w"].any()


def test_metadata_classes_are_inert_records() -> None:
    with pytest.raises(UnsafeCheckpointError):
        dcp_meta.unpickle(pickle.dumps(os.system, protocol=4), Path("x/.metadata"))
    rec = dcp_meta.unpickle(pickle.dumps(_chunk_md(), protocol=4), Path("x/.metadata"))
    assert type(rec).__name__ == "ChunkStorageMetadata" and not hasattr(rec, "__dict__")


def _chunk_md() -> Any:
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
    return ChunkStorageMetadata(torch.Size([0]), torch.Size([3]))


def test_mutated_metadata_gives_dcp_load_result_or_our_error(ckpt: Path, tmp_path: Path) -> None:
    """Flipped bytes and truncations of ``.metadata``: our errors only, never a builtin exception; a
    metadata that still reads restores the values the items hold."""
    raw = (ckpt / ".metadata").read_bytes()
    rnd = random.Random(int(os.environ.get("DR_FUZZ_SEED", "0")))
    n = int(os.environ.get("DR_FUZZ_EXAMPLES", "300"))
    bad = _copy(ckpt, tmp_path / "m")
    want = _state()
    for _ in range(n):
        data = bytearray(raw)
        how = rnd.random()
        if how < 0.6:
            for _k in range(rnd.randint(1, 3)):
                data[rnd.randrange(len(data))] = rnd.randrange(256)
        elif how < 0.8:
            del data[rnd.randrange(len(data)):]
        else:
            i = rnd.randrange(len(data))
            data[i:i] = bytes(rnd.randrange(256) for _ in range(rnd.randint(1, 8)))
        (bad / ".metadata").write_bytes(bytes(data))
        tgt = _target(_state())
        try:
            res = READER.load(bad, tgt)
        except (CorruptCheckpointError, UnsafeCheckpointError, StateDictMismatchError) as e:
            assert "metadata" in str(e) or ".distcp" in str(e) or e.key, e
            continue
        for key in ("w", "i", "t"):  # a key renamed by the mutation is missing, not wrong
            if f"model.{key}" not in res.missing_keys:
                assert torch.equal(tgt["model"][key], want["model"][key].contiguous()), key


def test_mutated_items_give_the_saved_values_or_our_error(ckpt: Path, tmp_path: Path) -> None:
    """Flipped bytes, mostly in the items' own zip framing and ``data.pkl`` (their first and last
    bytes): our errors only; a restore that succeeds holds exactly the saved values."""
    (src,) = ckpt.glob("*.distcp")
    raw = src.read_bytes()
    spans = [(i.offset, i.length) for i in _items(ckpt).values()]
    rnd = random.Random(int(os.environ.get("DR_FUZZ_SEED", "0")))
    n = int(os.environ.get("DR_FUZZ_EXAMPLES", "300"))
    bad = _copy(ckpt, tmp_path / "i")
    dst = bad / src.name
    want = _dcp_load(ckpt, _target(_state()))
    for _ in range(n):
        data = bytearray(raw)
        off, length = rnd.choice(spans)
        for _k in range(rnd.randint(1, 3)):
            at = off + (rnd.randrange(min(length, 256)) if rnd.random() < 0.5
                        else length - 1 - rnd.randrange(min(length, 256)))
            data[at] = rnd.randrange(256)
        dst.write_bytes(bytes(data))
        tgt = _target(_state())
        try:
            READER.load(bad, tgt)
        except (CorruptCheckpointError, UnsafeCheckpointError) as e:
            assert src.name in str(e) and e.key, e
            continue
        assert_same(tgt, want)


def _cli(*args: str) -> tuple[int, str]:
    from dist_restore.cli import main
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(list(args))
    return rc, buf.getvalue()


def test_cli_inspect_verify_consolidate(ckpt: Path, tmp_path: Path) -> None:
    rc, out = _cli("inspect", str(ckpt))
    assert rc == 0 and "dcp checkpoint" in out and "model.w" in out and "train.step" in out
    rc, out = _cli("inspect", str(ckpt), "--json")
    doc = json.loads(out)
    assert {e["key"] for e in doc["entries"]} == {k for k, v in _flat(_state()).items() if isinstance(v, torch.Tensor)}
    rc, out = _cli("verify", str(ckpt))
    assert rc == 0 and "verify: OK" in out
    # consolidate: what dcp_to_torch_save writes, loadable with weights_only=True
    dcp_to_torch_save(str(ckpt), str(tmp_path / "ref.pt"))
    rc, _out = _cli("consolidate", str(ckpt), str(tmp_path / "all.pt"), "--quiet")
    assert rc == 0
    assert_same(torch.load(tmp_path / "all.pt", weights_only=True), torch.load(tmp_path / "ref.pt", weights_only=False))
    rc, _out = _cli("consolidate", str(ckpt), str(tmp_path / "hf"), "--max-shard-size", "2KB", "--quiet")
    from safetensors.torch import load_file
    got = {}
    for f in sorted((tmp_path / "hf").glob("*.safetensors")):
        got.update(load_file(f))
    want = {k: v for k, v in _flat(_dcp_load(ckpt, _target(_state()))).items() if isinstance(v, torch.Tensor)}
    assert rc == 0 and len(list((tmp_path / "hf").glob("*.safetensors"))) > 1
    assert_same(got, want)
    # a flipped byte: verify names the file and the key
    bad = _copy(ckpt, tmp_path / "bad")
    info = _items(bad)["model.i"]
    f = bad / info.relative_path
    raw = bytearray(f.read_bytes())
    raw[info.offset + info.length - 900] ^= 1  # inside the int32 record (240 bytes) or its framing
    f.write_bytes(bytes(raw))
    rc, out = _cli("verify", str(bad))
    assert rc == 1 and "model.i" in out and info.relative_path in out


def _flat(sd: dict[str, Any]) -> dict[str, Any]:
    from dist_restore._format.dcp import dcp_flatten
    return {k: v for k, _p, _k, v in dcp_flatten(sd)}


def test_items_around_the_read_window_sizes(tmp_path: Path) -> None:
    """Items just below and above the sizes where the reader switches from reading an item whole
    to reading its ends (64 KiB) and where the ends overlap: every one restores as saved."""
    g = torch.Generator().manual_seed(1)
    sd = {f"t{n}": torch.randn(n, generator=g) for n in [*range(15_950, 16_100, 13), 1, 700, 1100, 2100]}
    dcp.save(sd, checkpoint_id=str(tmp_path / "c"))
    got = READER.load(tmp_path / "c", {k: torch.zeros_like(v) for k, v in sd.items()}).state_dict
    assert_same(got, sd)
    assert READER.load(tmp_path / "c", None).state_dict.keys() == sd.keys()
