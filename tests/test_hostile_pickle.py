"""Hostile ``data.pkl`` (issue 23): what the unpickler and the pickle tables refuse, and how.

Each crafted file gives exactly what ``torch.load(weights_only=True)`` gives, or our own error
naming the file (and the key where there is one). The files that crashed the process before
(a storage whose ``numel * itemsize`` wraps int64: SIGBUS; a dict key nested 200,000 tuples deep:
SIGSEGV in C recursion) run in a child under a memory limit (``fuzz/run_cases.py``'s runner).
"""

from __future__ import annotations

import collections
import mmap
import pickle
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from _util import assert_same, oracle
from dist_restore import CheckpointReader, RankInfo, read_index
from dist_restore._base.stack import StackUnavailable, call_with_stack
from dist_restore._format import pickletables as _pickletables
from dist_restore._format import unpickle as _unpickle
from dist_restore._format.unpickle import MAX_NESTING, unpickle_refs
from dist_restore.errors import CheckpointError, CorruptCheckpointError, UnsafeCheckpointError

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fuzz.hostile_cases import (  # noqa: E402
    CASES, Sto, Ten, after_empty_dict, enc_int, enc_str, insert_before, ops, pickle_tree, with_pickle)
from fuzz.run_cases import run_child  # noqa: E402

READER = CheckpointReader(RankInfo(0, 1))


def _s4(key: Any = "0", numel: Any = 4, stype: Any = torch.FloatStorage) -> Sto:
    return Sto(key, stype, "cpu", numel)


class _Ten(Ten):
    """``_rebuild_tensor_v2`` with every argument given (requires_grad, metadata)."""

    def __init__(self, storage: Sto, offset: Any, size: Any, stride: Any, requires_grad: Any = False,
                 *metadata: Any) -> None:
        self.args = (storage, offset, size, stride, requires_grad, collections.OrderedDict(), *metadata)


def _file(tmp_path: Path, tree_or_pkl: Any, base: Any = None) -> Path:
    return with_pickle(tmp_path, {"w": torch.arange(4.0)} if base is None else base, tree_or_pkl)


def _inserted(blob: bytes) -> bytes:
    """A one-tensor pickle with ``blob`` (opcodes that push a key and a value, then SETITEM)
    run right after its top-level dict is made."""
    pkl = pickle_tree({"w": Ten(_s4(numel=1), 0, (1,), (1,))})
    return insert_before(pkl, after_empty_dict(ops(pkl)), blob)


def _refused(path: Path, *, key: str | None = None, what: type[CheckpointError] = CorruptCheckpointError,
             match: str | None = None) -> list[str]:
    """Every way in refuses ``path`` with ``what``, naming the file (and ``key``); the messages."""
    messages = []
    calls = [lambda: READER.read(path.parent), lambda: READER.load(path.parent, {"w": torch.zeros(4)}),
             lambda: read_index(path).entries, lambda: read_index(path, tables=True).entries]
    for call in calls:
        with pytest.raises(what, match=match) as e:
            call()
        assert e.value.file == str(path), e.value
        if key is not None:
            assert e.value.key == key, e.value
        messages.append(str(e.value))
    return messages


def _torch_refuses(path: Path) -> None:
    with pytest.raises(Exception):  # noqa: B017 - any error: we must not return values for it
        oracle(path)


# -- crashes: in a child process ---------------------------------------------------------------

@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", ["rank_numel_wrap", "deep_tuple_key"])
def test_crash_cases_give_our_error_in_a_child(case: str, tmp_path: Path) -> None:
    """Were SIGBUS (numel * itemsize wrapped in the tables' int64 check) and SIGSEGV (hashing the
    200,000-deep key in C while unpickling); now our error naming the file, within seconds."""
    c = CASES[case](tmp_path / "case")
    work = tmp_path / "work"
    work.mkdir()
    for ex in c.exercises:
        if ex["api"] != "read":
            continue
        r = run_child(ex, 60.0, 4 << 30, work)
        assert "signal" not in r and not r.get("timeout"), r.get("signal") or r["stderr"][-2000:]
        assert r.get("ok") is False and r["ours"], r
        assert r["type"].endswith("CorruptCheckpointError") and "checkpoint_0.pt" in r["msg"], r["msg"]
        assert r["call_s"] < 10, r["call_s"]


# -- tensor fields -------------------------------------------------------------------------------

_BAD_FIELDS = {
    "negative_size": _Ten(_s4(), 0, (-1,), (1,)),
    "negative_size_2d": _Ten(_s4(), 0, (2, -2), (1, 1)),
    "float_size": _Ten(_s4(), 0, (2.5,), (1,)),
    "float_size_whole": _Ten(_s4(), 0, (2.0,), (1,)),
    "bool_size": _Ten(_s4(), 0, (True,), (1,)),
    "bool_stride": _Ten(_s4(), 0, (2,), (True,)),
    "negative_stride": _Ten(_s4(), 3, (4,), (-1,)),
    "huge_stride": _Ten(_s4(), 0, (1,), (1 << 70,)),
    "size_stride_lengths": _Ten(_s4(), 0, (2, 2), (1,)),
    "negative_offset": _Ten(_s4(), -1, (2,), (1,)),
    "float_offset": _Ten(_s4(), 1.0, (2,), (1,)),
    "bool_offset": _Ten(_s4(), True, (2,), (1,)),
    "str_offset": _Ten(_s4(), "1", (2,), (1,)),
    "numel_overflow": _Ten(_s4(), 0, (16,) * 16, (0,) * 16),  # torch: numel overflows
    "numel_overflow_before_zero": _Ten(_s4(), 0, (1 << 40, 1 << 40, 0), (0, 0, 0)),
    "requires_grad_int": _Ten(_s4(), 0, (4,), (1,), 1),
    "metadata_list": _Ten(_s4(), 0, (4,), (1,), False, [1]),
    "metadata_not_bool": _Ten(_s4(), 0, (4,), (1,), False, {"neg": "x"}),
    "conj_of_floats": _Ten(_s4(), 0, (4,), (1,), False, {"conj": True}),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", list(_BAD_FIELDS))
def test_tensor_fields_torch_refuses_are_refused_naming_file_and_key(name: str, tmp_path: Path) -> None:
    path = _file(tmp_path, {"w": _BAD_FIELDS[name]})
    _torch_refuses(path)
    _refused(path, key="w")


@pytest.mark.timeout(60)
def test_a_bad_tensor_deep_in_the_tree_is_named_by_its_key(tmp_path: Path) -> None:
    good = Ten(_s4(), 0, (4,), (1,))
    path = _file(tmp_path, {"a": {"b": [good, _Ten(_s4(), 0, (3,), (-1,))]}, "w": good})
    _refused(path, key="a.b[1]", match="stride")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("size, stride, offset", [
    ((4,), (1,), 0), ((2, 2), (2, 1), 0), ((2, 2), (1, 2), 0), ((), (), 3), ((0,), (1,), 9), ((0, 5), (7, 1), 0),
    ((3,), (0,), 1), ((1, 2, 2), (4, 2, 1), 0), ([2, 2], [2, 1], 0),  # lists: torch.load takes them
])
def test_unusual_but_valid_fields_read_as_torch_load(size: Any, stride: Any, offset: int, tmp_path: Path) -> None:
    path = _file(tmp_path, {"w": Ten(_s4(), offset, size, stride)})
    expected = oracle(path)
    assert_same(READER.read(tmp_path)[0], expected)
    got = READER.load(tmp_path, {"w": torch.zeros(expected["w"].shape)}).state_dict["w"]  # the target's strides
    assert torch.equal(got, expected["w"])


# -- storage keys and numels --------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_an_int_storage_key_reads_as_torch_load(tmp_path: Path) -> None:
    """torch.load names the record ``data/0`` for the key ``0``: we did ``prefix + 0`` (TypeError)."""
    path = _file(tmp_path, {"w": Ten(_s4(key=0), 0, (4,), (1,)), "v": Ten(_s4(key="0"), 1, (2,), (1,))})
    expected = oracle(path)
    assert_same(READER.read(tmp_path)[0], expected)
    assert_same(READER.load(tmp_path, {"w": torch.zeros(4)}, strict=False).state_dict, {"w": expected["w"]})
    assert set(read_index(path).storages) == {"0"}


@pytest.mark.timeout(60)
def test_one_record_under_two_keys_with_two_dtypes_is_refused(tmp_path: Path) -> None:
    """``0`` and ``"0"`` name one record; torch.load reads it twice, once per key, each in its own
    dtype: one reference cannot stand for both, so we refuse rather than give one dtype."""
    path = _file(tmp_path, {"w": Ten(_s4(key=0), 0, (4,), (1,)),
                            "v": Ten(_s4(key="0", numel=16, stype=torch.ByteStorage), 0, (16,), (1,))})
    oracle(path)  # torch.load takes it
    _refused(path, match="named twice")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("numel", [4.0, True, -4, 1 << 64, "4"])
def test_a_storage_numel_that_is_not_an_int64_is_refused(numel: Any, tmp_path: Path) -> None:
    path = _file(tmp_path, {"w": Ten(_s4(numel=numel), 0, (4,), (1,))})
    _torch_refuses(path)
    _refused(path)


@pytest.mark.timeout(60)
def test_a_numel_whose_byte_count_wraps_int64_is_refused_by_the_tables(tmp_path: Path) -> None:
    """numel 2^62 + 1 float32: ``numel * 4`` wraps to the record's 4 bytes in int64."""
    path = _file(tmp_path, {"w": Ten(_s4(numel=(1 << 62) + 1), 0, (60_000,), (1,))}, base={"w": torch.ones(1)})
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        with pytest.raises(_pickletables._NotTables, match="size is not what the pickle says"):
            _pickletables._tables(path, mm, len(mm), 0.0)
    _refused(path, match="holds 4 bytes")  # what the reference path says


# -- allocations ---------------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_bytearray_bigger_than_the_pickle_is_refused(tmp_path: Path) -> None:
    blob = enc_str("b") + b"c__builtin__\nbytearray\n" + enc_int(2_000_000_000) + b"\x85Rs"
    path = _file(tmp_path, _inserted(blob))
    _refused(path, match=r"bytearray\(2000000000\)")


@pytest.mark.timeout(60)
def test_small_bytearrays_read_as_torch_load(tmp_path: Path) -> None:
    path = _file(tmp_path, {"w": Ten(_s4(), 0, (4,), (1,)), "a": bytearray(b"xyz"), "n": bytearray(16)})
    expected = oracle(path)
    assert_same(READER.read(tmp_path)[0], expected)
    assert_same(READER.load(tmp_path, {"w": torch.zeros(4)}, strict=False).state_dict, {"w": expected["w"]})


@pytest.mark.timeout(60)
@pytest.mark.parametrize("value", [slice(1, 2), frozenset({1})])
def test_globals_torch_load_refuses_are_refused(value: Any, tmp_path: Path) -> None:
    """``slice`` and ``frozenset`` are not in torch's weights-only allowlist (and a slice nested a
    million deep crashes the interpreter when it is freed)."""
    path = _file(tmp_path, {"w": Ten(_s4(), 0, (4,), (1,)), "x": value})
    _torch_refuses(path)
    _refused(path, what=UnsafeCheckpointError)


# -- nesting -------------------------------------------------------------------------------------

def _deep_lists(n: int) -> bytes:
    return _inserted(enc_str("v") + b"]" * n + b"a" * (n - 1) + b"s")


@pytest.mark.timeout(60)
def test_nesting_up_to_the_cap_reads_as_torch_load(tmp_path: Path) -> None:
    path = _file(tmp_path, _deep_lists(MAX_NESTING - 1), base={"w": torch.ones(1)})  # the top dict is a level
    expected = oracle(path)
    assert_same(READER.read(tmp_path)[0], expected)
    assert list(read_index(path).entries) == ["w"]  # (empty lists: no leaves)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("depth", [MAX_NESTING, 100_000])
def test_nesting_past_the_cap_is_refused_quickly(depth: int, tmp_path: Path) -> None:
    """100,000 lists: walking the key paths was quadratic (~20 s), assembling them a bare
    RecursionError."""
    path = _file(tmp_path, _deep_lists(depth), base={"w": torch.ones(1)})
    t0 = time.perf_counter()
    for message in _refused(path, match="nests deeper"):
        assert "v[0][0]" in message
    assert time.perf_counter() - t0 < 10


@pytest.mark.timeout(60)
def test_a_deep_tuple_key_is_refused(tmp_path: Path) -> None:
    """A key nested past the cap (shallow enough to hash on any stack: the 200,000-deep one is
    in the child test): refused at indexing, before anything hashes it again."""
    path = _file(tmp_path, _inserted(b"K\x00" + b"\x85" * (MAX_NESTING + 5) + b"K\x01s"), base={"w": torch.ones(1)})
    oracle(path)  # torch.load takes it
    _refused(path, match="nests deeper")


@pytest.mark.timeout(60)
def test_a_billion_laughs_of_shared_lists_is_refused_quickly(tmp_path: Path) -> None:
    """60 levels of a list holding the level below twice (memo references): 2^60 places to walk."""
    put, get = (lambda i: b"r" + struct.pack("<I", i)), (lambda i: b"j" + struct.pack("<I", i))
    blob = bytearray(enc_str("v") + b"](" + b"]" + put(1000))
    for i in range(60):  # level i + 1: [(level i, level i)]
        blob += b"]" + get(1000 + i) + get(1000 + i) + b"\x86a" + put(1001 + i)
    path = _file(tmp_path, _inserted(bytes(blob) + b"es"), base={"w": torch.ones(1)})  # v: [level 0, ..., 60]
    v = oracle(path)["v"]  # torch.load takes it
    assert len(v) == 61 and v[60][0][0] is v[60][0][1]
    t0 = time.perf_counter()
    _refused(path, match="shared so often")
    assert time.perf_counter() - t0 < 10


@pytest.mark.timeout(60)
def test_map_leaves_stops_at_the_cap_and_the_limit() -> None:
    """The tables path walks the tree with map_leaves before anything checks it: a shared list
    60 levels deep (2^60 places) and a 300-deep one stop it at once."""
    from dist_restore._format.index import map_leaves

    dag: Any = []
    for _ in range(60):
        dag = [dag, dag]
    with pytest.raises(CorruptCheckpointError, match="shared so often"):
        map_leaves(dag, lambda v: v, limit=10_000)
    deep: Any = []
    for _ in range(300):
        deep = [deep]
    with pytest.raises(CorruptCheckpointError, match="nests deeper"):
        map_leaves(deep, lambda v: v)
    assert map_leaves({"a": [1, (2, 3)]}, lambda v: -v, limit=5) == {"a": [-1, (-2, -3)]}


# -- the deep-stack thread -----------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_call_with_stack_returns_raises_and_restores_the_stack_size() -> None:
    before = threading.stack_size()
    assert call_with_stack(lambda: threading.current_thread().name, 64 << 20) == "dist_restore-deep-stack"
    with pytest.raises(KeyError, match="boom"):
        call_with_stack(lambda: {}["boom"], 8 << 20)
    assert threading.stack_size() == before
    deep: Any = ()
    for _ in range(300_000):  # ~19 MiB of C stack to hash: more than a main thread has
        deep = (deep,)
    assert call_with_stack(lambda: hash(deep) == hash(deep), 64 << 20)  # (not on this thread: SIGSEGV)


@pytest.mark.timeout(60)
def test_unpickling_on_a_deep_stack_thread_gives_the_same_tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _file(tmp_path, {"a": {"b": [Ten(_s4(), 0, (2, 2), (2, 1)), 1.5, "s"]}})
    expected = oracle(path)
    monkeypatch.setattr(_unpickle, "_STACK_INLINE", 0)  # every pickle on a thread of its own
    seen = []
    real = _unpickle.call_with_stack
    monkeypatch.setattr(_unpickle, "call_with_stack", lambda fn, n: seen.append(n) or real(fn, n))
    assert_same(READER.read(tmp_path)[0], expected)
    assert_same(READER.load(tmp_path, {"a": {"b": [torch.zeros(2, 2), 0.0, ""]}}).state_dict, expected)
    assert seen


@pytest.mark.timeout(60)
def test_no_stack_to_be_had_is_our_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _file(tmp_path, {"w": Ten(_s4(), 0, (4,), (1,))})
    monkeypatch.setattr(_unpickle, "_STACK_INLINE", 0)

    def refuse(fn: Any, n: int) -> Any:
        raise StackUnavailable("no")

    monkeypatch.setattr(_unpickle, "call_with_stack", refuse)
    _refused(path, match="cannot unpickle data.pkl safely")


@pytest.mark.timeout(60)
def test_a_pickle_that_could_nest_past_the_stack_cap_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    data = pickle.dumps([(i,) for i in range(50_000)], protocol=2)  # 50,000 TUPLE1 opcodes
    monkeypatch.setattr(_unpickle, "_STACK_INLINE", 0)
    monkeypatch.setattr(_unpickle, "_STACK_BY_SIZE", 0)  # count the opcodes that nest
    monkeypatch.setattr(_unpickle, "_STACK_CAP", 4 << 20)
    with pytest.raises(CorruptCheckpointError, match=r"could nest values \d+ levels deep"):
        unpickle_refs(data, "f.pt")


# -- errors the tables path met ------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_memory_error_while_indexing_as_tables_names_the_file(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    path = _file(tmp_path, {"w": Ten(_s4(), 0, (4,), (1,))})

    def out_of_memory(*args: Any) -> Any:
        raise MemoryError

    monkeypatch.setattr(_pickletables, "_tables", out_of_memory)
    with pytest.raises(CorruptCheckpointError, match="MemoryError") as e:
        read_index(path, tables=True)
    assert e.value.file == str(path)
