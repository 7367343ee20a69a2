"""The index file written beside each rank file: ``checkpoint_{rank}.idx``.

A rank file's index (see :mod:`dist_restore._format.index`) is normally built by parsing the zip
directory and unpickling ``data.pkl`` with one Python callback per tensor: ~5-10 µs a tensor,
most of the cost of restoring a few of 60,000 small ones. :class:`~dist_restore.CheckpointWriter`
therefore writes the index once, with the bytes, as safetensors writes its header; a restore
loads it with a few vectorised reads and makes per-entry objects only for the entries it uses.

Format, version 1 (integers little-endian)::

    magic   b"DRIDX\\x00" + u16 format version (= 1)
    u32     header length, then the header: JSON, UTF-8
    ...     sections, at the [offset, length] the header gives (from the start of the file)
    u32     CRC32 of every byte before it

Header fields: ``format_version``; ``rank_file`` (``size``, ``tail_offset``, ``tail_crc32``:
the rank file's size, where its zip central directory starts, and the CRC32 of the bytes
from there to the end: the directory lists every record's offset, size and CRC32, ``data.pkl``
included, so the index matches the file only if they are the same; and ``pickle``: where
``data.pkl``'s bytes lie and their CRC32, checked too: the index describes those bytes); ``prefix`` (the archive
folder, ``archive/``); ``byteorder``; ``dtypes`` and ``locations`` (the tables the codes below
point into); ``rows``/``storages`` (counts); ``sections``:

* ``tree`` — a pickle (protocol 4, builtins and torch value types only, read with the
  weights-only allowlist) of ``(skeleton, objects, dtensors)``: the state dict's containers
  with every leaf replaced by its row number (rows in pickle order); ``{row: value}`` of the
  non-tensor leaves; ``{row: (global size, global stride, layout)}`` of DTensors, the layout
  as plain tuples (see :func:`_layout_to_tuple`);
* ``rows`` — per row, 20 bytes: kind (0 tensor, 1 DTensor: its local shard, 2 value), dtype
  code, ndim, flags (1 requires_grad, 2 Parameter, 4 conj, 8 neg), storage number (-1: none),
  start of its sizes then strides in ``dims``, storage offset in elements;
* ``dims`` — int64 sizes and strides;
* ``storages`` — per storage record, 38 bytes: local header offset, data offset, bytes,
  CRC32, storage dtype code, location code, numel;
* ``skeys`` — the storage keys (``data/{key}``), NUL-separated; empty when they are
  ``"0"``, ``"1"``, ... in order (as ``torch.save`` numbers them), which the header says by
  ``"ordinal_keys": true``.

Trust: the index is used only when its own CRC32 holds, it parses, the rank file has the
recorded size and the same directory (``tail_crc32``), and, in a directory with a commit
manifest, the manifest lists it with its size and CRC32. Whoever can edit an index file can
recompute all of those, so it is never trusted over the zip directory it describes: every
storage row must be the directory's entry of its name (header offset, size, CRC32, its data
within that local header's span and before the directory), the zip may hold no other
``data/`` record, ``data.pkl`` must be where the header says, every column must point inside
the tables and the file (checked without int64 wrap-around), and the tree must name only rows
the tables have (:func:`_check_directory`, :meth:`FileIndex._check_columns`,
:func:`_check_tree`); the tree section is bounded in depth and in the places a walk of it
visits, as a pickle's tree is, its DTensor table's rank maps (one object, shared by every
DTensor of a mesh) counted once each (:func:`_check_section`). Anything else falls back to the
pickle, with the reason at debug level.
Tensor bytes are still checked against the zip's CRC32 as they are read, and views against
their storage's bounds, exactly as without it. What no check can tell is a tree section that
describes in-bounds views or values other than the pickle's (it replaces the pickle): the
commit manifest's checksum of the index file is the guard there.
"""

from __future__ import annotations

import collections
import json
import logging
import mmap
import os
import pickle
import struct
import sys
import time
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Mapping, Sequence
from itertools import chain, count, repeat
from operator import itemgetter
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np
import torch

from dist_restore._base.crc import crc32
from dist_restore._format.dtensor import DLayout, DTensorRef, MeshInfo
from dist_restore._format.index import NO_ENTRY, CheckpointIndex, IndexEntry, iter_leaves, map_leaves
from dist_restore._format.keypath import RawPath
from dist_restore._base.regions import Partial, Placement, Replicate, Shard
from dist_restore._gc import paused
from dist_restore.errors import CheckpointError, CorruptCheckpointError
from dist_restore._format.unpickle import ExoticRef, StorageRef, TensorRef, check_tree, unpickle_refs
from dist_restore._format.zip import _CDIR, _CDIR_DTYPE, _CDIR_SIG, _CDIR_USED, _EOCD, _EOCD64, _EOCD64_LOC, \
    _EOCD64_LOC_SIG, _EOCD64_SIG, _EOCD_SIG, _LOCAL, _LOCAL_SIG, _U32, ZipRecord, _zip64_extra, data_offset, \
    read_zip_records

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MAGIC = b"DRIDX\x00"
SUFFIX = ".idx"
KIND_TENSOR, KIND_DTENSOR, KIND_VALUE = 0, 1, 2
_F_GRAD, _F_PARAM, _F_CONJ, _F_NEG = 1, 2, 4, 8
_HEAD = struct.Struct("<6sHI")
_ROW = np.dtype([("kind", "u1"), ("dtype", "u1"), ("ndim", "u1"), ("flags", "u1"), ("storage", "<i4"),
                 ("dims", "<i4"), ("offset", "<i8")])
_STORAGE = np.dtype([("header", "<i8"), ("data", "<i8"), ("size", "<i8"), ("crc", "<u4"), ("dtype", "u1"),
                     ("loc", "u1"), ("numel", "<i8")])
_MISSING = object()
_SPENT = object()  # a skeleton handed over by FileIndex.take_skeleton
_BULK = 2048  # rows (storages) read one by one before the columns are turned into lists


class IndexFileError(ValueError):
    """An index file that must not be used (the message says why)."""


def index_checksum(data: bytes) -> str:
    """``"crc32:%08x"`` of an index file for the manifest: the CRC32 of all but its last 4
    bytes, which hold that same CRC32 (the CRC32 of a whole file that ends in its own CRC32
    is the same for every file: the manifest could not tell two index files apart by it)."""
    return f"crc32:{crc32(memoryview(data)[:-4]) & 0xFFFFFFFF:08x}"


def index_path(rank_file: str | os.PathLike[str]) -> Path:
    """``checkpoint_3.pt`` -> ``checkpoint_3.idx``, beside it."""
    p = Path(rank_file)
    return p.with_name(p.stem + SUFFIX)


# -- the rank file's fingerprint ------------------------------------------------------------

def zip_tail(fd: int, size: int) -> tuple[int, int]:
    """``(offset, crc32)`` of a zip file's tail: its central directory to the end of the file.

    Raises:
        IndexFileError: no readable end-of-central-directory record.
    """
    tail = _zip_tail(fd, size)
    return tail.offset, crc32(tail.data) & 0xFFFFFFFF


class _Tail(NamedTuple):
    """A zip file's central directory and what its end record says of it."""

    offset: int  # where the directory starts
    entries: int  # its entry count
    size: int  # its length in bytes
    data: bytes  # the file from ``offset`` to its end (the directory, then the end records)


def _zip_tail(fd: int, size: int) -> _Tail:
    want = min(size, _EOCD.size + 0xFFFF)
    tail = os.pread(fd, want, size - want)
    pos = tail.rfind(_EOCD_SIG)
    while pos >= 0 and pos + _EOCD.size > len(tail):
        pos = tail.rfind(_EOCD_SIG, 0, pos)
    if pos < 0 or len(tail) != want:
        raise IndexFileError("no zip end-of-central-directory record")
    eocd = size - want + pos
    fields = _EOCD.unpack_from(tail, pos)
    entries, cd_size, cd_offset = fields[4], fields[5], fields[6]
    if entries == 0xFFFF or cd_size == _U32 or cd_offset == _U32:
        loc = pos - _EOCD64_LOC.size
        if loc < 0 or tail[loc : loc + 4] != _EOCD64_LOC_SIG:
            raise IndexFileError("zip64 locator missing")
        eocd64 = _EOCD64_LOC.unpack_from(tail, loc)[2]
        rec = os.pread(fd, _EOCD64.size, eocd64)
        if len(rec) != _EOCD64.size or rec[:4] != _EOCD64_SIG:
            raise IndexFileError("zip64 end-of-central-directory record missing")
        entries, cd_size, cd_offset = _EOCD64.unpack(rec)[7:10]
    if not 0 <= cd_offset <= eocd:
        raise IndexFileError("central directory offset out of range")
    data = os.pread(fd, size - cd_offset, cd_offset)
    if len(data) != size - cd_offset:
        raise IndexFileError("rank file shorter than its directory says")
    return _Tail(cd_offset, entries, cd_size, data)


class _Entry(NamedTuple):
    """One central directory entry, parsed on its own (the few records besides the storages')."""

    name: bytes
    header: int
    size: int
    crc: int
    end: int  # where the next entry starts


def _cd_entry(cd: bytes, p: int, cd_size: int) -> _Entry:
    if p + _CDIR.size > cd_size:
        raise IndexFileError("the zip directory is shorter than its entry count")
    sig, method, crc, csize, usize, nlen, elen, clen, hoff = _CDIR_USED.unpack_from(cd, p)
    q = p + _CDIR.size
    end = q + nlen + elen + clen
    if sig != _CDIR_SIG or end > cd_size:
        raise IndexFileError(f"a bad zip directory entry at byte {p} of it")
    if usize == _U32 or csize == _U32 or hoff == _U32:
        usize, csize, hoff = _zip64_extra(cd[q + nlen : q + nlen + elen], usize, csize, hoff)
    if method != 0 or csize != usize:
        raise IndexFileError("a compressed zip record")
    return _Entry(cd[q : q + nlen], hoff, usize, crc, end)


_MAX_OTHERS = 64  # zip records besides the storages' (torch.save writes 6) checked one by one
_MAX_EXTRA = 0xFFFF  # a local header's extra field: a record's data starts at most this far past its name


def _check_directory(tail: _Tail, prefix: bytes, sto: np.ndarray, keys: list[bytes] | None,
                     pickle_at: list[int]) -> None:
    """Check an index file's storage table against the zip directory of its rank file.

    Each storage row must be the directory's entry named ``{prefix}data/{key}``: same local
    header offset, size and CRC32, its data offset within that local header's span (after the
    header and its name, at most 64 KiB of extra field further), its data before the directory;
    no other entry may carry a ``data/`` name (a second one of a name: which one torch.load
    takes is not ours to guess), and ``data.pkl`` must be where the index says. torch.save
    lists the storages in key order, one after another, so their entries' places follow from
    their names' lengths (and zip64 extras, from the sizes and offsets) and every field of
    every entry is compared with numpy at once; only the few other entries are parsed one by
    one. A directory laid out otherwise is refused too (the pickle is read instead).

    Raises:
        IndexFileError: anything differs (the index is not used: the rank file's pickle is).
    """
    cd, cd_size, n = tail.data, tail.size, len(sto)
    if not 0 <= cd_size <= len(cd):
        raise IndexFileError("the zip directory's size is out of range")
    stem = prefix + b"data/"
    others: list[_Entry] = []
    p = 0

    def other(e: _Entry) -> None:
        if len(others) == _MAX_OTHERS:
            raise IndexFileError("the zip holds more records than the index lists")
        others.append(e)

    while len(others) < tail.entries:  # the entries before the storages' (data.pkl, byteorder, ...)
        e = _cd_entry(cd, p, cd_size)
        if e.name.startswith(stem):
            if n:
                break
            raise IndexFileError(f"the zip holds a record the index does not list ({e.name!r})")
        other(e)
        p = e.end
    if n:
        if len(others) + n > tail.entries:
            raise IndexFileError("the zip directory lists fewer records than the index")
        p = _check_storages(cd, p, cd_size, tail.offset, stem, sto, keys)
    while len(others) + n < tail.entries:  # the entries after them (version, ...)
        e = _cd_entry(cd, p, cd_size)
        if e.name.startswith(stem):
            raise IndexFileError(f"the zip holds a record the index does not list ({e.name!r})")
        other(e)
        p = e.end
    pkl = [e for e in others if e.name == prefix + b"data.pkl"]
    if len(pkl) != 1:
        raise IndexFileError("the zip directory does not hold one data.pkl")
    e = pkl[0]
    p_off, p_size, p_crc = pickle_at
    if (e.size, e.crc) != (p_size, p_crc) or not 0 <= p_off - (e.header + _LOCAL.size + len(e.name)) <= _MAX_EXTRA:
        raise IndexFileError("data.pkl is not where the zip directory says")


def _check_storages(cd: bytes, p: int, cd_size: int, cd_offset: int, stem: bytes, sto: np.ndarray,
                    keys: list[bytes] | None) -> int:
    """The storages' entries of :func:`_check_directory`, from byte ``p`` of the directory;
    returns where the entry after them starts."""
    n = len(sto)
    header, size, data = sto["header"], sto["size"], sto["data"]
    if keys is None:  # "0", "1", ...: each key's digit count
        key_no = np.arange(n, dtype=np.int64)
        digits = np.searchsorted(_POW10[1 : len(str(n - 1))], key_no, side="right") + 1
        nlen = len(stem) + digits
    else:
        if len(set(keys)) != n:
            raise IndexFileError("a storage key is listed twice")
        klen = np.fromiter(map(len, keys), dtype=np.int64, count=n)
        nlen = len(stem) + klen
    # where each entry starts: torch.save lists them one after another, each 46 bytes, its name
    # and a zip64 extra (tag 1: the sizes, both, then the offset, that do not fit 32 bits)
    zip64 = cd_offset >= _U32  # (else no storage's offset or size can need it)
    if zip64:
        if not ((header >= 0) & (header < cd_offset) & (size >= 0) & (size <= cd_offset)).all():
            raise IndexFileError("a storage lies outside the rank file")
        big_size, big_header = size >= _U32, header >= _U32
        n64 = 2 * big_size + big_header
        elen = np.where(n64 > 0, 4 + 8 * n64, 0)
        step = _CDIR.size + nlen + elen
    else:
        elen, step = 0, _CDIR.size + nlen
    at = np.empty(n, dtype=np.int64)
    at[0] = p
    np.cumsum(step[:-1], out=at[1:])
    at[1:] += p
    end = int(at[-1] + step[-1])
    if end > cd_size:
        raise IndexFileError("the zip directory does not list the storages the index does")
    u8 = np.frombuffer(cd, dtype=np.uint8)
    e = np.lib.stride_tricks.sliding_window_view(u8, _CDIR.size)[at].view(_CDIR_DTYPE).reshape(-1)
    ok = ((e["sig"] == _CDIR_SIG_U32) & (e["method"] == 0) & (e["nlen"] == nlen) & (e["elen"] == elen)
          & (e["clen"] == 0) & (e["crc"] == sto["crc"]) & (e["csize"] == e["usize"]))
    if zip64:
        ok &= (e["usize"] == np.where(big_size, _U32, size)) & (e["hoff"] == np.where(big_header, _U32, header))
        big = np.flatnonzero(n64)
        x, c, sz, hd = at[big] + _CDIR.size + nlen[big], n64[big], size[big], header[big]
        i64 = _view(cd, "<i8")  # (a value >= 2^63 reads negative: it matches nothing)
        v = [i64[np.minimum(x + 4 + 8 * j, len(cd) - 8)] for j in range(3)]
        ok[big] &= ((_view(cd, "<u2")[x] == 1) & (_view(cd, "<u2")[x + 2] == 8 * c)
                    & (v[0] == np.where(c >= 2, sz, hd)) & ((c < 2) | (v[1] == sz)) & ((c < 3) | (v[2] == hd)))
    else:
        ok &= (e["usize"] == size) & (e["hoff"] == header)
    # the names: the stem, then the key
    start = at + _CDIR.size
    ok &= _same_bytes(cd, start, stem)
    if keys is None and len(stem) >= 7 and n <= 10**8:
        # the last 8 bytes of "{stem}{n}": n's digits zero-padded to 8, their leading zeros
        # replaced by the stem's last bytes (the byte at the lowest address is the lowest)
        lo8 = _ASCII4[key_no % 10000].astype(np.uint64) << np.uint64(32)
        word = lo8 | _ASCII4[key_no // 10000]
        keep = _TOP_BYTES[digits]
        want = (word & keep) | _stem_tails(stem)[digits]
        ok &= _view(cd, "<u8")[start + nlen - 8] == want
    else:
        k_at = start + len(stem)
        k_len = nlen - len(stem)
        if keys is None:
            keys = [str(i).encode() for i in range(n)]
        width = int(k_len.max(initial=0))
        if width:
            pad = np.concatenate([u8, np.zeros(width, dtype=np.uint8)]) if end + width > len(u8) else u8
            got = np.lib.stride_tricks.sliding_window_view(pad, width)[k_at]
            want_b = np.array(keys, dtype=f"S{width}").view(np.uint8).reshape(n, width)
            ok &= ((got == want_b) | (np.arange(width) >= k_len[:, None])).all(axis=1)
    # the data: after its local header and name, within the extra field's reach, before the directory
    lo = header + _LOCAL.size + nlen
    ok &= (data >= lo) & (data <= lo + _MAX_EXTRA) & (size <= cd_offset - data)
    if not ok.all():
        raise IndexFileError(f"storage {_key(keys, int(np.argmin(ok)))} is not what the zip directory says")
    return end


def _view(buf: bytes, dtype: str) -> np.ndarray:
    """``buf`` as numbers of ``dtype`` starting at every byte (unaligned): ``v[i]`` is the one at byte ``i``."""
    size = np.dtype(dtype).itemsize
    return np.ndarray((max(0, len(buf) - size + 1),), dtype=dtype, buffer=buf, strides=(1,))


def _same_bytes(buf: bytes, at: np.ndarray, want: bytes) -> np.ndarray:
    """Per position: whether ``buf[at : at + len(want)] == want`` (eight bytes at a time; every
    range must lie in ``buf``, and ``want`` be 8 bytes or more)."""
    n = len(want)
    if n < 8:
        win = np.lib.stride_tricks.sliding_window_view(np.frombuffer(buf, dtype=np.uint8), n)
        return (win[at] == np.frombuffer(want, dtype=np.uint8)).all(axis=1)
    words = _view(buf, "<u8")
    ok = np.ones(len(at), dtype=bool)
    for i in [*range(0, n - 7, 8), n - 8]:
        ok &= words[at + i] == int.from_bytes(want[i : i + 8], "little")
    return ok


#: 10^i, i = 0..18
_POW10 = 10 ** np.arange(19, dtype=np.int64)
#: x -> x's four decimal digits, zero-padded, as ASCII in a little-endian uint32
_ASCII4 = sum((48 + np.arange(10000, dtype=np.uint32) // 10 ** (3 - i) % 10) << (8 * i) for i in range(4))
#: d -> the mask of a uint64's top d bytes (the last d of its eight)
_TOP_BYTES = np.array([0] + [((1 << 8 * d) - 1) << 8 * (8 - d) for d in range(1, 9)], dtype=np.uint64)


def _stem_tails(stem: bytes) -> np.ndarray:
    """d -> the stem's last 8 - d bytes, where a name of d digits has them in its last 8."""
    return np.array([0] + [int.from_bytes(stem[len(stem) - (8 - d):] if d < 8 else b"", "little") for d in range(1, 9)],
                    dtype=np.uint64)


def _key(keys: list[bytes] | None, i: int) -> str:
    return repr(str(i) if keys is None else keys[i].decode("utf-8", "replace"))


_CDIR_SIG_U32 = int.from_bytes(_CDIR_SIG, "little")


def _check_tree(skel: Any, objects: dict[Any, Any], dtensors: dict[Any, Any], kind: np.ndarray, limit: int) -> None:
    """The tree section must be what :func:`build_index_file` writes: containers (dicts, exact
    lists and tuples) whose leaves are row numbers the tables have; ``objects`` the value of
    every value row, ``dtensors`` the global size, stride and layout of every DTensor row.

    Walked a level at a time with loops that run in C, never recursively (a skeleton can be
    nested 100,000 deep). A container that occurs twice (as the pickle's memo can make it) is
    walked twice: the walk stops at ``limit`` nodes, the tree section's length in bytes, which
    every node the writer makes costs at least (so a cycle, or a container shared over and
    over, cannot make the walk, or the reads after it, long).

    Raises:
        IndexFileError: anything else.
    """
    nrows = len(kind)
    isint = int.__instancecheck__
    level, nodes = [skel], 0
    while level:
        nodes += len(level)
        if nodes > limit:
            raise IndexFileError("the skeleton has more nodes than its pickle has bytes (a container in it twice?)")
        types = set(map(type, level))
        bad = [t for t in types if not (t is int or t in _SEQUENCES or issubclass(t, dict))]
        if bad:
            raise IndexFileError(f"unexpected {bad[0].__name__} in the skeleton")
        if int in types:
            if len(types) == 1:
                ints, level = level, []
            else:  # the containers first, then the ints (one sort of a key that is all but sorted)
                level.sort(key=isint)
                cut = bisect_left(level, True, key=isint)
                ints, level = level[cut:], level[:cut]
            rows = np.fromiter(ints, dtype=np.int64, count=len(ints))
            if int(rows.min()) < 0 or int(rows.max()) >= nrows:
                raise IndexFileError(f"the tree names a row outside the table of {nrows}")
            types.discard(int)
            if not types:
                break
        if types <= _DICTS:
            level = list(chain.from_iterable(map(dict.values, level)))
        elif types <= _SEQUENCES:
            level = list(chain.from_iterable(level))
        else:
            level = list(chain.from_iterable(v.values() if isinstance(v, dict) else v for v in level))
    values, dts = np.flatnonzero(kind == KIND_VALUE), np.flatnonzero(kind == KIND_DTENSOR)
    for table, rows, what in ((objects, values, "values"), (dtensors, dts, "DTensor")):
        # as many keys as rows, every row a key: the keys are the rows (a key that only equals
        # one, 1.0 or True for 1, finds the same entry)
        if len(table) != len(rows) or not all(map(table.__contains__, rows.tolist())):
            raise IndexFileError(f"the {what} table does not match the {what} rows")
    if not all(type(v) is tuple and len(v) == 3 for v in dtensors.values()):
        raise IndexFileError("a DTensor row's entry is not (global size, global stride, layout)")
    # (each layout is checked as it is made: see FileIndex._layout)


_DICTS = {dict, collections.OrderedDict}  # what map_leaves makes of the tree's mappings, as a rule
_SEQUENCES = {list, tuple}


def _sizes(v: Any) -> bool:
    """Whether ``v`` is a tuple of sizes (ints >= 0)."""
    return type(v) is tuple and all(type(x) is int and x >= 0 for x in v)


class _Section(NamedTuple):
    """What :func:`_check_section` found of a tree section's DTensor table."""

    flat: bool  # every row as the writer makes it (see _flat_dtensors): layouts equal by value are one
    sizes: bool  # flat, and every global size and stride an int >= 0
    same: tuple[list[Any], list[Any]] | None = None  # flat: (the table's rows, each one's first row of its layout)


def _check_section(got: Any, size: int, file: str) -> _Section:
    """:func:`~dist_restore._format.unpickle.check_tree` of a tree section (``size`` bytes).

    The DTensor table's rows share their mesh's rank map (one object: the pickle's memo),
    which a place-by-place walk visits once a row: 10,000 DTensors of a 1,024-rank mesh are
    10 million places, past the bound for any section. Where every row is what the writer
    makes (:func:`_flat_dtensors`: flat tuples of ints and strings, nothing deeper), the table
    is checked column by column instead, each rank map counted once (a :class:`FileIndex`
    converts each once: :meth:`FileIndex._layout`) and everything else once a row, against
    the same bound as the skeleton and the values; any other table is walked as before.

    Raises:
        CorruptCheckpointError: as ``check_tree``.
    """
    if type(got) is tuple and len(got) == 3 and type(got[2]) is dict and got[2]:
        flat = _flat_dtensors(got[2])
        if flat is not None:
            places, sizes, same = flat
            check_tree((got[0], got[1], {}), size, file, spent=places)
            return _Section(True, sizes, same)
    check_tree(got, size, file)
    return _Section(False, False)


_T, _I, _S, _N = tuple, int, str, type(None)


def _columns(rows: list[Any], n: int) -> list[list[Any]] | None:
    """The columns of ``rows`` when every one is a tuple of ``n`` items, else ``None``."""
    if set(map(type, rows)) != {_T} or set(map(len, rows)) != {n}:
        return None
    return [list(map(itemgetter(i), rows)) for i in range(n)]


def _flat(col: list[Any], items: set[type], none: bool = False) -> bool:
    """Whether every value of ``col`` is a tuple (or ``None``, with ``none``) of ``items``."""
    if not set(map(type, col)) <= ({_T, _N} if none else {_T}):
        return False
    return set(map(type, chain.from_iterable(filter(None, col) if none else col))) <= items


def _flat_dtensors(table: dict[Any, Any]) -> tuple[int, bool, tuple[list[Any], list[Any]]] | None:
    """``(places, sizes, same)`` of a DTensor table whose rows are what :func:`build_index_file`
    writes, else ``None``: ``{row: (size, stride, (shape, placements, (mesh shape, dim names,
    coordinate, rank, rank map)))}``, sizes, strides, shapes and mesh shapes tuples of ints,
    placements tuples of tuples of strings and ints, names (or ``None``) tuples of strings,
    coordinates (or ``None``) of ints, the rank ``None`` or an int, a rank map ``None`` or a
    tuple of tuples of ints. ``places``: what a walk of it visits, each distinct rank map's
    ints once (some 20 loops over the rows that run in C, ~1 us a row); ``sizes``: every size
    and stride >= 0; ``same``: the table's rows, and for each the first row whose layout is
    equal to its (its key in :meth:`FileIndex._layout`).
    """
    if not set(map(type, table)) <= {_I}:
        return None
    rows = list(table.values())
    cols = _columns(rows, 3)
    lay = cols and _columns(cols[2], 3)
    mesh = lay and _columns(lay[2], 5)
    if not mesh:
        return None
    size, stride, _lay = cols  # type: ignore[misc]
    shape, placements, _mesh = lay
    mshape, names, coord, rank, groups = mesh
    ints = {_I}
    if not (_flat(size, ints) and _flat(stride, ints) and _flat(shape, ints) and _flat(mshape, ints)
            and _flat(coord, ints, none=True) and _flat(names, {_S}, none=True) and set(map(type, rank)) <= {_I, _N}
            and _flat(placements, {_T}) and _flat(list(chain.from_iterable(placements)), {_I, _S})):
        return None
    maps = [g for g in dict(zip(map(id, groups), groups)).values() if g is not None]  # each rank map once
    if not (_flat(groups, {_T}, none=True) and _flat(list(chain.from_iterable(maps)), ints)):
        return None
    n = len(rows)
    places = (2 + 3 + 3 + 5) * n + sum(map(len, chain(size, stride, shape, placements, mshape, filter(None, names),
                                                       filter(None, coord), filter(None, groups))))
    places += sum(map(len, chain.from_iterable(placements))) + sum(map(len, chain.from_iterable(maps)))
    sizes = min(chain(chain.from_iterable(size), chain.from_iterable(stride)), default=0) >= 0
    first: dict[Any, int] = {}
    at = list(map(first.setdefault, zip(shape, placements, mshape, names, coord, rank, map(id, groups)), count()))
    keys = list(table)
    return places, sizes, (keys, list(map(keys.__getitem__, at)))


# -- writing ---------------------------------------------------------------------------------

def build_index_file(index: CheckpointIndex) -> bytes | None:
    """The index file of a freshly written rank file, or ``None`` when it holds entries the
    format does not describe (quantized, sparse, nested tensors; tensors with Python
    attributes; legacy or foreign-byte-order files): those rank files are read through the
    pickle, as ever."""
    if index.format != "zip" or not index.native_order:
        return None
    dtypes: dict[torch.dtype, int] = {}
    locations: dict[str, int] = {}
    skeys = list(index.records)
    snum = {k: i for i, k in enumerate(skeys)}
    rows: list[tuple[int, int, int, int, int, int, int]] = []
    dims: list[int] = []
    objects: dict[int, Any] = {}
    dtensors: dict[int, Any] = {}

    def code(table: dict[Any, int], v: Any) -> int:
        c = table.get(v)
        if c is None:
            c = table[v] = len(table)
        return c

    def tensor_row(kind: int, ref: TensorRef, flags: int) -> None:
        s = snum.get(ref.storage.key)
        if ref.state or s is None:
            raise _Unsupported
        md = ref.metadata
        if md:
            if set(md) - {"conj", "neg"}:
                raise _Unsupported
            flags |= (_F_CONJ if md.get("conj") else 0) | (_F_NEG if md.get("neg") else 0)
        d = dtypes.get(ref.dtype)
        if d is None:
            d = dtypes[ref.dtype] = len(dtypes)
        rows.append((kind, d, len(ref.size), flags, s, len(dims), ref.storage_offset))
        dims.extend(ref.size)
        dims.extend(ref.stride)

    def leaf(v: Any) -> int:
        row = len(rows)
        if isinstance(v, TensorRef):
            tensor_row(KIND_TENSOR, v, (_F_GRAD if v.requires_grad else 0) | (_F_PARAM if v.is_parameter else 0))
        elif isinstance(v, DTensorRef):
            if not isinstance(v.local, TensorRef) or v.local.is_parameter or v.local.requires_grad:
                raise _Unsupported
            dtensors[row] = (tuple(v.size), tuple(v.stride), _layout_to_tuple(v.layout))
            tensor_row(KIND_DTENSOR, v.local, (_F_GRAD if v.requires_grad else 0) | (_F_PARAM if v.is_parameter else 0))
        elif isinstance(v, _TENSORISH):
            raise _Unsupported
        else:
            objects[row] = v
            rows.append((KIND_VALUE, 0, 0, 0, -1, 0, 0))
        return row

    def checked_leaf(v: Any) -> Any:
        if isinstance(v, (list, tuple)) and not isinstance(v, torch.Size):
            raise _Unsupported  # a list/tuple subclass: iter_leaves would walk it, pickle may not rebuild it
        return leaf(v)

    try:
        skel = map_leaves(index.tree, checked_leaf)
        with open(index.file, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            tail_offset, tail_crc = zip_tail(f.fileno(), index.file_size)
            pkl = next(r for n, r in read_zip_records(mm, str(index.file)).items()
                       if n.endswith("/data.pkl") and n.count("/") == 1)
            pickle_at = [data_offset(mm, pkl, str(index.file)), pkl.size, pkl.crc32]
            offsets = [index.data_offset(k, mm) for k in skeys]
    except _Unsupported:
        return None
    ordinal = skeys == [str(i) for i in range(len(skeys))]
    records, refs = index.records, index.storages
    storages = np.array([(rec.header_offset, off, rec.size, rec.crc32, code(dtypes, ref.dtype),
                          code(locations, ref.location), ref.numel)
                         for rec, ref, off in zip(map(records.__getitem__, skeys), map(refs.__getitem__, skeys),
                                                  offsets)], dtype=_STORAGE).reshape(-1)
    sections = {
        "tree": pickle.dumps((skel, objects, dtensors), protocol=4),
        "rows": np.array(rows, dtype=_ROW).tobytes() if rows else b"",
        "dims": np.array(dims, dtype="<i8").tobytes(),
        "storages": storages.tobytes(),
        "skeys": b"" if ordinal else "\x00".join(skeys).encode("utf-8"),
    }
    prefix = next(iter(index.records.values())).name[: -len("data/" + skeys[0])] if skeys else "archive/"
    header = {
        "format_version": FORMAT_VERSION,
        "rank_file": {"size": index.file_size, "tail_offset": tail_offset, "tail_crc32": tail_crc,
                      "pickle": pickle_at},
        "prefix": prefix,
        "byteorder": sys.byteorder,
        "dtypes": [str(d).removeprefix("torch.") for d in dtypes],
        "locations": list(locations),
        "rows": len(rows),
        "storages": len(skeys),
        "ordinal_keys": ordinal,
        "sections": {},
    }
    # the section offsets depend on the header's length, which depends on them: iterate to
    # the fixed point (offsets only grow, so this ends in a few rounds)
    while True:
        head = json.dumps(header, separators=(",", ":")).encode("utf-8")
        pos = _HEAD.size + len(head)
        layout = {}
        for name, data in sections.items():
            layout[name] = [pos, len(data)]
            pos += len(data)
        if layout == header["sections"]:
            break
        header["sections"] = layout
    body = b"".join([_HEAD.pack(MAGIC, FORMAT_VERSION, len(head)), head, *sections.values()])
    return body + struct.pack("<I", crc32(body) & 0xFFFFFFFF)


class _Unsupported(Exception):
    """An entry the index format does not describe: write no index for this file."""


def _layout_to_tuple(layout: DLayout) -> tuple[Any, ...]:
    def placement(p: Placement) -> tuple[Any, ...]:
        if isinstance(p, Shard):
            return ("S", p.dim, p.split_factor)
        if isinstance(p, Partial):
            return ("P", p.reduce_op)
        return ("R",)

    m = layout.mesh
    return (tuple(layout.shape), tuple(placement(p) for p in layout.placements),
            (m.shape, m.dim_names, m.coordinate, m.rank, m.groups))


def _layout_from_tuple(t: Any, meshes: _Meshes | None = None) -> DLayout:
    """A DTensor table row's layout. ``meshes``: an index's own memo of its meshes (a table
    :func:`_flat_dtensors` passed, whose rank maps were counted once each: each is converted
    once, however many meshes share it); without it, the last few are remembered."""
    shape, placements, (mshape, names, coord, rank, groups) = t
    ps: list[Placement] = []
    for p in placements:
        if p[0] == "S":
            ps.append(Shard(int(p[1]), int(p[2])))
        elif p[0] == "P":
            ps.append(Partial(str(p[1])))
        elif p[0] == "R":
            ps.append(Replicate())
        else:
            raise IndexFileError(f"unknown placement {p!r}")
    ints = lambda x: tuple(int(v) for v in x)  # noqa: E731
    # the table's DTensors share one rank map object (the pickle's memo), which can span
    # thousands of ranks: converted once, the rest of the mesh compared by value
    key = (id(groups), mshape, names, coord, rank)
    if meshes is not None:
        mesh = meshes.info.get(key)  # (every rank map stays alive with the table: ids are their own)
        if mesh is None:
            conv = meshes.maps.get(id(groups))
            if conv is None and groups is not None:
                conv = meshes.maps[id(groups)] = tuple(ints(g) for g in groups)
            mesh = meshes.info[key] = MeshInfo(ints(mshape), tuple(str(n) for n in names) if names is not None
                                               else None, ints(coord) if coord is not None else None,
                                               int(rank) if rank is not None else None, conv)
        return DLayout(ints(shape), tuple(ps), mesh)
    hit = _MESH_TUPLES.get(key)
    if hit is not None and hit[0] is groups:
        mesh = hit[1]
    else:
        mesh = MeshInfo(ints(mshape), tuple(str(n) for n in names) if names is not None else None,
                        ints(coord) if coord is not None else None, int(rank) if rank is not None else None,
                        tuple(ints(g) for g in groups) if groups is not None else None)
        _MESH_TUPLES[key] = (groups, mesh)
        while len(_MESH_TUPLES) > 64:
            _MESH_TUPLES.pop(next(iter(_MESH_TUPLES)))
    return DLayout(ints(shape), tuple(ps), mesh)


#: (id of an index file's rank map, the other mesh fields) -> (the rank map, its MeshInfo): the
#: last few, each kept with its rank map so that its id stays its own.
_MESH_TUPLES: dict[Any, tuple[Any, MeshInfo]] = {}


class _Meshes(NamedTuple):
    """One index's meshes, for :func:`_layout_from_tuple`: keyed by the ids of rank maps its
    DTensor table holds (and so keeps alive)."""

    info: dict[Any, MeshInfo]  # (id of the rank map, the other mesh fields) -> its MeshInfo
    maps: dict[int, tuple[tuple[int, ...], ...]]  # id of a rank map -> as ints


# -- reading ---------------------------------------------------------------------------------

def load_index_file(rank_file: Path, fd: int, size: int, t0: float) -> FileIndex | None:
    """The index of ``rank_file`` (open as ``fd``, ``size`` bytes) from its index file, or
    ``None`` when there is none or it cannot be trusted (the reason is logged at debug level)."""
    path = index_path(rank_file)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    except OSError as e:
        logger.debug("%s: index file not used: %s", path, e)
        return None
    try:
        _check_committed(path, rank_file, data)
        return FileIndex(rank_file, size, data, fd, t0)
    except (IndexFileError, pickle.UnpicklingError, ValueError, TypeError, KeyError, IndexError, EOFError,
            OSError, struct.error, AttributeError) as e:
        logger.debug("%s: index file not used, reading the pickle instead: %s", path, e)
        return None
    except Exception as e:  # noqa: BLE001 - e.g. UnsafeCheckpointError from the tree's pickle
        logger.debug("%s: index file not used, reading the pickle instead: %s: %s", path, type(e).__name__, e)
        return None


def _check_committed(path: Path, rank_file: Path, data: bytes) -> None:
    """In a directory with a commit manifest, the index file must be the one it commits
    (same size and CRC32): an index file edited or replaced after the commit is not used."""
    from dist_restore._format.manifest import read_manifest

    try:
        manifest = read_manifest(rank_file.parent)
    except Exception as e:  # noqa: BLE001 - the restore itself reports a bad manifest
        raise IndexFileError(f"the commit manifest is unreadable ({e})") from None
    if manifest is None:
        return
    info = next((r for r in manifest.ranks if r.file == rank_file.name), None)
    if info is None or info.index_file != path.name:
        raise IndexFileError("the commit manifest does not list it")
    got = index_checksum(data)
    if len(data) != info.index_size or got != info.index_checksum:
        raise IndexFileError(f"it is not the one the commit manifest lists ({len(data)} bytes, {got}; "
                             f"committed: {info.index_size} bytes, {info.index_checksum})")


class Columns(NamedTuple):
    """An index file's tables as stored (see the module docstring), for a reader that takes
    the common rows in bulk, without an object per row (:mod:`dist_restore._bytes.readall`)."""

    rows: np.ndarray  # _ROW records, one per leaf
    dims: np.ndarray  # int64 sizes then strides
    storages: np.ndarray  # _STORAGE records
    dtypes: list[torch.dtype]  # by dtype code
    locations: list[str]  # by location code
    objects: dict[int, Any]  # {row: value} of the value rows


class FileIndex(CheckpointIndex):
    """A rank file's index loaded from its index file: entries are made when used.

    ``tree`` (every leaf as a reference) is built on first use; the plan walks the
    ``skeleton`` instead and turns only the rows it reaches into references (:meth:`leaf`).
    """

    source = "index file"

    def __init__(self, file: Path, size: int, data: bytes, fd: int, t0: float) -> None:  # noqa: PLR0915
        if len(data) < _HEAD.size + 4:
            raise IndexFileError("too short")
        magic, version, hlen = _HEAD.unpack_from(data)
        if magic != MAGIC:
            raise IndexFileError("not an index file (bad magic)")
        if version != FORMAT_VERSION:
            raise IndexFileError(f"format version {version}, this dist_restore reads {FORMAT_VERSION}")
        if crc32(memoryview(data)[:-4]) & 0xFFFFFFFF != struct.unpack_from("<I", data, len(data) - 4)[0]:
            raise IndexFileError("its CRC32 does not match (damaged or edited)")
        h = json.loads(data[_HEAD.size : _HEAD.size + hlen])
        rf = h["rank_file"]
        if rf["size"] != size:
            raise IndexFileError(f"written for a rank file of {rf['size']} bytes, this one has {size}")
        if h["byteorder"] != sys.byteorder:
            raise IndexFileError(f"written on a {h['byteorder']}-endian machine")
        tail = _zip_tail(fd, size)
        if (tail.offset, crc32(tail.data) & 0xFFFFFFFF) != (rf["tail_offset"], rf["tail_crc32"]):
            raise IndexFileError("written for another rank file (its zip directory differs)")
        p_off, p_size, p_crc = pickle_at = rf["pickle"]
        if not (type(p_off) is int and type(p_size) is int and 0 <= p_off and 0 <= p_size <= tail.offset - p_off):
            raise IndexFileError("data.pkl's place lies outside the rank file")
        if crc32(os.pread(fd, p_size, p_off)) & 0xFFFFFFFF != p_crc:  # the pickle this index describes
            raise IndexFileError("the rank file's data.pkl is not the one it was built from (damaged?)")

        def section(name: str) -> memoryview:
            off, n = h["sections"][name]
            if not (isinstance(off, int) and isinstance(n, int) and _HEAD.size + hlen <= off
                    and n >= 0 and off + n <= len(data) - 4):
                raise IndexFileError(f"section {name!r} out of bounds")
            return memoryview(data)[off : off + n]

        nrows, nsto = int(h["rows"]), int(h["storages"])
        ordinal = h["ordinal_keys"] is True
        raw_keys = None if ordinal else bytes(section("skeys")).split(b"\x00") if nsto else []
        skeys = None if raw_keys is None else [k.decode("utf-8") for k in raw_keys]
        rows = np.frombuffer(section("rows"), dtype=_ROW)
        sto = np.frombuffer(section("storages"), dtype=_STORAGE)
        if len(rows) != nrows or len(sto) != nsto or (skeys is not None and len(skeys) != nsto):
            raise IndexFileError("row or storage counts disagree with the header")
        prefix = str(h["prefix"])
        # the storage table against the zip directory it claims to describe (never trusted over it)
        _check_directory(tail, prefix.encode("utf-8"), sto, raw_keys, pickle_at)
        dtypes = [_dtype(n) for n in h["dtypes"]]
        locations = [str(n) for n in h["locations"]]
        dims = np.frombuffer(section("dims"), dtype="<i8")
        tree = bytes(section("tree"))
        self._set_tables(file, size, prefix, dtypes, locations, rows, dims, sto, skeys,
                         lambda check: unpickle_refs(tree, str(index_path(file)), check=check)[0], len(tree), t0)

    @classmethod
    def from_tables(cls, file: Path, size: int, prefix: str, dtypes: list[torch.dtype], locations: list[str],
                    rows: np.ndarray, dims: np.ndarray, storages: np.ndarray, skeys: list[str] | None,
                    tree: bytes, t0: float) -> FileIndex:
        """An index of these tables, made in memory (from a rank file's pickle: see
        :mod:`dist_restore._format.pickletables`), checked and loaded as an index file's are.

        Args:
            skeys: The storage keys, ``None`` when they are ``"0"``, ``"1"``, ... in order.
            tree: The index file's tree section: a pickle of ``(skeleton, objects, dtensors)``.

        Raises:
            IndexFileError: the tables point outside themselves or the rank file.
        """
        ix = cls.__new__(cls)
        ix.source = "pickle"  # type: ignore[misc]
        ix._set_tables(file, size, prefix, dtypes, locations, rows, dims, storages, skeys,
                       lambda check: unpickle_refs(tree, str(file), check=check)[0], None, t0)
        return ix

    def _set_tables(self, file: Path, size: int, prefix: str, dtypes: list[torch.dtype], locations: list[str],
                    rows: np.ndarray, dims: np.ndarray, sto: np.ndarray, skeys: list[str] | None,
                    tree: Callable[[Callable[[Any, int, str], None]], Any], tree_bytes: int | None,
                    t0: float) -> None:
        """Install the tables (checked against the rank file's size and each other) and the tree
        section (``tree(check)`` unpickles it, checked by ``check``); ``tree_bytes``: the tree
        section's length, to check it against the tables (``None``: a tree made here from the
        pickle, rows and values as the tables have them)."""
        nrows, nsto = len(rows), len(sto)
        self.file, self.file_size, self.format = file, size, "zip"
        self.native_order = True
        self._prefix = prefix
        self._dtypes = dtypes
        self._locations = locations
        self._rows, self._dims, self._sto = rows, dims, sto
        self._ordinal = skeys is None
        self._check_columns(size)
        found: list[_Section] = []
        got = tree(lambda t, n, f: found.append(_check_section(t, n, f)))
        section = found[0] if found else _Section(False, False)
        if type(got) is not tuple or len(got) != 3:
            raise IndexFileError("tree section is not (skeleton, objects, dtensors)")
        skel, objects, dtensors = got
        if type(objects) is not dict or type(dtensors) is not dict:
            raise IndexFileError("tree section is not (skeleton, objects, dtensors)")
        if tree_bytes is not None:
            _check_tree(skel, objects, dtensors, rows["kind"], tree_bytes)
        self._skeleton, self._objects, self._dtensors = skel, objects, dtensors
        # per row, the first DTensor row of the same layout (-1: not a DTensor row): see dtensor_locals
        self._same: np.ndarray | None = None
        if section.same is not None and tree_bytes is not None:  # (the table's rows: checked by _check_tree)
            self._same = np.full(nrows, -1, dtype=np.int64)
            self._same[np.array(section.same[0], dtype=np.int64)] = section.same[1]
        # a flat DTensor table (_check_section): its rows' layouts equal by value are one object,
        # each mesh made once; its sizes and strides checked already where `sizes`
        self._layouts: dict[Any, DLayout] | None = {} if section.flat else None
        self._meshes = _Meshes({}, {}) if section.flat else None
        self._sizes_ok = section.sizes
        self._nsto = nsto
        self._skeys_list = skeys
        self._snum_dict: dict[str, int] | None = None
        self._cols: tuple[list[Any], list[int]] | None = None
        self._cache: list[Any] = [_MISSING] * nrows
        self._storage_refs: list[StorageRef | None] = [None] * nsto
        self._data_list: list[int] | None = None
        self._made = self._sto_used = 0
        self._left = nrows
        self._all_after = max(_BULK, nrows // 8)
        self._tree: Any = _MISSING
        self._entries = None
        self._data_offsets = {}
        self.records = _Records(self)
        self.seconds = time.perf_counter() - t0

    def _check_columns(self, size: int) -> None:
        r, s, nd = self._rows, self._sto, len(self._dims)
        if len(r) and (int(r["kind"].max()) > KIND_VALUE or int(r["dtype"].max()) >= max(1, len(self._dtypes))
                       or int(r["storage"].max()) >= len(s) or int(r["storage"].min()) < -1
                       or int(r["dims"].min()) < 0 or int((r["dims"].astype(np.int64) + 2 * r["ndim"]).max()) > nd
                       or int(r["offset"].min()) < 0):
            raise IndexFileError("a row points outside the tables")
        tensors = r["kind"] != KIND_VALUE
        if bool((r["storage"][tensors] < 0).any()):
            raise IndexFileError("a tensor row without a storage")
        if bool((self._dims < 0).any()):
            raise IndexFileError("a negative size or stride")
        # no int64 sum or product below can wrap: each is bounded first (data > header >= 0, so
        # size - data cannot; numel <= size // itemsize, so numel * itemsize <= size)
        if len(s) and (int(s["dtype"].max()) >= len(self._dtypes) or int(s["loc"].max()) >= len(self._locations)
                       or bool((s["header"] < 0).any()) or bool((s["data"] <= s["header"]).any())
                       or bool((s["size"] < 0).any()) or bool((s["size"] > size - s["data"]).any())):
            raise IndexFileError("a storage record lies outside the rank file")
        isz = np.array([max(1, d.itemsize) for d in self._dtypes], dtype=np.int64)
        if len(s):
            numel, sisz = s["numel"], isz[s["dtype"]]
            if bool((numel < 0).any()) or bool((numel > size // sisz).any()) or bool((numel * sisz != s["size"]).any()):
                raise IndexFileError("a storage's numel disagrees with its size")

    # -- what CheckpointIndex offers ---------------------------------------------------------

    @property
    def tree(self) -> Any:  # type: ignore[override]
        """The whole tree, every tensor a reference (built on first use)."""
        if self._tree is _MISSING:
            self._tree = self._build(self._skeleton)
        return self._tree

    @property
    def walkable(self) -> tuple[Any, Callable[[int], Any] | None]:
        return self._skeleton, self.leaf

    @property
    def storages(self) -> dict[str, StorageRef]:  # type: ignore[override]
        return {k: self._storage(i) for i, k in enumerate(self._skeys)}

    @property
    def _skeys(self) -> list[str]:
        if self._skeys_list is None:
            self._skeys_list = [str(i) for i in range(self._nsto)]
        return self._skeys_list

    def _snum(self, key: str) -> int:
        """A storage key's number (``KeyError`` for keys the file lacks)."""
        if self._snum_dict is not None:
            return self._snum_dict[key]
        if self._ordinal:
            if type(key) is str and key.isdigit() and key == str(i := int(key)) and i < self._nsto:
                return i
            raise KeyError(key)
        if self._snum_dict is None:
            self._snum_dict = dict(zip(self._skeys, range(self._nsto)))
        return self._snum_dict[key]

    def data_offset(self, storage_key: str, buf: Any = None) -> int:
        """The record's data offset; with ``buf`` (the rank file's bytes, a mapping) an index
        file's is checked against the record's local header, where torch.load reads.

        Raises:
            CorruptCheckpointError: the local header puts the data elsewhere.
        """
        i = self._snum(storage_key)
        off = self._data_list[i] if self._data_list is not None else self._srow(i)[1]
        if buf is not None and self.source == "index file":
            header = int(self._sto["header"][i])
            head = bytes(buf[header : header + _LOCAL.size])
            fields = _LOCAL.unpack(head) if len(head) == _LOCAL.size else None
            if fields is None or fields[0] != _LOCAL_SIG or header + _LOCAL.size + fields[9] + fields[10] != off:
                raise CorruptCheckpointError(
                    f"storage record data/{storage_key}: its local header does not put its data at byte {off}, "
                    "where the index file does (the local header was damaged, or the index file lies)", file=self.file)
        return off

    def data_offsets(self, storage_keys: list[str]) -> list[int] | None:
        snum = self._snum
        if len(storage_keys) <= _BULK and self._data_list is None:
            return self._sto["data"][[snum(k) for k in storage_keys]].tolist()  # type: ignore[no-any-return]
        data, snum_d = self._bulk_storages(), self._snum_dict
        return [data[snum_d[k]] for k in storage_keys]  # type: ignore[index]

    def _resolved(self, node: Any) -> Any:
        return self.leaf(node) if type(node) is int else self._build(node)

    def dtensor_locals(self, paths: Sequence[RawPath]) -> list[tuple[TensorRef, DLayout] | None] | None:
        """For each path naming a DTensor row, ``(its local tensor's reference, its layout)``,
        made without the DTensor's reference (rows made already give theirs; a row's DTensor
        has its local tensor's dtype, as :meth:`leaf` makes it); ``None`` where a path names
        anything else, or is missing (ask :meth:`entry_at`). ``None`` for all when the DTensor
        table is not flat (:func:`_check_section`). For the files a resharding rank reads
        pieces from: most of a file's rows, each only for its local tensor, so the rows are
        read from the columns in bulk and their layouts made once per distinct one.

        Raises:
            CorruptCheckpointError: a layout the index file holds wrong (as :meth:`leaf`: for
                the first path, in order, of that layout).
        """
        same = self._same
        if same is None or self._layouts is None or not self._sizes_ok:
            return None
        skel, cache, missing = self._skeleton, self._cache, _MISSING
        out: list[tuple[TensorRef, DLayout] | None] = [None] * len(paths)
        at: list[int] = []  # the positions of the paths that name a row not made yet, and their rows
        found: list[int] = []
        for i, path in enumerate(paths):
            v = skel
            try:
                for p in path:
                    v = v[p]
            except (KeyError, IndexError, TypeError):
                continue
            if type(v) is not int:
                continue
            made = cache[v]
            if made is missing:
                at.append(i)
                found.append(v)
            elif made.__class__ is DTensorRef:
                out[i] = (made.local, made.__dict__["layout"])
        if not found:
            return out
        r = np.array(found, dtype=np.int64)
        cols = self._rows[r]
        ok = (cols["kind"] == KIND_DTENSOR) & (cols["flags"] & (_F_CONJ | _F_NEG) == 0)
        if not ok.all():
            keep = np.flatnonzero(ok)
            r, cols = r[keep], cols[keep]
            at = [at[k] for k in keep.tolist()]
        if not len(r):
            return out
        # each distinct layout made once, at the first path of it (as one by one: the same first error)
        first = same[r]
        _u, where = np.unique(first, return_index=True)
        layout_of, dts = self._layout, self._dtensors
        made_for = {int(first[k]): layout_of(int(r[k]), dts[int(r[k])][2]) for k in np.sort(where).tolist()}
        layouts = list(map(made_for.__getitem__, first.tolist()))
        # the local tensors' references, from the columns (rows of one dimension count at a time)
        self._bulk_storages()
        ndim, start = cols["ndim"].astype(np.int64), cols["dims"].astype(np.int64)
        locals_: list[Any] = [None] * len(r)
        ndims = np.unique(ndim).tolist()
        for n in ndims:
            sel = np.arange(len(r)) if len(ndims) == 1 else np.flatnonzero(ndim == n)
            dims = self._dims[start[sel, None] + np.arange(2 * n)].tolist()
            sizes = [tuple(d[:n]) for d in dims]
            strides = [tuple(d[n:]) for d in dims]
            srefs = map(self._storage_refs.__getitem__, cols["storage"][sel].tolist())
            dtypes = map(self._dtypes.__getitem__, cols["dtype"][sel].tolist())
            made_refs = list(map(TensorRef, srefs, dtypes, cols["offset"][sel].tolist(), sizes, strides))
            for k, ref in zip(sel.tolist(), made_refs):
                locals_[k] = ref
        for i, ref, layout in zip(at, locals_, layouts):
            out[i] = (ref, layout)
        return out

    def entries_at(self, paths: Sequence[RawPath]) -> list[Any]:
        """:meth:`entry_at` of every path (:data:`NO_ENTRY` where the tree lacks it), with the
        rows made in one loop when there are as many as :meth:`leaf` makes all for."""
        skel, missing = self._skeleton, NO_ENTRY
        nodes = []
        for path in paths:
            v = skel
            try:
                for p in path:
                    v = v[p]
            except (KeyError, IndexError, TypeError):
                v = missing
            nodes.append(v)
        if self._left and len(nodes) >= self._all_after:
            self._make_all()
        cache, resolved = self._cache, self._resolved
        return [v if v is missing else c if type(v) is int and (c := cache[v]) is not _MISSING else resolved(v)
                for v in nodes]

    @property
    def columns(self) -> Columns:
        """The tables this index was loaded from."""
        return Columns(self._rows, self._dims, self._sto, self._dtypes, self._locations, self._objects)

    def take_skeleton(self) -> Any:
        """The skeleton (the containers, every leaf a row number), handed over for the caller
        to fill in place: this index is spent (anything that needs its skeleton raises)."""
        skel = self._skeleton
        self._skel = _SPENT
        return skel

    @property
    def _skeleton(self) -> Any:
        if self._skel is _SPENT:
            raise RuntimeError(f"the index of {self.file} was spent by a full read; index the file again")
        return self._skel

    @_skeleton.setter
    def _skeleton(self, skel: Any) -> None:
        self._skel = skel

    def storage_key(self, i: int) -> str:
        """The key of storage record number ``i`` (``data/{key}``)."""
        return str(i) if self._ordinal else self._skeys[i]

    @property
    def entries(self) -> dict[str, IndexEntry]:  # type: ignore[override]
        if self._entries is None:
            with paused():
                self._entries = {e.key: e for e in self._iter_entries()}
        return self._entries

    def _iter_entries(self) -> Iterator[IndexEntry]:
        for key, _path, row in iter_leaves(self._skeleton):
            v = self.leaf(row)
            yield self._entry(key, v)

    def _entry(self, key: str, v: Any) -> IndexEntry:
        if isinstance(v, DTensorRef):
            loc = v.local
            off = self.data_offset(loc.storage.key) + loc.storage_offset * loc.dtype.itemsize
            return IndexEntry(key, "dtensor", v.dtype, tuple(v.size), loc.stride, loc.storage_offset, loc.nbytes,
                              loc.storage.key, off, local_shape=tuple(loc.size), layout=v.layout)
        if isinstance(v, TensorRef):
            off = self.data_offset(v.storage.key) + v.storage_offset * v.dtype.itemsize
            return IndexEntry(key, "tensor", v.dtype, v.size, v.stride, v.storage_offset, v.nbytes,
                              v.storage.key, off)
        return IndexEntry(key, "object", value=v)

    # -- rows --------------------------------------------------------------------------------

    def prefetch_headers(self, fd: int, storage_keys: Iterable[str]) -> None:
        """Nothing to read: the data offsets are in the index file's table."""

    def dtensor_layouts(self) -> Iterator[DLayout]:
        """The layout of every DTensor entry, from the tree section's table (no leaf built)."""
        for row, (_size, _stride, layout) in self._dtensors.items():
            yield self._layout(row, layout)

    def leaf(self, row: int) -> Any:
        """The reference (or value) of one leaf of the skeleton."""
        v = self._cache[row]
        if v is _MISSING:
            self._made += 1
            if self._made >= self._all_after:  # most rows are wanted: make them all at once
                self._make_all()
                return self._cache[row]
            v = self._cache[row] = self._make(row)
            self._left -= 1
            if not self._left:
                self._cols = None  # every row is made: the lists are not needed any more
        return v

    def _make_all(self) -> None:
        """Every row not made yet, in one loop (a full restore: ~2x faster than one by one)."""
        rows, dims = self._cols if self._cols is not None else (self._rows.tolist(), self._dims.tolist())
        self._cols = (rows, dims)  # for _make, below
        self._bulk_storages()
        srefs, dtypes, cache = self._storage_refs, self._dtypes, self._cache
        plain = KIND_TENSOR
        special = _F_CONJ | _F_NEG
        # DTensor rows of a flat table whose sizes are checked (_check_section): made here too
        dt = KIND_DTENSOR if self._layouts is not None and self._sizes_ok else -1
        dts, layout_of = self._dtensors, self._layout
        for row, (k, d, n, f, s, a, off) in enumerate(rows):
            if cache[row] is not _MISSING:
                continue
            if k == plain and not f & special:
                b = a + n
                cache[row] = TensorRef(srefs[s], dtypes[d], off, tuple(dims[a:b]), tuple(dims[b : b + n]),  # type: ignore[arg-type]
                                       bool(f & _F_GRAD), bool(f & _F_PARAM))
            elif k == dt and not f & special:  # as _make makes it
                b = a + n
                dtype = dtypes[d]
                size, stride, layout = dts[row]
                ref = DTensorRef(dtype, size, stride, bool(f & _F_GRAD))
                ref.is_parameter = bool(f & _F_PARAM)
                sizes, strides = tuple(dims[a:b]), tuple(dims[b : b + n])
                ref.local = TensorRef(srefs[s], dtype, off, sizes, strides)  # type: ignore[arg-type]
                ref.__dict__["layout"] = layout_of(row, layout)  # the cached_property's slot
                cache[row] = ref
            else:
                cache[row] = self._make(row)
        self._left = 0
        self._cols = None

    def _make(self, row: int) -> Any:
        # a few rows: read from the arrays one by one; many: turn the columns into lists once
        rows = self._cols
        if rows is None:
            if self._made > _BULK and self._left > 1:
                rows = self._cols = (self._rows.tolist(), self._dims.tolist())
                self._bulk_storages()
        if rows is not None:
            k, d_code, n, f, s_num, a, off = rows[0][row]
            dims = rows[1]
        else:
            k, d_code, n, f, s_num, a, off = self._rows[row].tolist()
            dims, a = self._dims[a : a + 2 * n].tolist(), 0
        if k == KIND_VALUE:
            if row not in self._objects:
                raise IndexFileError(f"row {row} has no value")
            return self._objects[row]
        md = None
        if f & (_F_CONJ | _F_NEG):
            md = {}
            if f & _F_CONJ:
                md["conj"] = True
            if f & _F_NEG:
                md["neg"] = True
        ref = self._storage_refs[s_num]
        t = TensorRef(ref if ref is not None else self._storage(s_num), self._dtypes[d_code], off, tuple(dims[a : a + n]),
                      tuple(dims[a + n : a + 2 * n]), metadata=md)
        grad, param = bool(f & _F_GRAD), bool(f & _F_PARAM)
        if k == KIND_TENSOR:
            t.requires_grad, t.is_parameter = grad, param
            return t
        size, stride, layout = self._dtensors[row]
        if not (self._sizes_ok or (_sizes(size) and _sizes(stride))):
            raise CorruptCheckpointError(f"DTensor row {row} of the index file has a global size or stride "
                                         f"that is not sizes ({size!r}, {stride!r})", file=index_path(self.file))
        d = DTensorRef(t.dtype, size, stride, grad)
        d.is_parameter = param
        d.local = t
        d.__dict__["layout"] = self._layout(row, layout)  # the cached_property's slot
        return d

    def _layout(self, row: int, layout: Any) -> DLayout:
        """A DTensor row's layout, made when used: one the index file holds wrong is our error,
        naming the index file (its rows' layouts are not all made when it is loaded: a
        checkpoint of thousands of DTensors would pay for every one of them)."""
        memo = self._layouts
        if memo is not None:  # flat: every part of the key a tuple of ints and strings (or None, an int)
            shape, placements, (mshape, names, coord, rank, groups) = layout
            key = (shape, placements, mshape, names, coord, rank, id(groups))
            got = memo.get(key)
            if got is None:
                got = memo[key] = self._layout_made(row, layout)
            return got
        return self._layout_made(row, layout)

    def _layout_made(self, row: int, layout: Any) -> DLayout:
        try:
            return _layout_from_tuple(layout, self._meshes)
        except CheckpointError as e:
            if e.file is not None:
                raise
            raise CorruptCheckpointError(f"DTensor row {row} of the index file: {e.reason}",
                                         file=index_path(self.file), key=e.key) from None
        except Exception as e:  # a malformed tuple: TypeError, ValueError, ...
            raise CorruptCheckpointError(f"DTensor row {row} of the index file has a malformed layout "
                                         f"({type(e).__name__}: {e})", file=index_path(self.file)) from e

    def _storage(self, i: int) -> StorageRef:
        ref = self._storage_refs[i]
        if ref is None:
            self._sto_used += 1
            if self._sto_used > _BULK and self._data_list is None:
                self._bulk_storages()
                return self._storage_refs[i]  # type: ignore[return-value]
            _h, _d, _n, _c, dt, loc, numel = self._srow(i)
            ref = self._storage_refs[i] = StorageRef(str(i) if self._ordinal else self._skeys[i],
                                                     self._dtypes[dt], numel, self._locations[loc])
        return ref

    def _srow(self, i: int) -> tuple[int, ...]:
        """Storage ``i``: (header offset, data offset, size, crc, dtype, location, numel)."""
        return self._sto[i].tolist()  # type: ignore[no-any-return]

    def _bulk_storages(self) -> list[int]:
        """Many storages are wanted: make them all at once, with loops that run in C (the
        data offsets as a list, the key lookup and the records as dicts, every StorageRef)."""
        if self._data_list is None:
            s, keys = self._sto, self._skeys
            self._data_list = s["data"].tolist()
            self._snum_dict = dict(zip(keys, range(self._nsto)))
            dtypes = np.array(self._dtypes + [None], dtype=object)
            locs = np.array(self._locations + [None], dtype=object)
            made = list(map(StorageRef, keys, dtypes[s["dtype"]].tolist(), s["numel"].tolist(),
                            locs[s["loc"]].tolist()))
            if any(r is not None for r in self._storage_refs):  # keep the ones handed out already
                made = [old if old is not None else new for old, new in zip(self._storage_refs, made)]
            self._storage_refs = made
            names = [f"{self._prefix}data/{k}" for k in keys]
            # tuple.__new__ straight: the named tuple's own __new__ is a Python function
            self.records = dict(zip(keys, map(tuple.__new__, repeat(ZipRecord), zip(
                names, s["header"].tolist(), s["size"].tolist(), s["crc"].tolist()))))
        return self._data_list

    def _build(self, v: Any) -> Any:
        if type(v) is int:
            return self.leaf(v)
        if isinstance(v, Mapping):
            out = type(v)()
            for k, c in v.items():
                out[k] = self._build(c)
            return out
        if type(v) is list:
            return [self._build(c) for c in v]
        if type(v) is tuple:
            return tuple(self._build(c) for c in v)
        raise IndexFileError(f"unexpected {type(v).__name__} in the skeleton")


class _Records(Mapping[str, ZipRecord]):
    """``{storage key: ZipRecord}`` made on access from the storage table."""

    def __init__(self, ix: FileIndex) -> None:
        self._ix = ix
        self._made: dict[str, ZipRecord] = {}

    def __getitem__(self, key: str) -> ZipRecord:
        rec = self._made.get(key)
        if rec is None:  # a few records; many: the index turns into a dict of them all
            ix = self._ix
            header, _data, size, crc = ix._srow(ix._snum(key))[:4]
            rec = self._made[key] = ZipRecord(f"{ix._prefix}data/{key}", header, size, crc)
        return rec

    def __iter__(self) -> Iterator[str]:
        return iter(self._ix._skeys)

    def __len__(self) -> int:
        return self._ix._nsto

    def __contains__(self, key: object) -> bool:
        try:
            self._ix._snum(key)  # type: ignore[arg-type]
        except KeyError:
            return False
        return True


def _dtype(name: Any) -> torch.dtype:
    d = getattr(torch, str(name), None)
    if not isinstance(d, torch.dtype):
        raise IndexFileError(f"unknown dtype {name!r}")
    return d


_TENSORISH = (torch.Tensor, StorageRef, ExoticRef)
