"""Region math for sharded tensors: pure functions, no I/O, no process group.

A shard of a global tensor is described per tensor dimension by *runs*: the local
positions ``[0, n)`` of that dimension map to global positions as a sequence of
``(global_start, length)`` runs laid end to end. A ``Shard`` placement keeps one run; a
``_StridedShard`` (FSDP2 over tensor parallel) can leave several. A shard is then the
cartesian product of its dimensions' runs, and the overlap of two shards is a list of
boxes, each a plain strided copy between their local tensors.

This follows ``torch.distributed.tensor._utils._compute_local_shape_and_global_offset``:
placements are applied left to right over the mesh dimensions, ``Shard`` splits like
``torch.chunk`` (chunks of ``ceil(n / k)``; trailing chunks may be short or empty) and
``_StridedShard(dim, split_factor=sf)`` first chunks into ``sf`` pieces, chunks each of
them into ``k``, and keeps piece ``i`` of every one (see ``_StridedShard._split_tensor``).

Caps (a layout read from a file is hostile until checked; :class:`dist_restore._format.dtensor.DLayout`
checks the first two where a layout is parsed):

* :data:`MAX_MESH_RANKS`: a mesh, and the rank map it is laid over, hold at most 2^20 ranks;
* :data:`MAX_SPLIT_FACTOR`: a ``_StridedShard`` split factor is at most 2^16 (and at most the
  size of the dimension it splits);
* :data:`MAX_RUNS`: one coordinate's part of one dimension is at most 2^20 runs
  (:func:`shard_box` answers "is it a box?" without listing them).

Past a cap these functions raise :class:`LayoutError` before building anything large.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from typing import NamedTuple

#: ``(global_start, length)`` runs of one tensor dimension, in local order.
DimRuns = tuple[tuple[int, int], ...]
#: One :data:`DimRuns` per tensor dimension.
ShardRuns = tuple[DimRuns, ...]


class Shard(NamedTuple):
    """``Shard(dim)``; with ``split_factor`` > 0, ``_StridedShard(dim, split_factor)``."""

    dim: int
    split_factor: int = 0

    def __str__(self) -> str:
        if self.split_factor:
            return f"_StridedShard(dim={self.dim}, sf={self.split_factor})"
        return f"Shard(dim={self.dim})"


class Replicate(NamedTuple):
    """``Replicate()``: every coordinate of the mesh dimension holds the same data."""

    def __str__(self) -> str:
        return "Replicate()"


class Partial(NamedTuple):
    """``Partial(reduce_op)``: the global value is a reduction of the shards. Never mapped."""

    reduce_op: str = "sum"

    def __str__(self) -> str:
        return f"Partial({self.reduce_op})"


Placement = Shard | Replicate | Partial

#: Most ranks a device mesh, or the rank map it is laid over, may hold.
MAX_MESH_RANKS = 1 << 20
#: Largest ``_StridedShard`` split factor accepted (torch's own ``_split_tensor`` makes one
#: view per piece: real split factors are a tensor-parallel degree, far below this).
MAX_SPLIT_FACTOR = 1 << 16
#: Most runs :func:`split_runs` returns for one coordinate of one dimension.
MAX_RUNS = 1 << 20


class Box(NamedTuple):
    """A copy between two local tensors: ``dst[dst_start : +size] = src[src_start : +size]``
    per dimension."""

    src_start: tuple[int, ...]
    dst_start: tuple[int, ...]
    size: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.size)


class LayoutError(ValueError):
    """A placement or mesh the region math cannot map exactly."""


def _take(runs: DimRuns, lo: int, hi: int) -> DimRuns:
    """Local positions ``[lo, hi)`` of a run list, as a run list."""
    out: list[tuple[int, int]] = []
    pos = 0
    for g, n in runs:
        a, b = max(lo, pos), min(hi, pos + n)
        if a < b:
            out.append((g + a - pos, b - a))
        pos += n
        if pos >= hi:
            break
    return tuple(out)


def _length(runs: DimRuns) -> int:
    return sum(n for _g, n in runs)


def _chunk(runs: DimRuns, k: int, i: int) -> DimRuns:
    """Chunk ``i`` of ``k`` as ``torch.chunk`` makes it (empty past the last chunk)."""
    n = _length(runs)
    size = -(-n // k) if n else 0
    lo, hi = min(n, i * size), min(n, (i + 1) * size)
    return _take(runs, lo, hi)


def _merge(runs: list[tuple[int, int]]) -> DimRuns:
    out: list[tuple[int, int]] = []
    for g, n in runs:
        if n == 0:
            continue
        if out and out[-1][0] + out[-1][1] == g:
            out[-1] = (out[-1][0], out[-1][1] + n)
        else:
            out.append((g, n))
    return tuple(out)


def _take_many(runs: DimRuns, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Local positions ``[lo, hi)`` of each span (ascending, disjoint) of a run list, as global
    runs: one pass over both lists."""
    out: list[tuple[int, int]] = []
    i, pos = 0, 0  # runs[i] starts at local position pos
    for lo, hi in spans:
        while i < len(runs) and pos + runs[i][1] <= lo:
            pos += runs[i][1]
            i += 1
        j, p = i, pos
        while j < len(runs) and p < hi:
            g, n = runs[j]
            a, b = max(lo, p), min(hi, p + n)
            if a < b:
                out.append((g + a - p, b - a))
            if p + n > hi:
                break
            p += n
            j += 1
    return out


def _strided_spans(n: int, k: int, c: int, sf: int, limit: int) -> list[tuple[int, int]] | None:
    """The local positions ``[lo, hi)`` of a dimension of length ``n`` that coordinate ``c``
    of ``k`` keeps under a split factor ``sf`` (ascending, adjacent ones joined), or ``None``
    when there are more than ``limit`` of them (found before any is listed)."""
    size = -(-n // sf)  # torch.chunk: pieces of ceil(n / sf), the last short
    full, last = divmod(n, size)  # `full` pieces of `size`, then one of `last` (if any)
    spans: list[tuple[int, int]] = []
    q = -(-size // k)
    a, b = min(size, c * q), min(size, (c + 1) * q)
    if a < b and full:
        if a == 0 and b == size:  # the chunk is the whole piece: the pieces join up
            spans.append((0, full * size))
        elif full > limit:
            return None
        else:
            spans.extend((j * size + a, j * size + b) for j in range(full))
    if last:
        q = -(-last // k)
        a, b = min(last, c * q), min(last, (c + 1) * q)
        if a < b:
            lo = full * size + a
            if spans and spans[-1][1] == lo:
                spans[-1] = (spans[-1][0], full * size + b)
            else:
                spans.append((lo, full * size + b))
    return spans if len(spans) <= limit else None


def split_runs(runs: DimRuns, k: int, c: int, p: Shard) -> DimRuns:
    """The part of one dimension's ``runs`` that coordinate ``c`` of a mesh dimension of
    size ``k`` keeps under ``Shard``/``_StridedShard`` ``p``.

    A ``_StridedShard`` keeps chunk ``c`` of every one of its ``split_factor`` pieces: the
    pieces all have one length but the last, so the positions kept are worked out once,
    and only pieces that hold anything are visited (cost: the runs returned).

    Raises:
        LayoutError: ``k`` < 1, a split factor < 0, or more than :data:`MAX_RUNS` runs.
    """
    if k < 1 or not 0 <= c < k or p.split_factor < 0:
        raise LayoutError(f"placement {p} at coordinate {c} of a mesh dimension of size {k}")
    if not p.split_factor:
        return _chunk(runs, k, c)
    n = _length(runs)
    if n == 0:
        return ()
    spans = _strided_spans(n, k, c, p.split_factor, MAX_RUNS)
    out = None if spans is None else _merge(_take_many(runs, spans))
    if out is None or len(out) > MAX_RUNS:
        raise LayoutError(f"placement {p} cuts a dimension of {n} into more than {MAX_RUNS} runs")
    return out


def shard_box(global_shape: Sequence[int], mesh_shape: Sequence[int], placements: Sequence[Placement],
              coordinate: Sequence[int]) -> tuple[tuple[int, int], ...] | None:
    """The region held at ``coordinate`` as ``(offset, size)`` per dimension (``(0, 0)`` for
    an empty one) when it is a box, else ``None``: what :func:`shard_runs` says when each
    dimension has at most one run. A dimension that a ``_StridedShard`` cuts into several
    runs, with no later placement on it, is no box whatever the split factor: found without
    listing the runs (a later placement on it: the runs are worked out, as ``shard_runs``).

    Raises:
        LayoutError: as :func:`shard_runs`.
    """
    if len(placements) != len(mesh_shape) or len(coordinate) != len(mesh_shape):
        raise LayoutError(f"{len(placements)} placements and coordinate {tuple(coordinate)} "
                          f"for a mesh of shape {tuple(mesh_shape)}")
    dims = [(0, n) for n in global_shape]
    for mesh_dim, p in enumerate(placements):
        k, c = mesh_shape[mesh_dim], coordinate[mesh_dim]
        if not 0 <= c < k:
            raise LayoutError(f"coordinate {tuple(coordinate)} outside mesh {tuple(mesh_shape)}")
        if isinstance(p, Replicate):
            continue
        if isinstance(p, Partial):
            raise LayoutError(f"placement {p} on mesh dim {mesh_dim}: a partial value is not a slice "
                              "of the global tensor")
        if not 0 <= p.dim < len(dims) or p.split_factor < 0:
            raise LayoutError(f"placement {p} on mesh dim {mesh_dim} of a {len(dims)}-d tensor")
        g, n = dims[p.dim]
        if n == 0:
            continue
        if p.split_factor:
            spans = _strided_spans(n, k, c, p.split_factor, 1)
            if spans is None:
                later = any(isinstance(q, Shard) and q.dim == p.dim for q in placements[mesh_dim + 1:])
                if not later:
                    return None
                runs = _shard_runs(global_shape, mesh_shape, placements, coordinate)
                if any(len(r) > 1 for r in runs):
                    return None
                return tuple((r[0][0], r[0][1]) if r else (0, 0) for r in runs)
        else:
            size = -(-n // k)
            lo, hi = min(n, c * size), min(n, (c + 1) * size)
            spans = [(lo, hi)] if lo < hi else []
        dims[p.dim] = (g + spans[0][0], spans[0][1] - spans[0][0]) if spans else (0, 0)
    return tuple((g, n) if n else (0, 0) for g, n in dims)


def shard_runs(global_shape: Sequence[int], mesh_shape: Sequence[int], placements: Sequence[Placement],
               coordinate: Sequence[int]) -> ShardRuns:
    """The runs of every tensor dimension held at ``coordinate`` of the mesh (remembered for
    the last few thousand layouts: a model's layers repeat a handful of shapes).

    Raises:
        LayoutError: a ``Partial`` placement, a shard dim out of range, or a coordinate
            or placement count that does not fit the mesh.
    """
    if any(isinstance(p, Shard) and p.split_factor > _CACHED_SPLIT for p in placements):
        return _shard_runs(global_shape, mesh_shape, placements, coordinate)  # many runs: not kept
    try:
        return _shard_runs_cached(tuple(global_shape), tuple(mesh_shape), tuple(placements), tuple(coordinate))
    except TypeError:  # unhashable parts: compute (and raise) as they are
        return _shard_runs(global_shape, mesh_shape, placements, coordinate)


#: Layouts with a larger split factor (up to that many runs a dimension) are not remembered:
#: the cache's memory stays small whatever a file's layouts say.
_CACHED_SPLIT = 64


@functools.lru_cache(maxsize=8192)
def _shard_runs_cached(global_shape: tuple[int, ...], mesh_shape: tuple[int, ...],
                       placements: tuple[Placement, ...], coordinate: tuple[int, ...]) -> ShardRuns:
    return _shard_runs(global_shape, mesh_shape, placements, coordinate)


def _shard_runs(global_shape: Sequence[int], mesh_shape: Sequence[int], placements: Sequence[Placement],
                coordinate: Sequence[int]) -> ShardRuns:
    if len(placements) != len(mesh_shape) or len(coordinate) != len(mesh_shape):
        raise LayoutError(f"{len(placements)} placements and coordinate {tuple(coordinate)} "
                          f"for a mesh of shape {tuple(mesh_shape)}")
    dims: list[DimRuns] = [((0, n),) if n else () for n in global_shape]
    for mesh_dim, p in enumerate(placements):
        k, c = mesh_shape[mesh_dim], coordinate[mesh_dim]
        if not 0 <= c < k:
            raise LayoutError(f"coordinate {tuple(coordinate)} outside mesh {tuple(mesh_shape)}")
        if isinstance(p, Replicate):
            continue
        if isinstance(p, Partial):
            raise LayoutError(f"placement {p} on mesh dim {mesh_dim}: a partial value is not a slice "
                              "of the global tensor")
        if not 0 <= p.dim < len(dims):
            raise LayoutError(f"placement {p} on mesh dim {mesh_dim} of a {len(dims)}-d tensor")
        dims[p.dim] = split_runs(dims[p.dim], k, c, p)
    return tuple(dims)


def local_shape(runs: ShardRuns) -> tuple[int, ...]:
    """The shape of the local tensor a shard's runs describe."""
    return tuple(_length(r) for r in runs)


def full_runs(global_shape: Sequence[int]) -> ShardRuns:
    """Runs of an unsharded tensor: the whole of every dimension."""
    return tuple(((0, n),) if n else () for n in global_shape)


def _dim_overlap(src: DimRuns, dst: DimRuns) -> list[tuple[int, int, int]]:
    """``(src_local, dst_local, length)`` of every global stretch both run lists hold."""
    out: list[tuple[int, int, int]] = []
    s_pos = 0
    for sg, sn in src:
        d_pos = 0
        for dg, dn in dst:
            a, b = max(sg, dg), min(sg + sn, dg + dn)
            if a < b:
                out.append((s_pos + a - sg, d_pos + a - dg, b - a))
            d_pos += dn
        s_pos += sn
    return out


def overlap(src: ShardRuns, dst: ShardRuns) -> list[Box]:
    """The boxes that copy every element ``dst`` needs from ``src`` (empty: none).

    A 0-d tensor (no dimensions) overlaps itself in one box of no dimensions.
    """
    if len(src) != len(dst):
        raise LayoutError(f"{len(src)}-d source and {len(dst)}-d target")
    per_dim = [_dim_overlap(s, d) for s, d in zip(src, dst)]
    boxes = []
    for combo in itertools.product(*per_dim):
        boxes.append(Box(tuple(c[0] for c in combo), tuple(c[1] for c in combo), tuple(c[2] for c in combo)))
    return boxes


# -- device meshes ---------------------------------------------------------------------------

def _modes(shape: object, stride: object) -> list[tuple[int, int]]:
    """Flatten a (possibly nested) CuTe-style shape/stride into ``(size, stride)`` modes."""
    if isinstance(shape, int) and isinstance(stride, int):
        return [(shape, stride)]
    if isinstance(shape, tuple) and isinstance(stride, tuple) and len(shape) == len(stride):
        out: list[tuple[int, int]] = []
        for s, d in zip(shape, stride):
            out.extend(_modes(s, d))
        return out
    raise LayoutError(f"mesh layout shape {shape!r} and stride {stride!r} do not match")


def _axis_offsets(modes: list[tuple[int, int]]) -> list[int]:
    """Offsets of positions ``0..size-1`` of one mesh axis (lexicographic: last mode fastest)."""
    offs = [0]
    for size, stride in modes:
        if size == 1:  # adds nothing (and a layout may hold any number of them)
            continue
        offs = [o + i * stride for o in offs for i in range(size)]
    return offs


def _axis_size(modes: list[tuple[int, int]], world: int, axes: object) -> int:
    """The size of one mesh axis, checked before anything is expanded: every mode a
    positive size with a non-negative stride, and the product no more than ``world``."""
    n = 1
    for size, stride in modes:
        if type(size) is not int or type(stride) is not int or size < 1 or stride < 0:
            raise LayoutError(f"mesh layout {axes!r:.200}: mode size {size!r} / stride {stride!r} (sizes must be "
                              ">= 1, strides >= 0)")
        n *= size
        if n > world:
            raise LayoutError(f"mesh layout {axes!r:.200} spans more ranks than its rank map's {world}")
    return n


def mesh_groups(axes: Sequence[tuple[object, object]], rank_map: Sequence[int]) -> list[list[int]]:
    """Every copy of a (sub)mesh in its root: the global ranks of each, flattened row-major.

    Args:
        axes: ``(shape, stride)`` of each mesh dimension's layout over ``rank_map``
            (``DeviceMesh._layout``).
        rank_map: The root mesh's ranks, flattened (``DeviceMesh._flatten_rank_map``).

    A submesh (``mesh["dp"]`` of a 2-D mesh) is one of several copies that tile the root;
    each copy holds the same global tensors. Equivalent to ``_MeshLayout.remap_to_tensor``.

    Before expanding anything, the rank map must hold 1 to :data:`MAX_MESH_RANKS` ranks and
    every axis a size >= 1 whose product divides the rank map's length (so that the work
    and memory are those of the rank map, which the file holds).

    Raises:
        LayoutError: the layout does not tile the rank map exactly, or breaks a cap above.
    """
    world = len(rank_map)
    if not 1 <= world <= MAX_MESH_RANKS:
        raise LayoutError(f"a rank map of {world} ranks (1 to {MAX_MESH_RANKS} accepted)")
    per_modes = [_modes(s, d) for s, d in axes]
    total = 1
    for modes in per_modes:
        total *= _axis_size(modes, world, list(axes))
        if total > world:
            raise LayoutError(f"mesh layout {list(axes)!r:.200} spans more ranks than its rank map's {world}")
    if world % total:
        raise LayoutError(f"mesh layout {list(axes)!r:.200} ({total} ranks) is not a tiling of {world} ranks")
    per_axis = [_axis_offsets(modes) for modes in per_modes]
    offsets = [sum(c) for c in itertools.product(*per_axis)] if per_axis else [0]
    if len(set(offsets)) != len(offsets):
        raise LayoutError(f"mesh layout {list(axes)!r:.200} is not a tiling of {world} ranks")
    taken = [False] * world
    groups: list[list[int]] = []
    for base in range(world):
        if taken[base]:
            continue
        cells = [base + o for o in offsets]
        if any(c >= world or taken[c] for c in cells):
            raise LayoutError(f"mesh layout {list(axes)!r:.200} is not a tiling of {world} ranks")
        for c in cells:
            taken[c] = True
        groups.append([int(rank_map[c]) for c in cells])
    return groups
