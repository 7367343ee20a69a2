"""DCP's ``.metadata`` read without running anything in it, every field checked.

``torch.distributed.checkpoint`` pickles a :class:`~torch.distributed.checkpoint.metadata.Metadata`
into ``.metadata`` and loads it with a plain ``pickle.load``: a crafted file runs code on every
rank. Here the pickle is first scanned opcode by opcode (protocol 0-4 opcodes only, memo indices
bounded by the opcodes seen), then unpickled with an allowlist that maps DCP's metadata classes
to inert records (a class name and the state ``BUILD`` gave it), torch dtypes and ``Size`` to
themselves, and pathlib paths to strings. Anything else raises :class:`UnsafeCheckpointError`
before it is called. The records are then turned into plain dataclasses, each field's type and
bounds checked (chunks inside their tensor, not overlapping, covering it; file names relative,
inside the directory; byte ranges inside their files), or :class:`CorruptCheckpointError` names
the key.
"""

from __future__ import annotations

import io
import math
import pickle
import pickletools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dist_restore.errors import CorruptCheckpointError, UnsafeCheckpointError

METADATA = ".metadata"
#: Largest ``.metadata`` read (a model of 10^5 tensors saved on 10^3 ranks has ~10^8 bytes).
MAX_METADATA = 1 << 30

_DCP = "torch.distributed.checkpoint.metadata"
_CLASSES = ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
            "TensorProperties", "MetadataIndex", "StorageMeta")
#: Opcodes of protocols 0-4 that build data (no PERSID, no EXT, no protocol-5 buffers, no INST/OBJ).
_OPCODES = frozenset(
    ["PROTO", "FRAME", "STOP", "MARK", "POP", "POP_MARK", "DUP", "NONE", "NEWTRUE", "NEWFALSE", "INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "FLOAT", "BINFLOAT", "STRING", "BINSTRING", "SHORT_BINSTRING", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "EMPTY_TUPLE", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "EMPTY_LIST", "APPEND", "APPENDS", "LIST", "EMPTY_DICT", "DICT", "SETITEM", "SETITEMS", "EMPTY_SET", "ADDITEMS", "FROZENSET", "GET", "BINGET", "LONG_BINGET", "PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE", "GLOBAL", "STACK_GLOBAL", "REDUCE", "BUILD", "NEWOBJ", "NEWOBJ_EX"])


class _Record:
    """An inert stand-in for one of DCP's metadata classes: its state, nothing else runs."""

    __slots__ = ("state",)
    kind = ""

    def __init__(self) -> None:
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state


_RECORDS = {name: type(name, (_Record,), {"__slots__": (), "kind": name}) for name in _CLASSES}


def _mem_format(v: Any) -> Any:  # _MEM_FORMAT_ENCODING(v): the value, checked later
    return v


def _path(*parts: Any) -> str:
    if not all(isinstance(p, str) for p in parts):
        raise TypeError("a path's parts must be strings")
    return "/".join(parts)


def _size(dims: Any = ()) -> torch.Size:
    if not isinstance(dims, (tuple, list)) or not all(type(d) is int for d in dims):
        raise TypeError("torch.Size takes a tuple of integers")
    return torch.Size(dims)


def _layout(name: Any) -> torch.layout:
    out = getattr(torch, name.removeprefix("torch."), None) if isinstance(name, str) else None
    if not isinstance(out, torch.layout):
        raise TypeError(f"unknown layout {name!r:.40}")
    return out


def _allowed() -> dict[tuple[str, str], Any]:
    g: dict[tuple[str, str], Any] = {(_DCP, n): c for n, c in _RECORDS.items()}
    for old in ("torch.distributed._shard.sharded_tensor.metadata",):  # TensorProperties before torch 2.1
        g[(old, "TensorProperties")] = _RECORDS["TensorProperties"]
        g[(old, "MEM_FORMAT_ENCODING")] = _mem_format
    g[(_DCP, "_MEM_FORMAT_ENCODING")] = _mem_format
    g[("torch.distributed.checkpoint.filesystem", "_StorageInfo")] = type(
        "_StorageInfo", (_Record,), {"__slots__": (), "kind": "_StorageInfo"})
    g[("torch", "Size")] = _size
    g[("torch.serialization", "_get_layout")] = _layout
    for name in dir(torch):
        obj = getattr(torch, name, None)
        if isinstance(obj, (torch.dtype, torch.layout, torch.memory_format)):
            g[("torch", name)] = obj
    for cls in ("Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath"):
        g[("pathlib", cls)] = _path
    g[("collections", "OrderedDict")] = dict
    return g


_ALLOWED: dict[tuple[str, str], Any] | None = None


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, file: Path) -> None:
        super().__init__(io.BytesIO(data))
        self._file = file

    def find_class(self, module: str, name: str) -> Any:
        global _ALLOWED
        if _ALLOWED is None:
            _ALLOWED = _allowed()
        found = _ALLOWED.get((module, name))
        if found is None:
            raise UnsafeCheckpointError(
                f"the DCP metadata asks for global '{module}.{name}', which is not one of DCP's metadata "
                "classes: refused before any of it ran (torch.distributed.checkpoint.load would have called "
                "it). If you trust this checkpoint, load it with dcp.load yourself", file=self._file)
        return found


def scan(data: bytes, file: Path) -> None:
    """Refuse a pickle with opcodes outside :data:`_OPCODES` or a memo index beyond the opcodes
    seen (a huge ``LONG_BINPUT`` makes the C unpickler allocate its memo to that index)."""
    seen = 0
    try:
        for op, arg, _pos in pickletools.genops(data):
            seen += 1
            name = op.name
            if name not in _OPCODES:
                raise UnsafeCheckpointError(f"the DCP metadata pickle uses opcode {name}, which DCP's metadata "
                                            "never needs: refused before unpickling", file=file)
            if name in ("PUT", "BINPUT", "LONG_BINPUT", "GET", "BINGET", "LONG_BINGET") and (
                    type(arg) is not int or arg > seen):
                raise CorruptCheckpointError(f"the metadata pickle's memo index {arg!r:.30} exceeds its "
                                             f"{seen} opcodes so far", file=file)
    except (ValueError, TypeError) as e:  # truncated, unknown opcode, bad argument
        raise CorruptCheckpointError(f"the metadata does not unpickle: {str(e)[:200]}", file=file) from None


def unpickle(data: bytes, file: Path) -> Any:
    """The metadata pickle as inert records (see the module docstring).

    Raises:
        UnsafeCheckpointError: a global outside the allowlist, or an opcode DCP never writes.
        CorruptCheckpointError: a malformed pickle.
    """
    scan(data, file)
    try:
        return _Unpickler(data, file).load()
    except (UnsafeCheckpointError, CorruptCheckpointError):
        raise
    except Exception as e:  # noqa: BLE001 - a malformed pickle: any of pickle's and the factories' errors
        raise CorruptCheckpointError(f"the metadata does not unpickle: {type(e).__name__}: {str(e)[:200]}",
                                     file=file) from None


@dataclass(frozen=True, slots=True)
class ItemInfo:
    """Where one stored item lies: ``length`` bytes at ``offset`` of ``file`` (a ``torch.save``
    archive of a tensor chunk, or of a non-tensor value)."""

    file: str
    offset: int
    length: int
    transforms: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class TensorMeta:
    """A tensor of the checkpoint: dtype, global shape, and its chunks ``(offsets, sizes, item)``."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    chunks: tuple[tuple[tuple[int, ...], tuple[int, ...], ItemInfo], ...]


@dataclass(frozen=True, slots=True)
class DcpMetadata:
    """The checked content of ``.metadata``.

    Attributes:
        tensors: ``{flattened key: TensorMeta}``.
        objects: ``{flattened key: ItemInfo}`` of non-tensor values (``BytesStorageMetadata``).
        paths: ``{flattened key: object path}`` (``planner_data``: how the key nests).
        order: Every key, in the metadata's order.
        version: DCP's format version (``None`` before it was recorded).
    """

    tensors: dict[str, TensorMeta]
    objects: dict[str, ItemInfo]
    paths: dict[str, tuple[str | int, ...]]
    order: tuple[str, ...]
    version: str | None


def _state(rec: Any, kind: str, file: Path, key: str | None, what: str) -> Any:
    if not isinstance(rec, _Record) or rec.kind != kind:
        raise CorruptCheckpointError(f"{what} is a {type(rec).__name__}, not DCP's {kind}", file=file, key=key)
    return getattr(rec, "state", None)  # (a record made without BUILD has none)


def _field(state: Any, name: str, file: Path, key: str | None, kind: str, default: Any = ...) -> Any:
    if not isinstance(state, dict):
        raise CorruptCheckpointError(f"{kind}'s state is a {type(state).__name__}, not a dict", file=file, key=key)
    if name not in state:
        if default is not ...:
            return default
        raise CorruptCheckpointError(f"{kind} has no {name!r}", file=file, key=key)
    return state[name]


def _dims(v: Any, file: Path, key: str, what: str) -> tuple[int, ...]:
    if not isinstance(v, (torch.Size, tuple)) or not all(type(d) is int and d >= 0 for d in v):
        raise CorruptCheckpointError(f"{what} {v!r:.80} is not a tuple of non-negative integers", file=file, key=key)
    return tuple(v)


def parse(root: Path, data: bytes, file_sizes: dict[str, int] | None = None, *, listed: bool = False) -> DcpMetadata:
    """Check and convert ``.metadata`` (``data``) of the checkpoint in ``root``.

    Args:
        root: The checkpoint directory.
        data: ``.metadata``'s bytes.
        file_sizes: ``{file: size}`` to check item ranges against; the files not in it are
            ``stat``-ed and added (with ``listed``: it lists every file; one not in it is missing).

    Raises:
        UnsafeCheckpointError, CorruptCheckpointError: see :func:`unpickle`; a field of the wrong
            type, a chunk outside its tensor or overlapping another, chunks that leave part of a
            tensor uncovered, an item path outside the directory, an item past its file's end,
            two items sharing bytes.
    """
    file = root / METADATA
    meta = _state(unpickle(data, file), "Metadata", file, None, "the pickled object")
    sdm = _field(meta, "state_dict_metadata", file, None, "Metadata")
    storage = _field(meta, "storage_data", file, None, "Metadata")
    planner = _field(meta, "planner_data", file, None, "Metadata", None)
    version = _field(meta, "version", file, None, "Metadata", None)
    if not isinstance(sdm, dict) or not all(isinstance(k, str) for k in sdm):
        raise CorruptCheckpointError("state_dict_metadata is not a dict keyed by strings", file=file)
    if not isinstance(storage, dict):
        raise CorruptCheckpointError(f"storage_data is a {type(storage).__name__}, not the dict that DCP's "
                                     "FileSystemWriter writes (another storage writer?)", file=file)
    if version is not None and not isinstance(version, str):
        raise CorruptCheckpointError(f"version {version!r:.40} is not a string", file=file)
    sizes = file_sizes if file_sizes is not None else {}
    items: dict[tuple[str, tuple[int, ...] | None], ItemInfo] = {}
    for idx, info in storage.items():
        ist = _state(idx, "MetadataIndex", file, None, "a storage_data key")
        fqn = _field(ist, "fqn", file, None, "MetadataIndex")
        if not isinstance(fqn, str):
            raise CorruptCheckpointError(f"a storage key's fqn is a {type(fqn).__name__}", file=file)
        off = _field(ist, "offset", file, fqn, "MetadataIndex", None)
        items[(fqn, None if off is None else _dims(off, file, fqn, "storage offset"))] = _item(
            info, file, fqn, root, sizes, listed)
    tensors: dict[str, TensorMeta] = {}
    objects: dict[str, ItemInfo] = {}
    for key, rec in sdm.items():
        kind = rec.kind if isinstance(rec, _Record) else type(rec).__name__
        if kind == "BytesStorageMetadata":
            item = items.get((key, None))
            if item is None:
                raise CorruptCheckpointError("no storage entry for this value", file=file, key=key)
            objects[key] = item
        elif kind == "TensorStorageMetadata":
            tensors[key] = _tensor(getattr(rec, "state", None), file, key, items)
        else:
            raise CorruptCheckpointError(f"entry is a {kind}, not a tensor or bytes entry", file=file, key=key)
    _no_shared_bytes(root, items)
    paths: dict[str, tuple[str | int, ...]] = {}
    if isinstance(planner, dict):
        for key, path in planner.items():
            if isinstance(path, tuple) and path and all(type(p) in (str, int) for p in path):
                paths[key] = path
    return DcpMetadata(tensors, objects, paths, tuple(sdm), version)


def _tensor(st: Any, file: Path, key: str, items: dict[tuple[str, Any], ItemInfo]) -> TensorMeta:
    props = _state(_field(st, "properties", file, key, "TensorStorageMetadata"), "TensorProperties", file, key,
                   "properties")
    if isinstance(props, tuple) and len(props) == 5:  # TensorProperties.__getstate__
        dtype, layout = props[0], props[1]
    elif isinstance(props, dict):  # older writers: the dataclass's __dict__
        dtype, layout = props.get("dtype"), props.get("layout", torch.strided)
    else:
        raise CorruptCheckpointError("TensorProperties' state is neither DCP's tuple nor a dict", file=file, key=key)
    if not isinstance(dtype, torch.dtype):
        raise CorruptCheckpointError(f"dtype {dtype!r:.40} is not a torch dtype", file=file, key=key)
    if layout is not torch.strided:
        raise CorruptCheckpointError(f"layout {layout!r:.40}: only dense (strided) tensors can be restored",
                                     file=file, key=key)
    shape = _dims(_field(st, "size", file, key, "TensorStorageMetadata"), file, key, "size")
    raw = _field(st, "chunks", file, key, "TensorStorageMetadata")
    if not isinstance(raw, list):
        raise CorruptCheckpointError("chunks is not a list", file=file, key=key)
    chunks = []
    for c in raw:
        cs = _state(c, "ChunkStorageMetadata", file, key, "a chunk")
        offs = _dims(_field(cs, "offsets", file, key, "ChunkStorageMetadata"), file, key, "chunk offsets")
        size = _dims(_field(cs, "sizes", file, key, "ChunkStorageMetadata"), file, key, "chunk sizes")
        if len(offs) != len(shape) or len(size) != len(shape) or any(
                o + n > d for o, n, d in zip(offs, size, shape)):
            raise CorruptCheckpointError(f"chunk at {offs} of size {size} lies outside the tensor's shape {shape}",
                                         file=file, key=key)
        item = items.get((key, offs))
        if item is None:
            raise CorruptCheckpointError(f"no storage entry for the chunk at {offs}", file=file, key=key)
        chunks.append((offs, size, item))
    _check_cover(shape, chunks, file, key)
    return TensorMeta(dtype, shape, tuple(chunks))


#: Chunk pairs compared to prove that a tensor's chunks do not overlap (a real checkpoint needs
#: about one per chunk; a crafted one could ask for chunks squared).
_MAX_PAIRS = 20_000_000


def _check_cover(shape: tuple[int, ...], chunks: list[Any], file: Path, key: str) -> None:
    """Chunks inside the tensor (checked by the caller) cover it exactly once: their volumes add
    up to the tensor's and no two overlap."""
    total = sum(math.prod(s) for _o, s, _i in chunks)
    if total != math.prod(shape):
        raise CorruptCheckpointError(f"its chunks hold {total} elements, the tensor of shape {shape} has "
                                     f"{math.prod(shape)}", file=file, key=key)
    boxes = [(o, s) for o, s, _i in chunks if math.prod(s)]
    if len(boxes) < 2:
        return
    nd = len(shape)
    d = max(range(nd), key=lambda i: len({o[i] for o, _s in boxes}))  # the dimension that separates most
    boxes.sort(key=lambda b: b[0][d])
    pairs = 0
    for i, (oi, si) in enumerate(boxes):
        end = oi[d] + si[d]
        for oj, sj in boxes[i + 1:]:
            if oj[d] >= end:
                break
            pairs += 1
            if pairs > _MAX_PAIRS:
                raise CorruptCheckpointError(f"{len(boxes)} chunks too entangled to check for overlaps",
                                             file=file, key=key)
            if all(a < c + m and c < a + n for a, n, c, m in zip(oi, si, oj, sj)):
                raise CorruptCheckpointError(f"chunks at {oi} and {oj} overlap", file=file, key=key)


def _no_shared_bytes(root: Path, items: dict[tuple[str, Any], ItemInfo]) -> None:
    by_file: dict[str, list[tuple[int, int, str]]] = {}
    for (fqn, _o), it in items.items():
        if it.length:
            by_file.setdefault(it.file, []).append((it.offset, it.offset + it.length, fqn))
    for f, spans in by_file.items():
        spans.sort()
        for (_a, e0, k0), (b1, _e1, k1) in zip(spans, spans[1:]):
            if b1 < e0:
                raise CorruptCheckpointError(f"the items of {k0!r} and {k1!r} share bytes (from offset {b1})",
                                             file=root / f, key=k1)


def _item(rec: Any, file: Path, key: str, root: Path, sizes: dict[str, int], listed: bool = False) -> ItemInfo:
    st = _state(rec, "_StorageInfo", file, key, "the storage entry")
    rel = _field(st, "relative_path", file, key, "_StorageInfo")
    off = _field(st, "offset", file, key, "_StorageInfo")
    length = _field(st, "length", file, key, "_StorageInfo")
    tds = _field(st, "transform_descriptors", file, key, "_StorageInfo", None)
    if not isinstance(rel, str) or not rel or rel.startswith(("/", "\\")) or "\\" in rel or "\0" in rel \
            or any(p in ("..", "") for p in rel.split("/")) or ":" in rel.split("/")[0]:
        raise CorruptCheckpointError(f"item file {rel!r:.100} is not a relative path inside the checkpoint",
                                     file=file, key=key)
    if type(off) is not int or type(length) is not int or off < 0 or length < 0:
        raise CorruptCheckpointError(f"item range (offset {off!r:.30}, length {length!r:.30}) is not two "
                                     "non-negative integers", file=file, key=key)
    if tds is None:
        tds = ()
    if not isinstance(tds, (list, tuple)) or not all(isinstance(t, str) for t in tds):
        raise CorruptCheckpointError(f"transform_descriptors {tds!r:.80} is not a list of strings", file=file,
                                     key=key)
    size = sizes.get(rel)
    if size is None:
        try:
            if listed:
                raise FileNotFoundError(rel)
            size = sizes[rel] = (root / rel).stat().st_size
        except FileNotFoundError:
            raise CorruptCheckpointError(f"the metadata puts the key in {rel!r}, which does not exist",
                                         file=root / rel, key=key) from None
    if off + length > size:
        raise CorruptCheckpointError(f"item ({length} bytes at offset {off}) lies past the end of the {size}-byte "
                                     "file (truncated?)", file=root / rel, key=key)
    return ItemInfo(rel, off, length, tuple(tds))
