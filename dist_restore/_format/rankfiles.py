"""Our own per-rank ``torch.save`` files (``checkpoint_{rank}.pt``), read through a byte source
(an object store) as a :class:`~dist_restore._format.catalog.Catalog`.

Local rank files keep their own, faster path (:mod:`dist_restore._format.index` and the
coordinator's shared reads); this is the path for files that can only be fetched by range.
Per file, three range requests index it: its first and last 4 KiB (the zip directory's end
record; usually ``data.pkl``'s local header), the rest of the zip directory, and ``data.pkl``,
which the weights-only allowlist unpickler (:mod:`dist_restore._format.unpickle`) reads:
nothing in it runs. Then, for the tensors a rank's targets overlap, their local headers (read
concurrently) give each record's data offset, and the planner reads only the byte ranges it
needs, straight into the targets, CRC32-checked as the local path checks them.

The catalogue seen by rank ``r`` of a job of ``W`` ranks:

- a plain tensor (or ``nn.Parameter``) comes from ``r``'s own file when the checkpoint has
  ``W`` files; otherwise (another world size) from file 0, as a DDP checkpoint holds every
  plain tensor whole in every file (the report says so);
- a DTensor is the union of every file's local shard, each at its global region
  (``Replicate`` copies read once, from this rank's own file when it holds one); so a DTensor
  target on any mesh gets the byte ranges of its own shard from whichever files hold them;
- a non-tensor value comes from the same file as a plain tensor.

The checkpoint must pass :func:`~dist_restore._format.manifest.check_checkpoint` on the listing: a
manifest that agrees with the files (world size, each file's size), or, without one, every rank
file from 0 up and no write in progress.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from dist_restore._base.regions import LayoutError, Partial
from dist_restore._base.source import Location
from dist_restore._format.catalog import (
    Catalog,
    CatalogEntry,
    CatalogSource,
    Chunk,
    flatten,
)
from dist_restore._format.dcp import _parse_archive, _Window, build_value, resolve_ref
from dist_restore._format.dtensor import DTensorRef
from dist_restore._format.manifest import (
    IncompleteCheckpointError,
    _rank_files,
    check_checkpoint,
)
from dist_restore._format.unpickle import ExoticRef, TensorRef
from dist_restore._format.zip import ZipRecord
from dist_restore._types import rank_file_name
from dist_restore.errors import CorruptCheckpointError, StateDictMismatchError

logger = logging.getLogger(__name__)

_HEADER = 30 + 256  # bytes fetched at a record's local header: its fixed part, a name and torch's padding


def rank_files(loc: Location) -> dict[int, str]:
    """``{rank: file name}`` of the rank files listed in ``loc`` (numbered as the manifest checks
    accept them)."""
    return {r: rank_file_name(r) for r in _rank_files(loc.root, loc.files())}


def is_rank_files(loc: Location) -> bool:
    return bool(rank_files(loc))


@dataclass
class _Archive:
    """One rank file, indexed: its pickle's tree (references), zip records and record prefix."""

    file: str
    tree: Any
    records: dict[str, ZipRecord]
    prefix: str
    buf: _Window


def _index(loc: Location, file: str) -> _Archive:
    path = loc.join(file)
    with loc.open(file) as src:
        buf = _Window(src, 0, src.size, path, "")  # type: ignore[arg-type]
        tree, records, prefix = _parse_archive(buf, path, None, "the file")  # type: ignore[arg-type]
    if not isinstance(tree, Mapping):
        raise CorruptCheckpointError(f"the file holds a {type(tree).__name__}, not a state dict", file=path)
    return _Archive(file, tree, records, prefix, buf)


@dataclass(frozen=True)
class ValueInfo:
    """Where a non-tensor value lies: in ``file``'s pickle (``length``: the bytes its tensors' records add)."""

    file: str
    length: int = 0


@dataclass(frozen=True)
class _Where:
    """What a placeholder chunk stands for: a tensor reference in one archive (with ``sub``, the
    box of it at those local offsets: one run of a strided shard)."""

    archive: _Archive
    ref: TensorRef
    key: str
    sub: tuple[int, ...] | None = None


_MAX_BOXES = 4096  # boxes one strided shard may be cut into (each is a chunk)


def _row_major(size: Sequence[int]) -> tuple[int, ...]:
    st = [1] * len(size)
    for i in range(len(size) - 2, -1, -1):
        st[i] = st[i + 1] * max(1, size[i + 1])
    return tuple(st)


def _sub_chunk(whole: Chunk, c: Chunk, ref: TensorRef, sub: tuple[int, ...]) -> Chunk:
    """The chunk ``c`` (a box at local offsets ``sub`` of the tensor ``ref``, resolved as ``whole``)."""
    local = tuple(ref.size)
    st = whole.strides or _row_major(local)
    off = whole.offset + sum(a * b for a, b in zip(sub, st)) * ref.dtype.itemsize
    whole_box = not any(sub) and c.size == local
    strides = None if st == _row_major(c.size) or all(n <= 1 for n in c.size) else st
    if whole_box:
        return Chunk(c.file, off, c.start, c.size, whole.crc32, whole.strides)
    return Chunk(c.file, off, c.start, c.size, None, strides)


class RankFilesSource(CatalogSource):
    """Rank files' hooks: chunks located from their records' local headers, values from a file's pickle."""

    def __init__(self, loc: Location) -> None:
        self.loc = loc
        self.where: dict[tuple[str, int], _Where] = {}
        self.values: dict[str, tuple[_Archive, Any]] = {}
        self.order: dict[str, tuple[Any, ...]] = {}
        self.params: dict[str, bool] = {}  # keys saved as nn.Parameter: their requires_grad

    def parameter(self, key: str) -> bool | None:
        return self.params.get(key)

    def nest(self, values: dict[str, Any]) -> dict[str, Any]:
        """The file's own nesting of dicts, in its order (parameters saved as such: again)."""
        root: dict[Any, Any] = {}
        for key, path in self.order.items():
            if key not in values:
                continue
            cur = root
            for k in path[:-1]:
                cur = cur.setdefault(k, {})
            v = values[key]
            if key in self.params and isinstance(v, torch.Tensor) and not isinstance(v, torch.nn.Parameter):
                v = torch.nn.Parameter(v, requires_grad=self.params[key])
            cur[path[-1]] = v
        return root

    def locate(self, catalog: Catalog, needed: Sequence[tuple[CatalogEntry, Chunk]]) -> dict[Chunk, Chunk]:
        by_file: dict[str, list[Chunk]] = {}
        for _e, c in needed:
            by_file.setdefault(c.file, []).append(c)
        out: dict[Chunk, Chunk] = {}
        for f, chunks in by_file.items():
            path = self.loc.join(f)
            with self.loc.open(f) as src:
                if src.size != catalog.file_sizes[f]:
                    raise CorruptCheckpointError(f"file is {src.size} bytes, it was {catalog.file_sizes[f]} when it "
                                                 "was indexed: it changed under the restore", file=path)
                heads: list[tuple[int, int]] = []
                for c in chunks:
                    w = self.where[(f, c.offset)]
                    rec = w.archive.records.get(f"{w.archive.prefix}data/{w.ref.storage.key}")
                    if rec is not None:
                        heads.append((min(_HEADER + len(rec.name), src.size - rec.header_offset), rec.header_offset))
                got = src.pread_many(sorted(set(heads), key=lambda h: h[1]))
                buf = _Headers(src, got)
                for c in chunks:
                    w = self.where[(f, c.offset)]
                    if w.sub is None:
                        out[c] = resolve_ref(buf, w.archive.records, w.archive.prefix, w.ref, path,  # type: ignore[arg-type]
                                             w.key, w.ref.dtype, c, 0, "the file")
                        continue
                    local = tuple(w.ref.size)
                    whole = resolve_ref(buf, w.archive.records, w.archive.prefix, w.ref, path,  # type: ignore[arg-type]
                                        w.key, w.ref.dtype, Chunk(f, 0, (0,) * len(local), local), 0, "the file")
                    out[c] = _sub_chunk(whole, c, w.ref, w.sub)
        return out

    def load_object(self, catalog: Catalog, key: str) -> Any:
        archive, value = self.values[key]
        path = self.loc.join(archive.file)
        with self.loc.open(archive.file) as src:
            buf = _Window(src, 0, src.size, path, key)  # type: ignore[arg-type]
            return build_value(value, buf, archive.records, archive.prefix, path, key,  # type: ignore[arg-type]
                               "a rank file's value")


class _Headers:
    """A file sliceable like ``bytes`` for :func:`data_offset`: local headers prefetched, the
    rest read on demand."""

    def __init__(self, src: Any, got: list[tuple[int, bytes]]) -> None:
        self.src, self.cache = src, got

    def __len__(self) -> int:
        return self.src.size

    def __getitem__(self, s: slice) -> bytes:
        lo, hi, _ = s.indices(self.src.size)
        if hi <= lo:
            return b""
        for at, data in self.cache:
            if at <= lo and hi <= at + len(data):
                return data[lo - at:hi - at]
        return self.src.pread(hi - lo, lo)


def _leaves(tree: Mapping[str, Any]) -> dict[str, Any]:
    return {key: v for key, _p, _k, v in flatten(tree)}


def _paths(tree: Mapping[Any, Any], prefix: tuple[Any, ...] = ()) -> dict[str, tuple[Any, ...]]:
    """``{dotted key: the path of dict keys to it}``, in the tree's order (as :func:`flatten`
    keys the leaves; the tree is no deeper than the unpickler allows)."""
    out: dict[str, tuple[Any, ...]] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_paths(v, (*prefix, k)))
        else:
            out[".".join(map(str, (*prefix, k)))] = (*prefix, k)
    return out


def open_catalog(loc: Location, rank: int, world: int, want: set[str] | None = None,
                 ) -> tuple[Catalog, tuple[str, ...], str]:
    """The catalogue rank ``rank`` of ``world`` sees, every key, and a note for the report.

    Raises:
        FileNotFoundError: no rank file in ``loc``.
        IncompleteCheckpointError: a manifest that disagrees with the files listed.
        CorruptCheckpointError: a malformed file, naming it (and the key).
    """
    files = rank_files(loc)
    if not files:
        raise FileNotFoundError(f"no checkpoint_*.pt in {loc.name!r}")
    sizes = {name: size for name, size in loc.files().items() if name in files.values()}
    check_checkpoint(loc, world_size=None)  # committed (or complete without a manifest), sizes as listed
    n = len(files)
    own_rank = rank if n == world else 0
    own = _index(loc, files[own_rank])
    leaves = _leaves(own.tree)
    leaves_of = {own_rank: leaves}
    source = RankFilesSource(loc)
    source.order = _paths(own.tree)
    entries: dict[str, CatalogEntry] = {}
    objects: dict[str, Any] = {}
    archives = {own_rank: own}
    dkeys = [k for k, v in leaves.items() if isinstance(v, DTensorRef) and (want is None or k in want)]
    if dkeys and n > 1:
        others = [r for r in files if r != own_rank]
        with ThreadPoolExecutor(min(8, len(others))) as pool:
            for r, a in zip(others, pool.map(lambda r: _index(loc, files[r]), others)):
                archives[r] = a
                leaves_of[r] = _leaves(a.tree)
    next_id = [0]

    def placeholder(archive: _Archive, ref: TensorRef, key: str, sub: tuple[int, ...] | None = None) -> int:
        next_id[0] -= 1
        source.where[(archive.file, next_id[0])] = _Where(archive, ref, key, sub)
        return next_id[0]

    for key, v in leaves.items():
        if want is not None and key not in want:
            continue
        path = loc.join(own.file)
        if isinstance(v, ExoticRef):
            raise StateDictMismatchError(f"a {v.kind} tensor: not read from object storage", file=path, key=key)
        if isinstance(v, TensorRef):
            if v.is_parameter:
                source.params[key] = bool(v.requires_grad)
            shape = tuple(v.size)
            off = placeholder(own, v, key)
            entries[key] = CatalogEntry(key, v.dtype, shape, (Chunk(own.file, off, (0,) * len(shape), shape),))
        elif isinstance(v, DTensorRef):
            entries[key] = _dtensor_entry(key, v, archives, leaves_of, own_rank, placeholder, loc)
        else:
            objects[key] = ValueInfo(own.file)
            source.values[key] = (own, v)
    cat = Catalog(loc.root, "rank files", entries, sizes, {}, sum(a.records[a.prefix + "data.pkl"].size
                                                                  for a in archives.values()),
                  objects, source, location=loc)
    note = (f"rank files in an object store: plain tensors and values from {files[own_rank]!r}"
            + ("" if n == world else f" (saved on {n} rank(s), restored on {world}: every file holds them whole, "
               "as a DDP checkpoint does)"))
    return cat, tuple(leaves), note


def _dtensor_entry(key: str, v: DTensorRef, archives: dict[int, _Archive], leaves_of: dict[int, dict[str, Any]],
                   own_rank: int, placeholder: Any, loc: Location) -> CatalogEntry:
    """A DTensor's entry: each file's local shard at its global region, replicas once."""
    shape, dtype = tuple(v.size), v.dtype
    boxes: dict[tuple[tuple[int, int], ...], tuple[int, _Archive, TensorRef, tuple[int, ...]]] = {}
    for r, a in sorted(archives.items()):
        ref = leaves_of[r].get(key)
        path = loc.join(a.file)
        if ref is None:
            raise CorruptCheckpointError(f"DTensor {key!r} is missing from this rank file", file=path, key=key)
        if not isinstance(ref, DTensorRef) or tuple(ref.size) != shape or ref.dtype != dtype:
            raise CorruptCheckpointError(f"the files disagree on {key!r}: not the same DTensor in every file",
                                         file=path, key=key)
        try:
            lay = ref.layout
            if any(isinstance(p, Partial) for p in lay.placements):
                raise LayoutError(f"placements {lay.describe()}: a partial value is not a slice of the tensor")
            coord = lay.mesh.coordinate
            runs = None if coord is None else lay.runs_at(coord)
        except (LayoutError, CorruptCheckpointError) as e:
            raise CorruptCheckpointError(f"DTensor layout: {e}", file=path, key=key) from None
        if runs is None:
            continue  # this file's rank is outside the mesh: it holds no shard
        local = ref.local
        if not isinstance(local, TensorRef):
            raise CorruptCheckpointError("a DTensor whose local tensor is not a dense tensor", file=path, key=key)
        size = tuple(sum(n for _s, n in dim) for dim in runs)
        if tuple(local.size) != size:
            raise CorruptCheckpointError(f"the local shard is {tuple(local.size)}, its layout {lay.describe()} "
                                         f"says {size}", file=path, key=key)
        if 0 in size:
            continue
        count = 1
        for dim in runs:
            count *= len(dim)
        if count > _MAX_BOXES:
            raise StateDictMismatchError(f"placements {lay.describe()} cut the shard into {count} pieces (more than "
                                         f"{_MAX_BOXES}): not read from object storage", file=path, key=key)
        per_dim = []
        for dim in runs:  # (global start, length, local offset) of each run
            at, out = 0, []
            for s0, n in dim:
                out.append((s0, n, at))
                at += n
            per_dim.append(out)
        for combo in itertools.product(*per_dim):
            box = tuple((s0, n) for s0, n, _l in combo)
            if box not in boxes or r == own_rank:
                boxes[box] = (r, a, local, tuple(lo for _s, _n, lo in combo))
    chunks = []
    for box, (_r, a, local, sub) in sorted(boxes.items()):
        whole = not any(sub) and tuple(n for _o, n in box) == tuple(local.size)
        off = placeholder(a, local, key, None if whole else sub)
        chunks.append(Chunk(a.file, off, tuple(o for o, _n in box), tuple(n for _o, n in box)))
    _check_cover(key, shape, chunks, loc)
    return CatalogEntry(key, dtype, shape, tuple(chunks))


def _check_cover(key: str, shape: tuple[int, ...], chunks: list[Chunk], loc: Location) -> None:
    """The shards cover the tensor exactly (no rank file lost, none overlapping)."""
    total = 1
    for n in shape:
        total *= n
    got = 0
    for c in chunks:
        k = 1
        for n in c.size:
            k *= n
        got += k
    if got != total:
        raise IncompleteCheckpointError(f"the shards of {key!r} in {loc.name!r} hold {got} of its {total} elements "
                                        "(a rank file missing, or shards that overlap)")
    srt = sorted(chunks, key=lambda c: c.start)
    for i, a in enumerate(srt):
        for b in srt[i + 1:i + 64]:
            if all(x < y + m and y < x + n for x, n, y, m in zip(a.start, a.size, b.start, b.size)):
                raise CorruptCheckpointError(f"shards of {key!r} at {a.start} and {b.start} overlap", key=key,
                                             file=loc.name)


__all__ = ["RankFilesSource", "is_rank_files", "open_catalog", "rank_files"]
