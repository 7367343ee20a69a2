"""Moving bytes: produce the planned tensors of one rank file.

The file is mapped read-only-private (``mmap`` ``ACCESS_COPY``: nothing a restore does can
reach the file) and every tensor is made with one ``copy_`` from the mapping, straight
into its preallocated target, or into a new storage holding the span of elements its
views need (views of one storage stay views of one new storage: tied weights stay tied).
Whole storage records are checked against the zip's CRC32 before their bytes are used.
Exotic tensors (quantized, sparse, nested, ...), legacy non-zip files and files of the
other byte order go through ``torch.load(weights_only=True)``, with a warning.
"""

from __future__ import annotations

import logging
import mmap
import os
import time
import zlib
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from dist_restore._index import CheckpointIndex, full_load
from dist_restore._keypath import RawPath
from dist_restore._plan import PlannedLeaf
from dist_restore._unpickle import TensorRef
from dist_restore.errors import CorruptCheckpointError

logger = logging.getLogger(__name__)

try:  # ~9 GB/s on this class of machine, vs ~3 GB/s for zlib; both release the GIL
    from isal.isal_zlib import crc32 as _crc32
except ImportError:  # pragma: no cover - exercised only without isal
    _crc32 = zlib.crc32

MapLocation = str | torch.device | Mapping[str, str | torch.device] | None
Verify = Literal["crc32", "none"]


@dataclass
class ReadStats:
    """Counters of one read.

    Attributes:
        bytes_read: Bytes of tensor data taken from the file (each storage's needed
            span once, however many views or targets use it).
        bytes_verified: Bytes whose CRC32 was checked.
        fallback_loads: Number of full ``torch.load`` calls that were needed.
    """

    bytes_read: int = 0
    bytes_verified: int = 0
    fallback_loads: int = 0


def resolve_device(location: str, map_location: MapLocation, *, file: object, key: str) -> torch.device:
    """The device a tensor saved at ``location`` is allocated on."""
    if isinstance(map_location, Mapping):
        dev = torch.device(map_location.get(location, location))
    elif map_location is None:
        dev = torch.device(location)
    else:
        dev = torch.device(map_location)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CorruptCheckpointError(
            f"tensor was saved on {location!r} and CUDA is not available here; "
            "pass map_location='cpu'", file=file, key=key)
    return dev


def produce(
    index: CheckpointIndex,
    leaves: Sequence[PlannedLeaf],
    *,
    map_location: MapLocation = None,
    verify: Verify = "crc32",
    stats: ReadStats | None = None,
) -> dict[RawPath, Any]:
    """Make every planned leaf: fill targets in place, allocate the others.

    Returns:
        ``{raw path: tensor}`` for allocated leaves (and exotic ones, which are never
        filled in place).
    """
    stats = stats if stats is not None else ReadStats()
    values: dict[RawPath, Any] = {}
    if not leaves:
        return values
    dense = [lf for lf in leaves if isinstance(lf.source, TensorRef) and index.native_order]
    other = [lf for lf in leaves if not (isinstance(lf.source, TensorRef) and index.native_order)]
    if dense:
        _produce_dense(index, dense, values, map_location, verify, stats)
    if other:
        _produce_fallback(index, other, values, map_location, stats)
    return values


def _produce_dense(index: CheckpointIndex, leaves: Sequence[PlannedLeaf], values: dict[RawPath, Any],
                   map_location: MapLocation, verify: Verify, stats: ReadStats) -> None:
    by_storage: dict[str, list[PlannedLeaf]] = defaultdict(list)
    for lf in leaves:
        by_storage[lf.source.storage.key].append(lf)
    order = sorted(by_storage, key=lambda k: index.records[k].header_offset)
    fd = os.open(index.file, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if size != index.file_size:
            raise CorruptCheckpointError(
                f"file changed size since it was indexed ({index.file_size} -> {size} bytes)",
                file=index.file)
        mm = mmap.mmap(fd, size, access=mmap.ACCESS_COPY)
    finally:
        os.close(fd)
    # The mapping is never closed explicitly: tensors over it (and, on an error, the frames of
    # the traceback) keep the mmap object alive, and it unmaps when the last one goes.
    whole = torch.frombuffer(mm, dtype=torch.uint8)
    with torch.no_grad():  # filling Parameters that require grad is not an autograd op
        check = verify == "crc32"
        for skey in order:
            _produce_storage(index, mm, whole, skey, by_storage[skey], values, map_location, check, stats)


def _produce_storage(index: CheckpointIndex, mm: mmap.mmap, whole: torch.Tensor, skey: str,
                     group: list[PlannedLeaf], values: dict[RawPath, Any],
                     map_location: MapLocation, check: bool, stats: ReadStats) -> None:
    """Every planned view of one storage record: CRC-check it if read whole, then copy."""
    rec = index.records[skey]
    offset = index.data_offset(skey, mm)
    isz = group[0].source.dtype.itemsize
    spans = [lf.source.element_span() for lf in group]
    lo_b = min(lo for lo, hi in spans) * isz
    hi_b = max(hi for lo, hi in spans) * isz
    if hi_b > lo_b:
        stats.bytes_read += hi_b - lo_b
        if check and lo_b == 0 and hi_b == rec.size:
            with memoryview(mm) as mv:
                crc = _crc32(mv[offset : offset + rec.size])
            if crc != rec.crc32:
                raise CorruptCheckpointError(
                    f"CRC32 mismatch in storage record data/{skey}: tensor data is corrupt",
                    file=index.file, key=group[0].key)
            stats.bytes_verified += rec.size
    allocate = []
    for lf, (lo, hi) in zip(group, spans):
        if lf.target is None:
            allocate.append((lf, lo, hi))
        elif hi > lo:
            lf.target.copy_(_file_view(whole, offset, lf.source, lo, hi))
    if allocate:
        # one new storage per (storage, device) keeps views of it tied, as torch.load does
        by_dev: dict[torch.device, list[tuple[PlannedLeaf, int, int]]] = defaultdict(list)
        for item in allocate:
            dev = resolve_device(item[0].source.storage.location, map_location,
                                 file=index.file, key=item[0].key)
            by_dev[dev].append(item)
        for dev, items in by_dev.items():
            _allocate_group(whole, offset, items, dev, values)


def _file_view(whole: torch.Tensor, data_offset: int, ref: TensorRef, lo: int, hi: int) -> torch.Tensor:
    """A tensor aliasing the mapped file: ``ref``'s view of its storage record."""
    isz = ref.dtype.itemsize
    raw = whole[data_offset + lo * isz : data_offset + hi * isz]
    try:
        typed = raw.view(ref.dtype)
    except RuntimeError:  # record not aligned for this dtype (not written by torch.save)
        typed = raw.clone().view(ref.dtype)
    if hi - lo == ref.numel and ref.is_contiguous():
        view = typed.view(ref.size)
    else:
        view = typed.as_strided(ref.size, ref.stride, typed.storage_offset() + ref.storage_offset - lo)
    if ref.metadata:
        torch._utils.set_tensor_metadata(view, ref.metadata)
    return view


def _allocate_group(whole: torch.Tensor, data_offset: int, items: list[tuple[PlannedLeaf, int, int]],
                    dev: torch.device, values: dict[RawPath, Any]) -> None:
    ref0 = items[0][0].source
    isz = ref0.dtype.itemsize
    live = [(lo, hi) for _, lo, hi in items if hi > lo]
    base = min((lo for lo, _ in live), default=0)
    top = max((hi for _, hi in live), default=0)
    buf = torch.empty((top - base) * isz, dtype=torch.uint8, device=dev)
    if top > base:
        buf.copy_(whole[data_offset + base * isz : data_offset + top * isz])
    storage = buf.untyped_storage()
    for lf, lo, hi in items:
        ref: TensorRef = lf.source
        if hi > lo:
            t = torch.empty(0, dtype=ref.dtype, device=dev).set_(storage, ref.storage_offset - base,
                                                                 ref.size, ref.stride)
        else:
            t = torch.empty_strided(ref.size, ref.stride, dtype=ref.dtype, device=dev)
        values[lf.path] = finish_tensor(t, ref)


def finish_tensor(t: torch.Tensor, ref: TensorRef) -> torch.Tensor:
    """Apply what torch.load applies after the data: conj/neg bits, requires_grad, Parameter."""
    if ref.metadata:
        torch._utils.set_tensor_metadata(t, ref.metadata)
    if ref.is_parameter:
        t = torch.nn.Parameter(t, requires_grad=ref.requires_grad)
    elif ref.requires_grad:
        t.requires_grad_(True)
    if ref.state:
        t = torch._utils._set_obj_state(t, ref.state)
    return t


def _produce_fallback(index: CheckpointIndex, leaves: Sequence[PlannedLeaf], values: dict[RawPath, Any],
                      map_location: MapLocation, stats: ReadStats) -> None:
    """Leaves the fast path does not read: take them from one full ``torch.load``.

    torch.load itself places them (``map_location``) and keeps views of one storage tied,
    so the loaded tensors are used as they are, not copied.
    """
    if index.format == "legacy":
        tree = index.tree  # loaded on the CPU while indexing
    else:
        kinds = sorted({type(lf.source).__name__ for lf in leaves})
        logger.warning(
            "%s: %d entr%s (%s, e.g. %r) need a full torch.load(weights_only=True)",
            index.file, len(leaves), "y" if len(leaves) == 1 else "ies", ", ".join(kinds), leaves[0].key)
        tree = full_load(index.file, map_location=_torch_map_location(map_location), mmap=False)
        stats.fallback_loads += 1
    moved: dict[tuple[int, torch.device], torch.UntypedStorage] = {}
    for lf in leaves:
        v: Any = tree
        for p in lf.path:
            v = v[p]
        if isinstance(v, torch.Tensor) and v.layout == torch.strided:
            stats.bytes_read += v.numel() * v.element_size()
        target = lf.target
        if target is not None and isinstance(v, torch.Tensor) and v.layout == torch.strided \
                and not v.is_quantized and not target.is_quantized:
            with torch.no_grad():
                target.copy_(v)
            continue
        if target is not None:
            logger.warning("%s: %r (%s) is replaced, not filled in place", index.file, lf.key,
                           type(lf.source).__name__)
        if index.format == "legacy" and isinstance(v, torch.Tensor):
            dev = resolve_device(str(v.device), map_location, file=index.file, key=lf.key)
            if dev != v.device:
                v = _move_tied(v, dev, moved)
        values[lf.path] = v


def _torch_map_location(map_location: MapLocation) -> Any:
    if isinstance(map_location, Mapping):
        return {str(k): str(v) for k, v in map_location.items()}
    return map_location


def _move_tied(v: torch.Tensor, dev: torch.device, moved: dict[tuple[int, torch.device], Any]) -> torch.Tensor:
    """``v.to(dev)``, keeping tensors that shared a storage sharing one on ``dev``."""
    if v.layout != torch.strided or v.is_quantized:
        return v.to(dev)
    key = (v.untyped_storage().data_ptr(), dev)
    storage = moved.get(key)
    if storage is None:
        storage = moved[key] = v.untyped_storage().to(device=dev) if dev.type != "cpu" \
            else v.untyped_storage().cpu()
    out = torch.empty(0, dtype=v.dtype, device=dev).set_(storage, v.storage_offset(), v.size(), v.stride())
    if isinstance(v, torch.nn.Parameter):
        return torch.nn.Parameter(out, requires_grad=v.requires_grad)
    return out.requires_grad_(v.requires_grad) if v.requires_grad else out
