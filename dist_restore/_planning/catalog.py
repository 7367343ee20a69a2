"""Planning a restore from a :class:`~dist_restore._format.catalog.Catalog`: target regions onto chunks.

Pure: no tensor data is read and no collective is called. For each target key the plan
finds its file key (``key_map``), checks dtype and shape, takes the target's global region
(a DTensor's local shard on its mesh, or the whole tensor) and intersects it with the
chunks that hold the key; each overlap is a :class:`~dist_restore._base.regions.Box`
that the byte mover (:mod:`dist_restore._bytes.ranges`) turns into byte ranges of the file.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from dist_restore._base.regions import Box, ShardRuns, full_runs, overlap
from dist_restore._format.catalog import Catalog, CatalogEntry, Chunk, flatten
from dist_restore._planning.reshard import is_dtensor, target_region

KeyMap = Mapping[str, "str | None"] | Callable[[str], "str | None"] | None


@dataclass(frozen=True, slots=True, eq=False)
class CatalogJob:
    """One target tensor to fill from chunks.

    Attributes:
        key: The target's key (dotted path in the target state dict).
        file_key: The key in the files.
        target: The tensor to fill (a DTensor target's local tensor; allocated for ``None``).
        dtype: The files' dtype (the target's, unless cast).
        pieces: ``(chunk, boxes)``: copies from the chunk (its local, row-major
            coordinates) into the target.
    """

    key: str
    file_key: str
    target: torch.Tensor
    dtype: torch.dtype
    pieces: tuple[tuple[Chunk, tuple[Box, ...]], ...]

    @property
    def nbytes(self) -> int:
        return sum(b.numel for _c, boxes in self.pieces for b in boxes) * self.dtype.itemsize


@dataclass(frozen=True, slots=True, eq=False)
class ObjectJob:
    """One non-tensor value to load (a DCP ``BytesStorageMetadata`` entry).

    Attributes:
        key: The target's key.
        file_key: The key in the checkpoint.
        parent: The container it goes into (``None``: no target, a new value).
        slot: Its key (or index) in ``parent``.
    """

    key: str
    file_key: str
    parent: Any
    slot: Any


@dataclass
class CatalogPlan:
    """What one rank reads from a catalogue, and what its target lacks.

    Attributes:
        catalog: The source.
        jobs: The targets to fill.
        missing: Target keys the files do not hold.
        unexpected: File keys no target key asked for (only when a target was given).
        mismatched: ``(key, why)`` for targets whose dtype or shape differs.
        values: ``{target key: tensor}`` of the result (targets, and allocated tensors).
        tied: Target keys not in the files whose tensor is another target's (tied weights).
        assign: ``(dict, key, value)`` of allocated ``None`` targets and loaded values, put in
            place by :meth:`result`.
        objects: Non-tensor values to load.
        object_bytes: Bytes read to load them.
    """

    catalog: Catalog
    jobs: list[CatalogJob] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, str]] = field(default_factory=list)
    values: dict[str, Any] = field(default_factory=dict)
    tied: list[str] = field(default_factory=list)
    assign: list[tuple[Any, Any, Any]] = field(default_factory=list)
    objects: list[ObjectJob] = field(default_factory=list)
    object_bytes: int = 0
    subtrees: list[tuple[Any, Any, str, tuple[str, ...]]] = field(default_factory=list)

    def result(self, state_dict: Mapping[str, Any] | None) -> dict[str, Any]:
        """The restored state dict: the target, its ``None`` values replaced by the tensors
        allocated for them (call after the read) and a ``None`` that stands for a whole subtree
        of the checkpoint by that subtree; a new dict for ``None``."""
        if state_dict is None:
            return self.catalog.source.nest(self.values)
        for parent, k, t in self.assign:
            parent[k] = t
        for parent, k, prefix, keys in self.subtrees:
            flat = {sk: self.values[sk] for sk in keys if sk in self.values}
            parent[k] = _subtree(self.catalog.source.nest(flat), prefix, flat)
        return state_dict  # type: ignore[return-value]

    @property
    def files(self) -> set[str]:
        """The files this rank reads bytes from."""
        return {c.file for job in self.jobs for c, boxes in job.pieces if any(b.numel for b in boxes)}


def _subtree(nested: Any, prefix: str, flat: dict[str, Any]) -> Any:
    """The part of ``nested`` (a format's nesting of ``flat``) at dotted key ``prefix``; where the
    format does not nest (safetensors), the flat keys below ``prefix``, relative to it."""
    cur, at = nested, ""
    while at != prefix:
        if not isinstance(cur, Mapping):
            break
        step = next((c for c in cur if prefix == (nxt := f"{at}.{c}" if at else str(c))
                     or prefix.startswith(nxt + ".")), None)
        if step is None:
            break
        at = f"{at}.{step}" if at else str(step)
        cur = cur[step]
    if at == prefix:
        return cur
    return {sk[len(prefix) + 1:]: v for sk, v in flat.items()}


def map_key(key_map: KeyMap, key: str) -> str | None:
    """The file key of target key ``key`` (``None``: skipped)."""
    if key_map is None:
        return key
    if callable(key_map):
        out = key_map(key)
    else:
        out = key_map.get(key, key)
    if out is not None and not isinstance(out, str):
        raise TypeError(f"key_map gave {out!r} for {key!r}: a file key (str) or None to skip")
    return out


def _storage_id(t: Any) -> tuple[Any, ...] | None:
    local = t.to_local() if is_dtensor(t) else t
    if not isinstance(local, torch.Tensor) or local.device.type == "meta":
        return None
    return (local.untyped_storage().data_ptr(), local.storage_offset(), tuple(local.shape), tuple(local.stride()),
            local.dtype)


def plan_catalog(catalog: Catalog, all_keys: tuple[str, ...], state_dict: Mapping[str, Any] | None, *,
                 key_map: KeyMap = None, cast: bool = False, device: torch.device | None = None) -> CatalogPlan:
    """This rank's plan: which chunk boxes fill which targets.

    Args:
        catalog: The source (holding at least the entries the targets need).
        all_keys: Every key of the checkpoint (for the unexpected-key report).
        state_dict: Flat or nested dicts of tensors, DTensors or ``None`` (allocated);
            ``None``: every key, allocated.
        key_map: Target key -> file key (a dict, or a callable; ``None`` skips the key).
        cast: Allow a file dtype other than the target's (cast while copying).
        device: Where ``None`` targets are allocated (default: CPU).

    Raises:
        LayoutError: a DTensor placement the region math cannot map.
    """
    plan = CatalogPlan(catalog)
    device = device or torch.device("cpu")
    entries = catalog.entries
    objects = catalog.objects
    if state_dict is None:
        for key in all_keys:
            e = entries.get(key)
            if e is None:
                if key in objects:
                    plan.objects.append(ObjectJob(key, key, None, None))
                continue
            t = torch.empty(e.shape, dtype=e.dtype, device=device)
            plan.values[key] = t
            _add(plan, key, key, e, t, full_runs(e.shape))
        return _located(plan)
    claimed: set[str] = set()
    found_ids: dict[tuple[Any, ...], str] = {}
    lost: list[tuple[str, Any]] = []
    for key, parent, k, value in catalog.source.flatten(state_dict):
        fkey = map_key(key_map, key)
        if fkey is None:
            continue
        e = entries.get(fkey)
        if e is None:
            if fkey in objects:
                claimed.add(fkey)
                if isinstance(value, torch.Tensor):
                    named = f" as {fkey!r}" if fkey != key else ""
                    plan.mismatched.append((key, f"target is a tensor, the checkpoint holds a non-tensor value{named}"))
                else:
                    plan.objects.append(ObjectJob(key, fkey, parent, k))
                continue
            below = [sk for sk in all_keys if sk.startswith(fkey + ".")] if value is None else []
            if below:  # a None that stands for a whole subtree of the checkpoint (extra, rng, ...)
                for sk in below:
                    claimed.add(sk)
                    se = entries.get(sk)
                    if se is not None:
                        t = torch.empty(se.shape, dtype=se.dtype, device=device)
                        plan.values[sk] = t
                        _add(plan, sk, sk, se, t, full_runs(se.shape))
                    elif sk in objects:
                        plan.objects.append(ObjectJob(sk, sk, None, None))
                plan.subtrees.append((parent, k, fkey, tuple(below)))
                continue
            lost.append((key, value))
            continue
        claimed.add(fkey)
        if value is None:
            t = torch.empty(e.shape, dtype=e.dtype, device=device)
            plan.assign.append((parent, k, t))  # into the target's dict once every rank has planned
            plan.values[key] = t
            _add(plan, key, fkey, e, t, full_runs(e.shape))
            continue
        if not isinstance(value, torch.Tensor):
            plan.mismatched.append((key, f"target is {type(value).__name__}, the file holds a tensor"))
            continue
        why = _mismatch(key, fkey, value, e, cast)
        if why:
            plan.mismatched.append((key, why))
            continue
        plan.values[key] = value
        got = target_region(key, value)
        if got is None:  # a DTensor whose mesh does not include this rank
            continue
        local, runs = got
        sid = _storage_id(local)
        if sid is not None:
            found_ids[sid] = key
        _add(plan, key, fkey, e, local, runs)
    for key, value in lost:
        sid = _storage_id(value) if isinstance(value, torch.Tensor) else None
        if sid is not None and sid in found_ids:
            plan.tied.append(key)
        else:
            plan.missing.append(key)
    plan.unexpected = [k for k in all_keys if k not in claimed]
    return _located(plan)


def _located(plan: CatalogPlan) -> CatalogPlan:
    """The plan with each chunk it reads resolved by the format (exact offsets, strides, CRC32:
    DCP reads its items' framing here, in the plan phase, so a malformed item fails before any
    target is touched)."""
    needed = {}
    entries = plan.catalog.entries
    for job in plan.jobs:
        for chunk, _boxes in job.pieces:
            needed.setdefault(chunk, (entries[job.file_key], chunk))
    if not needed:
        return plan
    where = plan.catalog.source.locate(plan.catalog, list(needed.values()))
    if all(where[c] is c for c in needed):
        return plan
    plan.jobs = [replace(job, pieces=tuple((where[c], boxes) for c, boxes in job.pieces)) for job in plan.jobs]
    return plan


def _mismatch(key: str, fkey: str, t: torch.Tensor, e: CatalogEntry, cast: bool) -> str | None:
    where = f"{e.chunks[0].file!r}" if e.chunks else "the checkpoint"
    named = f" as {fkey!r}" if fkey != key else ""
    if tuple(t.shape) != e.shape:
        return f"target shape {tuple(t.shape)}, {where} holds {e.shape}{named}"
    if t.dtype != e.dtype and not cast:
        return f"target dtype {t.dtype}, {where} holds {e.dtype}{named}; pass cast=True to cast while copying"
    return None


def _add(plan: CatalogPlan, key: str, fkey: str, e: CatalogEntry, target: torch.Tensor, dst: ShardRuns) -> None:
    pieces = []
    for chunk in e.chunks:
        src = tuple(((s, n),) if n else () for s, n in zip(chunk.start, chunk.size))
        boxes = tuple(b for b in overlap(src, dst) if b.numel)
        if boxes:
            pieces.append((chunk, boxes))
    plan.jobs.append(CatalogJob(key, fkey, target, e.dtype, tuple(pieces)))


__all__ = ["CatalogJob", "CatalogPlan", "KeyMap", "ObjectJob", "flatten", "map_key", "plan_catalog"]
