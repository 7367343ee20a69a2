"""The index of one rank file: every entry's key, dtype, shape and place in the file.

Built from the zip directory and a restricted unpickle of ``data.pkl`` only; no tensor
data is read. Legacy (non-zip) files are indexed through ``torch.load`` with a warning.
"""

from __future__ import annotations

import logging
import mmap
import operator
import os
import sys
import time
import zlib
from array import array
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from dist_restore._format.dtensor import DLayout, DTensorRef
from dist_restore._gc import gc_paused, paused
from dist_restore._format.keypath import RawPath
from dist_restore._paths import open_regular, raise_with_path
from dist_restore._format.unpickle import MAX_NESTING, ExoticRef, StorageRef, TensorRef, deep_key, unpickle_refs
from dist_restore._format.zip import ZipRecord, data_offset, is_zip, prefetch_headers, read_zip_records
from dist_restore.errors import CorruptCheckpointError

logger = logging.getLogger(__name__)

EntryKind = Literal["tensor", "dtensor", "exotic", "object"]


@dataclass(frozen=True, slots=True)
class IndexEntry:
    """One leaf of a rank file.

    Attributes:
        key: Dotted key path (``model.w``, ``opt.groups[0].lr``).
        kind: ``"tensor"`` (dense, read by the fast path), ``"dtensor"`` (a DTensor: its
            local shard is a dense record; ``shape`` is the global shape), ``"exotic"`` (quantized,
            sparse, nested, meta: read through ``torch.load``) or ``"object"`` (a plain
            Python value stored in the pickle).
        dtype: Tensor dtype, when known.
        shape: Tensor shape, when known.
        stride: Tensor strides in elements (dense tensors only).
        storage_offset: Offset of the view in its storage, in elements (dense only).
        nbytes: Bytes of the tensor's elements (``numel * itemsize``).
        storage_key: Record key of the storage (``data/{storage_key}``); tensors that
            share one are views of the same storage (tied weights).
        file_offset: Byte offset in the file of the view's first element (dense only;
            ``None`` for legacy files).
        value: The value, for ``"object"`` entries.
        local_shape: A DTensor's local shard shape (``stride``, ``storage_offset``,
            ``nbytes``, ``storage_key`` and ``file_offset`` describe that shard).
        layout: A DTensor's layout: placements, mesh shape, dim names, this file's mesh
            coordinate (``layout.mesh.coordinate``).
    """

    key: str
    kind: EntryKind
    dtype: torch.dtype | None = None
    shape: tuple[int, ...] | None = None
    stride: tuple[int, ...] | None = None
    storage_offset: int | None = None
    nbytes: int = 0
    storage_key: str | None = None
    file_offset: int | None = None
    value: Any = None
    local_shape: tuple[int, ...] | None = None
    layout: DLayout | None = None

    @property
    def region(self) -> tuple[tuple[int, int], ...] | None:
        """A DTensor's global region held by this file as ``(offset, size)`` per dim, when
        it is a box; ``None`` for other entries or a non-box (strided) region (see
        :meth:`DLayout.runs_at` for the exact runs)."""
        if self.layout is None or self.layout.mesh.coordinate is None:
            return None
        runs = self.layout.runs_at(self.layout.mesh.coordinate)
        if any(len(r) > 1 for r in runs):
            return None
        return tuple((r[0][0], r[0][1]) if r else (0, 0) for r in runs)


SOURCE_TENSOR_TYPES = (TensorRef, DTensorRef, ExoticRef, StorageRef, torch.Tensor)

#: What :meth:`CheckpointIndex.entries_at` gives for a path the tree lacks.
NO_ENTRY: Any = object()


class CheckpointIndex:
    """What one rank file holds, without its tensor data.

    Use :func:`read_index` (or :meth:`dist_restore.CheckpointReader.index`) to build one.

    Attributes:
        file: The rank file.
        file_size: Its size in bytes at indexing time.
        format: ``"zip"`` (torch.save default) or ``"legacy"`` (non-zip, read via torch.load).
        tree: The unpickled structure, tensors replaced by references (legacy: real tensors).
        records: ``{storage key: ZipRecord}`` of the storage records (zip only).
        seconds: Time taken to build the index.
    """

    def __init__(
        self,
        file: Path,
        file_size: int,
        fmt: Literal["zip", "legacy"],
        tree: Any,
        records: dict[str, ZipRecord],
        storages: dict[str, StorageRef],
        native_order: bool,
        seconds: float,
    ) -> None:
        self.file = file
        self.file_size = file_size
        self.format = fmt
        self.tree = tree
        self.records = records
        self.storages = storages
        #: False when the file's byte order differs from this machine's (read via torch.load).
        self.native_order = native_order
        self.seconds = seconds
        self._entries: dict[str, IndexEntry] | None = None
        self._data_offsets: dict[str, int] = {}

    #: Where the index came from: ``"pickle"`` (the rank file's zip directory and
    #: ``data.pkl``) or ``"index file"`` (``checkpoint_{rank}.idx``, see :mod:`dist_restore._format.indexfile`).
    source = "pickle"

    @property
    def walkable(self) -> tuple[Any, Callable[[int], Any] | None]:
        """``(tree, leaf)`` for the plan: the tree whose leaves are references, and no
        ``leaf`` function; an index file gives a skeleton of row numbers and the function
        that turns a row into its reference or value."""
        return self.tree, None

    def entry_at(self, path: RawPath) -> Any:
        """The value at a raw path of the tree; ``KeyError`` when the tree lacks it."""
        v = self.walkable[0]
        for p in path:
            try:
                v = v[p]
            except (KeyError, IndexError, TypeError):
                raise KeyError(path) from None
        return self._resolved(v)

    def entries_at(self, paths: Sequence[RawPath]) -> list[Any]:
        """:meth:`entry_at` of every path, :data:`NO_ENTRY` where the tree lacks it."""
        out = []
        for path in paths:
            try:
                out.append(self.entry_at(path))
            except KeyError:
                out.append(NO_ENTRY)
        return out

    def _resolved(self, node: Any) -> Any:
        """A node of :attr:`walkable`'s tree as :attr:`tree` holds it (the same here)."""
        return node

    def data_offsets(self, storage_keys: list[str]) -> list[int] | None:
        """The data offsets of these records when known without reading their local
        headers (an index file records them), else ``None``."""
        return None

    @property
    def entries(self) -> dict[str, IndexEntry]:
        """Every leaf, in pickle order, keyed by dotted key path."""
        if self._entries is None:
            if self.records and len(self._data_offsets) < len(self.records):
                try:
                    with open(self.file, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                        self.prefetch_headers(f.fileno(), list(self.records))
                        for key in self.records:
                            self.data_offset(key, mm)
                except OSError as e:
                    raise_with_path(e, self.file)
            with paused():  # many small objects: avoid full collections over all of torch
                self._entries = {e.key: e for e in self._iter_entries()}
        return self._entries

    def dtensor_layouts(self) -> Iterator[DLayout]:
        """The layout of every DTensor entry, without building an :class:`IndexEntry` per
        leaf or reading any record's local header."""
        for key, _path, v in self._leaves(self.tree):
            if isinstance(v, DTensorRef):
                try:
                    yield v.layout
                except CorruptCheckpointError as e:
                    raise CorruptCheckpointError(e.reason, file=self.file, key=key) from None

    def _leaves(self, tree: Any) -> Iterator[tuple[str, RawPath, Any]]:
        """:func:`iter_leaves`, its errors naming this file."""
        try:
            yield from iter_leaves(tree)
        except CorruptCheckpointError as e:
            if e.file is not None:
                raise
            raise CorruptCheckpointError(e.reason, file=self.file, key=e.key) from None

    def prefetch_headers(self, fd: int, storage_keys: Iterable[str]) -> None:
        """Start reading the local headers of these records whose data offsets are not
        known yet, all at once (see :func:`dist_restore._format.zip.prefetch_headers`):
        call before :meth:`data_offset` on many records of a file that may be cold."""
        known, recs = self._data_offsets, self.records
        prefetch_headers(fd, [recs[k].header_offset for k in storage_keys if k not in known and k in recs])

    def data_offset(self, storage_key: str, buf: Any) -> int:
        """Byte offset of a storage record's data, read from its local header in ``buf``."""
        off = self._data_offsets.get(storage_key)
        if off is None:
            off = self._data_offsets[storage_key] = data_offset(buf, self.records[storage_key], str(self.file))
        return off

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[IndexEntry]:
        return iter(self.entries.values())

    def __getitem__(self, key: str) -> IndexEntry:
        return self.entries[key]

    @property
    def tensor_nbytes(self) -> int:
        """Bytes of all tensor elements in the file (views of one storage counted once each)."""
        return sum(e.nbytes for e in self.entries.values() if e.kind != "object")

    def _iter_entries(self) -> Iterator[IndexEntry]:
        for key, _path, value in self._leaves(self.tree):
            yield self._entry(key, value)

    def _entry(self, key: str, v: Any) -> IndexEntry:
        if isinstance(v, DTensorRef):
            loc: TensorRef = v.local
            base = self._data_offsets.get(loc.storage.key)
            off = None if base is None else base + loc.storage_offset * loc.dtype.itemsize
            try:
                layout = v.layout
            except CorruptCheckpointError as e:
                raise CorruptCheckpointError(e.reason, file=self.file, key=key) from None
            return IndexEntry(key, "dtensor", v.dtype, tuple(v.size), loc.stride, loc.storage_offset, loc.nbytes,
                              loc.storage.key, off, local_shape=tuple(loc.size), layout=layout)
        if isinstance(v, TensorRef):
            base = self._data_offsets.get(v.storage.key)
            off = None if base is None else base + v.storage_offset * v.dtype.itemsize
            return IndexEntry(key, "tensor", v.dtype, v.size, v.stride, v.storage_offset,
                              v.nbytes, v.storage.key, off)
        if isinstance(v, torch.Tensor):  # legacy file: loaded tensor
            if v.is_nested:
                return IndexEntry(key, "exotic", v.dtype, None)
            if v.layout != torch.strided or v.is_quantized:
                return IndexEntry(key, "exotic", v.dtype, tuple(v.shape))
            return IndexEntry(key, "tensor", v.dtype, tuple(v.shape), tuple(v.stride()),
                              v.storage_offset(), v.numel() * v.element_size())
        if isinstance(v, ExoticRef):
            return IndexEntry(key, "exotic", v.dtype, v.size,
                              nbytes=sum(s.nbytes for s in v.storages))
        if isinstance(v, StorageRef):
            return IndexEntry(key, "exotic", v.dtype, (v.numel,), nbytes=v.nbytes, storage_key=v.key)
        return IndexEntry(key, "object", value=v)


def map_leaves(tree: Any, leaf: Callable[[Any], Any], *, limit: int | None = None) -> Any:
    """``tree`` rebuilt with the same containers (a mapping as its own type, exact lists and
    tuples) and every leaf ``v`` replaced by ``leaf(v)``. A list or tuple subclass (such as
    ``torch.Size``) is a leaf: ``leaf`` decides whether it can stand.

    Args:
        limit: At most this many places to visit (the items of every container, counted at
            each place a shared container occurs: memo references can make a small pickle's
            tree take 2**60 places to walk).

    Raises:
        CorruptCheckpointError: a container deeper than :data:`MAX_NESTING` (the recursion
            stays well inside Python's limit), or more than ``limit`` places.
    """
    return _map_leaves(tree, leaf, 0, [_UNLIMITED if limit is None else limit])


_UNLIMITED = 1 << 62


def _map_leaves(tree: Any, leaf: Callable[[Any], Any], depth: int, left: list[int]) -> Any:
    t = type(tree)
    if t is list or t is tuple or isinstance(tree, Mapping):
        if depth >= MAX_NESTING:
            raise _too_deep("")
        left[0] -= len(tree)
        if left[0] < 0:
            raise CorruptCheckpointError("the tree's containers are shared so often that walking it visits too "
                                         "many places (memo references multiplying one container)")
        depth += 1
        if t is list:
            return [_map_leaves(c, leaf, depth, left) for c in tree]
        if t is tuple:
            return tuple([_map_leaves(c, leaf, depth, left) for c in tree])
        out = t()
        for k, c in tree.items():
            out[k] = _map_leaves(c, leaf, depth, left)
        return out
    return leaf(tree)


def iter_leaves(tree: Any, key: str = "", path: RawPath = ()) -> Iterator[tuple[str, RawPath, Any]]:
    """Yield ``(dotted key, raw path, leaf)`` for every leaf below ``tree``, in order.

    Dicts, lists and tuples are descended into; everything else is a leaf, ``torch.Size``
    included (a value, as ``torch.load`` returns it, not a container of ints).

    Raises:
        CorruptCheckpointError: a container deeper than :data:`MAX_NESTING` (counted from the
            root: ``path`` is where ``tree`` is), naming the key (not the file: the caller's).
    """
    stack: list[tuple[str, RawPath, Any]] = [(key, path, tree)]
    pop, push = stack.pop, stack.append
    while stack:
        k, p, v = pop()
        if isinstance(v, Mapping):
            if len(p) >= MAX_NESTING:  # (its path's length is a container's depth)
                raise _too_deep(k)
            items = list(v.items())
            for sub, child in reversed(items):
                push((f"{k}.{sub}" if k else str(sub), p + (sub,), child))
        elif isinstance(v, (list, tuple)) and not isinstance(v, torch.Size):
            if len(p) >= MAX_NESTING:
                raise _too_deep(k)
            for i in range(len(v) - 1, -1, -1):
                push((f"{k}[{i}]", p + (i,), v[i]))
        else:
            yield k, p, v


def _too_deep(key: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(f"the tree nests deeper than {MAX_NESTING} levels (dist_restore's limit)",
                                  key=deep_key(key) if key else None)


def shares_containers(tree: Any) -> bool:
    """Whether one dict, list or tuple object occurs at two places of ``tree`` (as the pickle
    memo can make it): the containers cannot then be filled in place, place by place."""
    ids = array("q")
    stack = [tree]
    pop, add = stack.pop, ids.append
    while stack:
        v = pop()
        if isinstance(v, Mapping):
            add(id(v))
            stack.extend(v.values())
        elif isinstance(v, (list, tuple)) and not isinstance(v, torch.Size):
            add(id(v))
            stack.extend(v)
    return len(ids) > 1 and len(np.unique(np.frombuffer(ids, dtype=np.int64))) < len(ids)


@gc_paused
def read_index(file: str | os.PathLike[str], *, use_index_file: bool = True, tables: bool = False) -> CheckpointIndex:
    """Index one ``torch.save`` file without reading its tensor data.

    Args:
        file: Path of the file.
        use_index_file: Load the index from ``checkpoint_{rank}.idx`` beside the file
            when there is one that matches it (written by :class:`CheckpointWriter`);
            otherwise, or when it does not match, parse the file itself.
        tables: Parse the file into an index file's tables where they describe it (see
            :mod:`dist_restore._format.pickletables`): a few bytes a tensor instead of a reference
            object each, for reading the whole file.

    Raises:
        FileNotFoundError: no such file.
        IsADirectoryError, PermissionError, OSError: not a readable regular file (each
            names the path).
        CorruptCheckpointError: truncated or corrupt.
        UnsafeCheckpointError: the pickle asks for a non-allowlisted global.
    """
    path = Path(file)
    t0 = time.perf_counter()
    fd = open_regular(path)
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            raise CorruptCheckpointError("file is empty", file=path)
        head = os.pread(fd, 4, 0)
        if is_zip(head) and use_index_file:
            from dist_restore._format.indexfile import load_index_file

            indexed = load_index_file(path, fd, size, t0)
            if indexed is not None:
                return indexed
        if not is_zip(head):
            if not head.startswith(b"\x80"):  # every legacy file starts with a pickle PROTO opcode
                raise CorruptCheckpointError(
                    f"not a torch.save file: starts with {head[:8]!r}, neither a zip archive nor the "
                    "legacy format (truncated or corrupt?)", file=path)
            return _legacy_index(path, size, t0)
        with mmap.mmap(fd, size, access=mmap.ACCESS_READ) as mm:
            if tables:
                from dist_restore._format.pickletables import pickle_tables

                indexed = pickle_tables(path, mm, size, t0)
                if indexed is not None:
                    return indexed
            return _zip_index(path, mm, size, t0)
    except OSError as e:  # pread, mmap: errors that name no file
        raise_with_path(e, path)
    finally:
        os.close(fd)


def _zip_index(path: Path, mm: mmap.mmap, size: int, t0: float) -> CheckpointIndex:
    records = read_zip_records(mm, str(path))
    pkl = next((r for n, r in records.items() if n.endswith("/data.pkl") and n.count("/") == 1), None)
    if pkl is None:
        raise CorruptCheckpointError("no data.pkl record: not a torch.save file", file=path)
    prefix = pkl.name[: -len("data.pkl")]
    off = data_offset(mm, pkl, str(path))
    data = mm[off : off + pkl.size]
    if zlib.crc32(data) != pkl.crc32:
        raise CorruptCheckpointError("CRC32 mismatch in data.pkl", file=path)
    native = True
    bo = records.get(prefix + "byteorder")
    if bo is not None:
        off = data_offset(mm, bo, str(path))
        order = mm[off : off + bo.size].decode("ascii", "replace")
        native = order == sys.byteorder
    tree, storages = unpickle_refs(data, str(path))
    storage_records = _storage_records(path, records, storages, prefix + "data/")
    if not native:
        logger.warning("%s was written with the other byte order; reading it through torch.load", path)
    return CheckpointIndex(path, size, "zip", tree, storage_records, storages, native,
                           time.perf_counter() - t0)


def _storage_records(path: Path, records: dict[str, ZipRecord], storages: dict[str, StorageRef],
                     data_prefix: str) -> dict[str, ZipRecord]:
    """``{storage key: its record}``, each record checked to hold the bytes the pickle says."""
    keys = list(storages)
    recs = list(map(records.get, [data_prefix + key for key in keys]))
    if None not in recs:  # one pass in C when every record is there with the right size
        refs = storages.values()
        nbytes = list(map(operator.mul, map(_numel, refs), map(_itemsize, refs)))
        if list(map(_size, recs)) == nbytes:
            return dict(zip(keys, recs))
    storage_records: dict[str, ZipRecord] = {}
    for key, ref in storages.items():  # the first bad record, by name
        rec = records.get(data_prefix + key)
        if rec is None:
            raise CorruptCheckpointError(f"storage record {data_prefix + key!r} is missing", file=path)
        if rec.size != ref.nbytes:
            raise CorruptCheckpointError(
                f"storage record {data_prefix + key!r} holds {rec.size} bytes, the pickle says "
                f"{ref.nbytes} ({ref.numel} x {ref.dtype})", file=path)
        storage_records[key] = rec
    return storage_records


_numel = operator.attrgetter("numel")
_itemsize = operator.attrgetter("dtype.itemsize")
_size = operator.attrgetter("size")


def _legacy_index(path: Path, size: int, t0: float) -> CheckpointIndex:
    logger.warning(
        "%s is not a zip file (legacy torch.save format, _use_new_zipfile_serialization=False): "
        "indexing and reading it with a full torch.load(weights_only=True)", path)
    tree = full_load(path, map_location="cpu", mmap=False)
    return CheckpointIndex(path, size, "legacy", tree, {}, {}, True, time.perf_counter() - t0)


def full_load(path: Path, *, map_location: Any, mmap: bool) -> Any:
    """``torch.load(weights_only=True)``, its errors turned into ours."""
    import pickle

    from dist_restore.errors import UnsafeCheckpointError

    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        if "unsupported global" in str(e).lower():  # torch's weights-only allowlist said no
            raise UnsafeCheckpointError(f"torch.load(weights_only=True) refused the file: {e}",
                                        file=path) from None
        raise CorruptCheckpointError(f"torch.load failed: UnpicklingError: {e}", file=path) from e
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever a damaged file makes torch.load raise
        raise CorruptCheckpointError(f"torch.load failed: {type(e).__name__}: {e}", file=path) from e
