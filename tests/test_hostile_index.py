"""Index files that lie (issue 23), and the byte layer's safety nets.

An index file (``checkpoint_{rank}.idx``) is checked against the zip directory of the rank file
it describes (every storage row's record name, header offset, size, CRC32 and data span) and its
tree against its tables; one that lies is not used: the rank file's pickle is, so a restore gives
exactly what ``torch.load(weights_only=True)`` gives. Behind those checks the byte layer never
copies from outside its mapping (a ``CorruptCheckpointError`` naming file and key, not a
``SIGBUS``), an unknown device is our error, and any bare error made from a file's fields while
tensors are built comes out as ours, naming the file and the key.

The crash-prone cases (crafted by ``fuzz/hostile_cases.py``) run in one child process under a
4 GiB address-space limit; the rest run here.
"""

from __future__ import annotations

import collections
import json
import os
import resource
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from dist_restore import CheckpointReader, CheckpointWriter, RankInfo, read_index
from dist_restore._bytes import read as bytes_read
from dist_restore._bytes import readall
from dist_restore._format import indexfile
from dist_restore._format.indexfile import FileIndex, IndexFileError, index_path
from dist_restore._format.unpickle import TensorRef
from dist_restore._planning.plan import PlannedLeaf
from dist_restore.errors import CorruptCheckpointError

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from fuzz import hostile_cases as hc

# -- the crafted files, in a child process ----------------------------------------------------

_CHILD = textwrap.dedent("""
    import faulthandler, json, logging, sys
    from pathlib import Path
    faulthandler.enable()  # a signal dumps the stacks into the test's message
    sys.path.insert(0, sys.argv[1])
    import torch
    from fuzz import hostile_cases as hc
    from fuzz.run_cases import _compare, _digest, _run_api
    from dist_restore import CheckpointReader, RankInfo, read_index
    from dist_restore._format import indexfile
    from dist_restore.errors import CheckpointError

    work, out = Path(sys.argv[2]), {}
    reasons = []
    handler = logging.Handler()
    handler.emit = lambda r: reasons.append(r.getMessage())
    logging.getLogger("dist_restore._format.indexfile").addHandler(handler)
    logging.getLogger("dist_restore._format.indexfile").setLevel(logging.DEBUG)

    def outcome(ex, oracle):
        try:
            kind, value = _run_api(ex)
        except CheckpointError as e:
            return ["OUR-ERROR" if "checkpoint_" in str(e) else "OUR-ERROR-NO-FILE", str(e)[:300]]
        except BaseException as e:
            return ["BUILTIN", f"{type(e).__name__}: {str(e)[:300]}"]
        if kind == "cli":
            return ["OK" if value["rc"] == 0 else "CLI-FAILED", (value["out"] + value["err"])[-300:]]
        if kind == "tree" and oracle is not None:
            diff = _compare(_digest(value), oracle, partial=ex.get("target") is not None)
            return ["SAME" if diff is None else "WRONG-VALUES", diff or ""]
        return ["OK", ""]

    # 1. every lying index file is refused (with its reason logged), and the restores equal torch.load
    for name in ["idx_data_size_wrap", "idx_numel_wrap", "idx_other_record", "idx_bad_tree_row"]:
        d = work / name
        d.mkdir()
        case = hc.CASES[name](d)
        f = d / "checkpoint_0.pt"
        oracle = _digest(torch.load(f, weights_only=True))
        del reasons[:]
        source = read_index(f).source
        out[name] = {"source": source, "reason": " | ".join(reasons),
                     "exercises": [[hc_label, *outcome(ex, oracle)] for hc_label, ex in
                                   ((ex["api"] + ("(target)" if ex.get("target") else ""), ex)
                                    for ex in case.exercises)]}

    # 2. legitimate index files are still used: DTensors, keys of 1 to 4 digits
    d = work / "legit"
    t = __import__("torch.distributed.tensor", fromlist=["DTensor"])
    mesh = hc._mesh()
    sd = {"w": t.DTensor.from_local(torch.arange(8.0), mesh, [t.Shard(0)]),
          "r": t.DTensor.from_local(torch.ones(3), mesh, [t.Replicate()]),
          "many": [torch.full((2,), float(i)) for i in range(1001)], "step": 7}
    f = hc.written(d, sd)
    got, want = CheckpointReader(RankInfo(0, 1)).read(d)[0], torch.load(f, weights_only=True)
    plain = lambda sd: {k: sd[k] for k in ("many", "step")}  # (a DTensor is read as its local shard)
    out["legit"] = {"source": read_index(f).source, "diff": _compare(_digest(plain(got)), _digest(plain(want)), False),
                    "entries": read_index(f).entries == read_index(f, use_index_file=False).entries}

    # 3. a DTensor layout the index file holds wrong is made when used: our error, naming the index file
    d = work / "bad_layout"
    hc.written(d, {"w": t.DTensor.from_local(torch.arange(8.0), mesh, [t.Shard(0)])})
    def bad_layout(h, s):
        import pickle
        skel, objects, dtensors = pickle.loads(s["tree"])
        dtensors = {row: (size, stride, ("not", "a", "layout")) for row, (size, stride, _) in dtensors.items()}
        s["tree"] = pickle.dumps((skel, objects, dtensors), protocol=4)
    hc.edit_idx(d, bad_layout)
    out["bad_layout"] = [[api, *outcome({"api": api, "dir": str(d), "target": None}, None)]
                         for api in ("read", "restore")]

    # 4. behind the index checks: with them off, a copy past the mapping is our error, not SIGBUS
    indexfile._check_directory = lambda *a: None
    indexfile.FileIndex._check_columns = lambda self, size: None
    indexfile.FileIndex.source = "unchecked"  # (nor are its data offsets checked against local headers)
    d = work / "past_end"
    f = hc.written(d, {"w": torch.arange(4.0)})
    def past_end(h, s):
        rows, dims, sto = hc.idx_tables(s)
        sto["data"][0] = f.stat().st_size - 8  # a 16-byte record 8 bytes past the end
        s["storages"] = sto.tobytes()
    hc.edit_idx(d, past_end)
    for name, d, target in [("idx_data_size_wrap", work / "idx_data_size_wrap", {"w": ["zeros", [200_000], "uint8"]}),
                            ("idx_numel_wrap", work / "idx_numel_wrap", {"w": ["zeros", [60_000], "float32"]}),
                            ("past_end", d, {"w": ["zeros", [4], "float32"]})]:
        assert isinstance(read_index(d / "checkpoint_0.pt"), indexfile.FileIndex)
        out["unchecked " + name] = [[api, *outcome({"api": api, "dir": str(d), "target": target}, None)]
                                     for api in ("read", "load")]
    print(json.dumps(out))
""")


@pytest.mark.timeout(120)
def test_lying_index_files_are_refused_in_a_child(tmp_path: Path) -> None:
    lim = 4 << 30

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (lim, lim))

    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-c", _CHILD, str(ROOT), str(tmp_path)], capture_output=True, text=True,
                       check=False, timeout=100, cwd=str(ROOT), env=env, preexec_fn=limit)
    assert p.returncode == 0, f"the child failed (exit {p.returncode}): {p.stderr[-4000:]}"
    out = json.loads(p.stdout.strip().splitlines()[-1])
    why = {"idx_data_size_wrap": "is not what the zip directory says", "idx_numel_wrap": "numel disagrees",
           "idx_other_record": "is not what the zip directory says", "idx_bad_tree_row": "names a row outside"}
    for name, reason in why.items():
        r = out[name]
        assert r["source"] == "pickle" and reason in r["reason"], (name, r)
        for label, kind, detail in r["exercises"]:
            # the oracle is torch.load of the rank file; a target of another shape is our mismatch error
            assert kind in ("SAME", "OK") or (kind == "OUR-ERROR" and "shape" in detail), (name, label, kind, detail)
    assert out["legit"] == {"source": "index file", "diff": None, "entries": True}
    for api, kind, detail in out["bad_layout"]:
        assert kind == "OUR-ERROR" and "checkpoint_0.idx" in detail and "layout" in detail, (api, kind, detail)
    for name in ("idx_data_size_wrap", "idx_numel_wrap", "past_end"):
        for api, kind, detail in out["unchecked " + name]:
            assert kind == "OUR-ERROR" and "do not lie in the file" in detail and "key 'w'" in detail, (name, api, detail)


# -- local headers: torch.load reads where they say ------------------------------------------------

@pytest.mark.timeout(60)
@pytest.mark.parametrize("field", [26, 28])  # a local header's name length, its extra field's length
@pytest.mark.parametrize("how", ["read", "load", "large", "slice"])
def test_a_local_header_that_moves_the_data_is_not_ignored(tmp_path: Path, field: int, how: str) -> None:
    """A local header damaged after the index file was written: torch.load reads where it says
    (no CRC32 check: other bytes), the index file says where the data was. Never the index
    file's bytes silently: our error, naming the file and the key."""
    big = torch.arange(100_000, dtype=torch.float32)  # > 256 KiB: read by pread, not from the mapping
    CheckpointWriter(RankInfo(0, 1)).write(tmp_path, {"a": torch.arange(4.0), "w": torch.arange(8.0), "big": big})
    f = tmp_path / "checkpoint_0.pt"
    ix = read_index(f)
    name = {"read": "w", "load": "w", "large": "big", "slice": "big"}[how]
    skey = ix.tree[name].storage.key if not isinstance(ix.tree[name], torch.Tensor) else None
    hoff = ix.records[skey].header_offset
    data = bytearray(f.read_bytes())
    data[hoff + field] += 1  # torch.load's data now starts a byte later
    f.write_bytes(bytes(data))
    reader = CheckpointReader(RankInfo(0, 1))
    with pytest.raises(CorruptCheckpointError, match="local header") as e:
        if how == "read":
            reader.read(tmp_path)
        elif how == "slice":
            with bytes_read._RankFile(ix, {}, None, False, bytes_read.ReadStats()) as rf:
                ix.data_offset(skey, rf.mm)
        else:
            reader.load(tmp_path, {name: torch.zeros_like(big if name == "big" else torch.arange(8.0))})
    assert e.value.file == str(f)
    assert how == "slice" or e.value.key == name


# -- the directory check ------------------------------------------------------------------------

def _tables(d: Path) -> tuple[Any, dict[str, Any], np.ndarray, list[bytes] | None]:
    """The rank file's zip tail, the index header, a writable storage table, and the raw keys."""
    f = d / "checkpoint_0.pt"
    fd = os.open(f, os.O_RDONLY)
    try:
        tail = indexfile._zip_tail(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)
    header, sections = hc.parse_idx(index_path(f).read_bytes())
    _rows, _dims, sto = hc.idx_tables(sections)
    keys = None if header["ordinal_keys"] else sections["skeys"].split(b"\x00")
    return tail, header, sto, keys


@pytest.fixture(scope="module")
def forty(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 storages (keys of one and two digits), of two sizes."""
    d = tmp_path_factory.mktemp("forty")
    CheckpointWriter(RankInfo(0, 1)).write(d, {f"t{i}": torch.full((4 + i % 2,), float(i)) for i in range(40)})
    return d


def _swap_rows(s: np.ndarray) -> None:
    s[[2, 4]] = s[[4, 2]]  # same sizes: only the names tell them apart


_LIES = {
    "another record's place": lambda s: s.__setitem__("header", np.where(np.arange(len(s)) == 2, s["header"][4], s["header"])),
    "two rows swapped": _swap_rows,
    "size": lambda s: s["size"].__setitem__(3, s["size"][3] + 4),
    "crc": lambda s: s["crc"].__setitem__(5, s["crc"][5] ^ 1),
    "data inside the name": lambda s: s["data"].__setitem__(6, s["header"][6] + 30),
    "data past the extra field": lambda s: s["data"].__setitem__(7, s["header"][7] + 30 + 15 + 0x10000),
    "data int64 wrap": lambda s: s["data"].__setitem__(8, -(1 << 63) + 5),
    "size int64 wrap": lambda s: s["size"].__setitem__(9, (1 << 63) - 1),
    "header int64 wrap": lambda s: s["header"].__setitem__(9, (1 << 63) - 1),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("lie", list(_LIES))
def test_the_storage_table_must_match_the_zip_directory(forty: Path, lie: str) -> None:
    tail, header, sto, keys = _tables(forty)
    indexfile._check_directory(tail, header["prefix"].encode(), sto, keys, header["rank_file"]["pickle"])  # as written
    _LIES[lie](sto)
    with pytest.raises(IndexFileError, match="storage|outside"):
        indexfile._check_directory(tail, header["prefix"].encode(), sto, keys, header["rank_file"]["pickle"])


@pytest.mark.timeout(60)
def test_the_zip_must_hold_what_the_index_lists_and_no_more(forty: Path) -> None:
    tail, header, sto, keys = _tables(forty)
    prefix, pickle_at = header["prefix"].encode(), header["rank_file"]["pickle"]
    with pytest.raises(IndexFileError, match="does not list"):  # a storage record the index lacks
        indexfile._check_directory(tail, prefix, sto[:-1], keys, pickle_at)
    with pytest.raises(IndexFileError, match="data.pkl"):
        indexfile._check_directory(tail, prefix, sto, keys, [pickle_at[0] - 1 - 0x10000, *pickle_at[1:]])
    with pytest.raises(IndexFileError, match="data.pkl"):
        indexfile._check_directory(tail, prefix, sto, keys, [pickle_at[0], pickle_at[1], pickle_at[2] ^ 1])
    with pytest.raises(IndexFileError):  # another prefix: no record has the names
        indexfile._check_directory(tail, b"other/", sto, keys, pickle_at)


@pytest.mark.timeout(60)
def test_keys_that_are_not_ordinal_and_zip64_entries(tmp_path: Path) -> None:
    """A directory of records past 4 GiB (zip64 extras, made here: no 4 GiB file) whose keys are
    names, checked as a rank file's would be."""
    big = 5 << 30
    entries = [{"name": b"a/data/" + k, "hoff": h, "size": n, "csize": n, "crc": c, "method": 0}
               for k, h, n, c in [(b"x", 100, 16, 7), (b"long_key", big, 32, 8), (b"y", big + 200, big, 9)]]
    cd = hc.finish_zip(bytearray(), entries)  # (the directory at 0, then its end record)
    nlen = np.array([len(e["name"]) for e in entries])
    sto = np.zeros(3, dtype=indexfile._STORAGE)
    sto["header"] = [e["hoff"] for e in entries]
    sto["size"] = [e["size"] for e in entries]
    sto["crc"] = [e["crc"] for e in entries]
    sto["data"] = sto["header"] + 30 + nlen + 20
    keys = [b"x", b"long_key", b"y"]
    cd_offset = 3 * big
    size = len(cd) - 22
    assert indexfile._check_storages(cd, 0, size, cd_offset, b"a/data/", sto, keys) == size
    for col, i, v in [("header", 1, big + 8), ("size", 2, big - 1), ("size", 0, big), ("crc", 1, 0)]:
        bad = sto.copy()
        bad[col][i] = v
        with pytest.raises(IndexFileError, match="storage"):
            indexfile._check_storages(cd, 0, size, cd_offset, b"a/data/", bad, keys)
    with pytest.raises(IndexFileError, match="storage"):
        indexfile._check_storages(cd, 0, size, cd_offset, b"a/data/", sto, [b"x", b"long_kez", b"y"])
    with pytest.raises(IndexFileError, match="twice"):
        indexfile._check_storages(cd, 0, size, cd_offset, b"a/data/", sto, [b"x", b"x", b"y"])


# -- the tree check -----------------------------------------------------------------------------

def _cycle() -> list[Any]:
    a: list[Any] = [0]
    a.append(a)
    return a


def _shared(depth: int) -> Any:
    node: Any = [0, 1]
    for _ in range(depth):
        node = [node, node]  # 2^depth leaves from a few bytes of pickle
    return node


_KIND = np.array([0, 0, 2, 2], dtype=np.uint8)  # two tensor rows, two value rows
_TREES = {
    "a row past the table": ({"w": 4, "v": [2, 3], "x": 1, "y": 0}, "names a row outside"),
    "a negative row": ({"w": -1, "v": [2, 3], "x": 1}, "names a row outside"),
    "a bool leaf": ({"w": True, "v": [2, 3], "x": 0}, "unexpected bool"),
    "a str leaf": ({"w": "0", "v": [2, 3], "x": 1}, "unexpected str"),
    "a float leaf": ({"w": 0.0, "v": [2, 3], "x": 1}, "unexpected float"),
    "a torch.Size": ({"w": torch.Size([0]), "v": [2, 3], "x": 1}, "unexpected Size"),
    "a cycle": ({"w": _cycle(), "v": [2, 3]}, "more nodes"),
    "a shared container": ({"w": _shared(30), "v": [2, 3]}, "more nodes"),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("what", list(_TREES))
def test_the_tree_must_name_rows_of_the_tables(what: str) -> None:
    indexfile._check_tree({"w": 0, "x": (1, [2]), "e": ((), (), [], {}), "v": {"a": 3}}, {2: "a", 3: None}, {},
                          _KIND, 1000)  # the shape the writer makes (() is one shared object)
    skel, why = _TREES[what]
    with pytest.raises(IndexFileError, match=why):
        indexfile._check_tree(skel, {2: "a", 3: None}, {}, _KIND, 1000)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("objects, dtensors", [({2: "a"}, {}), ({2: "a", 3: 0, 1: 0}, {}), ({2: "a", True: 0}, {}),
                                               ({2: "a", "3": 0}, {}), ({2: "a", 3: None}, {0: ((4,), (1,), None)})])
def test_the_values_and_dtensors_must_be_those_of_their_rows(objects: dict[Any, Any], dtensors: dict[Any, Any]) -> None:
    with pytest.raises(IndexFileError, match="table does not match"):
        indexfile._check_tree({"w": 0, "x": 1, "v": [2, 3]}, objects, dtensors, _KIND, 1000)


# -- the byte layer's safety nets ---------------------------------------------------------------

@pytest.mark.timeout(60)
def test_an_unknown_device_is_our_error_and_a_bad_map_location_a_value_error() -> None:
    with pytest.raises(CorruptCheckpointError, match="nosuchdevice") as e:
        bytes_read.resolve_device("nosuchdevice:0", None, file="f.pt", key="w")
    assert e.value.file == "f.pt" and e.value.key == "w"
    with pytest.raises(CorruptCheckpointError):  # not even a string (a damaged file)
        bytes_read.resolve_device(["cpu"], {"cpu": "cpu"}, file="f.pt", key="w")  # type: ignore[arg-type]
    assert bytes_read.resolve_device("nosuchdevice:0", "cpu", file="f.pt", key="w") == torch.device("cpu")
    with pytest.raises(ValueError, match="map_location"):
        bytes_read.resolve_device("cpu", {"cpu": "nosuchdevice"}, file="f.pt", key="w")


@pytest.fixture()
def small(tmp_path: Path) -> Path:
    CheckpointWriter(RankInfo(0, 1)).write(tmp_path, {"w": torch.arange(4.0), "v": torch.ones(2, 2)})
    return tmp_path


@pytest.mark.timeout(60)
def test_a_bad_map_location_is_said_before_anything_is_read(small: Path) -> None:
    for sd in (None, {"w": None}):
        with pytest.raises(ValueError, match="map_location"):
            CheckpointReader(RankInfo(0, 1)).load(small, sd, map_location="nosuchdevice")


@pytest.mark.timeout(60)
def test_bare_errors_while_tensors_are_made_name_the_file_and_key(small: Path) -> None:
    index = read_index(small / "checkpoint_0.pt", use_index_file=False)
    ref = index.tree["w"]
    bad = TensorRef(ref.storage, ref.dtype, 0, (2, 2), (1, 2, 3))  # sizes and strides of two lengths
    for target in (None, torch.zeros(2, 2)):
        with pytest.raises(CorruptCheckpointError, match="could not be made") as e:
            bytes_read.produce(index, [PlannedLeaf("w", ("w",), bad, target)])
        assert e.value.key == "w" and e.value.file == str(small / "checkpoint_0.pt")
        assert isinstance(e.value.__cause__, (RuntimeError, ValueError, TypeError))


@pytest.mark.timeout(60)
def test_bare_errors_of_a_full_read_name_the_file(small: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    index = read_index(small / "checkpoint_0.pt")
    assert isinstance(index, FileIndex)

    def boom(*a: Any) -> Any:
        raise IndexError("index 7 is out of bounds")

    monkeypatch.setattr(readall, "_common_rows", boom)
    with pytest.raises(CorruptCheckpointError, match="IndexError") as e:
        readall.read_all(index)
    assert e.value.file == str(small / "checkpoint_0.pt") and isinstance(e.value.__cause__, IndexError)


@pytest.mark.timeout(60)
def test_shared_empty_containers_and_ordered_dicts_keep_the_index(tmp_path: Path) -> None:
    sd = {"e": [(), (), [], {}], "o": collections.OrderedDict(a=torch.ones(1)), "t": torch.zeros(3)}
    CheckpointWriter(RankInfo(0, 1)).write(tmp_path, sd)
    assert read_index(tmp_path / "checkpoint_0.pt").source == "index file"
    got = CheckpointReader(RankInfo(0, 1)).read(tmp_path)[0]
    assert got["e"] == [(), (), [], {}] and torch.equal(got["o"]["a"], torch.ones(1))
