"""A ``torch.save`` file indexed as an index file's tables (what a full read, ``state_dict=None``,
uses): the tables say what the reference index (a tree of references) says, full reads through
them equal ``torch.load``, and whatever they cannot describe is indexed as ever."""

from __future__ import annotations

import collections
import gc
import io
import pickle
import sys
import weakref
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch

from _util import assert_same, assert_same_index, assert_same_ties, oracle, rewrite_zip, save
from dist_restore import CheckpointReader, RankInfo, read_index
from dist_restore._format import pickletables as _pickletables
from dist_restore._format.indexfile import FileIndex
from dist_restore._bytes.readall import read_all

READER = CheckpointReader(RankInfo(0, 1))


def _state() -> dict[str, Any]:
    g = torch.Generator().manual_seed(3)
    base = torch.randn(24, generator=g)
    shared = torch.randn(5, generator=g)
    return {
        "model": collections.OrderedDict([
            ("w", torch.randn(4, 3, generator=g)),
            ("p", torch.nn.Parameter(torch.randn(3, generator=g))),
            ("frozen", torch.nn.Parameter(torch.randn(2, generator=g), requires_grad=False)),
            ("grad", torch.randn(2, generator=g).requires_grad_()),
            ("half", torch.randn(5, generator=g).to(torch.float16)),
            ("u16", torch.arange(6, dtype=torch.int32).to(torch.uint16)),  # pickled by _rebuild_tensor_v3
            ("empty", torch.empty(0, 2)),
            ("scalar", torch.tensor(2.5)),
        ]),
        "views": {"a": base[3:9], "b": base.view(4, 6).t(), "c": base[::5]},
        "twice": [shared, shared],  # one tensor object in two places
        "conj": torch.randn(3, dtype=torch.complex64, generator=g).conj(),
        "neg": torch.randn(2, dtype=torch.complex64, generator=g).conj()._neg_view(),
        "optim": {"state": {i: {"step": torch.tensor(float(i)), "exp_avg": torch.randn(3, generator=g)}
                            for i in range(4)},
                  "param_groups": [{"lr": 0.1, "betas": (0.9, 0.99), "params": [0, 1, 2, 3]}]},
        "values": [1, -7, 2.5, "s", b"b", None, True, torch.Size([2, 3]), torch.bfloat16, torch.device("cpu"),
                   (), [], {}, {3, 4}, 1 + 2j],
    }


def test_tables_hold_what_the_reference_index_says(tmp_path: Path) -> None:
    path = save(_state(), tmp_path)
    ix, ref = read_index(path, tables=True), read_index(path)
    assert isinstance(ix, FileIndex) and ix.source == "pickle" and not isinstance(ref, FileIndex)
    assert_same_index(ix, ref)


def test_full_reads_through_the_tables_equal_torch_load(tmp_path: Path) -> None:
    path = save(_state(), tmp_path)
    expect = oracle(path)
    got = READER.read(tmp_path)[0]
    assert_same(got, expect)
    assert_same_ties(got, expect)
    assert got["twice"][0] is got["twice"][1] or \
        got["twice"][0].untyped_storage().data_ptr() == got["twice"][1].untyped_storage().data_ptr()


def test_a_full_read_spends_the_index(tmp_path: Path) -> None:
    """The skeleton becomes the result's containers: the index cannot be walked again."""
    path = save({"a": {"b": torch.ones(2)}}, tmp_path)
    ix = read_index(path, tables=True)
    got = read_all(ix)
    assert torch.equal(got["a"]["b"], torch.ones(2))
    with pytest.raises(RuntimeError, match="spent"):
        ix.walkable  # noqa: B018


class _Key:
    def __init__(self, key: str, t: torch.Tensor) -> None:
        self.key, self.t = key, t


def _craft(path: Path, obj: Any, keys: list[str]) -> None:
    """A ``torch.save``-like zip whose storage keys are ``keys`` in the order tensors are met
    (torch.save numbers them "0", "1", ...); a key met again is the same storage."""
    records: dict[str, torch.Tensor] = {}
    met = iter(keys)

    class P(pickle.Pickler):
        def persistent_id(self, o: Any) -> Any:
            if isinstance(o, _Key):
                return ("storage", torch.FloatStorage, o.key, "cpu", o.t.numel())
            return None

        def reducer_override(self, o: Any) -> Any:
            if isinstance(o, torch.Tensor):
                key = next(met)
                records.setdefault(key, o)
                return (torch._utils._rebuild_tensor_v2,
                        (_Key(key, records[key]), 0, tuple(o.shape), o.stride(), False, collections.OrderedDict()))
            return NotImplemented

    buf = io.BytesIO()
    P(buf, protocol=2).dump(obj)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", buf.getvalue())
        z.writestr("archive/byteorder", sys.byteorder)
        for k, t in records.items():
            z.writestr(f"archive/data/{k}", t.numpy().tobytes())
        z.writestr("archive/version", "3\n")


def test_storage_keys_other_than_ordinals(tmp_path: Path) -> None:
    """Keys "0", "1", then others (the tables keep them from there on), one met twice (a tie)."""
    t = torch.arange(3.0)
    obj = {"a": torch.arange(4.0), "b": t, "c": {"d": torch.ones(2)}, "e": torch.arange(3.0) * 2}
    path = tmp_path / "checkpoint_0.pt"
    _craft(path, obj, ["0", "1", "k7", "1"])
    ix = read_index(path, tables=True)
    assert isinstance(ix, FileIndex) and ix._skeys_list == ["0", "1", "k7"]
    expect = oracle(path)
    got = READER.read(tmp_path)[0]
    assert_same(got, expect)
    assert_same_ties(got, expect)
    assert torch.equal(got["e"], t)  # the record of the key's first tensor, as torch.load reads it


def _tensor_with_attribute() -> torch.Tensor:
    t = torch.ones(2)
    t.note = "attr"  # type: ignore[attr-defined]
    return t


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("make", [
    lambda: {"s": torch.eye(2).to_sparse(), "d": torch.ones(2)},
    lambda: {"t": _tensor_with_attribute()},
    lambda: {"storage": torch.arange(3.0).untyped_storage()},
    lambda: {"q": torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.qint8)},
], ids=["sparse", "tensor with an attribute", "bare storage", "quantized"])
def test_what_the_tables_cannot_describe_is_indexed_as_ever(tmp_path: Path, make: Any) -> None:
    path = save(make(), tmp_path)
    ix = read_index(path, tables=True)
    assert not isinstance(ix, FileIndex)
    got = READER.read(tmp_path)[0]
    expect = oracle(path)
    for k in expect:
        if isinstance(expect[k], torch.Tensor) and expect[k].layout == torch.strided and not expect[k].is_quantized:
            assert_same(got[k], expect[k], k)
    assert list(got) == list(expect)


def test_another_byte_order_is_indexed_as_ever(tmp_path: Path) -> None:
    path = save({"w": torch.arange(6, dtype=torch.int32)}, tmp_path)
    rewrite_zip(path, {"byteorder": b"big" if sys.byteorder == "little" else b"little"})
    assert not isinstance(read_index(path, tables=True), FileIndex)
    assert_same(READER.read(tmp_path)[0], oracle(path))


def test_the_unpickler_and_its_memo_go_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing refers back to the unpickler: its memo (every object the pickle made) is freed
    when it is dropped, not at a garbage collection (which a restore pauses)."""
    made: list[weakref.ref[Any]] = []
    cls = _pickletables._TableUnpickler

    class Watched(cls):  # type: ignore[misc, valid-type]
        def __init__(self, *a: Any) -> None:
            super().__init__(*a)
            made.append(weakref.ref(self))

    monkeypatch.setattr(_pickletables, "_TableUnpickler", Watched)
    path = save(_state(), tmp_path)
    was = gc.isenabled()
    gc.disable()
    try:
        assert isinstance(read_index(path, tables=True), FileIndex)
        assert len(made) == 1 and made[0]() is None
    finally:
        if was:
            gc.enable()
