"""Reading a whole rank file into new tensors (``state_dict=None``) without an object per entry.

Through the general path (:func:`dist_restore._planning.plan.plan_read`, :func:`dist_restore._bytes.read.produce`,
:func:`dist_restore._planning.plan.assemble`) a full restore makes, per tensor, a reference, a planned leaf, its key
and raw path and a ``{path: tensor}`` item, all alive next to the tensors at the peak: ~1 KB a
tensor (60,000 small ones: ~100 MiB beyond their bytes). Here an index file's tables
(:class:`dist_restore._format.indexfile.Columns`: loaded from the index file, or made from a ``torch.save`` file's
pickle by :mod:`dist_restore._format.pickletables`) are classified at once with numpy. Every *common* row, a tensor
that is the whole of a small storage record of its own (offset 0, torch.empty's strides),
placed on the CPU, with nothing else to set (no requires_grad, Parameter, conj/neg bits), gets
its tensor straight from the tables while the result's containers (the skeleton's own, filled
in place) are built; then the records are copied into those tensors in file order by
:meth:`dist_restore._bytes.read._RankFile.copy_whole` (CRC32 checked). What stays per tensor is the tensor itself
and a few machine words. Every other row (views, tied storages, large records, DTensor shards,
other devices, ...) goes through the general path, as before.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from itertools import chain
from typing import Any

import numpy as np
import torch

from dist_restore._format.index import CheckpointIndex, iter_leaves, shares_containers
from dist_restore._format.indexfile import KIND_TENSOR, KIND_VALUE, Columns, FileIndex
from dist_restore._format.keypath import RawPath
from dist_restore._paths import raise_with_path
from dist_restore._planning.plan import _PLAIN_MAPPINGS, PlannedLeaf, _is_sequence, _rebuild_tuple, first_out_of_bounds
from dist_restore._bytes.read import _SMALL, MapLocation, ReadStats, Verify, _check_map_location, _RankFile, \
    produce, raise_as_ours, resolve_device
from dist_restore._planning.reshard import split_leaves
from dist_restore.errors import CheckpointError, CorruptCheckpointError

_MISSING = object()
_SLICE = 4096  # records turned into Python ints at a time


def readable(index: CheckpointIndex) -> bool:
    """Whether :func:`read_all` can read this index (one in tables: a :class:`FileIndex`)."""
    return isinstance(index, FileIndex)


def read_all(index: CheckpointIndex, *, map_location: MapLocation = None, verify: Verify = "crc32",
             stats: ReadStats | None = None) -> Any:
    """Everything in the file, as ``torch.load(weights_only=True)`` returns it.

    Args:
        index: An index :func:`readable` accepts; it is spent (its skeleton becomes the result).

    Raises:
        CorruptCheckpointError: a record's CRC32 does not match, or a view lies outside its
            storage record (naming the entry's key).
    """
    assert isinstance(index, FileIndex)
    _check_map_location(map_location)
    try:
        return _read_all(index, map_location, verify, stats if stats is not None else ReadStats())
    except Exception as e:  # noqa: BLE001 - turned into ours, or raised as it is
        raise_as_ours(e, index.file, None)


def _read_all(index: FileIndex, map_location: MapLocation, verify: Verify, stats: ReadStats) -> Any:
    cols = index.columns
    code, shapes = _common_rows(cols, _cpu_locations(index, cols.locations, map_location))
    rows, sto = cols.rows, cols.storages
    skeleton = index.take_skeleton()
    general = _read_general(index, skeleton, np.flatnonzero((code < 0) & (rows["kind"] != KIND_VALUE)),
                            map_location, verify, stats)
    made: list[torch.Tensor | None] = [None] * len(rows)
    result = _build(index, skeleton, cols, code, shapes, general, made)
    common = np.flatnonzero(code >= 0)
    del general, skeleton, code, shapes
    if len(common):
        snum = rows["storage"][common].astype(np.int64)
        order = np.argsort(sto["data"][snum], kind="stable")  # file order
        common, snum = common[order], snum[order]
        addr = np.fromiter((0 if (t := made[r]) is None else t.data_ptr() for r in common.tolist()),
                           dtype=np.int64, count=len(common))
        del made, common, order
        if not addr.all():  # (a row the skeleton never names has no tensor to fill)
            snum, addr = snum[addr != 0], addr[addr != 0]
        _copy(index, result, snum, addr, map_location, verify, stats)
    return result


def _copy(index: FileIndex, result: Any, snum: np.ndarray, addr: np.ndarray, map_location: MapLocation,
          verify: Verify, stats: ReadStats) -> None:
    """Storage records ``snum`` (in file order) into the tensors at ``addr``."""
    if not len(snum):
        return
    sto = index.columns.storages
    data, size, crc = sto["data"][snum], sto["size"][snum], sto["crc"][snum]

    def names(i: int) -> tuple[str, str]:
        return index.storage_key(int(snum[i])), _key_of(result, int(addr[i]))

    try:
        with _RankFile(index, {}, map_location, verify == "crc32", stats) as rf:
            if index.source == "index file":  # torch.load reads where the local headers say
                rf.check_local_headers(sto["header"][snum], data, names)
            rf.copy_whole(_slices(addr, data, size, crc), int(data[0]), int(data[-1] + size[-1]), names)
    except OSError as e:  # fstat, mmap, madvise: errors that name no file
        raise_with_path(e, index.file)


def _cpu_locations(index: FileIndex, locations: list[str], map_location: MapLocation) -> np.ndarray:
    """Per location code: whether its tensors are placed on the CPU (the others, and those
    that cannot be placed, go through the general path, which says why by key)."""
    cpu = []
    for loc in locations:
        try:
            cpu.append(resolve_device(loc, map_location, file=index.file, key="").type == "cpu")
        except (CheckpointError, RuntimeError):
            cpu.append(False)
    return np.array(cpu + [False], dtype=bool)  # a trailing False: no location has that code


def _common_rows(cols: Columns, cpu: np.ndarray) -> tuple[np.ndarray, list[tuple[int, ...]]]:
    """Per row: ``shape id << 8 | dtype code`` of a common row (see the module docstring),
    ``-1`` for every other row; and the shapes the ids stand for."""
    rows, sto, dims = cols.rows, cols.storages, cols.dims
    n = len(rows)
    code = np.full(n, -1, dtype=np.int64)
    shapes: list[tuple[int, ...]] = []
    if not n or not len(sto):
        return code, shapes
    kind = rows["kind"]
    snum = rows["storage"].astype(np.int64)
    tensors = kind != KIND_VALUE
    uses = np.bincount(snum[tensors], minlength=len(sto))
    s = np.where(tensors, snum, 0)
    size = sto["size"][s]
    ok = ((kind == KIND_TENSOR) & (rows["flags"] == 0) & (rows["offset"] == 0) & (uses[s] == 1)
          & (size > 0) & (size < _SMALL) & cpu[sto["loc"][s]])
    ndim = rows["ndim"]
    # the elements the record holds, in the row's dtype (its storage may be untyped: bytes)
    isz = np.array([d.itemsize for d in cols.dtypes] + [1], dtype=np.int64)[rows["dtype"]]
    numel = np.where(size % isz == 0, size // isz, -1)
    for k in np.unique(ndim[ok]).tolist():
        sel = np.flatnonzero(ok & (ndim == k))
        if k == 0:
            good = numel[sel] == 1
            sizes = np.zeros((len(sel), 0), dtype=np.int64)
        else:
            at = rows["dims"][sel].astype(np.int64)[:, None] + np.arange(k)
            sizes, strides = dims[at], dims[at + k]
            # the saved strides must be the ones torch.empty makes, the elements the record's
            # (the float product too: an int64 product of huge sizes could wrap around)
            expect = np.ones_like(sizes)
            expect[:, :-1] = np.cumprod(sizes[:, :0:-1], axis=1)[:, ::-1]
            good = ((sizes >= 1).all(axis=1) & (strides == expect).all(axis=1)
                    & (sizes.prod(axis=1) == numel[sel])
                    & (sizes.astype(np.float64).prod(axis=1) == numel[sel].astype(np.float64)))
        sel, sizes = sel[good], sizes[good]
        if not len(sel):
            continue
        uniq, inv = np.unique(sizes, axis=0, return_inverse=True)
        code[sel] = ((len(shapes) + inv.reshape(-1)) << 8) | rows["dtype"][sel].astype(np.int64)
        shapes.extend(tuple(r) for r in uniq.tolist())
    return code, shapes


def _read_general(index: FileIndex, skeleton: Any, wanted: np.ndarray, map_location: MapLocation,
                  verify: Verify, stats: ReadStats) -> dict[int, Any]:
    """``{row: tensor}`` of the rows that are not common, through the general path."""
    if not len(wanted):
        return {}
    want = set(wanted.tolist())
    leaves: list[PlannedLeaf] = []
    rows: dict[RawPath, int] = {}
    for key, path, row in iter_leaves(skeleton):
        if type(row) is int and row in want:
            leaves.append(PlannedLeaf(key, path, index.leaf(row), None))
            rows[path] = row
    bad = first_out_of_bounds(leaves)
    if bad:
        raise CorruptCheckpointError(bad[1], file=index.file, key=bad[0].key)
    plain, reshard = split_leaves(leaves)
    assert not reshard  # nothing is resharded into a None target
    produced = produce(index, plain, map_location=map_location, verify=verify, stats=stats)
    return {rows[path]: v for path, v in produced.items()}


def _build(index: FileIndex, skeleton: Any, cols: Columns, code: np.ndarray, shapes: list[tuple[int, ...]],
           general: dict[int, Any], made: list[torch.Tensor | None]) -> Any:
    """The result over the skeleton, as :func:`dist_restore._planning.plan.assemble` builds it: a new tensor for
    every common row (into ``made``, by row), the others' values. The skeleton's dicts and
    lists become the result's, filled in place (no second container per container), unless
    one of them occurs twice in it (then each place gets new ones)."""
    codes = memoryview(code)  # Python ints by item, not a list of them all
    dtypes, objects, empty = cols.dtypes, cols.objects, torch.empty
    in_place = not shares_containers(skeleton)

    def leaf(row: int) -> Any:
        c = codes[row]
        if c >= 0:
            t = made[row]
            if t is None:  # (a row the skeleton names twice is one tensor, as torch.load makes it)
                t = made[row] = empty(shapes[c >> 8], dtype=dtypes[c & 255])
            return t
        v = general.get(row, _MISSING)
        if v is _MISSING:
            v = objects.get(row, _MISSING)
            if v is _MISSING:
                v = index.leaf(row)  # raises the index's error for a row without a value
        return v

    def build(node: Any) -> Any:
        if type(node) is int:
            return leaf(node)
        kind = type(node)
        if kind in _PLAIN_MAPPINGS:
            out = node if in_place else kind()
            for k, v in node.items():
                out[k] = build(v)
            return out
        if isinstance(node, Mapping):
            out = {}
            for k, v in node.items():
                out[k] = build(v)
            return out
        if kind is list:
            if in_place:
                for i, v in enumerate(node):
                    node[i] = build(v)
                return node
            return [build(v) for v in node]
        if _is_sequence(node):
            return _rebuild_tuple(node, [build(v) for v in node])
        return node

    try:
        return build(skeleton)
    finally:
        del build  # a recursive closure is a reference cycle (see _plan.plan_read)


def _slices(*cols: np.ndarray) -> Iterator[tuple[int, ...]]:
    """The columns' rows as tuples of Python ints, a few thousand made at a time (not a list of
    every record's ints at once)."""
    return chain.from_iterable(zip(*(c[lo : lo + _SLICE].tolist() for c in cols))
                               for lo in range(0, len(cols[0]), _SLICE))


def _key_of(result: Any, addr: int) -> str:
    """The dotted key of the common row whose tensor is at ``addr`` (for an error message)."""
    for key, _path, v in iter_leaves(result):
        if isinstance(v, torch.Tensor) and v.numel() and v.data_ptr() == addr:
            return key
    return "?"
