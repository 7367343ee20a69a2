"""Shared (replicated) entries: which they are, who reads them, how they travel.

Pure functions, identical on every rank given the same inputs: the coordinator feeds
them the canonical list of shared entries (gathered from all ranks) so that every rank
derives the same owners and bucket layout and so issues the same collectives.
"""

from __future__ import annotations

import fnmatch
import hashlib
import heapq
from array import array
from collections.abc import Callable, Container, Iterable, Sequence
from dataclasses import dataclass
from itertools import chain, repeat
from math import prod
from operator import add
from typing import Any, Literal, NamedTuple

import torch

from dist_restore._format.unpickle import TensorRef

SharedMode = Literal["broadcast", "spread", "local"]
SharedSpec = str | Sequence[str] | Callable[[str], bool] | None


def make_selector(shared: SharedSpec) -> Callable[[str], bool]:
    """A predicate on dotted key paths from ``shared``.

    ``shared`` is ``None`` (nothing is shared), a predicate, or one or more patterns: a
    pattern with ``*``, ``?`` or ``[`` is a glob (``fnmatch``) on the whole key; any other
    string is a key-path prefix (``"model"`` selects ``model``, ``model.w``, ``model[0]``,
    not ``model2``). A prefix may end with the separator, as torch writes prefixes
    (``consume_prefix_in_state_dict_if_present(sd, "module.")``): ``"model."`` selects
    what ``"model"`` does. The rules of every key pattern the project takes (``shared=``,
    the CLI's ``--keys``, the trainer hooks).

    Raises:
        TypeError: a pattern is not a string.
        ValueError: a pattern is empty (or only separators).
    """
    if shared is None:
        return lambda key: False
    if callable(shared):
        return shared
    patterns = _patterns(shared)
    globs = [p for p in patterns if _is_glob(p)]
    prefixes = tuple(_prefix(p) for p in patterns if not _is_glob(p))
    dotted = tuple(p + "." for p in prefixes) + tuple(p + "[" for p in prefixes)

    def select(key: str) -> bool:
        if key in prefixes or key.startswith(dotted):
            return True
        return any(fnmatch.fnmatchcase(key, g) for g in globs)

    return select


def unmatched_patterns(shared: SharedSpec, selected: Iterable[str]) -> list[str]:
    """The patterns of ``shared`` that select none of the keys ``selected`` (the keys the
    whole spec selected); a predicate counts as one pattern, named by its ``__qualname__``.

    Cheap: each pattern is tried on the selected keys until one matches.
    """
    if shared is None:
        return []
    keys = list(selected)
    if callable(shared):
        return [] if keys else [getattr(shared, "__qualname__", repr(shared))]
    return [p for p in _patterns(shared) if not any(map(make_selector(p), keys))]


def _patterns(shared: str | Sequence[str]) -> list[str]:
    patterns = [shared] if isinstance(shared, str) else list(shared)
    for p in patterns:
        if not isinstance(p, str):
            raise TypeError(f"shared patterns must be strings, got {type(p).__name__}: {p!r}")
        if not _is_glob(p) and not _prefix(p):
            raise ValueError(f"shared pattern {p!r} is empty: give a key prefix ('model', 'model.') "
                             "or a glob ('*.bias')")
    return patterns


def _is_glob(p: str) -> bool:
    return any(c in p for c in "*?[")


def _prefix(p: str) -> str:
    """``"model."`` -> ``"model"``: a trailing separator adds nothing to a key-path prefix."""
    return p.rstrip(".")


class SharedItem(NamedTuple):
    """One shared tensor in the canonical list: the same on every rank.

    A named tuple rather than a frozen dataclass: 10,000 shared entries make 30,000 of
    these per restore, and a tuple builds ~3x faster (and pickles smaller).
    """

    key: str
    dtype: str  # str(torch.dtype): plain and picklable
    shape: tuple[int, ...]
    nbytes: int
    owner: int = -1


def _new_items(rows: Iterable[tuple[Any, ...]]) -> list[SharedItem]:
    """``SharedItem`` s from full 5-tuples, without a Python call per item (its ``__new__`` is one)."""
    return list(map(tuple.__new__, repeat(SharedItem), rows))


def _with_owner(items: Iterable[tuple[Any, ...]], owner: int) -> list[SharedItem]:
    """``items`` (4- or 5-tuples) as ``SharedItem`` s owned by ``owner``."""
    return _new_items(map(add, (i[:4] for i in items), repeat((owner,))))


_DTYPE_NAMES: dict[torch.dtype, str] = {}


def dtype_name(dtype: torch.dtype) -> str:
    """``str(dtype)``, cached: it costs ~1 us a call, and there is one per shared tensor."""
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        name = _DTYPE_NAMES[dtype] = str(dtype)
    return name


def shared_items(leaves: Iterable[Any], owner: int = -1, skip: Container[str] = ()) -> tuple[list[SharedItem], str]:
    """The shared tensors among planned ``leaves``: those with a dense source
    (``TensorRef``) whose key is not in ``skip``, in order, owned by ``owner``; and a digest
    of their keys, dtypes and shapes.

    Equal digests on two ranks mean equal lists (``nbytes`` follows from dtype and shape), so
    ranks compare digests and send no list when they agree.
    """
    keys: list[str] = []
    dtypes: list[str] = []
    shapes: list[tuple[int, ...]] = []
    nbytes: list[int] = []
    names = _DTYPE_NAMES
    for lf in leaves:
        ref = lf.source
        if isinstance(ref, TensorRef) and lf.key not in skip:
            dt, size = ref.dtype, ref.size
            if type(size) is not tuple:
                size = tuple(size)
            keys.append(lf.key)
            dtypes.append(names.get(dt) or dtype_name(dt))
            shapes.append(size)
            nbytes.append(prod(size) * dt.itemsize)
    return _new_items(zip(keys, dtypes, shapes, nbytes, repeat(owner))), _digest(keys, dtypes, shapes)


def _digest(keys: list[str], dtypes: list[str], shapes: list[tuple[int, ...]]) -> str:
    """SHA-1 of the columns of a shared list, each hashed whole (lengths first, so that no two
    lists hash the same bytes) rather than formatted row by row."""
    h = hashlib.sha1()
    h.update(array("q", (len(keys), *map(len, keys), *map(len, shapes))).tobytes())
    try:
        h.update(array("q", chain.from_iterable(shapes)).tobytes())
    except (TypeError, OverflowError):  # a damaged file's odd sizes: left to the checks that name them
        h.update(repr(shapes).encode())
    h.update("\0".join(keys).encode("utf-8", "surrogatepass"))
    h.update("\0".join(dtypes).encode())
    return h.hexdigest()


def assign_owners(items: Sequence[SharedItem], mode: SharedMode, world_size: int, src: int) -> list[SharedItem]:
    """Give each item the rank that reads it from its own file.

    ``broadcast``: ``src`` reads all. ``spread``: greedy by bytes (largest first, to the
    least-loaded rank, ties to the lower rank), so each rank reads about 1/N of the bytes.
    ``local``: no owner (every rank reads its own copy).
    """
    if mode == "local":
        return _with_owner(items, -1)
    if mode == "broadcast":
        return _with_owner(items, src)
    load = [(0, q) for q in range(world_size)]  # a heap of (bytes so far, rank): least-loaded, then lowest rank
    owner = [0] * len(items)
    neg = [-i.nbytes for i in items]
    for idx in sorted(range(len(items)), key=neg.__getitem__):  # stable: ties keep canonical order
        b, r = load[0]
        owner[idx] = r
        heapq.heapreplace(load, (b + items[idx].nbytes, r))
    return _new_items(map(add, (i[:4] for i in items), zip(owner)))


@dataclass(frozen=True, slots=True)
class Bucket:
    """Items broadcast together as one flat byte buffer from ``owner``."""

    owner: int
    dtype: str
    items: tuple[SharedItem, ...]
    offsets: tuple[int, ...]  # byte offset of each item in the buffer
    nbytes: int


def make_buckets(items: Sequence[SharedItem], bucket_bytes: int) -> list[Bucket]:
    """Pack items into flat buckets per (owner, dtype), each at most ``bucket_bytes``.

    An item larger than ``bucket_bytes`` travels alone. Zero-byte items travel in no
    bucket. Order: by owner, then dtype, then canonical order.
    """
    groups: dict[tuple[int, str], list[SharedItem]] = {}
    for it in items:
        if it.nbytes > 0 and it.owner >= 0:
            groups.setdefault((it.owner, it.dtype), []).append(it)
    buckets: list[Bucket] = []
    for (owner, dtype) in sorted(groups):
        cur: list[SharedItem] = []
        offs: list[int] = []
        size = 0
        for it in groups[(owner, dtype)]:
            if cur and size + it.nbytes > bucket_bytes:
                buckets.append(Bucket(owner, dtype, tuple(cur), tuple(offs), size))
                cur, offs, size = [], [], 0
            cur.append(it)
            offs.append(size)
            size += it.nbytes
        if cur:
            buckets.append(Bucket(owner, dtype, tuple(cur), tuple(offs), size))
    return buckets
