"""Zip directory parsing for torch.save files, straight from the bytes.

torch.save writes an uncompressed ("stored") zip whose records are
``{archive}/data.pkl``, ``{archive}/data/{storage_key}``, ``{archive}/byteorder``, ...
Each record's data starts after its local header (torch pads it to 64 bytes with an
extra field). We parse the central directory ourselves (zip64 included) so that
indexing a file costs a few microseconds per record and never touches tensor data.
"""

from __future__ import annotations

import functools
import os
import struct
from collections.abc import Callable, Iterable
from typing import NamedTuple

import numpy as np

from dist_restore.errors import CorruptCheckpointError

_EOCD_SIG = b"PK\x05\x06"
_EOCD64_LOC_SIG = b"PK\x06\x07"
_EOCD64_SIG = b"PK\x06\x06"
_CDIR_SIG = b"PK\x01\x02"
_LOCAL_SIG = b"PK\x03\x04"
_EOCD = struct.Struct("<4s4H2LH")
_EOCD64_LOC = struct.Struct("<4sLQL")
_EOCD64 = struct.Struct("<4sQ2H2L4Q")
_CDIR = struct.Struct("<4s6H3L5H2L")
# the same 46 bytes, only the fields the parser uses: sig, method, crc, csize, usize,
# name/extra/comment lengths, local header offset
_CDIR_USED = struct.Struct("<4s6xH4x3L3H8xL")
_LOCAL = struct.Struct("<4s5H3L2H")
# the 46-byte central directory header as a packed numpy record (little-endian)
_CDIR_DTYPE = np.dtype([("sig", "<u4"), ("made_by", "<u2"), ("needed", "<u2"), ("flags", "<u2"),
                        ("method", "<u2"), ("time", "<u2"), ("date", "<u2"), ("crc", "<u4"),
                        ("csize", "<u4"), ("usize", "<u4"), ("nlen", "<u2"), ("elen", "<u2"),
                        ("clen", "<u2"), ("disk", "<u2"), ("iattr", "<u2"), ("eattr", "<u4"),
                        ("hoff", "<u4")])
_U32 = 0xFFFFFFFF
#: Longest record name the column tables hold (torch.save's are ``archive/data/123``); a zip with
#: a longer one is read record by record (the tables would be entries x that length).
_MAX_TABLE_NAME = 1024
#: Bytes a record takes at least: its central-directory entry and its local header.
_MIN_RECORD = 46 + 30


class ZipRecord(NamedTuple):
    """One record of the zip: where its bytes are and what they should hash to.

    (A named tuple: one per storage, and it builds ~3x faster than a frozen dataclass.)
    """

    name: str
    header_offset: int
    size: int
    crc32: int


def is_zip(head: bytes) -> bool:
    """True when the first bytes of a file look like a zip archive."""
    return head[:4] == _LOCAL_SIG


def read_zip_records(buf: memoryview | bytes, file: str) -> dict[str, ZipRecord]:
    """Parse the central directory of a zip held in ``buf`` (usually an mmap).

    Args:
        buf: The whole file's bytes.
        file: The file's name, for error messages.

    Returns:
        ``{record name: ZipRecord}`` in directory order.

    Raises:
        CorruptCheckpointError: the zip structure is damaged or truncated, or a record
            is compressed (torch.save never compresses).
    """
    size = len(buf)
    cd, n_entries, cd_offset, corrupt = _central_directory(buf, file)
    # numpy pays off from a few dozen records; a small zip (a DCP item: 7) is faster record by record
    records = _records_vectorised(cd, n_entries, size, cd_offset) if n_entries > 32 else None
    if records is None:  # anything unusual: the loop below, which raises the precise error
        records = _records_loop(cd, n_entries, cd_offset, size, corrupt)
    return records


class ZipTables(NamedTuple):
    """Every record of a zip's central directory as columns, in directory order: no object
    per record (a file of 60,000 small tensors has 60,000 records)."""

    names: np.ndarray  # fixed-width bytes (numpy "S"), NUL-padded
    name_lengths: np.ndarray  # int64
    header_offset: np.ndarray  # int64
    size: np.ndarray  # int64
    crc32: np.ndarray  # int64


def read_zip_tables(buf: memoryview | bytes, file: str) -> ZipTables | None:
    """The central directory as :class:`ZipTables`: the records :func:`read_zip_records` finds,
    or ``None`` where it would take its record-by-record loop (something unusual: that loop
    raises the precise error).

    Raises:
        CorruptCheckpointError: no readable end of the central directory.
    """
    cd, n_entries, cd_offset, _corrupt = _central_directory(buf, file)
    cols = _directory_columns(cd, n_entries, len(buf), cd_offset)
    if cols is None:
        return None
    starts, nlen, hoff, usize, crc = cols
    width = max(1, int(nlen.max()))
    if width > _MAX_TABLE_NAME:  # the name matrix is entries x the longest name: no such table
        return None
    u8 = np.frombuffer(cd, dtype=np.uint8)
    at = starts[:, None] + np.arange(width)
    inside = np.arange(width) < nlen[:, None]
    names = np.where(inside, u8[np.minimum(at, len(u8) - 1)], 0).astype(np.uint8)
    return ZipTables(np.ascontiguousarray(names).view(f"S{width}").reshape(-1), nlen, hoff, usize,
                     crc.astype(np.int64))


def _central_directory(buf: memoryview | bytes, file: str) -> tuple[bytes, int, int,
                                                                     Callable[[str], CorruptCheckpointError]]:
    """``(directory bytes, entry count, its offset, corrupt)``: the central directory found
    from the end-of-central-directory record (zip64 included); ``corrupt`` makes the error
    for a damaged one."""
    size = len(buf)

    def corrupt(msg: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(
            f"not a readable torch.save zip: {msg} (file size {size} bytes; truncated or corrupt?)",
            file=file,
        )

    if size < _EOCD.size:
        raise corrupt("file too short for a zip directory")
    pos = -1
    for reach in (4096, _EOCD.size + 0xFFFF):  # no comment (torch.save): the record is in the last bytes
        tail_start = max(0, size - reach)
        tail = bytes(buf[tail_start:size])
        pos = tail.rfind(_EOCD_SIG)
        while pos >= 0 and pos + _EOCD.size > len(tail):
            pos = tail.rfind(_EOCD_SIG, 0, pos)
        if pos >= 0 or tail_start == 0:
            break
    if pos < 0:
        raise corrupt("end-of-central-directory record not found")
    eocd_pos = tail_start + pos
    _, _disk, _cd_disk, _n_disk, n_entries, cd_size, cd_offset, _clen = _EOCD.unpack_from(tail, pos)
    if n_entries == 0xFFFF or cd_size == _U32 or cd_offset == _U32:
        loc = eocd_pos - _EOCD64_LOC.size
        if loc < 0 or bytes(buf[loc : loc + 4]) != _EOCD64_LOC_SIG:
            raise corrupt("zip64 locator missing")
        _, _, eocd64_pos, _ = _EOCD64_LOC.unpack(bytes(buf[loc : loc + _EOCD64_LOC.size]))
        if eocd64_pos + _EOCD64.size > size or bytes(buf[eocd64_pos : eocd64_pos + 4]) != _EOCD64_SIG:
            raise corrupt("zip64 end-of-central-directory record missing")
        fields = _EOCD64.unpack(bytes(buf[eocd64_pos : eocd64_pos + _EOCD64.size]))
        n_entries, cd_size, cd_offset = fields[7], fields[8], fields[9]
    if cd_offset + cd_size > size:
        raise corrupt("central directory lies beyond the end of the file")
    if n_entries > size // _MIN_RECORD:
        raise corrupt(f"{n_entries} entries cannot fit in the file (each takes at least {_MIN_RECORD} bytes)")
    cd = bytes(buf[cd_offset : cd_offset + cd_size])  # one copy; parsing bytes beats parsing an mmap
    return cd, n_entries, cd_offset, corrupt


def _records_loop(cd: bytes, n_entries: int, cd_offset: int, size: int,
                  corrupt: Callable[[str], CorruptCheckpointError]) -> dict[str, ZipRecord]:
    """The central directory record by record: the reference for :func:`_records_vectorised`."""
    records: dict[str, ZipRecord] = {}
    cd_size = len(cd)
    p = 0
    unpack = _CDIR_USED.unpack_from
    for _ in range(n_entries):
        if p + _CDIR.size > cd_size:
            raise corrupt("central directory shorter than its entry count")
        sig, method, crc, csize, usize, nlen, elen, clen, hoff = unpack(cd, p)
        if sig != _CDIR_SIG:
            raise corrupt(f"bad central directory entry at byte {cd_offset + p}")
        q = p + _CDIR.size
        name = cd[q : q + nlen].decode("utf-8", "replace")
        if usize == _U32 or csize == _U32 or hoff == _U32:
            usize, csize, hoff = _zip64_extra(cd[q + nlen : q + nlen + elen], usize, csize, hoff)
        p = q + nlen + elen + clen
        if method != 0 or csize != usize:
            raise corrupt(f"record {name!r} is compressed (method {method}); torch.save stores records uncompressed")
        if hoff + _LOCAL.size + usize > size:
            raise corrupt(f"record {name!r} ({usize} bytes) extends past the end of the file")
        if name in records:
            raise corrupt(f"record name {name!r} occurs twice in the central directory (torch.load would read "
                          "the first, other readers the last)")
        records[name] = ZipRecord(name, hoff, usize, crc)
    spans = sorted((r.header_offset, r.header_offset + _LOCAL.size + r.size, r.name) for r in records.values())
    for (_a, end, n0), (b, _e, n1) in zip(spans, spans[1:]):
        if b < end:
            raise corrupt(f"records {n0!r} and {n1!r} overlap (a zip's records lie one after another)")
    if spans and spans[-1][1] > cd_offset:
        raise corrupt(f"record {spans[-1][2]!r} runs into the central directory")
    return records


def _records_vectorised(cd: bytes, n_entries: int, size: int, cd_offset: int) -> dict[str, ZipRecord] | None:
    """The central directory parsed with numpy: the same records as :func:`_records_loop`,
    or ``None`` whenever that loop might raise or the entries cannot be found this way."""
    cols = _directory_columns(cd, n_entries, size, cd_offset)
    if cols is None:
        return None
    starts, nlen, hoff, usize, crc = cols
    stops = starts + nlen
    names = [cd[a:b].decode("utf-8", "replace") for a, b in zip(starts.tolist(), stops.tolist())]
    make = functools.partial(tuple.__new__, ZipRecord)  # no Python frame per record
    recs = map(make, zip(names, hoff.tolist(), usize.tolist(), crc.tolist()))
    out = dict(zip(names, recs))
    return out if len(out) == len(names) else None  # a name twice: the loop names it


def _directory_columns(cd: bytes, n_entries: int, size: int, cd_offset: int) -> tuple[np.ndarray, ...] | None:
    """``(name starts, name lengths, header offsets, sizes, CRC32s)`` of every entry (int64,
    CRC32s uint32), or ``None`` whenever :func:`_records_loop` might raise or the entries
    cannot be found this way.

    Entries have variable lengths, so their positions are a chain: each one's start plus
    46 plus its name, extra and comment lengths. Every place the entry signature occurs is
    a candidate; the first ``n_entries`` candidates are the entries when that chain links
    them all, starting at byte 0 (a signature inside an entry's bytes breaks the chain, and
    the loop takes over).
    """
    if n_entries == 0:
        return None
    hsize = _CDIR.size
    u8 = np.frombuffer(cd, dtype=np.uint8)
    if len(u8) < hsize:
        return None
    head = u8[: len(u8) - hsize + 1]  # a candidate's whole fixed header lies in the directory
    cand = np.flatnonzero(head == 0x50)
    sig = _CDIR_SIG
    cand = cand[(u8[cand + 1] == sig[1]) & (u8[cand + 2] == sig[2]) & (u8[cand + 3] == sig[3])]
    if len(cand) < n_entries or cand[0] != 0:
        return None
    cand = cand[:n_entries]
    # each candidate's 46 header bytes, gathered into packed records of _CDIR_DTYPE
    fixed = np.lib.stride_tricks.sliding_window_view(u8, hsize)[cand].view(_CDIR_DTYPE).ravel()
    nlen = fixed["nlen"].astype(np.int64)
    ends = cand + hsize + nlen + fixed["elen"] + fixed["clen"]
    if not np.array_equal(ends[:-1], cand[1:]):
        return None
    usize = fixed["usize"].astype(np.int64)
    csize = fixed["csize"].astype(np.int64)
    hoff = fixed["hoff"].astype(np.int64)
    starts = cand + hsize
    stops = starts + nlen
    for i in np.flatnonzero((usize == _U32) | (csize == _U32) | (hoff == _U32)).tolist():
        q = int(stops[i])
        u, c, h = _zip64_extra(cd[q : q + int(fixed["elen"][i])], int(usize[i]), int(csize[i]), int(hoff[i]))
        if max(u, c, h) >= 1 << 62:  # beyond int64 arithmetic: no real file; the loop decides
            return None
        usize[i], csize[i], hoff[i] = u, c, h
    if ((fixed["method"] != 0) | (csize != usize) | (hoff + _LOCAL.size + usize > size)).any():
        return None
    order = np.argsort(hoff, kind="stable")  # records one after another, before the directory
    ends = (hoff + _LOCAL.size + usize)[order]
    if (hoff[order][1:] < ends[:-1]).any() or ends[-1] > cd_offset:
        return None
    return starts.astype(np.int64), nlen, hoff, usize, fixed["crc"]


_HEADER_SPAN = 4096  # a local header, its name and its extra field fit in this (torch writes < 200 bytes)
_MERGE_GAP = 64 << 10  # header ranges closer than this are prefetched by one call...
_MERGE_MAX = 8 << 20  # ...up to this long: a file of small records is not read whole for its headers


def prefetch_headers(fd: int, header_offsets: Iterable[int]) -> None:
    """Start reading the pages under these local headers, all at once (``WILLNEED``).

    On a cold file each header read by a page fault or a ``pread`` waits for the disk on
    its own: tens of records of large tensors cost tens of milliseconds each, one after the
    other. Asked for together, the disk serves them in parallel, and the reads that follow
    wait at most for the slowest. Headers within 64 KiB of each other (small records) are
    merged into ranges of at most 8 MiB, so a file of many small records costs a call per 8 MiB
    of them. Warm pages cost a page-cache lookup."""
    if not hasattr(os, "posix_fadvise"):
        return
    ranges: list[list[int]] = []
    for off in sorted(header_offsets):
        if ranges and off <= ranges[-1][1] + _MERGE_GAP and off + _HEADER_SPAN - ranges[-1][0] <= _MERGE_MAX:
            ranges[-1][1] = max(ranges[-1][1], off + _HEADER_SPAN)
        else:
            ranges.append([off, off + _HEADER_SPAN])
    try:
        for lo, hi in ranges:
            os.posix_fadvise(fd, lo, hi - lo, os.POSIX_FADV_WILLNEED)
    except OSError:  # only a hint (some file systems refuse it): the reads still work
        pass


def data_offset(buf: memoryview | bytes, rec: ZipRecord, file: str) -> int:
    """Byte offset of a record's data: after its local header (read on demand)."""
    size = len(buf)
    head = bytes(buf[rec.header_offset : rec.header_offset + _LOCAL.size])
    if len(head) < _LOCAL.size:
        raise CorruptCheckpointError(f"record {rec.name!r} has its local header past the end of the file", file=file)
    lsig, _v, _f, _m, _lt, _ld, _lc, _lcs, _lus, lnlen, lelen = _LOCAL.unpack(head)
    if lsig != _LOCAL_SIG:
        raise CorruptCheckpointError(f"record {rec.name!r} has a bad local header", file=file)
    at = rec.header_offset + _LOCAL.size
    if bytes(buf[at : at + lnlen]).decode("utf-8", "replace") != rec.name:
        raise CorruptCheckpointError(f"record {rec.name!r}: its local header names another record", file=file)
    off = rec.header_offset + _LOCAL.size + lnlen + lelen
    if off + rec.size > size:
        raise CorruptCheckpointError(
            f"record {rec.name!r} ({rec.size} bytes at offset {off}) extends past the end of the "
            f"file ({size} bytes; truncated?)", file=file)
    return off


def _zip64_extra(extra: bytes, usize: int, csize: int, hoff: int) -> tuple[int, int, int]:
    i = 0
    while i + 4 <= len(extra):
        tag, ln = struct.unpack_from("<HH", extra, i)
        if tag == 1:
            j = i + 4
            vals = []
            while j + 8 <= min(i + 4 + ln, len(extra)):  # a field longer than the extra: what is there
                vals.append(struct.unpack_from("<Q", extra, j)[0])
                j += 8
            it = iter(vals)
            if usize == _U32:
                usize = next(it, usize)
            if csize == _U32:
                csize = next(it, csize)
            if hoff == _U32:
                hoff = next(it, hoff)
            break
        i += 4 + ln
    return usize, csize, hoff
