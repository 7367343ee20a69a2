"""What a consolidated file holds, planned from rank 0's index alone: pure functions, no I/O.

``torch``: the output's nested tree, tensors as :class:`dist_restore._format.torchzip.TensorOut` descriptions of
storage records yet to be written, and those records (every DTensor a new record of its
global shape; plain tensors keep rank 0's records, so views of one storage stay views of one
storage). ``safetensors``: one contiguous tensor per dotted key. Each record is a :class:`Unit`
saying where its bytes come from; :mod:`dist_restore._bytes.consolidate_io` makes and writes them.
"""

from __future__ import annotations

import collections
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dist_restore._format.dtensor import DTensorRef
from dist_restore._format.index import SOURCE_TENSOR_TYPES, CheckpointIndex, iter_leaves
from dist_restore._format.keypath import RawPath, join_index, join_key
from dist_restore._planning.plan import view_out_of_bounds
from dist_restore._format.safetensors import TensorSpec, unsupported
from dist_restore._bytes.segments import contiguous_strides
from dist_restore._format.torchzip import StorageOut, TensorOut
from dist_restore._format.unpickle import TensorRef
from dist_restore.errors import CheckpointError, CorruptCheckpointError

logger = logging.getLogger(__name__)

__all__ = ["Unit", "plan_safetensors", "plan_torch"]


@dataclass(frozen=True, slots=True, eq=False)
class Unit:
    """One record of the output and where its bytes come from.

    ``source``: a :class:`DTensorRef` (assembled from the rank files), a :class:`TensorRef`
    (read from rank 0's file into a contiguous tensor) or a :class:`StorageRef` (rank 0's
    storage record, copied as it is)."""

    key: str
    path: RawPath
    source: Any
    out: StorageOut | TensorSpec
    nbytes: int


def _not_writable(key: str, value: Any, file: Path) -> CheckpointError:
    kind = getattr(value, "kind", type(value).__name__)
    return CheckpointError(f"a {kind} tensor: consolidate writes dense tensors and DTensors only", file=file,
                           key=key)



def plan_torch(index: CheckpointIndex, select: Callable[[str], bool]) -> tuple[Any, list[Unit], list[str]]:
    """The output tree (``TensorOut`` leaves) and its storage records, in pickle order."""
    units: list[Unit] = []
    storages: dict[str, StorageOut] = {}  # rank 0's storage key -> its record in the output
    dropped = object()

    def new_key() -> str:
        return str(len(units))

    def leaf(v: Any, key: str, path: RawPath) -> Any:
        if isinstance(v, DTensorRef):
            st = StorageOut(new_key(), v.dtype, math.prod(v.size))
            units.append(Unit(key, path, v, st, st.nbytes))
            return TensorOut(st, 0, tuple(v.size), contiguous_strides(v.size), v.requires_grad, v.is_parameter)
        if isinstance(v, TensorRef):
            problem = view_out_of_bounds(v)
            if problem:
                raise CorruptCheckpointError(problem, file=index.file, rank=0, key=key)
            st = storages.get(v.storage.key)
            if st is None:
                nbytes = v.storage.nbytes
                if nbytes % v.dtype.itemsize:
                    raise CorruptCheckpointError(f"storage of {nbytes} bytes does not hold whole {v.dtype} "
                                                 "elements", file=index.file, rank=0, key=key)
                st = storages[v.storage.key] = StorageOut(new_key(), v.dtype, nbytes // v.dtype.itemsize)
                units.append(Unit(key, path, v.storage, st, nbytes))
            elif st.dtype != v.dtype:
                raise ValueError(f"{index.file}: key {key!r} views a storage as {v.dtype} that another entry "
                                 f"views as {st.dtype}; torch.save cannot write that")
            if v.state:
                logger.warning("%s: key %r: the Parameter's Python attributes %s are not written", index.file,
                               key, sorted(v.state) if isinstance(v.state, Mapping) else "")
            return TensorOut(st, v.storage_offset, tuple(v.size), tuple(v.stride), v.requires_grad,
                             v.is_parameter, v.metadata)
        if isinstance(v, SOURCE_TENSOR_TYPES):
            raise _not_writable(key, v, index.file)
        if type(v).__module__.startswith("dist_restore"):  # a stand-in (a DeviceMesh saved as a value)
            raise CheckpointError(f"a {getattr(v, 'kind', type(v).__name__)} value outside a DTensor: "
                                  "consolidate cannot write it", file=index.file, key=key)
        return v

    def keep(kept: Any, original: Any, key: str) -> bool:
        """A container stays if anything below it does, or it is empty and selected (or the root)."""
        return bool(kept) or (not original and select(key)) or not key

    def build(v: Any, key: str, path: RawPath) -> Any:
        if isinstance(v, Mapping):
            m = type(v)() if type(v) in (dict, collections.OrderedDict) else {}
            if isinstance(m, collections.OrderedDict):  # a state dict's _metadata rides along
                m.__dict__.update(getattr(v, "__dict__", {}))
            for k, c in v.items():
                sub = build(c, join_key(key, k), path + (k,))
                if sub is not dropped:
                    m[k] = sub
            return m if keep(m, v, key) else dropped
        if isinstance(v, (list, tuple)) and not isinstance(v, torch.Size):
            kept = [x for i, c in enumerate(v) if (x := build(c, join_index(key, i), path + (i,))) is not dropped]
            return (kept if isinstance(v, list) else tuple(kept)) if keep(kept, v, key) else dropped
        return leaf(v, key, path) if select(key) else dropped

    tree = build(index.tree, "", ())
    return tree, units, []


def plan_safetensors(index: CheckpointIndex, select: Callable[[str], bool]) -> tuple[list[Unit], list[str]]:
    """One tensor per selected tensor entry, in pickle order; the non-tensor keys skipped."""
    units: list[Unit] = []
    skipped: list[str] = []
    for key, path, v in iter_leaves(index.tree):
        if not select(key):
            continue
        if isinstance(v, (DTensorRef, TensorRef)):
            problem = unsupported(v.dtype)
            if problem:
                raise ValueError(f"{index.file}: key {key!r}: {problem}")
            bounds = view_out_of_bounds(v)
            if bounds:
                raise CorruptCheckpointError(bounds, file=index.file, rank=0, key=key)
            spec = TensorSpec(key, v.dtype, tuple(v.size))
            units.append(Unit(key, path, v, spec, spec.nbytes))
        elif isinstance(v, SOURCE_TENSOR_TYPES):
            raise _not_writable(key, v, index.file)
        else:
            skipped.append(key)
    return units, skipped
