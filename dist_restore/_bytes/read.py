"""Moving bytes: produce the planned tensors of one rank file.

The file is mapped read-only-private (``mmap`` ``ACCESS_COPY``: nothing a restore does can
reach the file) and every tensor is made with one copy from the mapping, straight into its
preallocated target, or into a new storage holding the span of elements its views need
(views of one storage stay views of one new storage: tied weights stay tied). Contiguous
CPU targets get a ``memmove`` from the mapping (small records) or a ``preadv`` straight into
the target in 8 MiB requests (large ones: a cold file is read in large requests, a few in
flight on a small I/O pool, across records, each CRC'd as it lands; see
:mod:`dist_restore._bytes.pio`). Large contiguous CUDA targets get the same reads into a few
pinned host buffers, each sent on by an asynchronous copy to the device while the next
requests are read. Strided or other device targets get a ``copy_`` from a view of the mapping.
Whole storage records are checked against the zip's CRC32 before their bytes are used.
Exotic tensors (quantized, sparse, nested, ...), legacy non-zip files and files of the
other byte order go through ``torch.load(weights_only=True)``, with a warning.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import operator
import os
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal, NoReturn

import numpy as np
import torch

from dist_restore._base.crc import _BIG as _CRC_BIG
from dist_restore._base.crc import crc32 as _crc32
from dist_restore._base.crc import crc32_at, crc32_buf, crc32_combine
from dist_restore._bytes.pio import read_part
from dist_restore._format.index import CheckpointIndex, full_load
from dist_restore._format.keypath import RawPath
from dist_restore._paths import open_regular, raise_with_path
from dist_restore._planning.plan import PlannedLeaf
from dist_restore._format.unpickle import TensorRef
from dist_restore._format.zip import _LOCAL, _LOCAL_SIG
from dist_restore.errors import CheckpointError, CorruptCheckpointError

logger = logging.getLogger(__name__)

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
        pieces: ``{(file, record): RecordPieces}``: what was read of records read in part
            (resharding), to be checked together with the other ranks' pieces
            (:mod:`dist_restore._bytes.shares`).
    """

    bytes_read: int = 0
    bytes_verified: int = 0
    fallback_loads: int = 0
    pieces: dict[tuple[str, str], Any] = field(default_factory=dict)

    def piece_reports(self) -> list[tuple[Any, ...]]:
        """The pieces as plain tuples (what the read agreement carries)."""
        return [(p.file, p.skey, p.key, p.total, p.want, p.groups) for p in self.pieces.values()]


def resolve_device(location: str, map_location: MapLocation, *, file: object, key: str) -> torch.device:
    """The device a tensor saved at ``location`` is allocated on.

    Raises:
        CorruptCheckpointError: the file's location names no device (or one this machine lacks).
        ValueError: ``map_location`` names no device.
    """
    try:
        if isinstance(map_location, Mapping):
            mapped = type(location) is str and location in map_location
            spec = map_location[location] if mapped else location
        else:
            mapped = map_location is not None
            spec = map_location if mapped else location
    except TypeError:  # an unhashable location (not a str: a damaged file)
        mapped, spec = False, location
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError, TypeError) as e:
        if mapped:
            raise ValueError(f"map_location {spec!r} is not a device: {e}") from None
        raise CorruptCheckpointError(f"tensor was saved on {location!r}, which is not a device ({e})",
                                     file=file, key=key) from None
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
    _check_map_location(map_location)
    at: list[str | None] = [None]  # the key being produced, for the error of a failure
    try:
        dense = [lf for lf in leaves if isinstance(lf.source, TensorRef) and index.native_order]
        other = [lf for lf in leaves if not (isinstance(lf.source, TensorRef) and index.native_order)]
        if dense:
            _produce_dense(index, dense, values, map_location, verify, stats, at)
        if other:
            _produce_fallback(index, other, values, map_location, stats, at)
    except Exception as e:  # noqa: BLE001 - turned into ours below, or raised as it is
        raise_as_ours(e, index.file, at[0])
    return values


def raise_as_ours(e: Exception, file: object, key: str | None) -> NoReturn:
    """Raise ``e`` as one of our errors (call it in the ``except`` block that caught it).

    A :class:`CheckpointError`, a ``MemoryError`` or an ``OSError`` that names its path is
    raised as it is (an ``OSError`` naming none names ``file``); anything else, made from the
    file's fields somewhere a check did not foresee (``torch.empty_strided`` of a size the
    checks let through, ...), becomes a :class:`CorruptCheckpointError` naming ``file`` and
    ``key``, caused by ``e``: never a bare builtin error that names no file.
    """
    if isinstance(e, (CheckpointError, MemoryError)):
        raise e
    if isinstance(e, OSError):
        raise_with_path(e, file)  # type: ignore[arg-type]
    raise CorruptCheckpointError(f"the tensor could not be made from the file ({type(e).__name__}: {e})",
                                 file=file, key=key) from e


def _check_map_location(map_location: MapLocation) -> None:
    """``ValueError`` for a ``map_location`` that names no device (a bad argument: said before
    anything is read, and never taken for a damaged file)."""
    specs = map_location.values() if isinstance(map_location, Mapping) else [map_location]
    for spec in specs:
        if spec is not None and not isinstance(spec, torch.device):
            try:
                torch.device(spec)
            except (RuntimeError, ValueError, TypeError) as e:
                raise ValueError(f"map_location {spec!r} is not a device: {e}") from None


def _produce_dense(index: CheckpointIndex, leaves: Sequence[PlannedLeaf], values: dict[RawPath, Any],
                   map_location: MapLocation, verify: Verify, stats: ReadStats, at: list[str | None]) -> None:
    by_storage: dict[str, list[PlannedLeaf]] = defaultdict(list)
    for lf in leaves:
        by_storage[lf.source.storage.key].append(lf)
    order = sorted(by_storage, key=lambda k: index.records[k].header_offset)
    try:
        with _RankFile(index, values, map_location, verify == "crc32", stats) as rf:
            with torch.no_grad():  # filling Parameters that require grad is not an autograd op
                small = [k for k in order if rf.is_small_whole(k, by_storage[k])]
                if small:
                    rf.small_whole(small, [by_storage[k][0] for k in small], at)
                    done = set(small)
                    order = [k for k in order if k not in done]
                for skey in order:
                    at[0] = by_storage[skey][0].key
                    rf.storage(skey, by_storage[skey])
                at[0] = None  # (a pipelined read's error names its own key)
                rf.drain()
    except OSError as e:  # fstat, mmap, madvise: errors that name no file
        raise_with_path(e, index.file)


_SMALL = 256 << 10  # below this: one memmove from the mapping; above: preadv
_CHUNK = 8 << 20  # one preadv request (and one CRC32 call): large enough for a disk's full speed
_DEPTH = 2  # I/O threads (= requests in flight) at least...
_MAX_THREADS = 8  # ...and up to torch.get_num_threads() and this (warm reads are memory-bound)
_DEVICE_DEPTH = 4  # pinned-buffer reads in flight to a CUDA device (plus 2 buffers being copied)
_DROP_SMALL = 2 << 20  # ... and in these, for small records: their tensors cost more RSS besides

_data_ptr = torch.Tensor.data_ptr
_size = operator.attrgetter("size")
_crc = operator.attrgetter("crc32")
_hoff = operator.attrgetter("header_offset")


def _local_offsets(u8: np.ndarray, hoff: np.ndarray) -> np.ndarray:
    """Where each record's data starts by its local header at ``hoff`` (every header's 30 bytes
    inside ``u8``, the mapped file): what torch.load reads; ``-1`` where no local header is."""
    sig = (u8[hoff] == 0x50) & (u8[hoff + 1] == 0x4B) & (u8[hoff + 2] == 3) & (u8[hoff + 3] == 4)
    names = u8[hoff + 26].astype(np.int64) | (u8[hoff + 27].astype(np.int64) << 8)
    extras = u8[hoff + 28].astype(np.int64) | (u8[hoff + 29].astype(np.int64) << 8)
    return np.where(sig, hoff + _LOCAL.size + names + extras, -1)


@dataclass
class _Job:
    """One range being read in pipelined chunks: its CRC so far, chunks not yet settled."""

    crc: bool
    rec: Any
    skey: str
    key: str
    left: int
    running: int = 0
    first: bool = True
    sink: Any = None  # given the range's CRC32 when it is a part of its record (else: checked)


_POOL: tuple[int, ThreadPoolExecutor] | None = None  # (the pid that made it, the pool)


def _io_pool(workers: int) -> ThreadPoolExecutor:
    """The process's I/O pool, of at least ``workers`` threads: kept between files and restores
    (starting threads costs milliseconds on a loaded machine), made anew after a fork."""
    global _POOL
    if _POOL is not None and _POOL[0] == os.getpid() and _POOL[1]._max_workers >= workers:
        return _POOL[1]
    old = _POOL[1] if _POOL is not None and _POOL[0] == os.getpid() else None
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dist_restore_io")
    _POOL = (os.getpid(), pool)
    if old is not None:
        old.shutdown(wait=False)  # its work was drained by the file that asked for more
    return pool


class _RankFile:
    """One open rank file, mapped private and read-only in effect (nothing writes to it).

    The mapping is never closed explicitly: tensors over it (and, on an error, the frames of
    the traceback) keep the mmap object alive, and it unmaps when the last one goes.
    """

    def __init__(self, index: CheckpointIndex, values: dict[RawPath, Any], map_location: MapLocation,
                 check: bool, stats: ReadStats) -> None:
        self.index, self.values, self.map_location, self.check, self.stats = (
            index, values, map_location, check, stats)
        self.fd = open_regular(index.file)
        try:
            size = os.fstat(self.fd).st_size
            if size != index.file_size:
                raise CorruptCheckpointError(
                    f"file changed size since it was indexed ({index.file_size} -> {size} bytes)",
                    file=index.file)
            self.mm = mmap.mmap(self.fd, size, access=mmap.ACCESS_COPY)
        except BaseException:
            os.close(self.fd)
            raise
        self.whole = torch.frombuffer(self.mm, dtype=torch.uint8)
        self._pool: ThreadPoolExecutor | None = None
        self._pending: deque[tuple[Future[int], int, _Job, Any]] = deque()
        self._devices: dict[str, torch.device] = {}
        self._slots: list[torch.Tensor] = []  # pinned staging buffers for CUDA targets
        self._free: deque[tuple[int, Any]] = deque()  # (slot, event of its last copy)
        self._cuda_used: set[torch.device] = set()

    def __enter__(self) -> _RankFile:
        return self

    def __exit__(self, *exc: Any) -> None:
        for fut, *_rest in self._pending:  # pipelined reads write into targets: let them end
            fut.exception()
        self._pending.clear()
        for dev in self._cuda_used:  # the copies to the device are complete when we return
            torch.cuda.synchronize(dev)
        os.close(self.fd)

    def is_small_whole(self, skey: str, group: list[PlannedLeaf]) -> bool:
        """A small record read whole by one plain contiguous view into a plain CPU tensor."""
        if len(group) != 1:
            return False
        lf = group[0]
        ref: TensorRef = lf.source
        size = self.index.records[skey].size
        if not 0 < size < _SMALL or ref.metadata or ref.storage_offset or ref.nbytes != size \
                or not ref.is_contiguous():
            return False
        t = lf.target
        if t is None:
            return self._device(ref.storage.location, lf.key).type == "cpu"
        return t.is_cpu and t.is_contiguous() and not t.is_conj() and not t.is_neg()

    def small_whole(self, skeys: list[str], leaves: list[PlannedLeaf], at: list[str | None]) -> None:
        """:meth:`is_small_whole` records, in a tight loop: one memmove and one CRC32 each
        (10,000 small tensors: several times faster than :meth:`storage` one by one).
        ``at[0]`` is set to the key of a leaf whose tensor cannot be made."""
        records = self.index.records
        offsets = self._data_offsets(skeys)
        if self.index.source == "index file":  # torch.load reads where the local headers say
            recs = list(map(records.__getitem__, skeys))
            self.check_local_headers(np.fromiter(map(_hoff, recs), dtype=np.int64, count=len(recs)),
                                     np.array(offsets, dtype=np.int64), lambda i: (skeys[i], leaves[i].key),
                                     drop=False)  # (dropped below, at once)
        end = offsets[-1] + records[skeys[-1]].size
        # parsing the local headers faulted in a page (and its neighbours) of every record:
        # unmap them all before the tensors are made
        self._drop(records[skeys[0]].header_offset, end)
        targets = [lf.target for lf in leaves]
        try:
            for i, lf in enumerate(leaves):
                if lf.target is None:
                    ref: TensorRef = lf.source
                    t = targets[i] = torch.empty_strided(ref.size, ref.stride, dtype=ref.dtype)
                    self.values[lf.path] = finish_tensor(t, ref)
        except Exception:
            at[0] = lf.key
            raise
        recs = list(map(records.__getitem__, skeys))
        # iterators in C: no Python frame, no list of ints per column
        self.copy_whole(zip(map(_data_ptr, targets), offsets, map(_size, recs), map(_crc, recs)),  # type: ignore[arg-type]
                        offsets[0], end, lambda i: (skeys[i], leaves[i].key))

    def copy_whole(self, records: Iterable[tuple[int, int, int, int]], start: int, end: int,
                   names: Callable[[int], tuple[str, str]]) -> None:
        """Whole small records, in file order, into memory: one memmove and (with ``check``)
        one CRC32 each, the mapped file pages unmapped again every :data:`_DROP_SMALL` bytes
        (the mapped file would stay resident next to the tensors it fills: RSS ~2x the payload).

        Args:
            records: ``(address, data offset, size, zip CRC32)`` of each record, ascending
                offsets; the address is the ``data_ptr()`` of a dense CPU tensor of its size,
                kept alive by the caller.
            start, end: The first record's data offset; the end of the last one's data.
            names: ``i -> (storage key, entry key)`` of record ``i``, for an error message.
        """
        stats = self.stats
        dropped = start
        base = self.whole.data_ptr()
        memmove, check, crc32, drop_every = ctypes.memmove, self.check, _crc32, _DROP_SMALL
        size = len(self.mm)
        read = 0  # bytes copied (and verified, with check): added to stats however the loop ends
        try:
            with memoryview(self.mm) as mv:
                for i, (addr, off, n, want) in enumerate(records):
                    if off < 0 or n < 0 or n > size - off:  # never a copy from outside the mapping
                        skey, key = names(i)
                        raise self._outside(off, n, skey, key)
                    if check and (crc32(mv[off : off + n]) if n < _CRC_BIG else crc32_buf(mv[off : off + n])) != want:
                        skey, key = names(i)
                        raise CorruptCheckpointError(
                            f"CRC32 mismatch in storage record data/{skey}: tensor data is corrupt",
                            file=self.index.file, key=key)
                    memmove(addr, base + off, n)
                    read += n
                    if off + n - dropped >= drop_every:
                        self._drop(dropped, off + n)
                        dropped = off + n
        finally:
            stats.bytes_read += read
            if check:
                stats.bytes_verified += read
        self._drop(dropped, end)

    def _data_offsets(self, skeys: list[str]) -> list[int]:
        """Data offsets of many records: their local headers parsed at once with numpy."""
        index = self.index
        known = index.data_offsets(skeys)
        if known is not None:
            return known
        hoff = np.array([index.records[k].header_offset for k in skeys], dtype=np.int64)
        index.prefetch_headers(self.fd, skeys)  # a cold file: the headers' reads in parallel
        offs = _local_offsets(self.whole.numpy(), hoff)
        sizes = np.array([index.records[k].size for k in skeys], dtype=np.int64)
        ok = (offs >= 0) & (offs + sizes <= index.file_size)
        out = offs.tolist()
        for i in np.flatnonzero(~ok).tolist():
            out[i] = index.data_offset(skeys[i], self.mm)  # raises the precise error
        return out

    def _data_offset(self, skey: str, key: str | None = None) -> int:
        """One record's data offset, its local header read by ``pread``: a fault on the
        mapping would read the file around it (up to the readahead size) synchronously,
        and a partial restore does not need those bytes. An index file's offset is checked
        against the local header (``key``: the entry's, for the error)."""
        known = self.index.data_offsets([skey])
        if known is not None and self.index.source != "index file":
            return known[0]
        rec = self.index.records[skey]
        head = os.pread(self.fd, _LOCAL.size, rec.header_offset)
        if len(head) == _LOCAL.size:
            fields = _LOCAL.unpack(head)
            off = rec.header_offset + _LOCAL.size + fields[9] + fields[10]
            if fields[0] == _LOCAL_SIG and off + rec.size <= self.index.file_size:
                if known is not None and off != known[0]:  # an index file's offset: one check, no read saved
                    raise self._header_disagrees(skey, off, known[0], key)
                return off
        if known is not None:
            raise self._header_disagrees(skey, -1, known[0], key)
        return self.index.data_offset(skey, self.mm)  # raises the precise error

    def check_local_headers(self, header: np.ndarray, data: np.ndarray, names: Callable[[int], tuple[str, str]],
                            *, drop: bool = True) -> None:
        """An index file's data offsets ``data`` against the local headers at ``header`` (both in
        file order): torch.load reads where the local header says, so an index file that says
        otherwise (or a local header damaged since it was written) is not followed. The headers
        are read a few MiB of the file at a time, the pages their reads mapped unmapped
        after each (as when they are parsed to find the data: the file never mapped whole).

        Args:
            names: ``i -> (storage key, entry key)`` of record ``i``, for the error.
            drop: Unmap the pages read (``False``: the caller unmaps them all itself).

        Raises:
            CorruptCheckpointError: a record's local header puts its data elsewhere.
        """
        if not len(header):
            return
        u8 = self.whole.numpy()
        if int(header.min()) < 0 or int(header.max()) > len(u8) - _LOCAL.size:
            i = int(np.argmax((header < 0) | (header > len(u8) - _LOCAL.size)))
            raise self._outside(int(header[i]), _LOCAL.size, *names(i))
        cuts: list[int] = []
        if drop:
            at = np.searchsorted(header, np.arange(int(header[0]) + _DROP_SMALL, int(header[-1]) + 1, _DROP_SMALL))
            cuts = np.maximum.accumulate(at).tolist() if len(at) else []  # (each record in one window, sorted or not)
        for lo, hi in zip([0, *cuts], [*cuts, len(header)]):
            if hi <= lo:
                continue
            h = header[lo:hi]
            bad = np.flatnonzero(_local_offsets(u8, h) != data[lo:hi])
            if drop:
                self._drop(int(h.min()) // mmap.PAGESIZE * mmap.PAGESIZE, int(h.max()) + _LOCAL.size + mmap.PAGESIZE)
            if len(bad):
                i = lo + int(bad[0])
                skey, key = names(i)
                raise self._header_disagrees(skey, int(_local_offsets(u8, header[i : i + 1])[0]), int(data[i]), key)

    def _header_disagrees(self, skey: str, local: int, known: int, key: str | None) -> CorruptCheckpointError:
        """The error for an index file's data offset the local header contradicts: the bytes
        there are not the record's (its CRC32 says so), or the local header was damaged."""
        rec = self.index.records[skey]
        if 0 <= known and rec.size <= len(self.mm) - known:
            with memoryview(self.mm) as mv:
                if crc32_buf(mv[known : known + rec.size]) != rec.crc32:
                    return CorruptCheckpointError(
                        f"CRC32 mismatch in storage record data/{skey}: tensor data is corrupt (the index file "
                        f"puts it at byte {known}, its local header at byte {local})", file=self.index.file, key=key)
        where = f"at byte {local}" if local >= 0 else "nowhere (no local header where the directory says)"
        return CorruptCheckpointError(
            f"storage record data/{skey}: its local header puts its data {where}, the index file at byte "
            f"{known} (the local header was damaged, or the index file lies)", file=self.index.file, key=key)

    def _device(self, location: str, key: str) -> torch.device:
        dev = self._devices.get(location)
        if dev is None:
            dev = self._devices[location] = resolve_device(location, self.map_location,
                                                           file=self.index.file, key=key)
        return dev

    def storage(self, skey: str, group: list[PlannedLeaf]) -> None:
        """Every planned view of one storage record: CRC-checked if read whole, then copied."""
        index, stats = self.index, self.stats
        rec = index.records[skey]
        offset = self._data_offset(skey, group[0].key)
        isz = group[0].source.dtype.itemsize
        spans = [lf.source.element_span() for lf in group]
        lo_b = min(lo for lo, hi in spans) * isz
        hi_b = max(hi for lo, hi in spans) * isz
        whole_record = self.check and hi_b > lo_b and lo_b == 0 and hi_b == rec.size
        stats.bytes_read += max(0, hi_b - lo_b)
        if len(group) == 1 and hi_b - lo_b >= _SMALL:
            dst = self._direct_target(group[0], spans[0], "cuda")
            if dst is not None:
                self._staged(dst, offset + lo_b, hi_b - lo_b, whole_record, rec, skey, group[0].key)
                return
        if len(group) == 1:
            dst = self._direct_target(group[0], spans[0])
            if dst is not None:
                if hi_b - lo_b >= _SMALL:
                    self._pipelined(dst, offset + lo_b, hi_b - lo_b, whole_record, rec, skey, group[0].key)
                    return
                self.drain()  # errors in file order
                crc = self._pread_into(dst, offset + lo_b, hi_b - lo_b, whole_record, skey, group[0].key)
                if whole_record:
                    self._check_crc(crc, rec, skey, group[0].key)
                return
        self.drain()  # errors in file order
        if whole_record:
            with memoryview(self.mm) as mv:
                self._check_crc(crc32_buf(mv[offset : offset + rec.size]), rec, skey, group[0].key)
        allocate = []
        for lf, (lo, hi) in zip(group, spans):
            if lf.target is None:
                allocate.append((lf, lo, hi))
            elif hi > lo:
                lf.target.copy_(_file_view(self.whole, offset, lf.source, lo, hi))
        if allocate:
            # one new storage per (storage, device) keeps views of it tied, as torch.load does
            by_dev: dict[torch.device, list[tuple[PlannedLeaf, int, int]]] = defaultdict(list)
            for item in allocate:
                dev = resolve_device(item[0].source.storage.location, self.map_location,
                                     file=index.file, key=item[0].key)
                by_dev[dev].append(item)
            for dev, items in by_dev.items():
                _allocate_group(self.whole, offset, items, dev, self.values)

    def _pipelined(self, t: torch.Tensor, file_off: int, nbytes: int, crc: bool, rec: Any, skey: str,
                   key: str, sink: Any = None) -> None:
        """Read a range into ``t`` on the I/O pool, in ``_CHUNK`` requests submitted in file
        order: a few requests in flight at once (across records too), each CRC'd by its
        thread as it lands while the others' I/O goes on; the CRCs are combined and checked
        in file order by :meth:`_settle`."""
        workers = max(_DEPTH, min(torch.get_num_threads(), _MAX_THREADS))
        self._ensure_pool(workers)
        job = _Job(crc, rec, skey, key, -(-nbytes // _CHUNK), sink=sink)
        addr = t.data_ptr()
        for lo in range(0, nbytes, _CHUNK):
            hi = min(nbytes, lo + _CHUNK)
            fut = self._pool.submit(read_part, self.fd, addr, file_off, lo, hi, _CHUNK, crc)  # type: ignore[union-attr]
            self._pending.append((fut, hi - lo, job, None))
            while len(self._pending) > workers:
                self._settle(*self._pending.popleft())

    def _staged(self, t: torch.Tensor, file_off: int, nbytes: int, crc: bool, rec: Any, skey: str,
                key: str, sink: Any = None) -> None:
        """Read a range into the CUDA tensor ``t``: ``_CHUNK`` requests into pinned host
        buffers on the I/O pool (CRC'd as they land, as in :meth:`_pipelined`), each sent on
        by an asynchronous copy on the current stream once it has landed; a buffer is reused
        when its copy is done. Host reads, CRC32 and the transfers to the device overlap."""
        workers = max(_DEPTH, min(torch.get_num_threads(), _MAX_THREADS))
        self._ensure_pool(workers)
        depth = min(workers, _DEVICE_DEPTH)
        if not self._slots:
            self._slots = [torch.empty(_CHUNK, dtype=torch.uint8, pin_memory=True) for _ in range(depth + 2)]
            self._free.extend((i, None) for i in range(len(self._slots)))
        self._cuda_used.add(t.device)
        job = _Job(crc, rec, skey, key, -(-nbytes // _CHUNK), sink=sink)
        flat = t.view(-1).view(torch.uint8) if t.numel() else t
        for lo in range(0, nbytes, _CHUNK):
            hi = min(nbytes, lo + _CHUNK)
            while len(self._pending) >= depth or not self._free:
                self._settle(*self._pending.popleft())
            slot, event = self._free.popleft()
            if event is not None:
                event.synchronize()  # its last copy to the device has read it
            buf = self._slots[slot]
            fut = self._pool.submit(read_part, self.fd, buf.data_ptr() - lo, file_off, lo, hi, _CHUNK, crc)  # type: ignore[union-attr]
            self._pending.append((fut, hi - lo, job, (slot, flat[lo:hi])))

    def submit(self, fn: Any, *args: Any, nbytes: int, key: str) -> None:
        """Run ``fn(*args)`` (a read that checks no CRC) on the I/O pool, in flight with the
        other requests; its errors surface, in file order, where the pool's reads settle."""
        self.submit_parts(_no_crc, [(fn, *args)], [nbytes], key=key)

    def submit_parts(self, fn: Any, parts: Sequence[tuple[Any, ...]], sizes: Sequence[int], *, key: str,
                     rec: Any = None, skey: str = "", sink: Any = None) -> None:
        """Run ``fn(*part)`` for each part on the I/O pool, in flight with the other requests.

        The parts read consecutive byte ranges of ``sizes`` bytes, in order. With ``rec``
        (the record they cover whole, ``data/{skey}``) each ``fn`` returns its range's CRC32,
        and the CRCs are combined and checked against the record's when the last one has
        settled (or, with ``sink``, handed to it: the parts are a piece of the record); without
        it ``fn``'s result is ignored. Errors surface, in file order, where the pool's reads
        settle."""
        workers = max(_DEPTH, min(torch.get_num_threads(), _MAX_THREADS))
        self._ensure_pool(workers)
        job = _Job(rec is not None, rec, skey, key, len(parts), sink=sink)
        for args, n in zip(parts, sizes):
            fut = self._pool.submit(fn, *args)  # type: ignore[union-attr]
            self._pending.append((fut, n, job, None))
            while len(self._pending) > workers:
                self._settle(*self._pending.popleft())

    def drain(self) -> None:
        """Wait for every pipelined read, checking their CRCs in file order."""
        while self._pending:
            self._settle(*self._pending.popleft())

    def _settle(self, fut: Future[int], n: int, job: _Job, to_device: Any) -> None:
        try:
            got = fut.result()
        except EOFError as e:
            raise CorruptCheckpointError(f"file changed size while being read ({e})",
                                         file=self.index.file, key=job.key) from None
        except OSError as e:  # a vectored read that made no progress (the file shrank), EIO, ...
            raise CorruptCheckpointError(f"reading the file failed ({e})", file=self.index.file,
                                         key=job.key) from None
        if to_device is not None:  # a pinned buffer has landed: send it on to the device
            slot, dst = to_device
            with torch.cuda.device(dst.device):
                dst.copy_(self._slots[slot][:n], non_blocking=True)
                event = torch.cuda.Event()
                event.record()
            self._free.append((slot, event))
        if job.crc:
            job.running = got if job.first else crc32_combine(job.running, got, n)
        job.first = False
        job.left -= 1
        if job.left == 0 and job.crc:
            if job.sink is not None:
                job.sink(job.running)
            else:
                self._check_crc(job.running, job.rec, job.skey, job.key)

    def _ensure_pool(self, workers: int) -> None:
        if self._pool is None or self._pool._max_workers < workers:
            self.drain()
            self._pool = _io_pool(workers)

    def _check_crc(self, crc: int | None, rec: Any, skey: str, key: str) -> None:
        if crc != rec.crc32:
            raise CorruptCheckpointError(
                f"CRC32 mismatch in storage record data/{skey}: tensor data is corrupt",
                file=self.index.file, key=key)
        self.stats.bytes_verified += rec.size

    def _direct_target(self, lf: PlannedLeaf, span: tuple[int, int], kind: str = "cpu") -> torch.Tensor | None:
        """The contiguous tensor on a ``kind`` device (``"cpu"`` or ``"cuda"``) a lone
        contiguous view's bytes can be read (CPU) or staged (CUDA) straight into, if any.

        Allocates it (with the saved strides) for ``None`` targets. ``None`` when the view
        or the target is strided, conjugate, or on another device: those go through ``copy_``.
        """
        ref: TensorRef = lf.source
        lo, hi = span
        if hi - lo != ref.numel or ref.metadata or not ref.is_contiguous():
            return None
        t = lf.target
        if t is None:
            dev = self._device(ref.storage.location, lf.key)
            if dev.type != kind:
                return None
            t = torch.empty_strided(ref.size, ref.stride, dtype=ref.dtype, device=dev)
            self.values[lf.path] = finish_tensor(t, ref)
            return t
        if t.device.type != kind or not t.is_contiguous() or t.is_conj() or t.is_neg():
            return None
        return t

    def _pread_into(self, t: torch.Tensor, file_off: int, nbytes: int, crc: bool, skey: str, key: str) -> int | None:
        """Bytes ``[file_off, +nbytes)`` of a small range into ``t``'s memory: one memmove from
        the mapping; their CRC32 (``None`` without ``crc``). Large ranges go by
        :meth:`_pipelined`."""
        if nbytes == 0:
            return 0 if crc else None
        if file_off < 0 or nbytes < 0 or nbytes > len(self.mm) - file_off or nbytes > t.numel() * t.element_size():
            raise self._outside(file_off, nbytes, skey, key)
        addr = t.data_ptr()
        ctypes.memmove(addr, self.whole.data_ptr() + file_off, nbytes)
        return crc32_at(addr, nbytes) if crc else None

    def _outside(self, off: int, nbytes: int, skey: str, key: str) -> CorruptCheckpointError:
        """The error for a copy the checks before it should have refused (a defence in depth:
        a memmove from past the mapping is a SIGBUS, not an error)."""
        return CorruptCheckpointError(
            f"storage record data/{skey}: {nbytes} bytes at offset {off} do not lie in the file "
            f"({len(self.mm)} bytes)", file=self.index.file, key=key)

    def _drop(self, lo: int, hi: int) -> None:
        """Unmap the whole pages of file bytes ``[lo, hi)`` (page cache keeps them): the
        mapping's footprint stays at a window, not the file. Few large calls: each one
        costs a TLB shootdown on every core running this process."""
        first = max(0, -(-lo // mmap.PAGESIZE) * mmap.PAGESIZE)
        last = min(len(self.mm), hi) // mmap.PAGESIZE * mmap.PAGESIZE
        if last > first:
            self.mm.madvise(mmap.MADV_DONTNEED, first, last - first)


def _no_crc(fn: Any, *args: Any) -> int:
    fn(*args)
    return 0


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
                      map_location: MapLocation, stats: ReadStats, at: list[str | None]) -> None:
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
        at[0] = lf.key
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
