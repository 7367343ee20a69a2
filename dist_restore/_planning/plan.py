"""Which entries to read, for one rank: pure functions over an index tree and a target.

The walk follows the reference reader's rules:
- a ``None`` target (at the root or any level) loads the whole subtree from the file;
- a dict target loads only the keys it names; a list/tuple target only its positions;
- a tensor target is filled in place after a shape/dtype check;
- any other target value is replaced by the file's value.
Keys the target names that the file lacks are *missing*; keys the file has under a level
the target named, that the target does not ask for, are *unexpected*.

:func:`plan_read` only looks; :func:`assemble` builds the result once values exist, so
nothing in the target is touched before the whole plan has been checked.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Mapping, MutableMapping, MutableSequence
from dataclasses import dataclass
from math import prod
from typing import Any, NamedTuple

import torch
from torch import Tensor

from dist_restore._format.dtensor import DTensorRef
from dist_restore._format.index import SOURCE_TENSOR_TYPES, iter_leaves
from dist_restore._format.keypath import RawPath, join_index, join_key
from dist_restore._format.unpickle import MAX_NESTING, ExoticRef, StorageRef, TensorRef, deep_key
from dist_restore.errors import CorruptCheckpointError


class PlannedLeaf(NamedTuple):
    """One tensor-like value to produce.

    A named tuple rather than a frozen dataclass, as ``SharedItem``: one is made per tensor of
    the plan, and it builds ~4x faster (a frozen dataclass's ``__init__`` was half of planning
    10,000 small tensors). Compared and hashed by identity, as the dataclass was (``eq=False``):
    a leaf holds tensors, whose ``==`` is elementwise.

    Attributes:
        key: Dotted key path.
        path: Raw path (dict keys / positions) from the root.
        source: The file's reference (TensorRef, ExoticRef, StorageRef) or, for legacy
            files, the loaded tensor.
        target: The preallocated tensor to fill in place, or ``None`` to allocate.
    """

    key: str
    path: RawPath
    source: Any
    target: torch.Tensor | None

    def __eq__(self, other: object) -> bool:
        return self is other

    def __ne__(self, other: object) -> bool:
        return self is not other

    __hash__ = object.__hash__


@dataclass(frozen=True, slots=True)
class ReadPlan:
    """What a rank reads. ``mismatched`` non-empty means the plan must not run.

    Attributes:
        leaves: Tensor values to produce, in file order of discovery.
        missing: Keys the target names that the file lacks.
        unexpected: Keys in the file under a level the target named, not asked for.
        mismatched: ``(key, message)`` for every structure/shape/dtype conflict.
        objects: ``(key, raw path, value)`` of every non-tensor leaf the result takes
            from the file.
    """

    leaves: tuple[PlannedLeaf, ...]
    missing: tuple[str, ...]
    unexpected: tuple[str, ...]
    mismatched: tuple[tuple[str, str], ...]
    objects: tuple[tuple[str, RawPath, Any], ...] = ()

    @property
    def nbytes(self) -> int:
        """Bytes of tensor elements this plan produces."""
        return sum(source_nbytes(leaf.source) for leaf in self.leaves)


def source_meta(src: Any) -> tuple[torch.dtype | None, tuple[int, ...] | None]:
    """``(dtype, shape)`` of a source value, where known."""
    if isinstance(src, (TensorRef, DTensorRef)):
        return src.dtype, src.size
    if isinstance(src, torch.Tensor):
        return src.dtype, tuple(src.shape)
    if isinstance(src, ExoticRef):
        return src.dtype, src.size
    if isinstance(src, StorageRef):
        return src.dtype, (src.numel,)
    return None, None


def source_nbytes(src: Any) -> int:
    if isinstance(src, (TensorRef, StorageRef, DTensorRef)):
        return src.nbytes
    if isinstance(src, ExoticRef):
        return sum(s.nbytes for s in src.storages)
    if isinstance(src, torch.Tensor):
        return src.numel() * src.element_size()
    return 0


def _describe(v: Any) -> str:
    if isinstance(v, SOURCE_TENSOR_TYPES):
        dtype, shape = source_meta(v)
        return f"a tensor ({dtype}, shape {tuple(shape) if shape is not None else '?'})"
    return f"a {type(v).__name__}"


def check_tensor(key: str, target: torch.Tensor, src: Any) -> str | None:
    """The mismatch message for filling ``target`` from ``src``, or ``None`` if it fits."""
    dtype, shape = source_meta(src)
    problems = []
    if isinstance(src, DTensorRef) and tuple(target.shape) == tuple(src.local.size) \
            and type(target).__name__ != "DTensor":
        shape = tuple(src.local.size)  # a plain tensor of the local shard's shape: the shard itself
    if shape is not None and tuple(target.shape) != tuple(shape):
        problems.append(f"shape {tuple(shape)} in checkpoint, {tuple(target.shape)} in target")
    if dtype is not None and target.dtype != dtype:
        problems.append(f"dtype {dtype} in checkpoint, {target.dtype} in target")
    return "; ".join(problems) if problems else None


def view_out_of_bounds(src: Any) -> str | None:
    """Why a dense tensor view cannot lie in its storage record, or ``None`` if it does."""
    if src.__class__ is not TensorRef:
        if isinstance(src, DTensorRef):
            src = src.local
        if not isinstance(src, TensorRef):
            return None
    if src.numel == 0:
        return None
    lo, hi = src.element_span()
    if lo < 0 or hi * src.dtype.itemsize > src.storage.nbytes:
        return (f"tensor view (offset {src.storage_offset}, size {src.size}, stride {src.stride}) "
                f"lies outside its {src.storage.nbytes}-byte storage record")
    return None


def first_out_of_bounds(leaves: Iterable[PlannedLeaf]) -> tuple[PlannedLeaf, str] | None:
    """The first leaf whose source :func:`view_out_of_bounds` rejects, with why; ``None`` if all fit.

    The same checks, with the common case (a dense ``TensorRef``) inline: one function call per
    tensor is most of the cost for files of many small tensors.
    """
    for leaf in leaves:
        src = leaf.source
        if type(src) is TensorRef:
            size, stride = src.size, src.stride
            if len(size) == 1 == len(stride):
                n, st = size[0], stride[0]
                if n == 0:
                    continue
                lo = hi = src.storage_offset
                if st >= 0:
                    hi += (n - 1) * st
                else:
                    lo += (n - 1) * st
            else:
                if prod(size) == 0:
                    continue
                lo, hi = src.element_span()
                hi -= 1
            rec = src.storage
            if lo >= 0 and (hi + 1) * src.dtype.itemsize <= rec.numel * rec.dtype.itemsize:
                continue
        problem = view_out_of_bounds(src)
        if problem:
            return leaf, problem
    return None


def plan_read(target: Any, tree: Any, leaf: Callable[[int], Any] | None = None) -> ReadPlan:
    """Match ``target`` (a state dict, or ``None`` for everything) against an index tree.

    Args:
        leaf: With a skeleton (an index file's tree, leaves as row numbers: see
            :attr:`CheckpointIndex.walkable`), turns a row into its reference or value;
            only the rows the walk reaches are made.
    """
    leaves: list[PlannedLeaf] = []
    missing: list[str] = []
    unexpected: list[str] = []
    mismatched: list[tuple[str, str]] = []
    objects: list[tuple[str, RawPath, Any]] = []
    skeleton = leaf is not None

    def take_all(src: Any, key: str, path: RawPath, raw: bool) -> None:
        for k, p, v in iter_leaves(src, key, path):
            if raw:
                v = leaf(v)  # type: ignore[misc]
            if isinstance(v, SOURCE_TENSOR_TYPES):
                leaves.append(PlannedLeaf(k, p, v, None))
            else:
                objects.append((k, p, v))

    def walk(t: Any, s: Any, key: str, path: RawPath) -> None:
        raw = skeleton
        if raw and type(s) is int:
            s = leaf(s)  # type: ignore[misc]
            raw = False
        if t is None:
            take_all(s, key, path, raw)
        elif isinstance(s, SOURCE_TENSOR_TYPES):
            if isinstance(t, torch.Tensor):
                # most leaves: a dense record into a tensor of its dtype and shape
                fits = s.__class__ is TensorRef and t.dtype == s.dtype and t.shape == s.size
                problem = None if fits else check_tensor(key, t, s)
                if problem:
                    mismatched.append((key, problem))
                else:
                    leaves.append(PlannedLeaf(key, path, s, t))
            else:
                mismatched.append((key, f"checkpoint holds {_describe(s)}, target holds {_describe(t)}"))
        elif isinstance(t, torch.Tensor):
            mismatched.append((key, f"checkpoint holds {_describe(s)}, target holds {_describe(t)}"))
        elif isinstance(t, Mapping):
            if not isinstance(s, Mapping):
                mismatched.append((key, f"checkpoint holds {_describe(s)}, target holds a mapping"))
                return
            dot = key + "." if key else ""
            for k, tv in t.items():
                sub = dot + k if type(k) is str else join_key(key, k)
                if k not in s:
                    missing.append(sub)
                    continue
                sv = s[k]
                rv = leaf(sv) if skeleton and sv.__class__ is int else sv  # type: ignore[misc]
                # what walk() does with a dense record into a tensor of its dtype and shape, or a
                # DTensor into a target of its global shape (a DTensor: resharded), without the call
                if (tv.__class__ is Tensor and rv.__class__ is TensorRef
                        or rv.__class__ is DTensorRef and isinstance(tv, Tensor)) \
                        and tv.dtype == rv.dtype and tv.shape == rv.size:
                    leaves.append(PlannedLeaf(sub, path + (k,), rv, tv))
                else:
                    walk(tv, sv, sub, path + (k,))
            # keys of a level the target names but does not ask for: often most of the file
            unexpected.extend([f"{key}.{k}" if key else str(k) for k in s if k not in t])  # join_key, inlined
        elif _is_sequence(t) and not isinstance(s, torch.Size):
            if not isinstance(s, (list, tuple)):
                mismatched.append((key, f"checkpoint holds {_describe(s)}, target holds a {type(t).__name__}"))
                return
            for i, tv in enumerate(t):
                if i < len(s):
                    walk(tv, s[i], join_index(key, i), path + (i,))
                else:
                    missing.append(join_index(key, i))
            unexpected.extend(join_index(key, i) for i in range(len(t), len(s)))
        else:
            take_all(s, key, path, raw)  # a plain value is replaced by the file's value

    if target is not None and not isinstance(target, Mapping):
        raise TypeError(f"state_dict must be a mapping or None, got {type(target).__name__}")
    try:
        walk(target, tree, "", ())
    finally:
        del walk  # a recursive closure is a reference cycle: break it, or the cyclic GC frees the lists
    return ReadPlan(tuple(leaves), tuple(missing), tuple(unexpected), tuple(mismatched), tuple(objects))


def assemble(target: Any, tree: Any, values: Mapping[RawPath, Any], leaf: Callable[[int], Any] | None = None) -> Any:
    """Build the result: fill ``target`` containers in place, values from ``values``.

    Args:
        target: The target given to :func:`plan_read` (containers are mutated in place;
            tuples are rebuilt).
        tree: The same index tree.
        values: ``{raw path: produced tensor}`` for every leaf of the plan whose target
            was ``None`` (filled targets may be absent: they are kept); may also hold
            replacements for non-tensor leaves (shared values received from another rank).
        leaf: As for :func:`plan_read`.
    """

    def build(src: Any, path: RawPath, raw: bool) -> Any:
        if raw and type(src) is int:
            src, raw = leaf(src), False  # type: ignore[misc]
        if isinstance(src, Mapping):
            if len(path) >= MAX_NESTING:  # (the index checked it; this recursion relies on it)
                raise _too_deep(path)
            out = type(src)() if type(src) in _PLAIN_MAPPINGS else {}
            for k, v in src.items():
                out[k] = build(v, path + (k,), raw)
            return out
        if isinstance(src, list):
            if len(path) >= MAX_NESTING:
                raise _too_deep(path)
            return [build(v, path + (i,), raw) for i, v in enumerate(src)]
        if _is_sequence(src):
            if len(path) >= MAX_NESTING:
                raise _too_deep(path)
            return _rebuild_tuple(src, [build(v, path + (i,), raw) for i, v in enumerate(src)])
        if isinstance(src, SOURCE_TENSOR_TYPES):
            return values[path]
        return values.get(path, src) if values else src

    raw = leaf is not None

    def walk(t: Any, s: Any, path: RawPath) -> Any:
        if raw and type(s) is int:
            s = leaf(s)  # type: ignore[misc]
            if t is None or not isinstance(s, SOURCE_TENSOR_TYPES):
                return build(s, path, False)
        if t is None:
            return build(s, path, raw)
        if isinstance(s, SOURCE_TENSOR_TYPES):
            return values.get(path, t)
        if isinstance(t, Mapping):
            if isinstance(t, MutableMapping):
                for k in list(t.keys()):
                    if k in s:
                        tv, sv = t[k], s[k]
                        rv = leaf(sv) if raw and sv.__class__ is int else sv  # type: ignore[misc]
                        if tv is not None and rv.__class__ is TensorRef:  # walk()'s answer, without the call
                            t[k] = values.get(path + (k,), tv)
                        else:
                            t[k] = walk(tv, sv, path + (k,))
                return t
            return {k: (walk(v, s[k], path + (k,)) if k in s else v) for k, v in t.items()}
        if _is_sequence(t) and not isinstance(s, torch.Size):
            items = [walk(v, s[i], path + (i,)) if i < len(s) else v for i, v in enumerate(t)]
            if isinstance(t, MutableSequence):
                t[:] = items
                return t
            return _rebuild_tuple(t, items)
        return build(s, path, raw)

    try:
        return walk(target, tree, ())
    finally:
        del walk, build  # recursive closures are reference cycles (see plan_read)


_PLAIN_MAPPINGS = (dict, collections.OrderedDict, collections.Counter)  # what the unpickler makes


def _too_deep(path: RawPath) -> CorruptCheckpointError:
    key = ""
    for p in path:
        key = join_index(key, p) if type(p) is int else join_key(key, p)
    return CorruptCheckpointError(f"the tree nests deeper than {MAX_NESTING} levels (dist_restore's limit)",
                                  key=deep_key(key) if key else None)


def _is_sequence(v: Any) -> bool:
    """A list or tuple whose items are walked; a ``torch.Size`` is a value, as an int is."""
    return isinstance(v, (list, tuple)) and not isinstance(v, torch.Size)


def _rebuild_tuple(like: tuple[Any, ...], items: list[Any]) -> tuple[Any, ...]:
    if type(like) is tuple:
        return tuple(items)
    if isinstance(like, torch.Size):  # takes one iterable, not the items
        return torch.Size(items)
    try:
        return type(like)(*items)  # namedtuple
    except TypeError:
        return tuple(items)
