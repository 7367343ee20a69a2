"""DTensor entries of a ``torch.save`` file, as plain data: no DeviceMesh, no process group.

A pickled DTensor is ``_rebuild_from_type_v2(_rebuild_wrapper_subclass, DTensor, (DTensor,
dtype, global size, global stride, ...), state)`` whose state holds ``_local_tensor`` (an
ordinary tensor record) and ``_spec`` (a ``DTensorSpec``: the ``DeviceMesh``, the
placements and ``TensorMeta``). The unpickler resolves those classes to the inert stand-ins
below: they record the arguments and state they are given and run no code of torch's. The
reference's :class:`DTensorRef` then turns them into a :class:`DLayout` of plain values.

A layout comes from a file and is checked before any region math runs on it (see
:meth:`DLayout.__post_init__`, :meth:`MeshInfo.__post_init__` and
:func:`dist_restore._base.regions.mesh_groups`); a layout outside these limits is refused
with :class:`~dist_restore.errors.CorruptCheckpointError`, which the index names with the
file and key:

* global shape: non-negative integers;
* one placement per mesh dimension; a ``Shard``/``_StridedShard`` dim inside the global
  shape's dimensions;
* ``_StridedShard`` split factor: at least 1, and at most the size of the dimension it splits
  and :data:`~dist_restore._base.regions.MAX_SPLIT_FACTOR` (2^16);
* mesh: every dimension's size at least 1, and their product at most
  :data:`~dist_restore._base.regions.MAX_MESH_RANKS` (2^20); with a rank map, at most its
  length and dividing it (the rank map itself 1 to 2^20 ranks); this file's coordinate
  inside the mesh.
"""

from __future__ import annotations

import operator
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch

from dist_restore._base.regions import MAX_MESH_RANKS, MAX_SPLIT_FACTOR, LayoutError, Partial, Placement, Replicate, \
    Shard, ShardRuns, mesh_groups, shard_box, shard_runs
from dist_restore.errors import CorruptCheckpointError


class _Stub:
    """An inert stand-in for a class of torch.distributed met in a pickle.

    ``NEWOBJ``/``REDUCE`` give it arguments, ``BUILD`` its state; it keeps both and runs
    nothing else.
    """

    __slots__ = ("args", "state")
    kind = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> _Stub:
        obj = object.__new__(cls)
        obj.args = args
        obj.state = None
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def fields(self) -> dict[str, Any]:
        """The object's attributes: a dict state, or the dict and slot parts of a pair."""
        st = self.state
        if isinstance(st, tuple) and len(st) == 2:
            out: dict[str, Any] = {}
            for part in st:
                if isinstance(part, Mapping):
                    out.update(part)
            return out
        return dict(st) if isinstance(st, Mapping) else {}

    def __repr__(self) -> str:
        return f"<{self.kind} {self.args!r} {self.state!r:.200}>"


def _stub(kind: str) -> type[_Stub]:
    return type(f"_{kind}Stub", (_Stub,), {"__slots__": (), "kind": kind})


class DTensorType:
    """Stands in for the ``DTensor`` class in the pickle."""


_PLACEMENT_MODULES = ("torch.distributed.tensor.placement_types", "torch.distributed._tensor.placement_types")
_SPEC_MODULES = ("torch.distributed.tensor._dtensor_spec", "torch.distributed._tensor._dtensor_spec")

STUBS: dict[str, type[_Stub]] = {k: _stub(k) for k in (
    "DTensorSpec", "TensorMeta", "ShardOrderEntry", "DeviceMesh", "_MeshLayout", "_FlatLayout",
    "Shard", "_StridedShard", "Replicate", "Partial", "_NormPartial", "_MaskPartial")}


def allowed_globals() -> dict[tuple[str, str], Any]:
    """The globals of pickled DTensors, mapped to the stand-ins."""
    g: dict[tuple[str, str], Any] = {}
    for mod in ("torch.distributed.tensor", "torch.distributed.tensor._api", "torch.distributed._tensor",
                "torch.distributed._tensor.api"):
        g[(mod, "DTensor")] = DTensorType
    for mod in _SPEC_MODULES:
        for name in ("DTensorSpec", "TensorMeta", "ShardOrderEntry"):
            g[(mod, name)] = STUBS[name]
    for mod in _PLACEMENT_MODULES:
        for name in ("Shard", "_StridedShard", "Replicate", "Partial", "_NormPartial", "_MaskPartial"):
            g[(mod, name)] = STUBS[name]
    g[("torch.distributed.device_mesh", "DeviceMesh")] = STUBS["DeviceMesh"]
    g[("torch.distributed._mesh_layout", "_MeshLayout")] = STUBS["_MeshLayout"]
    g[("torch.distributed._mesh_layout", "_FlatLayout")] = STUBS["_FlatLayout"]
    return g


@dataclass(frozen=True)
class MeshInfo:
    """A device mesh as saved.

    Attributes:
        shape: Mesh shape.
        dim_names: Mesh dimension names, if any.
        coordinate: The saving rank's coordinate (``None``: not in the mesh).
        rank: The saving rank's global rank.
        groups: Global ranks of every copy of this mesh in its root, each flattened
            row-major (one copy for a root mesh; ``None`` when the file does not say).
    """

    shape: tuple[int, ...]
    dim_names: tuple[str, ...] | None
    coordinate: tuple[int, ...] | None
    rank: int | None
    groups: tuple[tuple[int, ...], ...] | None

    def __post_init__(self) -> None:
        """Refuse a mesh the region math cannot hold (see the module docstring).

        Raises:
            LayoutError: a size below 1, more than ``MAX_MESH_RANKS`` ranks, or rank map
                copies of another size. (The coordinate is checked by :class:`DLayout`.)
        """
        total = 1
        for k in self.shape:
            if type(k) is not int or k < 1:
                raise LayoutError(f"mesh shape {self.shape!r:.200}: sizes must be integers >= 1")
            total *= k
            if total > MAX_MESH_RANKS:
                raise LayoutError(f"mesh shape {self.shape!r:.200} has more than {MAX_MESH_RANKS} ranks")
        if self.groups is not None and (
                len(self.groups) * total > MAX_MESH_RANKS or any(len(g) != total for g in self.groups)):
            raise LayoutError(f"rank map copies of mesh {self.shape} are not {total} ranks each (or span "
                              f"more than {MAX_MESH_RANKS} ranks)")

    @property
    def root_size(self) -> int | None:
        """How many ranks the root mesh (the saving job's mesh) spans, where recorded."""
        return None if self.groups is None else sum(len(g) for g in self.groups)

    def __str__(self) -> str:
        names = self.dim_names or tuple(f"d{i}" for i in range(len(self.shape)))
        return "(" + ", ".join(f"{n}={s}" for n, s in zip(names, self.shape)) + ")"


@dataclass(frozen=True)
class DLayout:
    """Where a DTensor's data lies: plain values, comparable and picklable.

    Attributes:
        shape: Global shape.
        placements: One per mesh dimension.
        mesh: The mesh.
    """

    shape: tuple[int, ...]
    placements: tuple[Placement, ...]
    mesh: MeshInfo

    def __post_init__(self) -> None:
        """Refuse a layout the region math cannot map, or could only map at a cost out of all
        proportion to the file (see the module docstring).

        Raises:
            LayoutError: naming the placement or shape.
        """
        for n in self.shape:
            if type(n) is not int or n < 0:
                raise LayoutError(f"global shape {self.shape!r:.200}: sizes must be integers >= 0")
        if len(self.placements) != len(self.mesh.shape):
            raise LayoutError(f"{len(self.placements)} placements on a {len(self.mesh.shape)}-d mesh")
        coord, mshape = self.mesh.coordinate, self.mesh.shape
        if coord is not None and (len(coord) != len(mshape) or not all(0 <= c < k for c, k in zip(coord, mshape))):
            raise LayoutError(f"coordinate {coord!r:.200} outside mesh {mshape}")
        for md, p in enumerate(self.placements):
            if not isinstance(p, Shard):
                continue
            if type(p.dim) is not int or not 0 <= p.dim < len(self.shape):
                raise LayoutError(f"placement {p} on mesh dim {md} of a {len(self.shape)}-d tensor")
            sf, n = p.split_factor, self.shape[p.dim]
            if type(sf) is not int or sf < 0 or (n and sf > min(n, MAX_SPLIT_FACTOR)):
                raise LayoutError(f"placement {p} on mesh dim {md}: the split factor must be at least 1 and at "
                                  f"most the size of dim {p.dim} ({n}) and {MAX_SPLIT_FACTOR}")

    def runs_at(self, coordinate: tuple[int, ...]) -> ShardRuns:
        """The global region held at a mesh coordinate (see :mod:`dist_restore._base.regions`)."""
        return shard_runs(self.shape, self.mesh.shape, self.placements, coordinate)

    def box_at(self, coordinate: tuple[int, ...]) -> tuple[tuple[int, int], ...] | None:
        """The region held at a mesh coordinate as ``(offset, size)`` per dim when it is a box,
        else ``None`` (:func:`~dist_restore._base.regions.shard_box`: no run listed for a
        strided region)."""
        return shard_box(self.shape, self.mesh.shape, self.placements, coordinate)

    def describe(self) -> str:
        return f"[{', '.join(map(str, self.placements))}] on mesh {self.mesh}"


class DTensorRef:
    """A pickled DTensor: its global metadata, layout and the local tensor's reference."""

    __slots__ = ("dtype", "size", "stride", "requires_grad", "is_parameter", "local", "_spec", "__dict__")

    def __init__(self, dtype: torch.dtype, size: tuple[int, ...], stride: tuple[int, ...],
                 requires_grad: bool) -> None:
        self.dtype = dtype
        self.size = size
        self.stride = stride
        self.requires_grad = requires_grad
        self.is_parameter = False
        self.local: Any = None
        self._spec: Any = None

    def set_state(self, state: Any) -> None:
        fields: dict[str, Any] = {}
        parts = state if isinstance(state, tuple) else (state,)
        for part in parts:
            if isinstance(part, Mapping):
                fields.update(part)
        self.local = fields.get("_local_tensor")
        self._spec = fields.get("_spec")
        if self.local is None or self._spec is None:
            raise CorruptCheckpointError("a DTensor without _local_tensor or _spec")

    @property
    def nbytes(self) -> int:
        """Bytes of this file's local shard."""
        return getattr(self.local, "nbytes", 0)

    @cached_property
    def layout(self) -> DLayout:
        """The layout, parsed on first use.

        Raises:
            CorruptCheckpointError: a spec this code cannot read.
        """
        try:
            return _parse_spec(self._spec, tuple(self.size))
        except (LayoutError, TypeError, ValueError, KeyError, AttributeError, IndexError, OverflowError) as e:
            raise CorruptCheckpointError(f"DTensor layout not understood: {e}") from None
        except RecursionError:
            raise CorruptCheckpointError("DTensor layout not understood: nested too deeply") from None

    def __repr__(self) -> str:
        return f"DTensorRef({self.dtype}, global {tuple(self.size)}, local {self.local!r})"


def _ints(x: Any) -> tuple[int, ...]:
    return tuple(operator.index(v) for v in x)


def _placement(p: Any) -> Placement:
    if not isinstance(p, _Stub):
        raise TypeError(f"placement {p!r:.200} is not a placement")
    f = p.fields()
    if p.kind == "Replicate":
        return Replicate()
    if p.kind == "Shard":
        return Shard(operator.index(f["dim"]))
    if p.kind == "_StridedShard":
        sf = operator.index(f.get("split_factor", f.get("sf", 1)))
        if sf < 1:  # 0 would read as a plain Shard below
            raise LayoutError(f"_StridedShard(dim={f['dim']!r:.50}, split_factor={sf}): the split factor must be >= 1")
        return Shard(operator.index(f["dim"]), sf)
    if p.kind in ("Partial", "_NormPartial", "_MaskPartial"):
        return Partial(str(f.get("reduce_op", "sum")))
    raise TypeError(f"unknown placement {p.kind}")


def _parse_spec(spec: Any, size: tuple[int, ...]) -> DLayout:
    if not isinstance(spec, _Stub) or spec.kind != "DTensorSpec":
        raise TypeError(f"_spec is {type(spec).__name__}, not a DTensorSpec")
    f = spec.fields()
    placements = tuple(_placement(p) for p in f["placements"])
    order = f.get("shard_order")
    if order:
        _check_default_order(order, placements)
    mesh, layouts = _parse_mesh_entry(f["mesh"])
    if len(layouts) >= _MESH_LAYOUTS or not all(type(n) is int for n in size):
        return DLayout(size, placements, mesh)  # checked there
    # the DTensors of a file share a handful of layouts: one object each (their checks made
    # once, and a plan compares layouts it checked already by identity)
    key = (size, placements)  # (placements: our own, of ints and strings; sizes: ints, as DLayout's)
    got = layouts.get(key)
    if got is None:
        got = layouts[key] = DLayout(size, placements, mesh)  # checked there
    return got


def _check_default_order(order: Any, placements: tuple[Placement, ...]) -> None:
    """A ``shard_order`` other than left to right changes which rows a rank holds; say so
    rather than guess."""
    for entry in order:
        args = entry.args if isinstance(entry, _Stub) else entry
        if isinstance(entry, _Stub) and not args:
            args = tuple(entry.fields().values())
        tensor_dim, mesh_dims = args[0], tuple(args[1])
        if list(mesh_dims) != sorted(mesh_dims):
            raise LayoutError(f"shard_order {tuple(mesh_dims)} for tensor dim {tensor_dim} is not left to "
                              "right: not supported")


#: id(stub) -> (stub, parsed, {(global shape, placements): layout on it}): recent ones
_MESHES: OrderedDict[int, tuple[Any, MeshInfo, dict[Any, DLayout]]] = OrderedDict()
_MESH_CACHE = 64
_MESH_LAYOUTS = 1024  # layouts remembered per mesh (a model's DTensors have a few dozen shapes)
_MESH_LOCK = threading.Lock()


def _parse_mesh(mesh: Any) -> MeshInfo:
    """A DeviceMesh stub's :class:`MeshInfo`. The DTensors of one file share one mesh object
    (the pickle's memo), whose rank map can span thousands of ranks: each is parsed once
    (the last few are remembered, with the stub itself, so that its ``id`` stays its own)."""
    return _parse_mesh_entry(mesh)[0]


def _parse_mesh_entry(mesh: Any) -> tuple[MeshInfo, dict[Any, DLayout]]:
    """:func:`_parse_mesh`, and the layouts made on that mesh so far."""
    key = id(mesh)
    with _MESH_LOCK:
        hit = _MESHES.get(key)
        if hit is not None and hit[0] is mesh:
            _MESHES.move_to_end(key)
            return hit[1], hit[2]
    info = _parse_mesh_uncached(mesh)
    layouts: dict[Any, DLayout] = {}
    with _MESH_LOCK:
        _MESHES[key] = (mesh, info, layouts)
        while len(_MESHES) > _MESH_CACHE:
            _MESHES.popitem(last=False)
    return info, layouts


def _parse_mesh_uncached(mesh: Any) -> MeshInfo:
    if not isinstance(mesh, _Stub) or mesh.kind != "DeviceMesh":
        raise TypeError(f"mesh is {type(mesh).__name__}, not a DeviceMesh")
    f = mesh.fields()
    names = f.get("_mesh_dim_names")
    coord = f.get("_coordinate_on_dim")
    rank = f.get("_rank")
    layout = f.get("_layout")
    groups: tuple[tuple[int, ...], ...] | None = None
    if isinstance(layout, _Stub):
        lf = layout.fields()
        if "axes" in lf:  # torch >= 2.12: a _FlatLayout per mesh dimension
            axes = []
            for ax in lf["axes"]:
                af = ax.fields()
                axes.append((af["shape"], af["stride"]))
        else:  # torch 2.9-2.11: one CuTe layout, a (possibly nested) mode per mesh dimension
            s, d = lf["shape"], lf["stride"]
            axes = list(zip(s, d)) if isinstance(s, tuple) and isinstance(d, tuple) else [(s, d)]
        rank_map = f.get("_flatten_rank_map")
        if rank_map is not None:
            if len(rank_map) > MAX_MESH_RANKS:
                raise LayoutError(f"a rank map of {len(rank_map)} ranks (at most {MAX_MESH_RANKS} accepted)")
            # checks every size against the rank map before expanding anything
            groups = tuple(tuple(g) for g in mesh_groups(axes, _ints(rank_map)))
        shape = [_flat_size(s) for s, _d in axes]
    elif "mesh" in f and hasattr(f["mesh"], "size"):  # older torch: the mesh's rank tensor
        shape = list(_ints(f["mesh"].size))
    else:
        raise TypeError("a DeviceMesh with neither _layout nor mesh")
    return MeshInfo(tuple(shape), tuple(names) if names else None,
                    _ints(coord) if coord is not None else None,
                    int(rank) if rank is not None else None, groups)


def _flat_size(v: Any) -> int:
    """The product of a (possibly nested) shape, refused once past ``MAX_MESH_RANKS``
    (a shape of many huge factors would otherwise make an enormous integer)."""
    if isinstance(v, tuple):
        n = 1
        for x in v:
            n *= _flat_size(x)
            if n > MAX_MESH_RANKS:
                raise LayoutError(f"mesh layout shape {v!r:.200} has more than {MAX_MESH_RANKS} ranks")
        return n
    n = operator.index(v)
    if n < 1:
        raise LayoutError(f"mesh layout size {n}: sizes must be >= 1")
    return n
