"""A restricted unpickler that turns a torch.save ``data.pkl`` into a tree of references.

Weights-only semantics, always: ``find_class`` resolves only an allowlist of globals
(containers, torch dtypes/devices/sizes, storage types and tensor rebuild functions).
Anything else raises :class:`UnsafeCheckpointError` *before* any of it runs, because the
C unpickler calls ``find_class`` for every GLOBAL/STACK_GLOBAL/INST/OBJ/EXT opcode
before it can call or build the object.

Tensor rebuild functions are replaced by constructors of :class:`TensorRef`, so
unpickling allocates no tensor and reads no tensor data (indexing a 10,000-tensor file
costs a fraction of ``torch.load`` of the same file).
"""

from __future__ import annotations

import collections
import io
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from math import prod
from typing import Any

import torch

from dist_restore._format.dtensor import DTensorRef, DTensorType
from dist_restore._format.dtensor import allowed_globals as dtensor_globals
from dist_restore._gc import gc_paused
from dist_restore.errors import CorruptCheckpointError, UnsafeCheckpointError


class StorageRef:
    """A storage record of the file: ``data/{key}``, ``numel`` elements of ``dtype``.

    A plain slotted class (not a dataclass): one is made per storage while unpickling,
    and that is the hot loop of indexing.
    """

    __slots__ = ("key", "dtype", "numel", "location")

    def __init__(self, key: str, dtype: torch.dtype, numel: int, location: str) -> None:
        self.key = key
        self.dtype = dtype
        self.numel = numel
        self.location = location

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    def __repr__(self) -> str:
        return f"StorageRef({self.key!r}, {self.dtype}, numel={self.numel}, {self.location!r})"


class TensorRef:
    """A dense strided tensor as pickled: a view (offset, size, stride) of a storage.

    A plain slotted class (not a dataclass): one is made per tensor while unpickling, where
    :func:`_rebuild_tensor_v2` fills its slots without an ``__init__`` call.

    Attributes:
        storage: The storage record it is a view of.
        dtype: Element type.
        storage_offset: Offset of the view in the storage, in elements.
        size: Shape.
        stride: Strides, in elements.
        requires_grad: As saved.
        is_parameter: Saved as a ``torch.nn.Parameter``.
        metadata: conj / neg bits, when set.
        state: Python attributes of a Tensor/Parameter (rare).
    """

    __slots__ = ("storage", "dtype", "storage_offset", "size", "stride", "requires_grad", "is_parameter",
                 "metadata", "state")

    def __init__(self, storage: StorageRef, dtype: torch.dtype, storage_offset: int, size: tuple[int, ...],
                 stride: tuple[int, ...], requires_grad: bool = False, is_parameter: bool = False,
                 metadata: dict[str, bool] | None = None, state: Any = None) -> None:
        self.storage = storage
        self.dtype = dtype
        self.storage_offset = storage_offset
        self.size = size
        self.stride = stride
        self.requires_grad = requires_grad
        self.is_parameter = is_parameter
        self.metadata = metadata
        self.state = state

    def __repr__(self) -> str:
        return (f"TensorRef(storage={self.storage!r}, dtype={self.dtype!r}, storage_offset={self.storage_offset!r}, "
                f"size={self.size!r}, stride={self.stride!r}, requires_grad={self.requires_grad!r}, "
                f"is_parameter={self.is_parameter!r}, metadata={self.metadata!r}, state={self.state!r})")

    @property
    def numel(self) -> int:
        return prod(self.size)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    def element_span(self) -> tuple[int, int]:
        """``[lo, hi)`` in storage elements covering every element of the view."""
        lo = self.storage_offset
        size, stride = self.size, self.stride
        if len(size) == 1 and len(stride) == 1:  # most tensors of a state dict: no loop
            n, st = size[0], stride[0]
            if n == 0:
                return lo, lo
            return (lo, lo + 1 + (n - 1) * st) if st >= 0 else (lo + (n - 1) * st, lo + 1)
        if prod(size) == 0:
            return lo, lo
        hi = lo + 1
        for s, st in zip(self.size, self.stride):
            if st >= 0:
                hi += (s - 1) * st
            else:
                lo += (s - 1) * st
        return lo, hi

    def is_contiguous(self) -> bool:
        size, stride = self.size, self.stride
        if len(size) == 1 and len(stride) == 1:  # most tensors of a state dict: no loop
            return size[0] == 1 or stride[0] == 1
        expected = 1
        for s, st in zip(reversed(self.size), reversed(self.stride)):
            if s != 1 and st != expected:
                return False
            expected *= s
        return True


@dataclass(slots=True, eq=False)
class ExoticRef:
    """A tensor the fast path does not read itself (quantized, sparse, nested, meta, ...).

    Reading one falls back to ``torch.load(weights_only=True)`` of the file.
    """

    kind: str
    dtype: torch.dtype | None = None
    size: tuple[int, ...] | None = None
    storages: list[StorageRef] = field(default_factory=list)


class _StorageType:
    """Stands in for ``torch.FloatStorage`` & co. in the pickle: carries the dtype only."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


def _rebuild_tensor(storage: StorageRef, offset: int, size: Any, stride: Any) -> TensorRef:
    _check_storage(storage)
    return TensorRef(storage, storage.dtype, int(offset), tuple(size), tuple(stride))


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad, backward_hooks, metadata=None):
    # the hot loop of indexing (once per tensor): the slots filled here rather than by
    # TensorRef.__init__, and int()/tuple() called only on values not already of that type
    if storage.__class__ is not StorageRef:
        _check_storage(storage)
    ref = _new(TensorRef)
    ref.storage = storage
    ref.dtype = storage.dtype
    ref.storage_offset = offset if offset.__class__ is int else int(offset)
    ref.size = size if size.__class__ is tuple else tuple(size)
    ref.stride = stride if stride.__class__ is tuple else tuple(stride)
    ref.requires_grad = True if requires_grad else False
    ref.is_parameter = False
    ref.metadata = metadata or None
    ref.state = None
    return ref


_new = object.__new__


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None):
    _check_storage(storage)
    if not isinstance(dtype, torch.dtype):
        raise CorruptCheckpointError(f"tensor rebuild has dtype {dtype!r}, not a torch.dtype")
    return TensorRef(storage, dtype, int(offset), tuple(size), tuple(stride),
                     bool(requires_grad), metadata=metadata or None)


def _rebuild_parameter(data, requires_grad, backward_hooks):
    return _as_parameter(data, requires_grad, None)


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
    return _as_parameter(data, requires_grad, state)


def _as_parameter(data: Any, requires_grad: Any, state: Any) -> Any:
    if isinstance(data, TensorRef):
        data.is_parameter = True
        data.requires_grad = bool(requires_grad)
        if state:
            data.state = state
        return data
    if isinstance(data, DTensorRef):
        data.is_parameter = True
        data.requires_grad = bool(requires_grad)
        return data
    if isinstance(data, ExoticRef):
        return data
    raise CorruptCheckpointError(f"parameter rebuilt from {type(data).__name__}, not a tensor")


def _rebuild_wrapper_subclass(cls, dtype, size, stride, storage_offset, layout, device, requires_grad=False):
    if cls is DTensorType:
        if not isinstance(dtype, torch.dtype):
            raise CorruptCheckpointError(f"DTensor rebuild has dtype {dtype!r}, not a torch.dtype")
        return DTensorRef(dtype, tuple(int(v) for v in size), tuple(int(v) for v in stride), bool(requires_grad))
    return _exotic("wrapper_subclass")(cls, dtype, size, stride, storage_offset, layout, device, requires_grad)


def _rebuild_from_type_v2(func, new_type, args, state):
    ret = func(*args)
    if isinstance(ret, DTensorRef):
        if new_type is not DTensorType:
            raise CorruptCheckpointError(f"a DTensor rebuilt as {new_type!r}")
        ret.set_state(state)
        if not isinstance(ret.local, TensorRef):
            raise CorruptCheckpointError(f"a DTensor whose local tensor is {type(ret.local).__name__}, "
                                         "not a dense tensor record")
        return ret
    if isinstance(ret, TensorRef):
        if new_type is torch.nn.Parameter:
            ret.is_parameter = True
        if state:
            ret.state = state
    return ret


def _check_storage(storage: Any) -> None:
    if not isinstance(storage, StorageRef):
        raise CorruptCheckpointError(f"tensor rebuilt from {type(storage).__name__}, not a storage record")


def _exotic(kind: str):
    def make(*args: Any) -> ExoticRef:
        storages = [a for a in _flat(args) if isinstance(a, StorageRef)]
        dtype = next((a for a in _flat(args) if isinstance(a, torch.dtype)), None)
        return ExoticRef(kind, dtype=dtype, storages=storages)

    return make


def _flat(x: Any):
    if isinstance(x, (tuple, list)):
        for y in x:
            yield from _flat(y)
    elif isinstance(x, TensorRef):
        yield x.storage
    elif isinstance(x, ExoticRef):
        yield from x.storages
    else:
        yield x


def _allowed_globals() -> dict[tuple[str, str], Any]:
    g: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("collections", "Counter"): collections.Counter,
        ("torch", "Size"): torch.Size,
        ("torch", "device"): torch.device,
        ("torch", "Tensor"): torch.Tensor,
        ("torch.nn.parameter", "Parameter"): torch.nn.Parameter,
        ("torch.serialization", "_get_layout"): torch.serialization._get_layout,
        ("_codecs", "encode"): _codecs_encode,
        ("builtins", "bytearray"): bytearray,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("builtins", "complex"): complex,
        ("builtins", "slice"): slice,
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
        ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
        ("torch._utils", "_rebuild_qtensor"): _exotic("quantized"),
        ("torch._utils", "_rebuild_sparse_tensor"): _exotic("sparse"),
        ("torch._utils", "_rebuild_nested_tensor"): _exotic("nested"),
        ("torch._utils", "_rebuild_meta_tensor_no_storage"): _exotic("meta"),
        ("torch._utils", "_rebuild_wrapper_subclass"): _rebuild_wrapper_subclass,
        ("torch._utils", "_rebuild_device_tensor_from_cpu_tensor"): _exotic("device_tensor"),
        ("torch._utils", "_rebuild_device_tensor_from_numpy"): _exotic("device_tensor"),
    }
    g.update(dtensor_globals())
    for name in dir(torch):
        obj = getattr(torch, name, None)
        if isinstance(obj, (torch.dtype, torch.qscheme, torch.layout, torch.memory_format)):
            g[("torch", name)] = obj
    for dtype, sname in torch.storage._dtype_to_storage_type_map().items():
        g[("torch", sname)] = _StorageType(dtype)
    g[("torch", "UntypedStorage")] = _StorageType(torch.uint8)
    g[("torch.storage", "UntypedStorage")] = _StorageType(torch.uint8)
    for (mod, name), obj in list(g.items()):
        if mod == "builtins":
            g[("__builtin__", name)] = obj
    return g


def _codecs_encode(obj: str, encoding: str = "utf-8") -> bytes:
    # protocol-2 pickles store bytes as _codecs.encode(str, "latin1")
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8"):
        raise UnsafeCheckpointError(f"_codecs.encode({type(obj).__name__}, {encoding!r}) refused")
    return obj.encode(encoding)


_ALLOWED: dict[tuple[str, str], Any] | None = None


class _Prefetched(io.BytesIO):
    """``data`` as a file whose ``peek`` hands the unpickler all that is left of it.

    The C unpickler reads a file without ``peek`` (a bare ``BytesIO``) with one ``read()``
    call per opcode: ~3.5 million calls for 60,000 tensors, most of the unpickling time. With
    ``peek`` it decodes from the buffer it was handed; its reads stay ``BytesIO`` reads (a
    huge length in a damaged pickle reads short, as before: nothing is allocated for it), so
    the opcodes, and the errors of a truncated or malformed pickle, are the same.
    """

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self._view = memoryview(data)

    def peek(self, size: int = 0) -> memoryview:
        return self._view[self.tell():]


_stream = _Prefetched


class _RefUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, file: str) -> None:
        super().__init__(_stream(data))
        self._file = file
        self._storages: dict[str, StorageRef] = {}
        self.persistent_load = self._storage_loader()  # the C unpickler's setter: called directly

    def find_class(self, module: str, name: str) -> Any:
        global _ALLOWED
        if _ALLOWED is None:
            _ALLOWED = _allowed_globals()
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(
                f"the pickle asks for global '{module}.{name}', which is not allowed in a "
                "weights-only load; refused before any of it ran. If you trust this file, "
                "load it with torch.load(weights_only=False) yourself",
                file=self._file,
            ) from None

    def _storage_loader(self) -> Callable[[Any], StorageRef]:
        """The persistent_load callback: a closure (no attribute lookups on ``self``; it runs
        once per tensor)."""
        storages = self._storages
        get = storages.get
        file = self._file
        new = _new

        def persistent_load(pid: Any) -> StorageRef:
            try:
                tag, stype, key, location, numel = pid
                ref = get(key)
                if ref is not None:
                    return ref
                if tag != "storage":
                    raise ValueError
                dtype = stype.dtype
            except (ValueError, TypeError, AttributeError):
                raise CorruptCheckpointError(f"unknown persistent id {pid!r:.80}", file=file) from None
            if location.__class__ is not str:
                location = location.decode("ascii") if isinstance(location, bytes) else str(location)
            ref = new(StorageRef)
            ref.key = key if key.__class__ is str else str(key)
            ref.dtype = dtype
            ref.numel = numel if numel.__class__ is int else int(numel)
            ref.location = location
            storages[key] = ref
            return ref

        return persistent_load


@gc_paused  # ~3 new objects per tensor would trigger full collections over all of torch
def unpickle_refs(data: bytes, file: str) -> tuple[Any, dict[str, StorageRef]]:
    """Unpickle ``data.pkl`` into a tree of containers, plain values and refs.

    Returns:
        ``(tree, storages)``, storages keyed by record key.

    Raises:
        UnsafeCheckpointError: a global outside the allowlist.
        CorruptCheckpointError: the pickle is malformed.
    """
    up = _RefUnpickler(data, file)
    try:
        tree = up.load()
    except (UnsafeCheckpointError, CorruptCheckpointError) as e:
        if e.file is None:
            raise type(e)(e.reason, file=file) from None
        raise
    except Exception as e:  # malformed pickle: EOFError, UnpicklingError, TypeError, ...
        raise CorruptCheckpointError(
            f"data.pkl does not unpickle: {type(e).__name__}: {e}", file=file
        ) from e
    return tree, up._storages
