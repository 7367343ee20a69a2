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
import gc
import io
import pickle
import reprlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from itertools import compress
from math import prod
from typing import Any, TypeVar

import torch

from dist_restore._base.stack import StackUnavailable, call_with_stack
from dist_restore._format.dtensor import DTensorRef, DTensorType
from dist_restore._format.dtensor import allowed_globals as dtensor_globals
from dist_restore._gc import gc_paused
from dist_restore.errors import CorruptCheckpointError, UnsafeCheckpointError

T = TypeVar("T")

#: The deepest nesting of containers (dicts, lists, tuples, sets; a tuple used as a dict key
#: counts its own levels) a file's tree may have. A real state dict is under 20 deep; the tree's
#: walkers (the plan's, ``assemble``'s, ``map_leaves``') recurse once or twice a level, and 256
#: levels leave them far from Python's default recursion limit of 1,000. Deeper trees are
#: refused with :class:`CorruptCheckpointError` naming the file and the key.
MAX_NESTING = 256

_I64 = 1 << 63  # torch keeps sizes, strides and offsets as int64
_SMALL = (1 << 30) - 1  # an int of one internal digit: comparisons the interpreter specializes
_U64 = 1 << 64


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


class _BadView(CorruptCheckpointError):
    """A tensor's rebuild arguments that ``torch.load`` refuses (or that we could not read)."""


_short = reprlib.Repr()
_short.maxlevel, _short.maxstring, _short.maxother = 3, 40, 40


def view_problem(offset: Any, size: tuple[Any, ...], stride: tuple[Any, ...]) -> str | None:
    """Why a view's fields are not ones ``torch.load`` accepts and we can read, or ``None``.

    Every size, stride and the storage offset must be an ``int`` (not a ``bool``) in
    ``[0, 2**63)`` (a negative size or stride torch takes in a few odd cases is refused too), as
    many strides as sizes, and the element count must pass torch's overflow check (every
    partial product of the sizes under 2**64, the whole under 2**63).
    """
    if offset.__class__ is not int or not 0 <= offset < _I64:
        return f"storage offset {_short.repr(offset)} is not an integer in [0, 2**63)"
    if len(size) != len(stride):
        return f"size {_short.repr(size)} and stride {_short.repr(stride)} differ in length"
    n = 1
    for v in size:
        if v.__class__ is not int or not 0 <= v < _I64:
            return f"size {_short.repr(size)} holds {_short.repr(v)}, not an integer in [0, 2**63)"
        n *= v
        if n >= _U64:
            break
    for v in stride:
        if v.__class__ is not int or not 0 <= v < _I64:
            return f"stride {_short.repr(stride)} holds {_short.repr(v)}, not an integer in [0, 2**63)"
    if n >= _I64:
        return f"size {_short.repr(size)}: the element count overflows int64"
    return None


def plain_view(offset: Any, size: tuple[Any, ...], stride: tuple[Any, ...]) -> bool:
    """Whether a view's fields are certainly ones :func:`view_problem` accepts, checked as
    :func:`_rebuild_tensor_v2` checks them inline: a 0-, 1- or 2-d view of ints under 2**30
    (``False`` for anything else: ask :func:`view_problem`)."""
    if type(offset) is not int or not 0 <= offset <= _SMALL:
        return False
    n = len(size)
    if n == 1:
        if len(stride) != 1:
            return False
        a, = size
        b, = stride
        return type(a) is int and type(b) is int and 0 <= a <= _SMALL and 0 <= b <= _SMALL
    if n == 2:
        if len(stride) != 2:
            return False
        a, c = size
        b, d = stride
        return (type(a) is int and type(c) is int and type(b) is int and type(d) is int
                and 0 <= a <= _SMALL and 0 <= c <= _SMALL and 0 <= b <= _SMALL and 0 <= d <= _SMALL)
    return not n and not stride


def metadata_problem(metadata: Any, dtype: torch.dtype) -> str | None:
    """Why a tensor's conj/neg metadata is not one we set as ``torch.load`` does, or ``None``."""
    if metadata.__class__ not in (dict, collections.OrderedDict):
        return f"tensor metadata is a {type(metadata).__name__}, not a dict"
    for k, v in metadata.items():
        if k.__class__ is not str or v.__class__ is not bool:
            return f"tensor metadata {_short.repr(metadata)} is not str -> bool"
    if metadata.get("conj") and not dtype.is_complex:
        return f"tensor metadata sets conj on a {dtype} tensor"
    return None


def _seq(v: Any, what: str) -> tuple[Any, ...]:
    if isinstance(v, (tuple, list)):  # torch.Size included
        return tuple(v)
    raise _BadView(f"tensor {what} is a {type(v).__name__}, not a sequence")


def _checked(storage: StorageRef, dtype: torch.dtype, offset: Any, size: Any, stride: Any, requires_grad: Any,
             metadata: Any) -> TensorRef:
    """A TensorRef of these rebuild arguments, every field checked (:func:`view_problem`)."""
    size = size if size.__class__ is tuple else _seq(size, "size")
    stride = stride if stride.__class__ is tuple else _seq(stride, "stride")
    problem = view_problem(offset, size, stride)
    if problem is None and requires_grad.__class__ is not bool:
        problem = f"requires_grad is {_short.repr(requires_grad)}, not a bool"
    if problem is None and metadata:
        problem = metadata_problem(metadata, dtype)
    if problem is not None:
        raise _BadView(problem)
    return TensorRef(storage, dtype, offset, size, stride, requires_grad, metadata=metadata or None)


def _rebuild_tensor(storage: StorageRef, offset: Any, size: Any, stride: Any) -> TensorRef:
    _check_storage(storage)
    return _checked(storage, storage.dtype, offset, size, stride, False, None)


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad, backward_hooks, metadata=None):
    # the hot loop of indexing (once per tensor): the fields of a 0-, 1- or 2-d view of ints
    # under 2**30 checked inline (what view_problem checks, without a call, its loops or
    # comparisons of big ints: type() and small-int comparisons are what the interpreter
    # specializes; the product of two such sizes cannot overflow), the slots filled here rather
    # than by TensorRef.__init__; anything else through _checked
    if type(storage) is not StorageRef:
        _check_storage(storage)
    if (type(size) is not tuple or type(stride) is not tuple or type(offset) is not int
            or type(requires_grad) is not bool or metadata or not 0 <= offset <= _SMALL):
        return _checked(storage, storage.dtype, offset, size, stride, requires_grad, metadata)
    n = len(size)
    if n == 1:
        if len(stride) != 1:
            return _checked(storage, storage.dtype, offset, size, stride, requires_grad, metadata)
        a, = size
        b, = stride
        if type(a) is not int or type(b) is not int or not 0 <= a <= _SMALL or not 0 <= b <= _SMALL:
            return _checked(storage, storage.dtype, offset, size, stride, requires_grad, metadata)
    elif n == 2:
        if len(stride) != 2:
            return _checked(storage, storage.dtype, offset, size, stride, requires_grad, metadata)
        a, c = size
        b, d = stride
        if (type(a) is not int or type(c) is not int or type(b) is not int or type(d) is not int
                or not 0 <= a <= _SMALL or not 0 <= c <= _SMALL or not 0 <= b <= _SMALL or not 0 <= d <= _SMALL):
            return _checked(storage, storage.dtype, offset, size, stride, requires_grad, metadata)
    elif n or stride:
        return _checked(storage, storage.dtype, offset, size, stride, requires_grad, metadata)
    ref = _new(TensorRef)
    ref.storage = storage
    ref.dtype = storage.dtype
    ref.storage_offset = offset
    ref.size = size
    ref.stride = stride
    ref.requires_grad = requires_grad
    ref.is_parameter = False
    ref.metadata = None
    ref.state = None
    return ref


_new = object.__new__


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None):
    _check_storage(storage)
    if not isinstance(dtype, torch.dtype):
        raise CorruptCheckpointError(f"tensor rebuild has dtype {_short.repr(dtype)}, not a torch.dtype")
    return _checked(storage, dtype, offset, size, stride, requires_grad, metadata)


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
            raise CorruptCheckpointError(f"DTensor rebuild has dtype {_short.repr(dtype)}, not a torch.dtype")
        size, stride = _seq(size, "size"), _seq(stride, "stride")
        problem = view_problem(storage_offset, size, stride)
        if problem is not None:
            raise CorruptCheckpointError(f"DTensor: {problem}")
        return DTensorRef(dtype, size, stride, bool(requires_grad))
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
        ("builtins", "bytearray"): bytearray,  # the unpicklers hand out bounded_bytearray(len(data))
        ("builtins", "set"): set,
        ("builtins", "complex"): complex,
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
        raise UnsafeCheckpointError(f"_codecs.encode({type(obj).__name__}, {_short.repr(encoding)}) refused")
    return obj.encode(encoding)


_BYTEARRAY = (("builtins", "bytearray"), ("__builtin__", "bytearray"))


def bounded_bytearray(limit: int) -> Callable[..., bytearray]:
    """``bytearray`` for a pickle of ``limit`` bytes: ``bytearray(n)`` makes ``n`` zero bytes from
    the few bytes that say ``n``, so a size above ``limit`` is refused (every other form copies
    what the pickle holds)."""

    def make(*args: Any) -> bytearray:
        if args and isinstance(args[0], int) and args[0] > limit:
            raise CorruptCheckpointError(f"bytearray({args[0]}) asks for more bytes than data.pkl holds ({limit})")
        return bytearray(*args)

    return make


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
    """The restricted unpickler. ``lenient``: a tensor whose rebuild arguments are refused
    becomes an empty placeholder, kept in ``bad`` with why (to find its key, for the error)."""

    def __init__(self, data: bytes, file: str, *, lenient: bool = False) -> None:
        super().__init__(_stream(data))
        self._file = file
        self._storages: dict[str, StorageRef] = {}
        self.persistent_load = self._storage_loader()  # the C unpickler's setter: called directly
        self._own: dict[tuple[str, str], Any] = {key: bounded_bytearray(len(data)) for key in _BYTEARRAY}
        self.bad: list[tuple[TensorRef, str]] = []
        if lenient:
            for name, f in (("_rebuild_tensor", _rebuild_tensor), ("_rebuild_tensor_v2", _rebuild_tensor_v2),
                            ("_rebuild_tensor_v3", _rebuild_tensor_v3)):
                self._own[("torch._utils", name)] = self._lenient(f)

    def _lenient(self, f: Callable[..., TensorRef]) -> Callable[..., TensorRef]:
        def rebuild(storage: Any, *args: Any) -> TensorRef:
            try:
                return f(storage, *args)
            except _BadView as e:
                ref = TensorRef(storage, storage.dtype, 0, (0,), (1,))
                self.bad.append((ref, e.reason))
                return ref

        return rebuild

    def find_class(self, module: str, name: str) -> Any:
        global _ALLOWED
        if _ALLOWED is None:
            _ALLOWED = _allowed_globals()
        own = self._own.get((module, name))
        if own is not None:
            return own
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
        aliased: set[str] = set()  # records first named by a key that is not a str (0 for "0")

        def persistent_load(pid: Any) -> StorageRef:
            try:
                tag, stype, key, location, numel = pid
                ref = get(key)
                if ref is not None and not (aliased and key in aliased):
                    return ref
                if tag != "storage" or type(stype) is not _StorageType:
                    raise ValueError
            except (ValueError, TypeError):
                raise CorruptCheckpointError(f"unknown persistent id {_short.repr(pid)}", file=file) from None
            dtype = stype.dtype
            if ref is not None:
                return other_storage(key, dtype, location, numel)
            # (a numel out of range gives a byte count its record does not have: refused with it)
            if type(key) is not str or type(numel) is not int or type(location) is not str:
                return other_storage(key, dtype, location, numel)
            ref = new(StorageRef)
            ref.key = key
            ref.dtype = dtype
            ref.numel = numel
            ref.location = location
            storages[key] = ref
            return ref

        def other_storage(key: Any, dtype: torch.dtype, location: Any, numel: Any) -> StorageRef:
            """A storage whose key is not a str, its numel not a small int or its location not a str."""
            if type(key) is str:
                skey = key
            elif type(key) is int:  # torch.load names the record f"data/{key}" whatever its type
                skey = str(key)
                if skey not in storages:
                    aliased.add(skey)
            else:
                raise CorruptCheckpointError(f"storage key {_short.repr(key)} is not a str", file=file)
            if type(numel) is not int or not 0 <= numel < _I64:
                raise CorruptCheckpointError(f"storage {skey!r} has {_short.repr(numel)} elements, not an "
                                             "integer in [0, 2**63)", file=file)
            if type(location) is not str:
                location = location.decode("ascii") if isinstance(location, bytes) else str(location)
            ref = storages.get(skey)
            if ref is not None:  # the same record under another key (0 and "0"): torch.load reads it
                # once per key, each time in its own dtype; one reference serves all where they agree
                if ref.dtype != dtype or ref.numel != numel:
                    raise CorruptCheckpointError(
                        f"storage record data/{skey} is named twice ({_short.repr(key)}) with another "
                        f"dtype or size ({dtype}, {numel} vs {ref.dtype}, {ref.numel})", file=file)
                return ref
            ref = new(StorageRef)
            ref.key = skey
            ref.dtype = dtype
            ref.numel = numel
            ref.location = location
            storages[skey] = ref
            return ref

        return persistent_load


# -- deep pickles ------------------------------------------------------------------------------

#: C stack a pickle byte may need while unpickling: one TUPLE1 byte nests a tuple one level deeper,
#: and hashing a tuple (a dict key, a set element) recurses in C without a depth check, ~64 bytes
#: a level on x86-64 (3.11); half as much again for safety.
_STACK_PER_BYTE = 96
_STACK_MARGIN = 1 << 20  # for the frames around the deepest recursion
_STACK_INLINE = 4 << 20  # what the calling thread can spare (a main thread has 8 MiB)
_STACK_BY_SIZE = 1 << 30  # up to this, reserve by the pickle's size (no scan: ~11 MB of pickle)
_STACK_CAP = 2 << 30  # more than this is refused
_NESTING_OPS = bytes([0x85, 0x86, 0x87]) + b"tR\x81\x92"  # TUPLE1-3, TUPLE, REDUCE, NEWOBJ(_EX)


def load_deep(load: Callable[[], T], data: bytes, file: str) -> T:
    """``load()`` of an unpickler over ``data``, on a thread whose C stack holds any nesting
    ``data`` can make (see :mod:`dist_restore._base.stack`): a pickle of ``n`` bytes nests at
    most ``n`` levels, and usually far fewer of its bytes are opcodes that nest.

    Up to ~43 KB of pickle runs on the calling thread; up to ~11 MB reserves 96 bytes of stack
    (address space: only what is used becomes memory) per pickle byte; above that, or when a
    reservation is refused, 96 bytes per opcode byte that can nest (counted: ~2 ms per MB).

    Raises:
        CorruptCheckpointError: the pickle could nest too deep for any stack we can reserve.
    """
    need = len(data) * _STACK_PER_BYTE + _STACK_MARGIN
    if need <= _STACK_INLINE:
        return load()
    counted = False
    if need > _STACK_BY_SIZE:
        need, counted = _counted_need(data), True
    while True:
        if need > _STACK_CAP:
            raise CorruptCheckpointError(
                f"data.pkl could nest values {(need - _STACK_MARGIN) // _STACK_PER_BYTE} levels deep, more than "
                f"the {_STACK_CAP >> 20} MiB of C stack dist_restore reserves to unpickle safely", file=file)
        try:
            return call_with_stack(load, need)
        except StackUnavailable as e:
            if counted:
                raise CorruptCheckpointError(f"cannot unpickle data.pkl safely: {e}", file=file) from None
            need, counted = min(need, _counted_need(data)), True


def _counted_need(data: bytes) -> int:
    nesting = len(data) - len(data.translate(None, _NESTING_OPS))
    return nesting * _STACK_PER_BYTE + _STACK_MARGIN


_NESTED = frozenset({dict, collections.OrderedDict, collections.Counter, list, tuple, set, frozenset})
_is_nested = _NESTED.__contains__
_referents = gc.get_referents


def check_tree(tree: Any, size: int, file: str, *, spent: int = 0) -> None:
    """Refuse a tree deeper than :data:`MAX_NESTING` (a tuple used as a dict key or a set
    element counts its own levels), or whose containers are shared so often that walking it
    place by place (as every walker of the tree does) would visit more places than the pickle
    of ``size`` bytes could hold as a tree (a "billion laughs" of memo references).

    A breadth-first walk, one ``gc.get_referents`` call a level: ~0.1 us a tensor.

    Args:
        spent: Places of the same pickle already counted by another check (an index file's
            DTensor table: see :func:`dist_restore._format.indexfile._check_section`).

    Raises:
        CorruptCheckpointError: naming ``file`` and the key where the tree goes too deep.
    """
    if type(tree) not in _NESTED:
        return
    level: Any = [tree]
    depth, seen = 0, spent
    budget = 2 * size + 4096  # each place of a tree costs its pickle at least a byte
    while level:
        depth += 1
        if depth > MAX_NESTING:
            raise CorruptCheckpointError(f"the tree nests deeper than {MAX_NESTING} levels (dist_restore's "
                                         "limit)", file=file, key=_deep_key(tree))
        found = _referents(*level)
        seen += len(found)
        if seen > budget:
            raise CorruptCheckpointError(
                f"the tree's containers are shared so often that walking it visits more than {budget} places "
                "(memo references multiplying one container)", file=file)
        level = list(compress(found, map(_is_nested, map(type, found))))


def deep_key(key: str) -> str:
    """A key path that goes too deep, shortened for a message (it can be 256 levels long)."""
    return key if len(key) <= 200 else f"{key[:120]}...{key[-40:]}"


def _deep_key(tree: Any) -> str | None:
    """The dotted key (as :func:`dist_restore._format.index.iter_leaves` writes it) where ``tree``
    goes deeper than :data:`MAX_NESTING`; a dict key that nests too deep shows as ``<key>``."""
    stack: list[tuple[str, int, Any]] = [("", 0, tree)]
    visits = 0
    while stack and visits < 1_000_000:
        k, depth, v = stack.pop()
        visits += 1
        if type(v) not in _NESTED:
            continue
        if depth >= MAX_NESTING:
            return deep_key(k) if k else None
        if isinstance(v, Mapping):
            for sub, child in v.items():
                name = "<key>" if type(sub) in _NESTED else sub
                stack.append((f"{k}.{name}" if k else str(name), depth + 1, child))
                if type(sub) in _NESTED:
                    stack.append((f"{k}.<key>" if k else "<key>", depth + 1, sub))
        elif isinstance(v, (list, tuple)):
            stack.extend((f"{k}[{i}]", depth + 1, c) for i, c in enumerate(v))
        else:  # a set
            stack.extend((f"{k}.<element>" if k else "<element>", depth + 1, c) for c in v)
    return None


@gc_paused  # ~3 new objects per tensor would trigger full collections over all of torch
def unpickle_refs(data: bytes, file: str, *, check: Callable[[Any, int, str], None] = check_tree
                  ) -> tuple[Any, dict[str, StorageRef]]:
    """Unpickle ``data.pkl`` into a tree of containers, plain values and refs.

    Args:
        check: ``check(tree, len(data), file)``: :func:`check_tree`, or a check of a tree
            whose shape the caller knows (an index file's tree section).

    Returns:
        ``(tree, storages)``, storages keyed by record key.

    Raises:
        UnsafeCheckpointError: a global outside the allowlist.
        CorruptCheckpointError: the pickle is malformed, a tensor's fields are not ones
            ``torch.load`` accepts (naming the key), or the tree nests too deep
            (:func:`check_tree`).
    """
    up = _RefUnpickler(data, file)
    try:
        tree = load_deep(up.load, data, file)
        check(tree, len(data), file)
    except _BadView as e:
        raise _bad_view_error(data, file, e.reason) from None
    except (UnsafeCheckpointError, CorruptCheckpointError) as e:
        if e.file is None:
            raise type(e)(e.reason, file=file) from None
        raise
    except Exception as e:  # malformed pickle: EOFError, UnpicklingError, TypeError, ...
        raise CorruptCheckpointError(
            f"data.pkl does not unpickle: {type(e).__name__}: {_short.repr(str(e))}", file=file
        ) from e
    return tree, up._storages


def _bad_view_error(data: bytes, file: str, reason: str) -> CorruptCheckpointError:
    """The error for a tensor whose rebuild arguments were refused, naming its key where a
    second, lenient unpickle (only on this error path) finds it."""
    key = None
    try:
        up = _RefUnpickler(data, file, lenient=True)
        tree = load_deep(up.load, data, file)
        check_tree(tree, len(data), file)
        if up.bad:
            reason = up.bad[0][1]
            key = _key_of(tree, up.bad[0][0])
    except Exception:  # noqa: BLE001 - the key is a courtesy; the reason stands without it
        pass
    return CorruptCheckpointError(reason, file=file, key=key)


def _key_of(tree: Any, ref: TensorRef) -> str | None:
    from dist_restore._format.index import iter_leaves

    for key, _path, v in iter_leaves(tree):
        if v is ref or (isinstance(v, DTensorRef) and v.local is ref):
            return key
    return None
