"""Resharding plans: which rank files, and which boxes of their records, fill each target shard.

A target is a DTensor (its local tensor is filled) or a plain tensor holding the whole
global tensor. A source is a DTensor entry of the rank files (each file holds one region,
given by the saving mesh and placements) or a plain tensor (every file holds all of it).
From the *home* file's entry alone (the saving mesh's rank map says which file sits at which
coordinate), :func:`plan_job` finds the source regions that overlap the target's region,
picks one file for each (files this rank already reads first, then its own, then spread
over ranks), and turns each overlap into boxes of local-tensor copies. Nothing here reads
tensor data or calls a collective; :mod:`dist_restore._bytes.slices` moves the bytes.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from dist_restore._format.dtensor import DLayout, DTensorRef
from dist_restore._format.keypath import RawPath
from dist_restore._base.regions import Box, DimRuns, LayoutError, Partial, Placement, Replicate, Shard, ShardRuns, \
    full_runs, local_shape, overlap, shard_runs, split_runs
from dist_restore._format.unpickle import TensorRef
from dist_restore._planning.plan import view_out_of_bounds
from dist_restore.errors import CorruptCheckpointError

#: Most runs (plus one per coordinate) :func:`_dim_options` builds for one dimension over all
#: of a saved mesh's coordinates, per mesh dimension: a saved layout past it is refused before
#: memory goes (~1 s, ~250 MB at the cap). FSDP2 over TP needs about two per saving rank.
MAX_PLAN_RUNS = 1 << 20


@dataclass(frozen=True, slots=True)
class Piece:
    """What one source file gives one target.

    Attributes:
        file: The source rank file's rank.
        coordinate: The saving mesh coordinate that file must hold (``None``: a plain
            tensor, whole in every file).
        boxes: Copies from that file's local tensor into the target's local tensor.
    """

    file: int
    coordinate: tuple[int, ...] | None
    boxes: tuple[Box, ...]


@dataclass(frozen=True, slots=True, eq=False)
class ShardJob:
    """One target to fill from slices of source records.

    Attributes:
        key: Dotted key path.
        path: Raw path from the root.
        target: The tensor to fill (a DTensor target's local tensor).
        pieces: Where its bytes come from.
        source: The home file's entry (for the checks made when other files are opened).
    """

    key: str
    path: RawPath
    target: torch.Tensor
    pieces: tuple[Piece, ...]
    source: Any

    @property
    def nbytes(self) -> int:
        return self.target.numel() * self.target.element_size()


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a DTensor (without importing torch.distributed when it is not loaded)."""
    cls = type(t)
    return cls.__name__ == "DTensor" and cls.__module__.startswith("torch.distributed")


def placements_of(key: str, placements: Sequence[Any]) -> tuple[Placement, ...]:
    """torch's placement objects as :mod:`dist_restore._base.regions` placements.

    Raises:
        LayoutError: a placement that is not a slice of the global tensor (``Partial``).
    """
    from torch.distributed.tensor.placement_types import Partial as TPartial
    from torch.distributed.tensor.placement_types import Replicate as TReplicate
    from torch.distributed.tensor.placement_types import Shard as TShard
    from torch.distributed.tensor.placement_types import _StridedShard

    out: list[Placement] = []
    for p in placements:
        if isinstance(p, _StridedShard):
            out.append(Shard(int(p.dim), int(p.split_factor)))
        elif isinstance(p, TShard):
            out.append(Shard(int(p.dim)))
        elif isinstance(p, TReplicate):
            out.append(Replicate())
        elif isinstance(p, TPartial):
            raise LayoutError(f"key {key!r}: target placement {p!r} is a partial value, not a slice; "
                              "redistribute it to Shard or Replicate before restoring")
        else:
            raise LayoutError(f"key {key!r}: target placement {p!r} is not supported")
    return tuple(out)


def target_region(key: str, t: torch.Tensor, memo: dict[Any, Any] | None = None
                  ) -> tuple[torch.Tensor, ShardRuns] | None:
    """``(tensor to fill, its global region)``; ``None`` when this rank holds no part of a
    DTensor target (not in its mesh). ``memo``: a dict kept across the targets of one plan
    (targets of one shape and layout share their region: thousands of layers' weights).

    Raises:
        LayoutError: a placement the math cannot map, or a local tensor whose shape is not
            the one the placements give (never guessed).
    """
    if not is_dtensor(t):
        return t, full_runs(tuple(t.shape))
    spec = t._spec
    mesh = spec.mesh
    if memo is not None:
        order = getattr(spec, "shard_order", None)  # a tuple of named tuples of ints: a key as it is
        try:
            hash(order)
        except TypeError:
            order = repr(order)
        mkey = (id(mesh), tuple(t.shape), tuple(map(repr, spec.placements)), order)
        hit = memo.get(mkey)
        if hit is not None:
            runs, shape = hit
            local = t._local_tensor  # (to_local() without the autograd function's cost)
            if local.shape != shape:
                raise LayoutError(f"key {key!r}: target local tensor has shape {tuple(local.shape)}, its "
                                  f"placements {tuple(t.placements)} give {shape}")
            return local, runs
    got = _target_region(key, t, mesh, spec)
    if memo is not None and got is not None:
        memo[mkey] = (got[1], local_shape(got[1]))  # (the mesh lives as long as the targets: its id is its own)
    return got


def _target_region(key: str, t: torch.Tensor, mesh: Any, spec: Any) -> tuple[torch.Tensor, ShardRuns] | None:
    coord = mesh.get_coordinate()
    if coord is None:
        return None
    order = getattr(spec, "shard_order", None)
    if order and not getattr(spec, "use_strided_shard_as_shard_order", False):
        for entry in order:
            if list(entry.mesh_dims) != sorted(entry.mesh_dims):
                raise LayoutError(f"key {key!r}: target shard_order {tuple(entry.mesh_dims)} for tensor dim "
                                  f"{entry.tensor_dim} is not left to right: not supported")
    runs = shard_runs(tuple(t.shape), tuple(mesh.shape), placements_of(key, t.placements), tuple(coord))
    local = t.to_local()
    if tuple(local.shape) != local_shape(runs):
        raise LayoutError(f"key {key!r}: target local tensor has shape {tuple(local.shape)}, its placements "
                          f"{tuple(t.placements)} give {local_shape(runs)}")
    return local, runs


# -- sources ---------------------------------------------------------------------------------

def _steps(layout: DLayout) -> tuple[tuple[tuple[int, int, Shard], ...], ...]:
    """Per tensor dim: ``(mesh dim, mesh size, placement)`` of the mesh dims sharding it."""
    per: list[list[tuple[int, int, Shard]]] = [[] for _ in layout.shape]
    for md, p in enumerate(layout.placements):
        if isinstance(p, Partial):
            raise LayoutError(f"saved placement {p} on mesh dim {md} is a partial value, not a slice")
        if isinstance(p, Shard):
            if not 0 <= p.dim < len(per):
                raise LayoutError(f"saved placement {p} on mesh dim {md} of a {len(per)}-d tensor")
            per[p.dim].append((md, layout.mesh.shape[md], p))
    return tuple(tuple(s) for s in per)


@lru_cache(maxsize=4096)
def _dim_options(n: int, steps: tuple[tuple[int, int, Shard], ...]) -> tuple[tuple[tuple[int, ...], DimRuns], ...]:
    """Every way the mesh dims in ``steps`` can split one dimension of size ``n``:
    ``(their coordinates, the runs held)``. Cached: many entries share a dim size.

    Raises:
        LayoutError: more than :data:`MAX_PLAN_RUNS` runs in all.
    """
    options: list[tuple[tuple[int, ...], DimRuns]] = [((), ((0, n),) if n else ())]
    for _md, k, p in steps:
        nxt: list[tuple[tuple[int, ...], DimRuns]] = []
        total = 0
        for coords, runs in options:
            for c in range(k):
                got = split_runs(runs, k, c, p)
                total += len(got) + 1
                if total > MAX_PLAN_RUNS:
                    raise LayoutError(f"saved placement {p} cuts a dimension of {n} into more than "
                                      f"{MAX_PLAN_RUNS} pieces over the mesh")
                nxt.append((coords + (c,), got))
        options = nxt
    return tuple(options)


@lru_cache(maxsize=4096)
def _dim_spans(n: int, steps: tuple[tuple[int, int, Shard], ...]) -> tuple[Any, np.ndarray, np.ndarray]:
    """:func:`_dim_options` with each option's bounding ``[lo, hi)`` as arrays: the options
    that may touch a target are found with one vectorised test, not a loop over all ranks."""
    options = _dim_options(n, steps)
    lo = np.array([r[0][0] if r else 0 for _c, r in options], dtype=np.int64)
    hi = np.array([r[-1][0] + r[-1][1] if r else 0 for _c, r in options], dtype=np.int64)
    if any(len(r) > 1 for _c, r in options):  # interleaved runs: bound by the min/max instead
        lo = np.array([min(g for g, _n in r) if r else 0 for _c, r in options], dtype=np.int64)
        hi = np.array([max(g + m for g, m in r) if r else 0 for _c, r in options], dtype=np.int64)
    return options, lo, hi


def _touches(a: DimRuns, b: DimRuns) -> bool:
    return any(max(g, h) < min(g + n, h + m) for g, n in a for h, m in b)


def dtensor_holders(layout: DLayout, dst: ShardRuns) -> list[tuple[ShardRuns, list[tuple[int, tuple[int, ...]]]]]:
    """The saved regions that overlap ``dst``, each with every ``(file rank, coordinate)``
    holding it (several: replicas).

    Raises:
        LayoutError: the saving mesh's rank map is unknown, or a placement is unmappable.
    """
    mesh = layout.mesh
    if mesh.groups is None:
        raise LayoutError("the saved DeviceMesh does not record its rank map (saved by an older torch?): "
                          "cannot tell which file holds which shard")
    steps = _steps(layout)
    if any(not runs for runs in dst):
        return []  # the target holds nothing
    per_dim = []
    for n, st, d in zip(layout.shape, steps, dst):
        options, lo, hi = _dim_spans(n, st)
        dlo, dhi = min(g for g, _m in d), max(g + m for g, m in d)
        near = np.flatnonzero((lo < dhi) & (hi > dlo)).tolist() if len(options) > 8 else range(len(options))
        opts = [options[i] for i in near if _touches(options[i][1], d)]
        if not opts:
            return []
        per_dim.append(opts)
    sharded_dims = [[md for md, _k, _p in st] for st in steps]
    free = [md for md in range(len(mesh.shape)) if not any(md in s for s in sharded_dims)]
    out = []
    for combo in itertools.product(*per_dim):
        coord = [0] * len(mesh.shape)
        for (coords, _runs), mds in zip(combo, sharded_dims):
            for md, c in zip(mds, coords):
                coord[md] = c
        region = tuple(runs for _coords, runs in combo)
        holders = []
        for free_vals in itertools.product(*(range(mesh.shape[md]) for md in free)):
            for md, c in zip(free, free_vals):
                coord[md] = c
            flat = 0
            for md, k in enumerate(mesh.shape):
                flat = flat * k + coord[md]
            for group in mesh.groups:
                holders.append((group[flat], tuple(coord)))
        out.append((region, holders))
    return out


def plan_job(key: str, path: RawPath, source: Any, target: torch.Tensor, dst: ShardRuns, *, home: int,
             own: int | None, nfiles: int, reading: set[int], spread: int,
             memo: dict[Any, Any] | None = None) -> ShardJob:
    """The pieces that fill one target shard.

    Args:
        source: The home file's entry: a :class:`DTensorRef` or a plain :class:`TensorRef`.
        target: The tensor to fill; ``dst`` its global region.
        home: The file ``source`` comes from (plain sources are read from it).
        own: This rank's own file, if it has one (preferred among replicas).
        nfiles: How many rank files the checkpoint has.
        reading: Files this rank already reads; updated with the files chosen.
        spread: This rank's index for spreading replicas over ranks (its rank).
        memo: A dict kept across the entries of one plan: entries of one layout, shape and
            target region share their holders and boxes.

    Raises:
        LayoutError: unmappable layouts, a file the checkpoint does not have, or a target
            region the files do not cover.
    """
    if isinstance(source, TensorRef):  # plain: whole in every file, read from home
        boxes = overlap(full_runs(tuple(source.size)), dst)
        reading.add(home)
        return ShardJob(key, path, target, (Piece(home, None, tuple(boxes)),) if boxes else (), source)
    if not isinstance(source, DTensorRef):
        raise LayoutError(f"key {key!r}: checkpoint holds {type(source).__name__}, not a tensor")
    layout = _layout_of(source, key)
    mkey = (id(layout.mesh), layout.shape, layout.placements, dst)
    hit = memo.get(mkey) if memo is not None else None
    if hit is None:
        hit = [_holders_and_boxes(key, layout, dst, nfiles), None, -1, None]
        if memo is not None:
            memo[mkey] = hit
    found, made, seen, picked_for = hit
    if seen == len(reading) and picked_for is reading:  # the files read when these were picked: same picks
        return ShardJob(key, path, target, made, source)
    before = len(reading)
    pieces = []
    for holders, boxes in found:
        pick = next((h for h in holders if h[0] in reading), None) \
            or next((h for h in holders if h[0] == own), None) \
            or holders[spread % len(holders)]
        reading.add(pick[0])
        pieces.append(Piece(pick[0], pick[1], boxes))
    made = tuple(pieces)
    if len(reading) == before:  # (`reading` only grows: the same size is the same set)
        hit[1:] = made, before, reading
    return ShardJob(key, path, target, made, source)


def _holders_and_boxes(key: str, layout: DLayout, dst: ShardRuns, nfiles: int
                       ) -> list[tuple[list[tuple[int, tuple[int, ...]]], tuple[Box, ...]]]:
    """The saved regions that fill ``dst``: each one's holders and boxes, checked."""
    out = []
    got = 0
    for region, holders in dtensor_holders(layout, dst):
        if not holders:
            continue
        bad = [f for f, _c in holders if not 0 <= f < nfiles]
        if bad:
            raise LayoutError(f"key {key!r}: the saved mesh places shards on rank {bad[0]}, but the checkpoint "
                              f"has {nfiles} rank file(s)")
        boxes = tuple(overlap(region, dst))
        got += sum(b.numel for b in boxes)
        out.append((holders, boxes))
    need = math.prod(local_shape(dst))
    if got != need:
        raise LayoutError(f"key {key!r}: the saved shards cover {got} of the {need} elements this rank needs")
    return out


def _layout_of(ref: DTensorRef, key: str, file: object = None) -> DLayout:
    """``ref.layout``, its error naming the key (and ``file``, where given)."""
    try:
        return ref.layout
    except CorruptCheckpointError as e:
        raise CorruptCheckpointError(e.reason, file=e.file or file, rank=e.rank, key=e.key or key) from None


def check_source(key: str, job_source: Any, entry: Any, piece: Piece, file: object) -> str | None:
    """Why ``entry`` (the same key in another rank file) cannot give ``piece``, or ``None``."""
    if isinstance(job_source, TensorRef):
        if not isinstance(entry, TensorRef) or tuple(entry.size) != tuple(job_source.size) \
                or entry.dtype != job_source.dtype:
            return f"{file} holds {entry!r} for {key!r}, not a {job_source.dtype} tensor of shape {job_source.size}"
        return None
    if not isinstance(entry, DTensorRef):
        return f"{file} holds {type(entry).__name__} for {key!r}, where the home file holds a DTensor"
    a, b = _layout_of(entry, key, file), job_source.layout
    if entry.dtype != job_source.dtype or a.shape != b.shape or a.placements != b.placements \
            or a.mesh.shape != b.mesh.shape:
        return (f"{file}: {key!r} is {entry.dtype} {a.shape} {a.describe()}, the home file says "
                f"{job_source.dtype} {b.shape} {b.describe()}")
    if a.mesh.coordinate is not None and piece.coordinate is not None and a.mesh.coordinate != piece.coordinate:
        return (f"{file}: {key!r} is at mesh coordinate {a.mesh.coordinate}, the saved rank map puts "
                f"coordinate {piece.coordinate} there")
    want = local_shape(a.runs_at(piece.coordinate)) if piece.coordinate is not None else None
    if want is not None and tuple(entry.local.size) != want:
        return f"{file}: {key!r} local tensor has shape {tuple(entry.local.size)}, its placements give {want}"
    return None


def _open_for(open_index: Any, f: int, key: str) -> Any:
    """``open_index(f)``, its error saying which key needed the file."""
    from dist_restore.errors import CheckpointError

    try:
        return open_index(f)
    except CheckpointError as e:
        raise type(e)(f"{e.reason} (rank file {f} holds part of {key!r})", file=e.file, rank=e.rank,
                      key=e.key or key) from e
    except OSError as e:
        raise type(e)(f"{e} (rank file {f} holds part of {key!r})") from e


_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)  # targets that are surely not DTensors


def split_leaves(leaves: Sequence[Any]) -> tuple[list[Any], list[Any]]:
    """Split planned leaves into ``(read as before, reshard)``.

    A DTensor entry read into nothing (``None``) or into a plain tensor of its local shard's
    shape becomes an ordinary read of its local tensor; a DTensor target, or a DTensor entry
    read into a plain tensor of the global shape, is resharded.
    """
    from dist_restore._planning.plan import PlannedLeaf

    plain, reshard = [], []
    for lf in leaves:
        src, t = lf.source, lf.target
        if (t is None or type(t) in _PLAIN_TENSORS) and not isinstance(src, DTensorRef):
            plain.append(lf)  # the common case, decided without a call
        elif is_dtensor(t):
            reshard.append(lf)
        elif isinstance(src, DTensorRef):
            if t is None or tuple(t.shape) == tuple(src.local.size):
                plain.append(PlannedLeaf(lf.key, lf.path, src.local, t))
            else:
                reshard.append(lf)
        else:
            plain.append(lf)
    return plain, reshard


@dataclass
class ShardPlan:
    """A rank's resharding reads, checked: every file opened, every entry matched.

    Attributes:
        jobs: One per target.
        indexes: ``{file rank: index}`` of every file a piece names.
        entries: ``{(file rank, key): the local record reference}``.
    """

    jobs: list[ShardJob]
    indexes: dict[int, Any]
    entries: dict[tuple[int, str], TensorRef]

    @property
    def files(self) -> list[int]:
        return sorted(self.indexes)


def plan_shards(leaves: Sequence[Any], *, home: int, home_index: Any, own: int | None, nfiles: int,
                open_index: Any, spread: int) -> ShardPlan:
    """Plan every reshard leaf (see :func:`split_leaves`) and open the files they need.

    Args:
        home, home_index: The file the leaves were planned against, and its index.
        own: This rank's own file, if it has one.
        nfiles: How many rank files the checkpoint has.
        open_index: ``file rank -> index`` (indexes a rank file; raises naming the file).
        spread: This rank's index for spreading replicas.

    Raises:
        LayoutError: an unmappable layout, or files that do not match the home file's layout.
        CorruptCheckpointError: a saved layout that cannot be read (naming the file and key).
    """
    try:
        return _plan_shards(leaves, home=home, home_index=home_index, own=own, nfiles=nfiles,
                            open_index=open_index, spread=spread)
    except CorruptCheckpointError as e:
        if e.file is not None:
            raise
        raise CorruptCheckpointError(e.reason, file=getattr(home_index, "file", None), rank=e.rank,
                                     key=e.key) from None


def _plan_shards(leaves: Sequence[Any], *, home: int, home_index: Any, own: int | None, nfiles: int,
                 open_index: Any, spread: int) -> ShardPlan:
    reading: set[int] = {own} if own is not None and own == home else set()
    jobs = []
    regions: dict[Any, Any] = {}
    memo: dict[Any, Any] = {}
    for lf in leaves:
        got = target_region(lf.key, lf.target, regions)
        if got is None:
            continue
        target, dst = got
        jobs.append(plan_job(lf.key, lf.path, lf.source, target, dst, home=home, own=own, nfiles=nfiles,
                             reading=reading, spread=spread, memo=memo))
    indexes: dict[int, Any] = {home: home_index}
    agreed: dict[Any, Any] = {}  # see _agree
    entries = _entries_by_file(jobs, indexes, open_index, agreed)
    if entries is None:  # something to say: said as the checks one by one find it first
        entries = _entries_in_order(jobs, indexes, open_index, agreed)
    return ShardPlan(jobs, indexes, entries)


def _entries_in_order(jobs: list[ShardJob], indexes: dict[int, Any], open_index: Any, agreed: dict[Any, Any]
                      ) -> dict[tuple[int, str], TensorRef]:
    """Every piece's entry, checked: files opened, and entries checked, job by job.

    Raises:
        LayoutError: the first piece whose entry is missing or does not match.
    """
    entries: dict[tuple[int, str], TensorRef] = {}
    for job in jobs:
        for piece in job.pieces:
            f = piece.file
            index = indexes.get(f)
            if index is None:
                index = indexes[f] = _open_for(open_index, f, job.key)
            try:
                entry = index.entry_at(job.path)
            except KeyError:
                raise LayoutError(f"{index.file} has no entry {job.key!r}, which holds part of this rank's "
                                  "shard") from None
            entries[(f, job.key)] = _checked(job, entry, piece, index.file, agreed)
    return entries


def _checked(job: ShardJob, entry: Any, piece: Piece, file: object, agreed: dict[Any, Any]) -> TensorRef:
    """``entry``'s local record reference, checked in full (:func:`check_source`, the view's bounds).

    Raises:
        LayoutError: naming the file and key.
    """
    problem = check_source(job.key, job.source, entry, piece, file)
    if problem is None:
        local = entry.local if isinstance(entry, DTensorRef) else entry
        bounds = view_out_of_bounds(local)
        problem = f"{file}: {job.key!r}: {bounds}" if bounds else None
    if problem:
        raise LayoutError(problem)
    _agree(entry, job.source, piece, agreed)
    return local  # type: ignore[no-any-return]


def _entries_by_file(jobs: list[ShardJob], indexes: dict[int, Any], open_index: Any, agreed: dict[Any, Any]
                     ) -> dict[tuple[int, str], TensorRef] | None:
    """:func:`_entries_in_order`'s result, file by file: each file's entries looked up in one
    call (an index file makes its rows in one loop), and the entries whose layouts were
    checked already (:func:`_agree`: an index file's rows of one layout share it) checked by
    their own fields inline. ``None`` when a file cannot be opened or an entry is missing or
    does not match: :func:`_entries_in_order` then finds the first problem in job order."""
    by_file: dict[int, list[tuple[ShardJob, Piece]]] = {}
    for job in jobs:
        for piece in job.pieces:
            got = by_file.get(piece.file)
            if got is None:
                got = by_file[piece.file] = []
            got.append((job, piece))
    entries: dict[tuple[int, str], TensorRef] = {}
    for f, items in by_file.items():
        index = indexes.get(f)
        if index is None:
            try:
                index = indexes[f] = _open_for(open_index, f, items[0][0].key)
            except Exception:  # noqa: BLE001 - raised again in order
                return None
        try:
            paths = [job.path for job, _p in items]
            shards = index.dtensor_locals(paths) if hasattr(index, "dtensor_locals") else None
            if shards is None:  # (check_source compares the DTensor's dtype; the fast path, its local's)
                shards = [(e.local, e.layout) if e.__class__ is DTensorRef
                          and e.dtype == getattr(e.local, "dtype", None) else None for e in index.entries_at(paths)]
        except Exception:  # noqa: BLE001 - (a row the index file holds wrong) raised again in order
            return None
        for (job, piece), got in zip(items, shards):
            # an entry of a layout checked already (_agree): its own fields, inline; else in full
            src = job.source
            local = None
            if got.__class__ is tuple and src.__class__ is DTensorRef:
                local, a = got
                b = src.__dict__.get("layout")
                hit = agreed.get((id(a), id(b), piece.coordinate)) if a is not None and b is not None else None
                if hit is not None and hit[2] is None:
                    hit[2] = local_shape(a.runs_at(piece.coordinate))
                if hit is None or local.__class__ is not TensorRef or local.dtype != src.dtype \
                        or local.size != hit[2] or not _fits(local):
                    local = None
            if local is None:
                try:
                    local = _checked(job, index.entry_at(job.path), piece, index.file, agreed)
                except Exception:  # noqa: BLE001 - (KeyError: no such entry) raised again in order
                    return None
            entries[(f, job.key)] = local
    return entries


def _fits(ref: TensorRef) -> bool:
    """``view_out_of_bounds(ref) is None`` for a :class:`TensorRef`, inline."""
    lo = hi = ref.storage_offset
    size, stride = ref.size, ref.stride
    if len(size) == 2 == len(stride):  # most of a model's sharded weights
        n, m = size
        st, su = stride
        if n and m and st >= 0 and su >= 0:
            rec = ref.storage
            hi += (n - 1) * st + (m - 1) * su
            return lo >= 0 and (hi + 1) * ref.dtype.itemsize <= rec.numel * rec.dtype.itemsize
    for n, st in zip(size, stride):
        if n == 0:
            return True
        if st >= 0:
            hi += (n - 1) * st
        else:
            lo += (n - 1) * st
    # (an empty size: one element; sizes longer than strides: element_span's zip, and numel's prod)
    if len(size) > len(stride) and 0 in size[len(stride):]:
        return True
    rec = ref.storage
    return lo >= 0 and (hi + 1) * ref.dtype.itemsize <= rec.numel * rec.dtype.itemsize


def _agree(entry: Any, source: Any, piece: Piece, agreed: dict[Any, Any]) -> None:
    """Remember that ``entry``'s layout passed :func:`check_source` against ``source``'s for
    ``piece``'s coordinate: the layouts of an index file's rows are one object per distinct
    layout, so the other entries of those layouts need only the checks of their own fields
    (dtype, local shape, bounds). The layouts are held, so that their ids stay their own."""
    if entry.__class__ is DTensorRef and source.__class__ is DTensorRef and piece.coordinate is not None:
        a, b = entry.__dict__.get("layout"), source.__dict__.get("layout")
        if a is not None and b is not None:
            agreed.setdefault((id(a), id(b), piece.coordinate), [a, b, None])  # the local shape: at the first use


__all__ = ["Piece", "ShardJob", "check_source", "dtensor_holders", "is_dtensor", "plan_job",
           "placements_of", "target_region"]
