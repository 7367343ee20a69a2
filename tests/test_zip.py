"""The zip central directory: the vectorised parser against the record-by-record loop.

Oracle: ``_records_loop`` (the reference parser). ``_records_vectorised`` must return the
same records, in the same order, or ``None`` (then the loop runs and raises its precise
error); it must never return records where the loop raises.
"""

from __future__ import annotations

import random
import zipfile
from pathlib import Path

import pytest
import torch

from dist_restore import CheckpointWriter, RankInfo, consolidate

from dist_restore._format import torchzip as _torchzip

from dist_restore._format import zip as _zip
from dist_restore.errors import CorruptCheckpointError


def _directory(raw: bytes) -> tuple[bytes, int, int]:
    """``(central directory bytes, entry count, its offset)`` of an intact zip."""
    pos = raw.rfind(_zip._EOCD_SIG)
    fields = _zip._EOCD.unpack_from(raw, pos)
    n, cd_size, cd_offset = fields[4], fields[5], fields[6]
    if n == 0xFFFF or cd_size == _zip._U32 or cd_offset == _zip._U32:
        loc = pos - _zip._EOCD64_LOC.size
        _, _, eocd64, _ = _zip._EOCD64_LOC.unpack_from(raw, loc)
        f64 = _zip._EOCD64.unpack_from(raw, eocd64)
        n, cd_size, cd_offset = f64[7], f64[8], f64[9]
    return raw[cd_offset : cd_offset + cd_size], n, cd_offset


def _loop(cd: bytes, n: int, cd_offset: int, size: int) -> dict[str, _zip.ZipRecord] | str:
    def corrupt(msg: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(msg, file="f")

    try:
        return _zip._records_loop(cd, n, cd_offset, size, corrupt)
    except CorruptCheckpointError as e:
        return str(e)


def _agree(cd: bytes, n: int, cd_offset: int, size: int) -> bool:
    """True when the vectorised parser took the file (and agrees with the loop)."""
    want = _loop(cd, n, cd_offset, size)
    got = _zip._records_vectorised(cd, n, size, cd_offset)
    if got is None:
        return False
    assert not isinstance(want, str), f"vectorised parser accepted what the loop refuses: {want}"
    assert list(got.items()) == list(want.items())
    assert all(type(r) is _zip.ZipRecord for r in got.values())
    return True


def _tables_agree(raw: bytes) -> None:
    """``read_zip_tables`` holds, as columns, the entries ``read_zip_records`` parses (or is
    ``None`` exactly when the vectorised parser is)."""
    tables = _zip.read_zip_tables(raw, "f")
    cd, n, off = _directory(raw)
    if tables is None:
        assert _zip._records_vectorised(cd, n, len(raw), off) is None
        return
    names = [x.decode("utf-8") for x in tables.names.tolist()]
    assert tables.name_lengths.tolist() == [len(x) for x in tables.names.tolist()]
    got = list(zip(names, tables.header_offset.tolist(), tables.size.tolist(), tables.crc32.tolist()))
    assert got == [tuple(r) for r in _zip.read_zip_records(raw, "f").values()]


def _torch_file(tmp_path: Path) -> Path:
    sd = {"w": torch.arange(12.0).reshape(3, 4), "b": torch.tensor([1, 2], dtype=torch.int16),
          "l": [torch.zeros(3, dtype=torch.float64) for _ in range(5)], "n": 3}
    path = tmp_path / "plain.pt"
    torch.save(sd, path)
    return path


def test_torch_save_file(tmp_path: Path) -> None:
    raw = _torch_file(tmp_path).read_bytes()
    cd, n, off = _directory(raw)
    assert _agree(cd, n, off, len(raw))
    _tables_agree(raw)


def test_zip64_fields_are_honoured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_torchzip, "_ZIP64_AT", 1)  # every size and offset in zip64 fields
    d = tmp_path / "ck"
    CheckpointWriter(RankInfo(0, 1)).write(d, {"w": torch.arange(6.0), "t": [torch.ones(2, 2)], "x": 1})
    out = tmp_path / "full.pt"
    consolidate(d, out)
    raw = out.read_bytes()
    cd, n, off = _directory(raw)
    assert b"\xff\xff\xff\xff" in cd
    assert _agree(cd, n, off, len(raw))
    _tables_agree(raw)
    recs = _zip.read_zip_records(raw, "f")
    with zipfile.ZipFile(out) as z:
        assert [(i.filename, i.header_offset, i.file_size, i.CRC) for i in z.infolist()] == \
            [tuple(r) for r in recs.values()]


def test_names_extras_comments_and_duplicates(tmp_path: Path) -> None:
    path = tmp_path / "odd.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("a/data.pkl", b"x")
        info = zipfile.ZipInfo("a/\u00e9t\u00e9")
        info.extra = b"\x99\x99\x04\x00PK\x01\x02"  # an unknown extra field holding the signature
        info.comment = b"PK\x01\x02 in a comment"
        z.writestr(info, b"yy")
        z.writestr("a/data/0", b"0123")
        with pytest.warns(UserWarning, match="Duplicate"):
            z.writestr("a/data/0", b"45")
    raw = path.read_bytes()
    cd, n, off = _directory(raw)
    # a name twice: torch.load reads the first record, a dict the last; refused, naming it
    want = _loop(cd, n, off, len(raw))
    assert isinstance(want, str) and "'a/data/0' occurs twice" in want
    assert _zip._records_vectorised(cd, n, len(raw), off) is None
    with pytest.raises(CorruptCheckpointError, match="occurs twice"):
        _zip.read_zip_records(raw, "f")


def test_every_flipped_directory_byte_agrees(tmp_path: Path) -> None:
    raw = _torch_file(tmp_path).read_bytes()
    cd, n, off = _directory(raw)
    rng = random.Random(0)
    taken = 0
    for pos in range(len(cd)):
        for value in (cd[pos] ^ 0xFF, rng.randrange(256), 0x50):
            bad = bytearray(cd)
            bad[pos] = value
            taken += _agree(bytes(bad), n, off, len(raw))
    for cut in range(0, len(cd), 7):  # a truncated directory, or a short entry count
        _agree(cd[:cut], n, off, len(raw))
        _agree(cd, max(0, n - 1 - cut % n), off, len(raw))
        _agree(cd, n + 1 + cut, off, len(raw))
    assert taken > len(cd)  # most flips land in fields the parser does not use


@pytest.mark.skipif(not hasattr(__import__("os"), "posix_fadvise"), reason="posix_fadvise: Linux")
def test_prefetch_headers_asks_once_per_cluster(tmp_path, monkeypatch) -> None:
    """The local headers a restore will read are asked for together (``WILLNEED``) before
    any is read: headers within 64 KiB of each other in one call (of at most 8 MiB), distant
    ones in their own, each range covering its header; what the index then reads is unchanged
    (oracle: ``torch.load``)."""
    import os

    import torch

    from dist_restore._format import zip as Z
    from dist_restore._format.index import read_index

    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, off, n, advice: calls.append((off, n)))
    Z.prefetch_headers(0, [5 << 20, 100, 30_000, 200_000, 9 << 20, (5 << 20) + 4096])
    assert calls == [(100, 30_000 - 100 + Z._HEADER_SPAN), (200_000, Z._HEADER_SPAN),
                     (5 << 20, 4096 + Z._HEADER_SPAN), (9 << 20, Z._HEADER_SPAN)]
    calls.clear()
    Z.prefetch_headers(0, [])
    assert calls == []
    Z.prefetch_headers(0, range(0, 20 << 20, 32 << 10))  # small records over 20 MiB: 8 MiB ranges at most
    assert len(calls) == 3 and all(n <= Z._MERGE_MAX for _o, n in calls)
    assert calls[0][0] == 0 and calls[-1][0] + calls[-1][1] == (20 << 20) - (32 << 10) + Z._HEADER_SPAN
    calls.clear()

    big = {"small": torch.arange(3)}  # first in the file: its header and t0's share a call
    big.update({f"t{i}": torch.randn(300_000) for i in range(4)})  # 1.2 MB apart: one call each
    path = tmp_path / "checkpoint_0.pt"
    torch.save(big, path)
    index = read_index(path)
    entries = index.entries
    heads = sorted(r.header_offset for r in index.records.values())
    assert all(any(off <= h and h + 30 <= off + n for off, n in calls) for h in heads)
    assert len(calls) < len(heads)  # the small record's header shares a call
    loaded = torch.load(path, weights_only=True)
    assert set(entries) == set(loaded)
    with open(path, "rb") as f:
        raw = f.read()
    for k, v in loaded.items():
        skey = index.tree[k].storage.key
        off = index.data_offset(skey, raw)
        assert raw[off:off + v.nbytes] == v.numpy().tobytes()


@pytest.mark.skipif(not hasattr(__import__("os"), "posix_fadvise"), reason="posix_fadvise: Linux")
def test_prefetch_headers_ignores_a_refusal(monkeypatch) -> None:
    """``WILLNEED`` is a hint: a file system that refuses it costs nothing."""
    import os

    from dist_restore._format import zip as Z

    def refuse(*a):
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(os, "posix_fadvise", refuse)
    Z.prefetch_headers(0, [0, 10 << 20])  # no error
