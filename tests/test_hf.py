"""Safetensors sources in one process: the reader and the coordinator (no process group) against
``safetensors.torch.load_file`` of the same files; every malformed header and index refused with an
error naming the file (and key) before any target is touched; slice byte ranges against ``narrow``."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dist_restore import CheckpointReader, CorruptCheckpointError, RankInfo, RestoreCoordinator, RestoreError, \
    StateDictMismatchError, read_catalog
from dist_restore._bytes.ranges import box_runs, split_box
from dist_restore._format.catalog import Chunk
from dist_restore._base.regions import Box

safetensors_torch = pytest.importorskip("safetensors.torch")
save_file, load_file = safetensors_torch.save_file, safetensors_torch.load_file

READER = CheckpointReader(RankInfo(0, 1))


def _every_dtype() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {}
    for i, dt in enumerate([torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
                            torch.int16, torch.int8, torch.uint8, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2,
                            torch.complex64, torch.uint16, torch.uint32, torch.uint64]):
        t = torch.randint(0, 100, (3, 5 + i), generator=g).to(dt) if not dt.is_complex \
            else torch.randn(3, 5 + i, generator=g, dtype=dt)
        out[f"t.{str(dt).split('.')[-1]}"] = t
    out["scalar"] = torch.tensor(2.5)
    out["empty"] = torch.empty(0, 7)
    out["big"] = torch.randn(300, 129, generator=g)
    return out


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8) if a.dtype.itemsize == 1
                                                                      and a.dtype != torch.uint8 else a, b.view(
        torch.uint8) if b.dtype.itemsize == 1 and b.dtype != torch.uint8 else b)


@pytest.fixture()
def one_file(tmp_path: Path) -> Path:
    f = tmp_path / "model.safetensors"
    save_file(_every_dtype(), f, metadata={"format": "pt", "note": "hello"})
    return f


def test_read_everything_matches_load_file(one_file: Path) -> None:
    want = load_file(one_file)
    for path in (one_file, one_file.parent):  # the file, or its directory
        got, missing = READER.read(path)
        assert missing == [] and list(got) == list(want)
        for k in want:
            assert _same(got[k], want[k]), k


def test_partial_targets_filled_in_place(one_file: Path) -> None:
    want = load_file(one_file)
    big = torch.zeros(129, 300).t()  # a strided target: staged and copied
    dense = torch.zeros(3, 6, dtype=torch.float32)
    target = {"big": big, "t.float32": dense, "t.int64": None, "nope": torch.zeros(2)}
    res = READER.load(one_file, target)
    assert res.state_dict is target and target["big"] is big and target["t.float32"] is dense
    assert torch.equal(big, want["big"]) and torch.equal(dense, want["t.float32"])
    assert torch.equal(target["t.int64"], want["t.int64"])
    assert res.missing_keys == ["nope"]
    assert set(res.unexpected_keys) == set(want) - {"big", "t.float32", "t.int64"}
    assert res.bytes_read == sum(want[k].nbytes for k in ("big", "t.float32", "t.int64"))


def test_nested_targets_and_key_map(one_file: Path) -> None:
    want = load_file(one_file)
    target = {"model": {"w": torch.zeros(300, 129), "skip": torch.ones(1)}}
    res = READER.load(one_file, target, key_map={"model.w": "big", "model.skip": None})
    assert torch.equal(target["model"]["w"], want["big"]) and torch.equal(target["model"]["skip"], torch.ones(1))
    assert res.missing_keys == []
    target = {"w": torch.zeros(300, 129)}
    READER.load(one_file, target, key_map=lambda k: {"w": "big"}.get(k))
    assert torch.equal(target["w"], want["big"])


def test_dtype_mismatch_refused_then_cast_bit_exact(tmp_path: Path) -> None:
    src = {"w": torch.randn(64, 33).to(torch.bfloat16), "h": torch.randn(7, dtype=torch.float16)}
    save_file(src, tmp_path / "m.safetensors")
    target = {"w": torch.full((64, 33), 5.0), "h": torch.zeros(7, dtype=torch.float64)}
    with pytest.raises(StateDictMismatchError) as e:
        READER.load(tmp_path, target)
    assert "'w'" in str(e.value) and "torch.bfloat16" in str(e.value) and "torch.float32" in str(e.value)
    assert "cast=True" in str(e.value) and "m.safetensors" in str(e.value)
    assert torch.equal(target["w"], torch.full((64, 33), 5.0))  # untouched
    READER.load(tmp_path, target, cast=True)
    for k in src:
        assert target[k].dtype != src[k].dtype and torch.equal(target[k], src[k].to(target[k].dtype))


def test_shape_mismatch_names_both(tmp_path: Path) -> None:
    save_file({"w": torch.zeros(4, 4)}, tmp_path / "m.safetensors")
    with pytest.raises(StateDictMismatchError, match=r"target shape \(4, 5\).*\(4, 4\)"):
        READER.load(tmp_path, {"w": torch.zeros(4, 5)})


def test_coordinator_without_group_and_strict(one_file: Path) -> None:
    want = load_file(one_file)
    res = RestoreCoordinator().restore(one_file.parent, {"big": torch.zeros(300, 129), "gone": torch.zeros(1)})
    assert torch.equal(res.state_dict["big"], want["big"])
    assert res.missing_keys == ["gone"] and res.report is not None and "gone" in res.report.render()
    assert res.stats.bytes_read == want["big"].nbytes and res.stats.files_opened == 1
    assert res.stats.bytes_metadata > 0
    with pytest.raises(RestoreError) as e:
        RestoreCoordinator().restore(one_file.parent, {"big": torch.zeros(300, 129)}, strict=True)
    assert e.value.phase == "strict"


def test_metadata_exposed(one_file: Path) -> None:
    cat = read_catalog(one_file)
    assert cat.metadata["model.safetensors"] == {"format": "pt", "note": "hello"}
    assert cat.entries["big"].shape == (300, 129) and cat.entries["big"].dtype == torch.float32


def _shards(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A directory of three shard files and an index, as save_pretrained writes it."""
    d = tmp_path / "sharded"
    d.mkdir()
    g = torch.Generator().manual_seed(1)
    tensors = {f"layers.{i}.w": torch.randn(8, 4 + i, generator=g) for i in range(6)}
    weight_map = {}
    for n in range(3):
        part = {k: tensors[k] for k in list(tensors)[2 * n:2 * n + 2]}
        name = f"model-{n + 1:05d}-of-00003.safetensors"
        save_file(part, d / name)
        weight_map |= {k: name for k in part}
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return d, tensors


def test_index_opens_only_the_files_holding_the_keys(tmp_path: Path) -> None:
    d, tensors = _shards(tmp_path)
    cat = read_catalog(d, keys=["layers.3.w"])
    assert list(cat.file_sizes) == ["model-00002-of-00003.safetensors"]
    res = RestoreCoordinator().restore(d, {"layers.3.w": torch.zeros(8, 7)})
    assert torch.equal(res.state_dict["layers.3.w"], tensors["layers.3.w"])
    assert res.stats.files_opened == 1 and res.stats.bytes_read == tensors["layers.3.w"].nbytes
    assert set(res.unexpected_keys) == set(tensors) - {"layers.3.w"}  # from the index: no other file opened
    # a damaged file the target does not need is never read
    other = d / "model-00003-of-00003.safetensors"
    other.write_bytes(b"\xff" * 16)
    RestoreCoordinator().restore(d, {"layers.3.w": torch.zeros(8, 7)})


def test_tied_weights_from_save_pretrained(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_attention_heads=2,
                                   num_key_value_heads=1, num_hidden_layers=1, tie_word_embeddings=True)
    torch.manual_seed(0)
    src = transformers.LlamaForCausalLM(cfg)
    src.save_pretrained(tmp_path / "tied")
    torch.manual_seed(1)
    dst = transformers.LlamaForCausalLM(cfg)
    res = RestoreCoordinator().restore(tmp_path / "tied", dst.state_dict(), strict=True)
    assert res.missing_keys == []  # lm_head.weight is the embedding's tensor
    assert "tied" in res.report.render()
    for (k, a), (_k, b) in zip(src.state_dict().items(), dst.state_dict().items()):
        assert torch.equal(a, b), k


# -- bad input ------------------------------------------------------------------------------

def _raw(header: dict | bytes, data: bytes = b"", length: int | None = None) -> bytes:
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(h) if length is None else length) + h + data


_F32 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}

BAD = {
    "too short": (b"\x01\x02", "too short"),
    "header beyond file": (_raw({"a": _F32}, b"\0" * 8, length=10_000), "beyond the file"),
    "header above cap": (_raw({"a": _F32}, b"\0" * 8, length=100_000_001), "100000000-byte cap"),
    "invalid json": (_raw(b'{"a": [', b""), "not valid JSON"),
    "not utf-8": (_raw(b'{"\xff": 1}', b""), "not valid JSON"),
    "not an object": (_raw([1, 2]), "not an object"),
    "deep nesting": (_raw(b"[" * 100_000 + b"]" * 100_000), "not valid JSON"),
    "duplicate key": (_raw(b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "a": {}}', b"\0" * 8),
                      "twice"),
    "offsets outside": (_raw({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, b"\0" * 8),
                        "outside the 8-byte data section"),
    "offsets reversed": (_raw({"a": {"dtype": "F32", "shape": [0], "data_offsets": [8, 0]}}, b"\0" * 8),
                         "0 <= begin <= end"),
    "overlap": (_raw({"a": _F32, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12),
                "overlaps"),
    "unknown dtype": (_raw({"a": {"dtype": "F13", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8),
                      "unknown dtype 'F13'"),
    "shape x dtype": (_raw({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8),
                      "is 12 bytes"),
    "negative dim": (_raw({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8),
                     "non-negative"),
    "bool dim": (_raw({"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, b"\0" * 4),
                 "non-negative"),
    "huge shape": (_raw({"a": {"dtype": "F32", "shape": [2**62, 2**62], "data_offsets": [0, 8]}}, b"\0" * 8),
                   "bytes, data_offsets"),
    "bad metadata": (_raw({"__metadata__": {"a": 1}, "a": _F32}, b"\0" * 8), "__metadata__"),
    "gap": (_raw({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8), "bytes unclaimed"),
    "trailing bytes": (_raw({"a": _F32}, b"\0" * 12), "end at byte 8 of the 12-byte"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_headers_name_the_file(tmp_path: Path, case: str) -> None:
    raw, words = BAD[case]
    f = tmp_path / "model.safetensors"
    f.write_bytes(raw)
    target = {"a": torch.full((2,), 3.0)}
    with pytest.raises(CorruptCheckpointError) as e:
        READER.load(tmp_path, target)
    assert words in str(e.value) and str(f) in str(e.value), str(e.value)
    assert torch.equal(target["a"], torch.full((2,), 3.0))
    with pytest.raises(RestoreError) as e2:  # the coordinator: the same, as a RestoreError of the plan
        RestoreCoordinator().restore(tmp_path, target)
    assert e2.value.phase == "plan" and words in str(e2.value)
    assert f.read_bytes() == raw  # never written


def test_index_naming_a_missing_file(tmp_path: Path) -> None:
    d, _t = _shards(tmp_path)
    (d / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CorruptCheckpointError, match="model-00002-of-00003.safetensors.*does not exist") as e:
        READER.read(d)
    assert "model.safetensors.index.json" in str(e.value)


@pytest.mark.parametrize("how", ["two files, no index", "index says another file", "index names a key twice",
                                 "index key missing from its file", "index path escapes"])
def test_one_key_in_two_files_and_lying_indexes(tmp_path: Path, how: str) -> None:
    d, _t = _shards(tmp_path)
    index = d / "model.safetensors.index.json"
    wm = json.loads(index.read_text())["weight_map"]
    if how == "two files, no index":
        index.unlink()
        save_file({"layers.0.w": torch.zeros(8, 4)}, d / "extra.safetensors")
        words = "in two files"
    elif how == "index says another file":
        save_file({"layers.0.w": torch.zeros(8, 4)}, d / "extra.safetensors")
        wm["zzz"] = "extra.safetensors"
        index.write_text(json.dumps({"weight_map": wm}))
        words = "in two files"
    elif how == "index names a key twice":
        text = json.dumps({"weight_map": wm})
        index.write_text(text[:-2] + ', "layers.0.w": "model-00002-of-00003.safetensors"}}')
        words = "twice"
    elif how == "index key missing from its file":
        wm["ghost"] = "model-00001-of-00003.safetensors"
        index.write_text(json.dumps({"weight_map": wm}))
        words = "header lacks it"
    else:
        wm["layers.0.w"] = "../elsewhere.safetensors"
        index.write_text(json.dumps({"weight_map": wm}))
        words = "not a plain file name"
    with pytest.raises(CorruptCheckpointError, match=words):
        READER.read(d)


def test_file_changed_after_planning_is_an_error(tmp_path: Path) -> None:
    from dist_restore._sources import plan_source, read_source

    save_file({"w": torch.zeros(1000)}, tmp_path / "m.safetensors")
    plan = plan_source(tmp_path, {"w": torch.ones(1000)})
    with open(tmp_path / "m.safetensors", "r+b") as f:
        f.truncate(100)
    with pytest.raises(CorruptCheckpointError, match="changed under the restore"):
        read_source(plan)


# -- slice byte ranges ----------------------------------------------------------------------

@st.composite
def _box_case(draw):  # type: ignore[no-untyped-def]
    nd = draw(st.integers(0, 4))
    shape = tuple(draw(st.lists(st.integers(1, 6), min_size=nd, max_size=nd)))
    start = tuple(draw(st.integers(0, n - 1)) for n in shape)
    size = tuple(draw(st.integers(1, n - s)) for n, s in zip(shape, start))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.int8, torch.float64]))
    limit = draw(st.sampled_from([1, 8, 64, 1 << 20]))
    return shape, start, size, dtype, limit


@settings(max_examples=300, deadline=None)
@given(_box_case())
def test_box_runs_are_narrow(case) -> None:  # type: ignore[no-untyped-def]
    shape, start, size, dtype, limit = case
    full = torch.arange(max(1, int(torch.tensor(shape).prod())) if shape else 1).to(dtype).reshape(shape)
    blob = bytes(7) + full.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()  # the data at byte 7 of a "file"
    chunk = Chunk("f", 7, (0,) * len(shape), shape)
    want = full
    for d, (a, n) in enumerate(zip(start, size)):
        want = want.narrow(d, a, n)
    want_bytes = want.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    isz = dtype.itemsize
    box = Box(start, (0,) * len(shape), size)
    parts = split_box(box, isz, limit)
    assert sum(p.numel for p in parts) == box.numel
    whole = {}
    for p in parts:
        offs, run, _k = box_runs(chunk, p, isz)
        assert run * len(offs) == p.numel * isz  # exactly the bytes of the part, nothing more
        piece = b"".join(blob[o:o + run] for o in offs.tolist())
        whole[p.dst_start] = (p, piece)
    # the parts, put back in the box's row-major order, are the narrowed tensor
    out = torch.empty(size, dtype=dtype)
    for p, piece in whole.values():
        sl = tuple(slice(a, a + n) for a, n in zip(p.dst_start, p.size))
        out[sl] = torch.frombuffer(bytearray(piece), dtype=dtype).reshape(p.size) if piece else out[sl]
    got = out.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    assert got == want_bytes


# -- hostile files: mutations of a valid file, against safetensors' own reader ----------------

def _valid_file() -> bytes:
    import io

    from safetensors.torch import save

    g = torch.Generator().manual_seed(9)
    return save({"a": torch.randn(3, 4, generator=g), "b": torch.arange(5, dtype=torch.int16),
                 "c": torch.randn(2, generator=g).to(torch.bfloat16)}, metadata={"format": "pt"})


_BASE = _valid_file()
_HLEN = struct.unpack("<Q", _BASE[:8])[0]


@st.composite
def _mutant(draw):  # type: ignore[no-untyped-def]
    data = bytearray(_BASE)
    kind = draw(st.sampled_from(["flip", "truncate", "length", "json", "splice"]))
    if kind == "flip":  # bytes of the length field and the header (the data are any bytes)
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, 8 + _HLEN - 1))
            data[i] = draw(st.integers(0, 255))
    elif kind == "truncate":
        del data[draw(st.integers(0, len(data) - 1)):]
    elif kind == "length":
        data[:8] = struct.pack("<Q", draw(st.one_of(st.integers(0, 2 * len(data)), st.integers(0, 2**64 - 1))))
    elif kind == "json":  # a header of other values, the data section as it is
        names = st.sampled_from(["F32", "I16", "BF16", "F64", "U8", "BOOL", "F8_E4M3", "X", 3, None])
        ints = st.one_of(st.integers(-2, 70), st.sampled_from([2**63, 2**64 + 1, 1.0, "4", True]))
        entry = st.fixed_dictionaries({"dtype": names, "shape": st.lists(ints, max_size=3),
                                       "data_offsets": st.lists(ints, min_size=0, max_size=3)})
        doc = draw(st.dictionaries(st.sampled_from(["a", "b", "c", "__metadata__"]), entry, max_size=4))
        raw = json.dumps(doc).encode()
        body = _BASE[8 + _HLEN:]
        data = bytearray(struct.pack("<Q", len(raw)) + raw + body)
    else:  # a run of the file moved elsewhere in it
        a = draw(st.integers(0, len(data) - 1))
        n = draw(st.integers(1, 16))
        b = draw(st.integers(0, len(data) - 1))
        data[b:b + n] = data[a:a + n]
    return bytes(data)


@settings(max_examples=int(os.environ.get("DR_FUZZ_EXAMPLES", "400")), deadline=None)
@given(_mutant())
def test_mutated_files_read_as_safetensors_does_or_fail_naming_the_file(tmp_path_factory, raw: bytes) -> None:
    """Any mutation: exactly what ``safetensors.torch.load_file`` returns, or our own
    ``CorruptCheckpointError`` naming the file; when safetensors refuses the file, so do we."""
    d = tmp_path_factory.mktemp("m")
    f = d / "model.safetensors"
    f.write_bytes(raw)
    try:
        want = load_file(f)
    except Exception:  # noqa: BLE001 - safetensors refused it
        want = None
    try:
        got, _missing = READER.read(f)
    except CorruptCheckpointError as e:
        assert str(f) in str(e)
        return
    assert want is not None, "safetensors refuses this file, dist_restore read it"
    assert list(got) == list(want)
    for k in want:
        assert _same(got[k], want[k]), k
