"""Planning a resharding restore in one process: the pieces' entries of the other rank files
checked file by file (and by layout) give what the checks one by one give, the same first
error, and an index file of many DTensors on a large mesh is used (its rank map, one object
in every DTensor row, is checked once).

Checkpoints here are ``torch.save`` files of real DTensors on a 1-D mesh of ``N`` saving ranks,
made in this process with each saving rank's identity in turn (as ``bench_plan_scale.py``
makes them): only the files a plan opens are written.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import pytest
import torch

from dist_restore._format import indexfile
from dist_restore._format.index import read_index
from dist_restore._format.indexfile import FileIndex, build_index_file, index_path
from dist_restore._planning import reshard as RS
from dist_restore._planning.plan import plan_read
from dist_restore.errors import CorruptCheckpointError

pytestmark = pytest.mark.timeout(120)

COLS = 3


@pytest.fixture(scope="module", autouse=True)
def _group() -> Any:
    """``DTensor.from_local`` needs a process group: one of this process alone, gone after
    this module (other modules' tests see none)."""
    import torch.distributed as dist

    made = not dist.is_initialized()
    if made:
        dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        yield
    finally:
        if made:
            dist.destroy_process_group()


def _mesh(n: int, rank: int) -> Any:
    """A 1-D DeviceMesh of ``n`` ranks as rank ``rank`` sees it (no process groups made)."""
    import torch.distributed.device_mesh as dm

    real = dm.get_rank
    dm.get_rank = lambda *a, **k: rank  # type: ignore[assignment]
    try:
        return dm.DeviceMesh("cpu", torch.arange(n), _init_backend=False)
    finally:
        dm.get_rank = real  # type: ignore[assignment]


def _state(n: int, rank: int, rows: int, keys: list[str], dtypes: dict[str, torch.dtype] | None = None
           ) -> dict[str, Any]:
    from torch.distributed.tensor import DTensor, Shard

    mesh = _mesh(n, rank)
    out = {}
    for i, k in enumerate(keys):
        dtype = (dtypes or {}).get(k, torch.float32)
        local = torch.arange(rows // n * COLS, dtype=dtype).reshape(rows // n, COLS) + 1000 * rank + i
        out[k] = DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=(rows, COLS), stride=(COLS, 1))
    return {"model": out}


def _save(d: Path, n: int, rows: int, keys: list[str], files: set[int], *, index_files: bool,
          odd: dict[int, dict[str, torch.dtype]] | None = None) -> None:
    """Rank files of a checkpoint saved on ``n`` ranks: ``files`` written (``odd``: a file's
    entries saved with another dtype), the others empty (never opened)."""
    d.mkdir(parents=True, exist_ok=True)
    for r in range(n):
        f = d / f"checkpoint_{r}.pt"
        if r in files:
            torch.save(_state(n, r, rows, keys, (odd or {}).get(r)), f)
            if index_files:
                index_path(f).write_bytes(build_index_file(read_index(f, use_index_file=False)))
        else:
            f.touch()


def _plan(d: Path, n: int, world: int, me: int, rows: int, keys: list[str]) -> tuple[Any, Any]:
    """``(plan_shards' plan, the target state dict)`` of rank ``me`` of ``world``, as the coordinator plans."""
    target = _state(world, me, rows, keys)
    home = read_index(d / "checkpoint_0.pt")
    plan = plan_read(target, *home.walkable)
    _plain, reshard = RS.split_leaves(plan.leaves)
    shards = RS.plan_shards(reshard, home=0, home_index=home, own=me if me < n else None, nfiles=n,
                            open_index=lambda f: read_index(d / f"checkpoint_{f}.pt"), spread=me)
    return shards, target


def _fields(ref: Any) -> tuple[Any, ...]:
    return (ref.storage.key, ref.storage.numel, ref.dtype, ref.storage_offset, tuple(ref.size), tuple(ref.stride))


KEYS = [f"layers.{i}.w" for i in range(12)]


@pytest.mark.parametrize("index_files", [True, False])
def test_entries_by_file_are_those_checked_one_by_one(tmp_path: Path, index_files: bool) -> None:
    # saved on 8 ranks, restored on rank 1 of 2: rows 8-15 of 16, in files 4-7 (4 pieces an entry)
    _save(tmp_path, 8, 16, KEYS, {0, 4, 5, 6, 7}, index_files=index_files)
    shards, _t = _plan(tmp_path, 8, 2, 1, 16, KEYS)
    assert shards.files == [0, 4, 5, 6, 7]
    assert all(isinstance(shards.indexes[f], FileIndex) == index_files for f in shards.files)
    assert [p.file for p in shards.jobs[0].pieces] == [4, 5, 6, 7]
    fresh = {f: read_index(tmp_path / f"checkpoint_{f}.pt") for f in shards.files}
    one_by_one = RS._entries_in_order(shards.jobs, fresh, None, {})
    assert list(shards.entries) != []
    assert {k: _fields(v) for k, v in shards.entries.items()} == {k: _fields(v) for k, v in one_by_one.items()}
    # rows 2f, 2f+1 of the global tensor are file f's rows 0, 1: each piece's box says where they go
    job = shards.jobs[3]
    assert [(p.file, p.coordinate, [(b.src_start, b.dst_start, b.size) for b in p.boxes]) for p in job.pieces] == \
        [(f, (f,), [((0, 0), (2 * (f - 4), 0), (2, COLS))]) for f in range(4, 8)]


@pytest.mark.parametrize("index_files", [True, False])
def test_the_first_mismatch_in_job_order_is_the_one_raised(tmp_path: Path, index_files: bool) -> None:
    # file 5 holds layers.7 as float64, file 6 holds layers.2 as float64: checked file by file,
    # file 5's comes first; checked one by one (job order), file 6's layers.2 does: that one is said
    _save(tmp_path, 8, 16, KEYS, {0, 4, 5, 6, 7}, index_files=index_files,
          odd={5: {"layers.7.w": torch.float64}, 6: {"layers.2.w": torch.float64}})
    with pytest.raises(RS.LayoutError) as e:
        _plan(tmp_path, 8, 2, 1, 16, KEYS)
    assert "checkpoint_6" in str(e.value) and "'model.layers.2.w'" in str(e.value) and "float64" in str(e.value)


def test_a_missing_entry_is_said_in_job_order(tmp_path: Path) -> None:
    _save(tmp_path, 8, 16, KEYS, {0, 4, 6, 7}, index_files=True)
    torch.save(_state(8, 5, 16, KEYS[:-1]), tmp_path / "checkpoint_5.pt")  # no layers.11 in file 5
    with pytest.raises(RS.LayoutError, match=r"checkpoint_5.pt has no entry 'model.layers.11.w'"):
        _plan(tmp_path, 8, 2, 1, 16, KEYS)


def test_an_unreadable_piece_file_is_named_with_the_key(tmp_path: Path) -> None:
    _save(tmp_path, 8, 16, KEYS, {0, 4, 5, 7}, index_files=True)  # file 6 left empty
    with pytest.raises(CorruptCheckpointError, match=r"file is empty \(rank file 6 holds part of 'model.layers.0.w'\)"):
        _plan(tmp_path, 8, 2, 1, 16, KEYS)


# -- an index file's DTensor table ---------------------------------------------------------------

def test_many_dtensors_on_a_large_mesh_keep_their_index_file(tmp_path: Path) -> None:
    """600 DTensor rows each hold the 4,096-rank mesh's rank map (one object in the tree
    section): walked place by place, 2.4 million places, past the section's bound."""
    keys = [f"w{i}" for i in range(600)]
    f = tmp_path / "checkpoint_3.pt"
    torch.save(_state(4096, 3, 4096 * 2, keys), f)
    index_path(f).write_bytes(build_index_file(read_index(f, use_index_file=False)))
    ix = read_index(f)
    assert isinstance(ix, FileIndex) and ix._layouts is not None
    ref = read_index(f, use_index_file=False)
    assert ix.entries == ref.entries
    layouts = {id(e.layout) for e in ix.entries.values()}
    assert len(layouts) == 1 and ix.entries["model.w7"].layout.mesh.root_size == 4096
    got = ix.dtensor_locals([("model", "w5"), ("model", "nope"), ("model",)])
    assert got is not None and got[1] is None and got[2] is None
    assert _fields(got[0][0]) == _fields(ix.leaf(5).local)
    assert got[0][1] is ix.entries["model.w5"].layout


def _section(rows: int, *, shape: Any = None, groups: Any = None, size: Any = (8, 3), names: Any = None) -> Any:
    groups = groups if groups is not None else (tuple(range(64)),)
    table = {r: (size, (3, 1), ((8, 3) if shape is None else shape, (("S", 0, 0),),
                                ((64,), names, (r % 64,), r % 64, groups))) for r in range(rows)}
    return ({"w": list(range(rows))}, {}, table)


def test_a_flat_table_counts_each_rank_map_once_and_the_rest_every_row() -> None:
    got = _section(500)
    size = len(pickle.dumps(got, protocol=4))
    section = indexfile._check_section(got, size, "f.idx")
    assert section.flat and section.sizes and section.same == (list(range(500)), [r % 64 for r in range(500)])
    # the generic walk visits the rank map once a row: refused, as before
    with pytest.raises(CorruptCheckpointError, match="shared so often"):
        indexfile.check_tree(got, size, "f.idx")
    # a shared shape tuple is walked once a row by every row's layout: still counted every row
    big = tuple(range(1, 2000))
    bad = _section(500, shape=big)
    with pytest.raises(CorruptCheckpointError, match="shared so often"):
        indexfile._check_section(bad, len(pickle.dumps(bad, protocol=4)), "f.idx")


@pytest.mark.parametrize("what", ["a bool size", "a float in the rank map", "a deep name", "a list shape"])
def test_a_table_not_as_the_writer_makes_it_is_walked_as_before(what: str) -> None:
    deep: Any = "x"
    for _ in range(300):
        deep = (deep,)
    kw = {"a bool size": {"size": (True, 3)}, "a float in the rank map": {"groups": ((0.5,) * 64,)},
          "a deep name": {"names": (deep,)}, "a list shape": {"shape": [8, 3]}}[what]
    got = _section(3, **kw)
    size = len(pickle.dumps(got, protocol=4))
    if what == "a deep name":
        with pytest.raises(CorruptCheckpointError, match="deeper than"):
            indexfile._check_section(got, size, "f.idx")
    else:
        assert indexfile._check_section(got, size, "f.idx") == indexfile._Section(False, False, None)


def test_local_tensors_in_bulk_are_the_rows_made_one_by_one(tmp_path: Path) -> None:
    """Rows of 1, 2 and 3 dimensions, a value among them, some made already: each path's local
    tensor and layout as :meth:`FileIndex.leaf` makes them."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    mesh = _mesh(4, 2)
    sd = {"a": DTensor.from_local(torch.ones(2), mesh, [Shard(0)], run_check=False, shape=(8,), stride=(1,)),
          "b": DTensor.from_local(torch.ones(2, 3), mesh, [Shard(0)], run_check=False, shape=(8, 3), stride=(3, 1)),
          "c": DTensor.from_local(torch.ones(1, 2, 5), mesh, [Shard(1)], run_check=False, shape=(1, 8, 5),
                                  stride=(40, 5, 1)),
          "d": DTensor.from_local(torch.ones(3), mesh, [Replicate()], run_check=False, shape=(3,), stride=(1,)),
          "e": DTensor.from_local(torch.ones(2, 3), mesh, [Shard(0)], run_check=False, shape=(8, 3), stride=(3, 1)),
          "step": 3, "t": torch.zeros(2)}
    f = tmp_path / "checkpoint_2.pt"
    torch.save(sd, f)
    index_path(f).write_bytes(build_index_file(read_index(f, use_index_file=False)))
    keys = ["e", "a", "step", "nope", "c", "t", "b", "d", "a"]
    ix = read_index(f)
    assert isinstance(ix, FileIndex)
    ix.entry_at(("d",))  # made already: its own
    got = ix.dtensor_locals([(k,) for k in keys])
    ref = read_index(f)
    assert got is not None
    for k, g in zip(keys, got):
        if k in ("step", "nope", "t"):
            assert g is None
            continue
        want = ref.entry_at((k,))
        assert _fields(g[0]) == _fields(want.local) and g[1] == want.layout, k
    assert got[0][1] is got[6][1]  # "e" and "b": one layout
    assert got[7][0] is ix.entry_at(("d",)).local
