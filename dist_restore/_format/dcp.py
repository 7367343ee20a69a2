"""DCP checkpoints (``torch.distributed.checkpoint``'s ``FileSystemWriter``) as a
:class:`~dist_restore._format.catalog.Catalog`.

A DCP directory holds ``.metadata`` (read by :mod:`dist_restore._format.dcp_meta`, nothing in it
run) and ``.distcp`` files. Each stored item lies at ``(offset, length)`` in one of them and is a
``torch.save`` archive of its own: a tensor chunk (a DTensor's local shard, or a whole tensor), or
a non-tensor value (a ``BytesStorageMetadata`` entry: step counters, ``param_groups``, ...).

The catalogue holds, per tensor key, the chunks the metadata lists, each pointing at its item.
Only the items of chunks a rank's targets overlap are opened (:meth:`DcpSource.locate`): the
item's zip directory (its last bytes) and ``data.pkl`` give the storage record's offset, its
CRC32, and the chunk's dtype, stride and storage offset, all checked against the metadata;
then the planner reads just the byte ranges of the record it needs. Non-tensor values are
unpickled with the weights-only allowlist (:mod:`dist_restore._format.unpickle`), never with
``weights_only=False`` as ``dcp.load`` does.
"""

from __future__ import annotations

import logging
import os
import sys
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from dist_restore._base.crc import crc32_buf
from dist_restore._base.source import ByteSource, Location, is_url, local_path, location
from dist_restore._format.catalog import Catalog, CatalogEntry, CatalogSource, Chunk
from dist_restore._format.dcp_meta import (
    MAX_METADATA,
    METADATA,
    DcpMetadata,
    ItemInfo,
    parse,
)
from dist_restore._format.index import map_leaves
from dist_restore._format.unpickle import ExoticRef, TensorRef, unpickle_refs
from dist_restore._format.zip import ZipRecord, data_offset, read_zip_records
from dist_restore.errors import CorruptCheckpointError, UnsafeCheckpointError

logger = logging.getLogger(__name__)

_HEAD = 64 << 10  # an item this small is read whole; a larger one: its first and last bytes
_EDGE = 4096  # bytes read at each end of a larger item (its first records; the zip's end records)


def is_dcp(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a DCP checkpoint directory (it holds ``.metadata``; local, or a URL)."""
    if is_url(path):
        return location(path).is_file(METADATA)
    p = local_path(path)
    return p.is_dir() and (p / METADATA).is_file()


class _Window:
    """``length`` bytes at ``base`` of an open file, sliceable like ``bytes`` (what the zip parser
    takes), read with ``pread`` and cached at both ends: an item's own zip is parsed without
    reading its data."""

    def __init__(self, src: ByteSource, base: int, length: int, path: Path, key: str) -> None:
        self.src, self.base, self.length, self.path, self.key = src, base, length, path, key
        self.cache: list[tuple[int, bytes]] = []
        if length <= _HEAD:
            self.cache.append((0, self._pread(0, length)))
        elif base + length > src.size:
            self._pread(0, length)  # (raises: the file ends inside the item)
        else:  # both ends at once (an object store fetches them concurrently)
            got = src.pread_many([(_EDGE, base), (_EDGE, base + length - _EDGE)], key)
            self.cache += [(off - base, data) for off, data in got]

    def _pread(self, off: int, n: int) -> bytes:
        if self.base + off + n > self.src.size:
            raise CorruptCheckpointError(f"file ended at byte {self.src.size}, inside the item at {self.base} "
                                         "(truncated?)", file=self.path, key=self.key)
        return self.src.pread(n, self.base + off, self.key)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, s: slice) -> bytes:
        lo, hi, _ = s.indices(self.length)
        if hi <= lo:
            return b""
        for at, data in self.cache:
            if at <= lo and hi <= at + len(data):
                return data[lo - at:hi - at]
        return self._pread(lo, hi - lo)


def _archive(buf: Any, path: Path, key: str, base: int) -> tuple[Any, dict[str, ZipRecord], str]:
    """``(data.pkl's tree, records, prefix)`` of the ``torch.save`` archive (an item at byte ``base``
    of ``path``) held in ``buf``."""
    try:
        return _parse_archive(buf, path, key)
    except (CorruptCheckpointError, UnsafeCheckpointError) as e:
        if e.key is not None:
            raise
        raise type(e)(f"{e.reason} [the item at byte {base}, {len(buf)} bytes]", file=path, key=key) from None


def _parse_archive(buf: Any, path: Path, key: str | None, what: str = "the item") -> tuple[Any, dict[str, ZipRecord], str]:
    records = read_zip_records(buf, str(path))
    pkl = next((r for n, r in records.items() if n.endswith("/data.pkl") and n.count("/") == 1), None)
    if pkl is None:
        raise CorruptCheckpointError(f"{what} has no data.pkl: not a torch.save archive", file=path, key=key)
    prefix = pkl.name[: -len("data.pkl")]
    off = data_offset(buf, pkl, str(path))
    data = bytes(buf[off:off + pkl.size])
    if zlib.crc32(data) != pkl.crc32:
        raise CorruptCheckpointError(f"CRC32 mismatch in data.pkl of {what}", file=path, key=key)
    bo = records.get(prefix + "byteorder")
    if bo is not None:
        o = data_offset(buf, bo, str(path))
        order = bytes(buf[o:o + bo.size]).decode("ascii", "replace")
        if order != sys.byteorder:
            raise CorruptCheckpointError(f"{what} was written {order}-endian; this machine is {sys.byteorder}-"
                                         "endian", file=path, key=key)
    try:
        tree, _storages = unpickle_refs(data, str(path))
    except (CorruptCheckpointError, UnsafeCheckpointError) as e:
        raise type(e)(e.reason, file=path, key=key) from None
    return tree, records, prefix


def _storage(buf: Any, records: dict[str, ZipRecord], prefix: str, ref: TensorRef, path: Path,
             key: str) -> tuple[int, ZipRecord]:
    """``(data offset in buf, record)`` of ``ref``'s storage, its size and the view's span checked."""
    rec = records.get(f"{prefix}data/{ref.storage.key}")
    if rec is None:
        raise CorruptCheckpointError(f"storage record data/{ref.storage.key} is missing from the item", file=path,
                                     key=key)
    st = ref.storage
    if type(st.numel) is not int or st.numel < 0 or rec.size != st.numel * st.dtype.itemsize:
        raise CorruptCheckpointError(f"storage record data/{st.key} holds {rec.size} bytes, the pickle says "
                                     f"{st.numel} x {st.dtype}", file=path, key=key)
    if st.dtype != ref.dtype:
        raise CorruptCheckpointError(f"a {ref.dtype} view of a {st.dtype} storage", file=path, key=key)
    if any(type(x) is not int or x < 0 for x in (ref.storage_offset, *ref.size, *ref.stride)) \
            or len(ref.size) != len(ref.stride):
        raise CorruptCheckpointError(f"size {ref.size!r:.60}, stride {ref.stride!r:.60} and offset "
                                     f"{ref.storage_offset!r:.30} are not a view of the storage", file=path, key=key)
    lo, hi = ref.element_span()
    if hi > st.numel:
        raise CorruptCheckpointError(f"the view's elements [{lo}, {hi}) lie outside its {st.numel}-element storage",
                                     file=path, key=key)
    return data_offset(buf, rec, str(path)), rec


def locate_chunk(src: ByteSource, path: Path, item: ItemInfo, key: str, dtype: torch.dtype,
                 chunk: Chunk) -> Chunk:
    """``chunk`` (pointing at its item) resolved: the offset of its first element in the file, its
    strides where not row-major, and the CRC32 of its record where the chunk is the whole record.

    Raises:
        CorruptCheckpointError: a malformed item, or one whose tensor is not the chunk the
            metadata describes (dtype, size), naming the file and the key.
    """
    if item.transforms:
        raise CorruptCheckpointError(f"the item is stored through transforms {list(item.transforms)} (compressed "
                                     "by a DCP extension); dist_restore reads plain items only: load this "
                                     "checkpoint with dcp.load, or save it without the extension", file=path, key=key)
    buf = _Window(src, item.offset, item.length, path, key)
    tree, records, prefix = _archive(buf, path, key, item.offset)
    if isinstance(tree, ExoticRef) or not isinstance(tree, TensorRef):
        raise CorruptCheckpointError(f"the item holds a {getattr(tree, 'kind', type(tree).__name__)}, not a dense "
                                     "tensor", file=path, key=key)
    if tree.dtype != dtype or tuple(tree.size) != chunk.size:
        raise CorruptCheckpointError(f"the item holds a {tree.dtype} tensor of size {tuple(tree.size)}, the "
                                     f"metadata says {dtype} of size {chunk.size}", file=path, key=key)
    if tree.metadata:
        raise CorruptCheckpointError(f"the item's tensor carries bits {sorted(tree.metadata)} (conj/neg)", file=path,
                                     key=key)
    return resolve_ref(buf, records, prefix, tree, path, key, dtype, chunk, item.offset)


def resolve_ref(buf: Any, records: dict[str, ZipRecord], prefix: str, ref: TensorRef, path: Path, key: str,
                dtype: torch.dtype, chunk: Chunk, base: int = 0, where: str = "the item") -> Chunk:
    """``chunk`` resolved from the tensor ``ref`` of a ``torch.save`` archive held in ``buf``
    (at byte ``base`` of the file): the offset of its first element, its strides where not
    row-major, its record's CRC32 where the chunk is the whole record; the storage record's
    size and the view's span checked."""
    try:
        off, rec = _storage(buf, records, prefix, ref, path, key)
    except CorruptCheckpointError as e:
        raise CorruptCheckpointError(f"{e.reason} [{where} at byte {base}]", file=path, key=key) from None
    isz = dtype.itemsize
    start = base + off + ref.storage_offset * isz
    if ref.is_contiguous():
        whole = ref.storage_offset == 0 and ref.numel * isz == rec.size
        return Chunk(chunk.file, start, chunk.start, chunk.size, rec.crc32 if whole else None)
    strided = Chunk(chunk.file, start, chunk.start, chunk.size, None, tuple(ref.stride))
    whole = ref.storage_offset == 0 and strided.span(dtype) == rec.size
    return Chunk(chunk.file, start, chunk.start, chunk.size, rec.crc32 if whole else None, tuple(ref.stride))


def load_object(src: ByteSource, path: Path, item: ItemInfo, key: str) -> Any:
    """The non-tensor value of an item, unpickled with the weights-only allowlist (tensors in it
    are built from the item's own records).

    Raises:
        UnsafeCheckpointError: the value needs a class outside the allowlist, naming the key.
        CorruptCheckpointError: a malformed item, naming the file and the key.
    """
    if item.transforms:
        raise CorruptCheckpointError(f"the item is stored through transforms {list(item.transforms)}; "
                                     "dist_restore reads plain items only", file=path, key=key)
    buf = _Window(src, item.offset, item.length, path, key)
    if item.length > _HEAD:
        buf = buf[0:item.length]  # one read: a value's storages are read anyway
    tree, records, prefix = _archive(buf, path, key, item.offset)
    return build_value(tree, buf, records, prefix, path, key, "a DCP value")


def build_value(tree: Any, buf: Any, records: dict[str, ZipRecord], prefix: str, path: Path, key: str,
                what: str) -> Any:
    """A non-tensor value of an archive held in ``buf``, its tensors built from their records
    (each record's CRC32 checked)."""

    def leaf(v: Any) -> Any:
        if isinstance(v, ExoticRef):
            raise UnsafeCheckpointError(f"the value holds a {v.kind} tensor, which a weights-only load of {what} "
                                        "does not build", file=path, key=key)
        if not isinstance(v, TensorRef):
            return v
        off, rec = _storage(buf, records, prefix, v, path, key)
        raw = bytes(buf[off:off + rec.size])
        if zlib.crc32(raw) != rec.crc32:
            raise CorruptCheckpointError(f"CRC32 mismatch in storage record data/{v.storage.key}", file=path, key=key)
        storage = torch.frombuffer(bytearray(raw), dtype=v.dtype) if raw else torch.empty(0, dtype=v.dtype)
        t = torch.as_strided(storage, v.size, v.stride, v.storage_offset)
        if v.is_parameter:
            return torch.nn.Parameter(t, requires_grad=bool(v.requires_grad))
        return t.requires_grad_(bool(v.requires_grad)) if v.requires_grad and t.is_floating_point() else t

    return map_leaves(tree, leaf)


_BLOCK = 8 << 20


def check_item(src: ByteSource, path: Path, item: ItemInfo, key: str, *, checksum: bool = True) -> int:
    """(``verify``) Parse an item's framing and, with ``checksum``, stream every record of it
    through CRC32; returns the bytes checked.

    Raises:
        CorruptCheckpointError: a malformed item or a CRC32 mismatch, naming the file and key.
    """
    buf = _Window(src, item.offset, item.length, path, key)
    _tree, records, _prefix = _archive(buf, path, key, item.offset)
    if not checksum:
        return 0
    done = 0
    for rec in records.values():
        try:
            off = item.offset + data_offset(buf, rec, str(path))
        except CorruptCheckpointError as e:
            raise CorruptCheckpointError(f"{e.reason} [the item at byte {item.offset}]", file=path, key=key) from None
        crc, pos, end = 0, off, off + rec.size
        while pos < end:
            if pos >= src.size:
                raise CorruptCheckpointError(f"file ended at byte {pos}, inside record {rec.name!r}", file=path,
                                             key=key)
            block = src.pread(min(_BLOCK, end - pos, src.size - pos), pos, key)
            crc = crc32_buf(block, crc)
            pos += len(block)
        if crc != rec.crc32:
            raise CorruptCheckpointError(f"CRC32 mismatch in record {rec.name!r} of the item at byte {item.offset}",
                                         file=path, key=key)
        done += rec.size
    return done


def _terminal(value: Any) -> bool:
    """DCP's ``_is_terminal``: a list is a leaf unless it holds tensors, dicts or such lists."""
    if isinstance(value, Mapping):
        return False
    if not isinstance(value, list):
        return True
    for v in value:
        if isinstance(v, (Mapping, list)) and not _terminal(v):
            return False
        if isinstance(v, torch.Tensor):
            return False
    return True


def dcp_flatten(state_dict: Mapping[str, Any]) -> Iterator[tuple[str, Any, Any, Any]]:
    """``(key, parent, its key, value)`` of each leaf, keyed as ``dcp.save`` flattens it
    (``traverse_state_dict``: dicts always, lists when they hold tensors or dicts; keys joined
    with dots)."""
    stack: list[tuple[str, Any, Any, Any]] = [(str(k), state_dict, k, v) for k, v in state_dict.items()][::-1]
    while stack:
        key, parent, k, v = stack.pop()
        if isinstance(v, Mapping):
            stack.extend([(f"{key}.{kk}", v, kk, vv) for kk, vv in v.items()][::-1])
        elif _terminal(v) or not isinstance(v, (list, tuple)):
            yield key, parent, k, v
        else:
            stack.extend([(f"{key}.{i}", v, i, vv) for i, vv in enumerate(v)][::-1])


def _nest(values: dict[str, Any], paths: Mapping[str, tuple[str | int, ...]]) -> dict[str, Any]:
    """``{key: value}`` nested along DCP's ``planner_data`` paths (DCP's ``set_element``)."""
    root: dict[str, Any] = {}
    for key, value in values.items():
        path = paths.get(key, (key,))
        cur: Any = root
        for i in range(1, len(path)):
            prev, nxt = path[i - 1], path[i]
            fresh: Any = {} if type(nxt) is str else []
            if isinstance(cur, dict):
                cur = cur.setdefault(prev, fresh)
            else:
                cur.extend([None] * (prev + 1 - len(cur)))
                if cur[prev] is None:
                    cur[prev] = fresh
                cur = cur[prev]
        last = path[-1]
        if isinstance(cur, list):
            if type(last) is not int:
                raise CorruptCheckpointError(f"planner_data path {path!r:.80} indexes a list with {last!r:.30}",
                                             key=key)
            cur.extend([None] * (last + 1 - len(cur)))
        elif type(last) is int and not isinstance(cur, dict):
            raise CorruptCheckpointError(f"planner_data path {path!r:.80} is inconsistent", key=key)
        cur[last] = value
    return root


class DcpSource(CatalogSource):
    """DCP's hooks: DCP's key flattening, chunk items located on demand, values unpickled safely."""

    def __init__(self, meta: DcpMetadata) -> None:
        self.meta = meta
        self.items: dict[tuple[str, int], ItemInfo] = {}
        for t in meta.tensors.values():
            for _o, _s, it in t.chunks:
                self.items[(it.file, it.offset)] = it

    def flatten(self, state_dict: Mapping[str, Any]) -> Iterator[tuple[str, Any, Any, Any]]:
        return dcp_flatten(state_dict)

    def locate(self, catalog: Catalog, needed: Sequence[tuple[CatalogEntry, Chunk]]) -> dict[Chunk, Chunk]:
        out: dict[Chunk, Chunk] = {}
        by_file: dict[str, list[tuple[CatalogEntry, Chunk]]] = {}
        for e, c in needed:
            by_file.setdefault(c.file, []).append((e, c))
        for f, todo in by_file.items():
            path = catalog.path(f)
            with _open(catalog, f, todo[0][0].key) as src:
                for e, c in sorted(todo, key=lambda ec: ec[1].offset):
                    if c not in out:
                        out[c] = locate_chunk(src, path, self.items[(c.file, c.offset)], e.key, e.dtype, c)
        return out

    def load_object(self, catalog: Catalog, key: str) -> Any:
        item: ItemInfo = catalog.objects[key]
        path = catalog.path(item.file)
        with _open(catalog, item.file, key) as src:
            return load_object(src, path, item, key)

    def nest(self, values: dict[str, Any]) -> dict[str, Any]:
        order = {k: i for i, k in enumerate(self.meta.order)}
        return _nest(dict(sorted(values.items(), key=lambda kv: order.get(kv[0], len(order)))), self.meta.paths)


def _open(catalog: Catalog, file: str, key: str) -> ByteSource:
    path = catalog.path(file)
    try:
        src = catalog.open(file)
    except FileNotFoundError:
        raise CorruptCheckpointError("the file the metadata names is gone", file=path, key=key) from None
    size = catalog.file_sizes[file]
    if src.size != size:
        src.close()
        raise CorruptCheckpointError(f"file is {src.size} bytes, it was {size} when the metadata was read: it "
                                     "changed under the restore", file=path, key=key)
    return src


def read_metadata(root: Path | str | Location) -> tuple[DcpMetadata, int, dict[str, int]]:
    """``(checked metadata, its size, {file: size})`` of the DCP checkpoint in ``root``."""
    loc = root if isinstance(root, Location) else location(root)
    sizes: dict[str, int] = dict(loc.files()) if loc.is_remote else {}  # (local: stat-ed as named)
    data = loc.read_bytes(METADATA, MAX_METADATA)
    meta = parse(loc.root, data, sizes, listed=loc.is_remote)
    named = {it.file for t in meta.tensors.values() for _o, _s, it in t.chunks} | {it.file for it in meta.objects.values()}
    return meta, len(data), {f: n for f, n in sizes.items() if f in named}


def open_catalog(path: str | os.PathLike[str], want: Iterable[str] | None = None) -> tuple[Catalog, tuple[str, ...]]:
    """The catalogue of a DCP checkpoint and every key it holds (tensors and values).

    Args:
        path: The checkpoint directory.
        want: The keys needed (``None``: all); the others are only in the returned key list.

    Raises:
        FileNotFoundError: no ``.metadata`` in ``path``.
        UnsafeCheckpointError: ``.metadata`` asks for anything but DCP's own classes.
        CorruptCheckpointError: malformed metadata, naming the file and the key.
    """
    loc = location(path)
    if not loc.is_file(METADATA):
        raise FileNotFoundError(f"no {METADATA} in {loc.name!r}: not a DCP checkpoint")
    meta, msize, sizes = read_metadata(loc)
    wanted = None if want is None else set(want)
    entries: dict[str, CatalogEntry] = {}
    for key, t in meta.tensors.items():
        if wanted is None or key in wanted:
            chunks = tuple(Chunk(it.file, it.offset, o, s) for o, s, it in t.chunks)
            entries[key] = CatalogEntry(key, t.dtype, t.shape, chunks)
    objects = {k: v for k, v in meta.objects.items() if wanted is None or k in wanted}
    cat = Catalog(loc.root, "dcp", entries, sizes, {}, msize, objects, DcpSource(meta), location=loc)
    return cat, meta.order


__all__ = ["DcpSource", "check_item", "dcp_flatten", "is_dcp", "load_object", "locate_chunk", "open_catalog", "read_metadata"]
