"""A ``torch.save`` file's index as an index file's tables, straight from its pickle.

:func:`dist_restore._format.index.read_index` unpickles ``data.pkl`` into a tree of references: per tensor a
``TensorRef``, a ``StorageRef``, their tuples and a ``ZipRecord``, ~1 KB that a full read
(``state_dict=None``) would keep alive next to the tensors it makes. For that read this module
makes the tables :class:`CheckpointWriter`'s index file holds (:mod:`dist_restore._format.indexfile`) instead: the
rebuild callbacks append each tensor's fields to machine-int columns and leave a placeholder
in the tree; the zip directory and the records' local headers are parsed into numpy columns;
the tree becomes the skeleton, every leaf a row. :mod:`dist_restore._bytes.readall` then reads the file from
those tables as it reads one with an index file.

The unpickling is as safe as :func:`dist_restore._format.unpickle.unpickle_refs`': the same allowlist, the dense
rebuild functions replaced by ones that only record their arguments. Whatever the tables do not
describe (exotic tensors, DTensors, Python attributes on a tensor, a bare storage, another byte
order, an unusual zip), and every error, gives ``None``: the caller indexes the file as ever,
and that path reports the error precisely.
"""

from __future__ import annotations

import logging
import mmap
import pickle
import sys
import zlib
from array import array
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dist_restore._format import unpickle as _unpickle
from dist_restore._format.dtensor import DTensorRef
from dist_restore._format.index import map_leaves
from dist_restore._gc import paused
from dist_restore._format.indexfile import _F_CONJ, _F_GRAD, _F_NEG, _F_PARAM, _ROW, _STORAGE, KIND_TENSOR, KIND_VALUE, \
    FileIndex
from dist_restore._format.unpickle import ExoticRef, StorageRef, TensorRef
from dist_restore._format.zip import ZipTables, read_zip_tables
from dist_restore.errors import CorruptCheckpointError

logger = logging.getLogger(__name__)

_DROP = 4 << 20  # local headers parsed (and their mapped pages dropped) this many file bytes at a time


class _NotTables(Exception):
    """Something the tables do not describe: index the file as ever."""


class _Row(int):
    """A tensor's row, where the tree holds it until the skeleton is made."""

    __slots__ = ()


class _Sto(int):
    """A storage's number, as ``persistent_load`` gives it to the rebuild functions."""

    __slots__ = ()


def pickle_tables(path: Path, mm: mmap.mmap, size: int, t0: float) -> FileIndex | None:
    """The index of the ``torch.save`` file ``path`` (mapped as ``mm``, ``size`` bytes) as tables,
    or ``None`` when they do not describe it or anything is wrong with it."""
    try:
        with paused():  # several objects per tensor: no full collections over all of torch
            return _tables(path, mm, size, t0)
    except MemoryError:
        raise CorruptCheckpointError("ran out of memory indexing the file (MemoryError): a file whose few bytes "
                                     "ask for much memory, or too little memory for it", file=path) from None
    except Exception as e:  # noqa: BLE001 - whatever it is, the reference path says it precisely
        logger.debug("%s: indexed as references, not tables: %s: %s", path, type(e).__name__, e)
        return None


def _tables(path: Path, mm: mmap.mmap, size: int, t0: float) -> FileIndex:
    zt = read_zip_tables(mm, str(path))
    if zt is None:
        raise _NotTables("an unusual zip directory")
    pkl = [i for i in np.flatnonzero(np.char.endswith(zt.names, b"/data.pkl")).tolist()
           if zt.names[i].count(b"/") == 1]
    if len(pkl) != 1 or _find(zt, [zt.names[pkl[0]]])[0] < 0:
        raise _NotTables("not one data.pkl")
    i = pkl[0]
    prefix = zt.names[i][: -len(b"data.pkl")]
    offsets = _data_offsets(mm, zt.header_offset[[i]], zt.size[[i]], size)
    data = mm[int(offsets[0]) : int(offsets[0]) + int(zt.size[i])]
    if zlib.crc32(data) != int(zt.crc32[i]):
        raise _NotTables("data.pkl's CRC32 does not match")
    bo = _find(zt, [prefix + b"byteorder"])
    if bo[0] >= 0:
        at = int(_data_offsets(mm, zt.header_offset[bo], zt.size[bo], size)[0])
        if mm[at : at + int(zt.size[bo[0]])].decode("ascii", "replace") != sys.byteorder:
            raise _NotTables("another byte order")
    up = _Columns()
    limit = 2 * len(data) + 4096  # places in the tree: each costs its pickle at least a byte

    def skeleton() -> Any:
        tree = _TableUnpickler(data, up).load()  # the unpickler and its memo go right after
        return up.skeleton(tree, limit)  # (its dict keys hashed again: on the same deep stack)

    skel = _unpickle.load_deep(skeleton, data, str(path))
    del data
    # The skeleton and the values, pickled as an index file's tree section and loaded back
    # from that: unpickling data.pkl left ~500 bytes a tensor of the memo's objects freed
    # among the tree's, and the allocator's arenas stay as long as one object in them does
    # (60,000 tensors: ~30 MiB of RSS). Once the tree goes too, they are returned whole. (A key
    # nested too deep fails to pickle here, or when the section is loaded: check_tree.)
    blob = pickle.dumps((skel, up.objects, {}), protocol=4)
    del skel
    up.objects = {}
    nsto = len(up.s_numel)
    if up.skeys is None:
        want = np.char.add(prefix + b"data/", np.arange(nsto).astype("S"))
    else:
        want = np.array([prefix + b"data/" + k.encode("utf-8") for k in up.skeys], dtype="S")
    rec = _find(zt, want)
    if nsto and (rec < 0).any():
        raise _NotTables("a storage record is missing")
    dtypes = list(up.dtypes)
    isz = np.array([d.itemsize for d in dtypes] or [1], dtype=np.int64)
    s_dtype = np.frombuffer(up.s_dtype, dtype=np.uint8)
    s_numel = np.frombuffer(up.s_numel, dtype=np.int64)
    rec_size = zt.size[rec]
    s_isz = isz[s_dtype]
    # numel within the record before any product (numel * itemsize can wrap int64 around)
    if nsto and not ((s_numel >= 0) & (s_numel <= rec_size // s_isz) & (s_numel * s_isz == rec_size)).all():
        raise _NotTables("a storage record's size is not what the pickle says")
    sto = np.zeros(nsto, dtype=_STORAGE)
    sto["header"] = zt.header_offset[rec]
    sto["size"] = rec_size
    sto["crc"] = zt.crc32[rec]
    sto["dtype"] = s_dtype
    sto["loc"] = np.frombuffer(up.s_loc, dtype=np.uint8)
    sto["numel"] = s_numel
    sto["data"] = _data_offsets(mm, sto["header"], rec_size, size) if nsto else 0
    rows = np.zeros(len(up.kind), dtype=_ROW)
    for name, col in (("kind", up.kind), ("dtype", up.dtype), ("ndim", up.ndim), ("flags", up.flags),
                      ("storage", up.storage), ("dims", up.dims_at), ("offset", up.offset)):
        rows[name] = np.frombuffer(col, dtype=rows.dtype[name].newbyteorder("="))
    dims = np.frombuffer(up.dims, dtype=np.int64) if len(up.dims) else np.zeros(0, dtype=np.int64)
    # (each row's sizes, strides and offset were checked as the rebuild functions met them:
    # non-negative int64, torch's element count; with every storage's numel its record's, the
    # readers' span checks over these columns cannot wrap)
    return FileIndex.from_tables(path, size, prefix.decode("utf-8"), dtypes, list(up.locations), rows, dims,
                                 sto, up.skeys, blob, t0)


def _find(zt: ZipTables, names: np.ndarray | list[bytes]) -> np.ndarray:
    """The directory position of each name, ``-1`` for a name it lacks (or holds twice)."""
    want = np.asarray(names, dtype="S") if not isinstance(names, np.ndarray) else names
    order = np.argsort(zt.names, kind="stable")
    have = zt.names[order]
    pos = np.minimum(np.searchsorted(have, want), max(0, len(have) - 1))
    found = order[pos] if len(have) else np.zeros(len(want), dtype=np.int64)
    lengths = np.char.str_len(want)
    ok = (have[pos] == want) & (zt.name_lengths[found] == lengths) if len(have) else np.zeros(len(want), bool)
    twice = np.zeros(len(want), dtype=bool)
    if len(have) > 1:  # a name the directory holds twice: which record is meant is not clear
        dup = np.flatnonzero(have[1:] == have[:-1])
        if len(dup):
            twice = np.isin(want, have[dup])
    return np.where(ok & ~twice, found, -1)


def _data_offsets(mm: mmap.mmap, header: np.ndarray, sizes: np.ndarray, size: int) -> np.ndarray:
    """Each record's data offset, from its local header: a few MiB of the file at a time, the
    pages the parse faulted in unmapped after each (the whole file would be resident else)."""
    u8 = np.frombuffer(mm, dtype=np.uint8)
    try:
        order = np.argsort(header, kind="stable")
        hs = header[order]
        out = np.empty(len(hs), dtype=np.int64)
        if len(hs) and (hs[0] < 0 or hs[-1] + 30 > size):
            raise _NotTables("a local header lies outside the file")
        cuts = np.searchsorted(hs, np.arange(int(hs[0]) + _DROP, int(hs[-1]) + 1, _DROP)) if len(hs) else []
        for part in np.split(np.arange(len(hs)), cuts):
            if not len(part):
                continue
            h = hs[part]
            ok = (u8[h] == 0x50) & (u8[h + 1] == 0x4B) & (u8[h + 2] == 3) & (u8[h + 3] == 4)
            nlen = u8[h + 26].astype(np.int64) | (u8[h + 27].astype(np.int64) << 8)
            elen = u8[h + 28].astype(np.int64) | (u8[h + 29].astype(np.int64) << 8)
            out[part] = h + 30 + nlen + elen
            if not ok.all():
                raise _NotTables("a bad local header")
            lo = int(h[0]) // mmap.PAGESIZE * mmap.PAGESIZE
            hi = -(-(int(h[-1]) + 30) // mmap.PAGESIZE) * mmap.PAGESIZE
            mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)  # (a length past the end: to the end)
        res = np.empty_like(out)
        res[order] = out
        if len(res) and (res + sizes > size).any():
            raise _NotTables("a record extends past the end of the file")
        return res
    finally:
        del u8


class _TableUnpickler(pickle.Unpickler):
    """The restricted unpickler of :mod:`dist_restore._format.unpickle`, its dense rebuild functions (and
    ``persistent_load``) replaced by those of a :class:`_Columns`, which records them as rows.

    Nothing it holds refers back to it: it (and its memo, every object the pickle made) goes
    the moment the caller drops it, not at the next garbage collection.
    """

    def __init__(self, data: bytes, cols: _Columns) -> None:
        super().__init__(_unpickle._Prefetched(data))
        self._rebuild = {
            ("torch._utils", "_rebuild_tensor"): cols.rebuild_tensor,
            ("torch._utils", "_rebuild_tensor_v2"): cols.rebuild_tensor_v2,
            ("torch._utils", "_rebuild_tensor_v3"): cols.rebuild_tensor_v3,
            ("torch._utils", "_rebuild_parameter"): cols.rebuild_parameter,
            ("torch._utils", "_rebuild_parameter_with_state"): cols.rebuild_parameter_with_state,
            ("torch._tensor", "_rebuild_from_type_v2"): cols.rebuild_from_type_v2,
        }
        self.persistent_load = cols.persistent_load
        for key in _unpickle._BYTEARRAY:
            self._rebuild[key] = _unpickle.bounded_bytearray(len(data))

    def find_class(self, module: str, name: str) -> Any:
        f = self._rebuild.get((module, name))
        if f is not None:
            return f
        if _unpickle._ALLOWED is None:
            _unpickle._ALLOWED = _unpickle._allowed_globals()
        if (module, name) not in _unpickle._ALLOWED:
            raise _NotTables(f"global {module}.{name} (refused by the reference unpickler)")
        if module in ("torch._utils", "torch._tensor") or module.startswith("torch.distributed"):
            # another tensor rebuild (quantized, sparse, nested, meta, a subclass) or a DTensor's
            # parts: stop here, not after the whole pickle
            raise _NotTables(f"global {module}.{name} (a tensor the tables do not describe)")
        return _unpickle._ALLOWED[(module, name)]


class _Columns:
    """A file's rows and storages as the rebuild functions meet them, in machine-int columns
    (the index file's ``_ROW`` and ``_STORAGE`` fields), and the tree's values by row."""

    def __init__(self) -> None:
        self.kind, self.dtype, self.ndim, self.flags = array("B"), array("B"), array("B"), array("B")
        self.storage, self.dims_at, self.offset, self.dims = array("i"), array("i"), array("q"), array("q")
        self.s_dtype, self.s_numel, self.s_loc = array("B"), array("q"), array("B")
        self.skeys: list[str] | None = None  # None while they are "0", "1", ... in order
        self._snum: dict[str, int] | None = None
        self.dtypes: dict[torch.dtype, int] = {}
        self.locations: dict[str, int] = {}
        self.objects: dict[int, Any] = {}

    # -- storages ------------------------------------------------------------------------------

    def persistent_load(self, pid: Any) -> _Sto:
        tag, stype, key, location, numel = pid
        if tag != "storage" or type(stype) is not _StorageType or type(key) is not str:
            raise _NotTables("an unusual persistent id")  # (a key of another type: torch.load reads the
            # record once per key type, each in its own dtype; the reference path sorts that out)
        known = self._known(key)
        if known is not None:
            return _Sto(known)
        if type(numel) is not int:  # (its range: the int64 column, then its record's size)
            raise _NotTables("a storage's numel is not an int")
        if location.__class__ is not str:
            location = location.decode("ascii") if isinstance(location, bytes) else str(location)
        n = len(self.s_numel)
        if self.skeys is None and key != str(n):  # the keys are not "0", "1", ...: keep them
            self.skeys = [str(i) for i in range(n)]
            self._snum = {k: i for i, k in enumerate(self.skeys)}
        if self.skeys is not None:
            self.skeys.append(key)
            self._snum[key] = n  # type: ignore[index]
        self.s_dtype.append(self._code(self.dtypes, stype.dtype))
        self.s_numel.append(numel)
        self.s_loc.append(self._code(self.locations, location))
        return _Sto(n)

    def _known(self, key: str) -> int | None:
        if self._snum is not None:
            return self._snum.get(key)
        if key.isdigit() and key.isascii():
            i = int(key)
            if i < len(self.s_numel) and str(i) == key:
                return i
        return None

    @staticmethod
    def _code(table: dict[Any, int], v: Any) -> int:
        c = table.get(v)
        if c is None:
            if len(table) >= 255:
                raise _NotTables("more than 255 dtypes or locations")
            c = table[v] = len(table)
        return c

    # -- tensors -------------------------------------------------------------------------------

    def _row(self, storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any, metadata: Any,
             dtype: torch.dtype | None) -> _Row:
        if type(storage) is not _Sto:
            raise _NotTables("a tensor rebuilt from something other than a storage record")
        if type(size) is not tuple or type(stride) is not tuple:
            if not isinstance(size, (tuple, list)) or not isinstance(stride, (tuple, list)):
                raise _NotTables("sizes or strides that are not sequences")
            size, stride = tuple(size), tuple(stride)
        # the reference path's checks (any failure: it says which and where); a 1-d view of small
        # ints inline, as _rebuild_tensor_v2 does, anything else through view_problem
        if type(requires_grad) is not bool or len(size) > 255:
            raise _NotTables("a tensor's fields are not ones torch.load accepts")
        if len(size) == 1 == len(stride) and type(offset) is int:
            a, = size
            b, = stride
            plain = type(a) is int and type(b) is int and 0 <= a <= _SMALL and 0 <= b <= _SMALL and 0 <= offset <= _SMALL
        else:
            plain = _plain_view(offset, size, stride)
        if not plain and _view_problem(offset, size, stride) is not None:
            raise _NotTables("a tensor's fields are not ones torch.load accepts")
        code = self.s_dtype[storage] if dtype is None else self._code(self.dtypes, dtype)
        flags = _F_GRAD if requires_grad else 0
        if metadata:
            if _metadata_problem(metadata, _dtype_of(self.dtypes, code)) or set(metadata) - {"conj", "neg"}:
                raise _NotTables("unusual tensor metadata")
            flags |= (_F_CONJ if metadata.get("conj") else 0) | (_F_NEG if metadata.get("neg") else 0)
        row = len(self.kind)
        self.kind.append(KIND_TENSOR)
        self.dtype.append(code)
        self.ndim.append(len(size))
        self.flags.append(flags)
        self.storage.append(storage)
        self.dims_at.append(len(self.dims))
        self.offset.append(offset)
        self.dims.extend(size)
        self.dims.extend(stride)
        return _Row(row)

    def rebuild_tensor(self, storage: Any, offset: Any, size: Any, stride: Any) -> _Row:
        return self._row(storage, offset, size, stride, False, None, None)

    def rebuild_tensor_v2(self, storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any,
                           backward_hooks: Any, metadata: Any = None) -> _Row:
        return self._row(storage, offset, size, stride, requires_grad, metadata, None)

    def rebuild_tensor_v3(self, storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any,
                           backward_hooks: Any, dtype: Any, metadata: Any = None) -> _Row:
        if not isinstance(dtype, torch.dtype):
            raise _NotTables(f"tensor rebuild with dtype {dtype!r:.40}")
        return self._row(storage, offset, size, stride, requires_grad, metadata, dtype)

    def _parameter(self, data: Any, requires_grad: Any) -> _Row:
        if data.__class__ is not _Row:
            raise _NotTables("a Parameter of something other than a dense tensor")
        f = self.flags[data] & ~_F_GRAD
        self.flags[data] = f | _F_PARAM | (_F_GRAD if requires_grad else 0)
        return data

    def rebuild_parameter(self, data: Any, requires_grad: Any, backward_hooks: Any) -> _Row:
        return self._parameter(data, requires_grad)

    def rebuild_parameter_with_state(self, data: Any, requires_grad: Any, backward_hooks: Any, state: Any) -> _Row:
        if state:
            raise _NotTables("a Parameter with Python attributes")
        return self._parameter(data, requires_grad)

    def rebuild_from_type_v2(self, func: Any, new_type: Any, args: Any, state: Any) -> _Row:
        ret = func(*args)
        if ret.__class__ is not _Row or state or new_type not in (torch.Tensor, torch.nn.Parameter):
            raise _NotTables("a tensor subclass or a tensor with Python attributes")
        if new_type is torch.nn.Parameter:
            self.flags[ret] |= _F_PARAM
        return ret

    # -- the skeleton --------------------------------------------------------------------------

    def skeleton(self, tree: Any, limit: int) -> Any:
        """The tree with every leaf a row (as :func:`dist_restore._format.indexfile.build_index_file` makes it):
        a tensor leaf its row (a second place of one tensor a copy of it), a value a new row; no
        deeper than :data:`MAX_NESTING`, at most ``limit`` places (:func:`map_leaves`)."""
        seen = bytearray(len(self.kind))

        def tensor(r: int) -> int:
            if not seen[r]:
                seen[r] = 1
                return int(r)  # a plain int: the skeleton's leaves are exactly ints
            n = len(self.kind)  # the same tensor in two places: two rows, as the writer makes them
            for col in (self.kind, self.dtype, self.ndim, self.flags, self.storage, self.dims_at, self.offset):
                col.append(col[r])
            return n

        def leaf(v: Any) -> Any:
            if v.__class__ is _Row:
                return tensor(v)
            if isinstance(v, _NOT_VALUES) or (isinstance(v, (list, tuple)) and not isinstance(v, torch.Size)):
                raise _NotTables(f"a leaf of type {type(v).__name__}")
            row = len(self.kind)
            for col, x in ((self.kind, KIND_VALUE), (self.dtype, 0), (self.ndim, 0), (self.flags, 0),
                           (self.storage, -1), (self.dims_at, 0), (self.offset, 0)):
                col.append(x)
            self.objects[row] = v
            return row

        return map_leaves(tree, leaf, limit=limit)


_NOT_VALUES = (_Sto, StorageRef, TensorRef, ExoticRef, DTensorRef, torch.Tensor)
_view_problem = _unpickle.view_problem
_plain_view = _unpickle.plain_view
_SMALL = _unpickle._SMALL
_StorageType = _unpickle._StorageType
_metadata_problem = _unpickle.metadata_problem


def _dtype_of(codes: dict[torch.dtype, int], code: int) -> torch.dtype:
    return next(d for d, c in codes.items() if c == code)
