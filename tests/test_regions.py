"""Region math against DTensor's own: random shapes, meshes and placements (no processes)."""

from __future__ import annotations

import itertools
import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributed._mesh_layout import _MeshLayout
from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset
from torch.distributed.tensor.placement_types import Replicate as TReplicate
from torch.distributed.tensor.placement_types import Shard as TShard
from torch.distributed.tensor.placement_types import _StridedShard

from dist_restore._base import regions as R
from dist_restore._format.unpickle import unpickle_refs
from dist_restore.errors import UnsafeCheckpointError


@st.composite
def layouts(draw):
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.integers(0, 9)) for _ in range(ndim))
    mdim = draw(st.integers(1, 3))
    mesh = tuple(draw(st.integers(1, 4)) for _ in range(mdim))
    ours, theirs = [], []
    for _ in range(mdim):
        kind = draw(st.sampled_from(["r", "s", "ss"]))
        d = draw(st.integers(0, ndim - 1))
        if kind == "r":
            ours.append(R.Replicate())
            theirs.append(TReplicate())
        elif kind == "s":
            ours.append(R.Shard(d))
            theirs.append(TShard(d))
        else:
            sf = draw(st.integers(1, 4))
            ours.append(R.Shard(d, sf))
            theirs.append(_StridedShard(d, split_factor=sf))
    return shape, mesh, ours, theirs


def _split_like_dtensor(full: torch.Tensor, mesh, theirs, coord) -> torch.Tensor:
    """The local tensor ``distribute_tensor`` gives a coordinate: each placement's own
    ``_split_tensor``, mesh dims left to right."""
    t = full
    for md, p in enumerate(theirs):
        if isinstance(p, TReplicate):
            continue
        chunks, _ = p._split_tensor(t, mesh[md], with_padding=False)
        t = chunks[coord[md]]
    return t


def _gather(full: torch.Tensor, runs: R.ShardRuns) -> torch.Tensor:
    t = full
    for d, r in enumerate(runs):
        idx = torch.tensor([g + i for g, n in r for i in range(n)], dtype=torch.long)
        t = t.index_select(d, idx)
    return t


@settings(max_examples=300, deadline=None)
@given(layouts(), st.data())
def test_shard_runs_match_dtensor(layout, data) -> None:
    shape, mesh, ours, theirs = layout
    coord = tuple(data.draw(st.integers(0, k - 1)) for k in mesh)
    full = torch.arange(max(1, int(torch.tensor(shape).prod()))).reshape(shape) if all(shape) \
        else torch.empty(shape, dtype=torch.long)
    runs = R.shard_runs(shape, mesh, ours, coord)
    expect = _split_like_dtensor(full, mesh, theirs, coord)
    assert R.local_shape(runs) == tuple(expect.shape)
    assert torch.equal(_gather(full, runs), expect)
    local, offset = _compute_local_shape_and_global_offset(shape, mesh, list(coord), theirs)
    assert tuple(local) == R.local_shape(runs)
    for d, r in enumerate(runs):
        if r:
            assert offset[d] == r[0][0]


@settings(max_examples=150, deadline=None)
@given(layouts(), layouts(), st.data())
def test_overlaps_rebuild_every_target_shard(src, dst_draw, data) -> None:
    """Any source layout into any target layout of the same global shape: the boxes from the
    source shards fill each target shard with exactly the target's elements."""
    shape, smesh, sours, _ = src
    _s2, dmesh, dours, _ = dst_draw
    dours = [p if not isinstance(p, R.Shard) or p.dim < len(shape) else R.Replicate() for p in dours]
    full = torch.arange(int(torch.tensor(shape).prod())).reshape(shape)
    dcoord = tuple(data.draw(st.integers(0, k - 1)) for k in dmesh)
    druns = R.shard_runs(shape, dmesh, dours, dcoord)
    out = torch.full(R.local_shape(druns), -1, dtype=torch.long)
    seen: set[R.ShardRuns] = set()
    for scoord in itertools.product(*(range(k) for k in smesh)):
        sruns = R.shard_runs(shape, smesh, sours, scoord)
        if sruns in seen:  # a replica: read once
            continue
        seen.add(sruns)
        local = _gather(full, sruns)
        for b in R.overlap(sruns, druns):
            dsl = tuple(slice(a, a + n) for a, n in zip(b.dst_start, b.size))
            ssl = tuple(slice(a, a + n) for a, n in zip(b.src_start, b.size))
            assert (out[dsl] == -1).all()  # every element once
            out[dsl] = local[ssl]
    assert torch.equal(out, _gather(full, druns))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 3), min_size=1, max_size=4), st.data())
def test_mesh_groups_match_mesh_layout(sizes, data) -> None:
    """Submeshes of a root mesh: the same groups as torch's ``_MeshLayout.remap_to_tensor``."""
    root = _MeshLayout.from_sizes_strides(tuple(sizes))
    dims = sorted(data.draw(st.sets(st.integers(0, len(sizes) - 1), min_size=1)))
    sub = _MeshLayout([root[i] for i in dims])
    world = 1
    for s in sizes:
        world *= s
    rank_map = data.draw(st.permutations(list(range(world))))
    expect = sub.remap_to_tensor(torch.tensor(rank_map)).reshape(-1, sub.numel()).tolist()
    axes = [(ax.shape, ax.stride) for ax in sub]
    got = R.mesh_groups(axes, rank_map)
    assert sorted(map(tuple, got)) == sorted(map(tuple, expect))


def test_partial_and_bad_layouts_are_refused() -> None:
    with pytest.raises(R.LayoutError, match="partial"):
        R.shard_runs((4,), (2,), [R.Partial()], (0,))
    with pytest.raises(R.LayoutError, match="2-d tensor"):
        R.shard_runs((4, 4), (2,), [R.Shard(2)], (0,))
    with pytest.raises(R.LayoutError, match="tiling"):
        R.mesh_groups([((2,), (3,))], list(range(4)))


def test_strided_shard_leaves_several_runs() -> None:
    # 8 rows: _StridedShard(0, sf=2) over 2, then Shard(0) over 2: (0, 1) holds rows 4-5
    runs = R.shard_runs((8,), (2, 2), [R.Shard(0, 2), R.Shard(0)], (0, 1))
    assert runs == (((4, 2),),)
    # alone, sf=2 over 2 ranks interleaves: rank 0 holds rows 0-1 and 4-5
    assert R.shard_runs((8,), (2,), [R.Shard(0, 2)], (0,)) == (((0, 2), (4, 2)),)


def test_unpickler_stubs_run_no_torch_distributed_code() -> None:
    """DTensor's classes resolve to inert stand-ins; anything else of torch.distributed is refused."""
    evil = pickle.dumps(0, protocol=2)[:2] + b"ctorch.distributed.distributed_c10d\nnew_group\n)R."
    with pytest.raises(UnsafeCheckpointError, match="new_group"):
        unpickle_refs(evil, "x.pt")
    # a DeviceMesh built by REDUCE with arguments: recorded, not run (a real one would need a group)
    mesh = b"\x80\x02ctorch.distributed.device_mesh\nDeviceMesh\nX\x03\x00\x00\x00cpuK\x04\x86R."
    obj, _ = unpickle_refs(mesh, "x.pt")
    assert type(obj).__name__ == "_DeviceMeshStub" and obj.args == ("cpu", 4)


def _ref(layout):
    from dist_restore._format.dtensor import DTensorRef

    ref = DTensorRef(torch.float32, layout.shape, (1,), False)
    ref.__dict__["layout"] = layout  # the parsed layout, as the unpickler's spec would give
    return ref


def test_replicas_are_read_once_and_spread_over_ranks() -> None:
    """A tensor replicated on 4 saving ranks, wanted whole by 2 restoring ranks: each reads it
    from one file, and the two pick different files."""
    from dist_restore._format.dtensor import DLayout, MeshInfo
    from dist_restore._planning.reshard import plan_job

    layout = DLayout((8,), (R.Replicate(),), MeshInfo((4,), None, (0,), 0, ((0, 1, 2, 3),)))
    picks = []
    for rank in range(2):
        job = plan_job("w", ("w",), _ref(layout), torch.zeros(8), R.full_runs((8,)), home=0, own=None, nfiles=4,
                       reading=set(), spread=rank)
        assert len(job.pieces) == 1 and job.pieces[0].boxes == (R.Box((0,), (0,), (8,)),)
        picks.append(job.pieces[0].file)
    assert picks[0] != picks[1]
    # a file this rank already reads is preferred to a new one
    job = plan_job("w", ("w",), _ref(layout), torch.zeros(8), R.full_runs((8,)), home=0, own=None, nfiles=4,
                   reading={3}, spread=0)
    assert job.pieces[0].file == 3


def test_mesh_ranks_beyond_the_files_are_named() -> None:
    from dist_restore._format.dtensor import DLayout, MeshInfo
    from dist_restore._planning.reshard import plan_job

    layout = DLayout((8,), (R.Shard(0),), MeshInfo((4,), None, (0,), 0, ((0, 1, 2, 3),)))
    with pytest.raises(R.LayoutError, match="places shards on rank 3, but the checkpoint has 3"):
        plan_job("w", ("w",), _ref(layout), torch.zeros(8), R.full_runs((8,)), home=0, own=0, nfiles=3,
                 reading=set(), spread=0)


def _mesh_stub(layout_state: dict, rank_map: tuple[int, ...], names: tuple[str, ...], coord: list[int]):
    from dist_restore._format.dtensor import STUBS

    layout = STUBS["_MeshLayout"]()
    layout.__setstate__(layout_state)
    mesh = STUBS["DeviceMesh"]()
    mesh.__setstate__({"_layout": layout, "_flatten_rank_map": rank_map, "_mesh_dim_names": names,
                       "_coordinate_on_dim": coord, "_rank": 3})
    return mesh


def _flat_stub(shape: tuple, stride: tuple):
    from dist_restore._format.dtensor import STUBS

    ax = STUBS["_FlatLayout"]()
    ax.__setstate__({"shape": shape, "stride": stride})
    return ax


@pytest.mark.parametrize("which", ["root", "submesh", "flattened"])
def test_mesh_layout_of_older_torch(which: str) -> None:
    """torch 2.9-2.11 pickle a DeviceMesh's ``_layout`` as one CuTe layout (``shape``/``stride``,
    a mode per mesh dim; seen on a GPU machine with torch 2.11), torch 2.12+ as ``axes`` of
    ``_FlatLayout``: both give the same mesh, groups included."""
    from dist_restore._format.dtensor import _parse_mesh

    rank_map = tuple(range(8))
    old, new = {
        "root": ({"shape": (2, 4), "stride": (4, 1)}, [((2,), (4,)), ((4,), (1,))]),
        "submesh": ({"shape": (4,), "stride": (1,)}, [((4,), (1,))]),
        "flattened": ({"shape": ((2, 4),), "stride": ((4, 1),)}, [((2, 4), (4, 1))]),
    }[which]
    got_old = _parse_mesh(_mesh_stub(old, rank_map, ("a",), [1]))
    got_new = _parse_mesh(_mesh_stub({"axes": tuple(_flat_stub(*ax) for ax in new)}, rank_map, ("a",), [1]))
    assert got_old == got_new
    assert got_new.shape == {"root": (2, 4), "submesh": (4,), "flattened": (8,)}[which]
    expect = {"root": [list(range(8))], "submesh": [[0, 1, 2, 3], [4, 5, 6, 7]],
              "flattened": [list(range(8))]}[which]
    assert [list(g) for g in got_old.groups] == expect


def test_one_mesh_object_is_parsed_once() -> None:
    """The DTensors of a file share one DeviceMesh object: it is parsed once and the same
    MeshInfo comes back; another object (another mesh) is parsed on its own; the memory is
    bounded and a forgotten object is parsed again, equal to before."""
    from dist_restore._format import dtensor as D

    calls = []
    real = D._parse_mesh_uncached

    def counting(m):
        calls.append(m)
        return real(m)

    ax = [((2,), (4,)), ((4,), (1,))]
    a = _mesh_stub({"axes": tuple(_flat_stub(*x) for x in ax)}, tuple(range(8)), ("dp", "tp"), [1, 2])
    b = _mesh_stub({"axes": tuple(_flat_stub(*x) for x in ax)}, tuple(range(8)), ("dp", "tp"), [0, 3])
    old = D._parse_mesh_uncached
    D._parse_mesh_uncached = counting
    try:
        first = D._parse_mesh(a)
        assert D._parse_mesh(a) is first and len(calls) == 1
        other = D._parse_mesh(b)
        assert other.coordinate == (0, 3) and first.coordinate == (1, 2) and len(calls) == 2
        for _ in range(D._MESH_CACHE + 1):  # push a and b out
            D._parse_mesh(_mesh_stub({"axes": tuple(_flat_stub(*x) for x in ax)}, tuple(range(8)), None, [0, 0]))
        assert len(D._MESHES) <= D._MESH_CACHE
        again = D._parse_mesh(a)
        assert again == first and calls[-1] is a
    finally:
        D._parse_mesh_uncached = old
