"""CheckpointReader on broken, malicious and mismatched input: the right error, nothing touched."""

from __future__ import annotations

import logging
import os
import pickle
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch

from _util import (
    assert_same,
    assert_same_ties,
    file_fingerprint,
    fill_garbage,
    oracle,
    rank_file,
    record_name,
    rewrite_zip,
    save,
    tensor_bytes,
)
from dist_restore import (
    CheckpointError,
    CheckpointReader,
    CorruptCheckpointError,
    RankInfo,
    StateDictMismatchError,
    UnsafeCheckpointError,
    read_index,
)

pytestmark = [pytest.mark.timeout(60),
              pytest.mark.filterwarnings("ignore:Detected pickle protocol")]

RANK, WORLD = 3, 4
READER = CheckpointReader(RankInfo(RANK, WORLD))
NO_VERIFY = CheckpointReader(RankInfo(RANK, WORLD), verify="none")


def _sd(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    big = torch.randn(64, 33, generator=g)
    return {"model": {"w": big, "wt": big.t(), "b": torch.randn(7, generator=g).double(),
                      "layers": [{"w": torch.randn(3, 3, generator=g)}, {"w": torch.randn(2, 5, generator=g)}]},
            "step": 9, "name": "run"}


def _save(tmp_path: Path, obj: object = None, **kwargs) -> Path:
    return save(_sd() if obj is None else obj, tmp_path, rank=RANK, **kwargs)


def _assert_names_file_and_rank(err: BaseException, path: Path) -> None:
    msg = str(err)
    assert str(path) in msg, msg
    assert f"rank {RANK}" in msg, msg
    if isinstance(err, CheckpointError):
        assert err.file == str(path) and err.rank == RANK


def _all_reads(directory: Path):
    """Every way of reading a file, each of which must fail the same way on a broken one."""
    return [
        ("load", lambda: READER.load(directory)),
        ("load_partial", lambda: READER.load(directory, {"model": {"b": None}})),
        ("load_empty_target", lambda: READER.load(directory, {})),
        ("read", lambda: READER.read(directory)),
        ("index", lambda: list(READER.index(directory))),
    ]


# -- missing, empty, truncated ------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    save({"x": torch.zeros(1)}, tmp_path, rank=0)  # another rank's file is there, not ours
    path = rank_file(tmp_path, RANK)
    for name, call in _all_reads(tmp_path):
        with pytest.raises(FileNotFoundError) as ei:
            call()
        assert str(path) in str(ei.value), name
    with pytest.raises(FileNotFoundError, match="checkpoint_3.pt"):
        read_index(path)
    with pytest.raises(FileNotFoundError):
        READER.load(tmp_path / "no_such_dir")


def test_empty_file(tmp_path: Path) -> None:
    path = rank_file(tmp_path, RANK)
    path.write_bytes(b"")
    for name, call in _all_reads(tmp_path):
        with pytest.raises(CorruptCheckpointError) as ei:
            call()
        _assert_names_file_and_rank(ei.value, path)


def test_truncated_everywhere(tmp_path: Path) -> None:
    path = _save(tmp_path)
    data = path.read_bytes()
    cuts = sorted({len(data) * k // 20 for k in range(1, 20)}
                  | {1, 2, 3, 4, 5, 22, 64, len(data) - 1, len(data) - 22})
    for cut in cuts:
        path.write_bytes(data[:cut])
        before = file_fingerprint(path)
        for name, call in _all_reads(tmp_path):
            with pytest.raises(CorruptCheckpointError) as ei:
                call()
            _assert_names_file_and_rank(ei.value, path)
            assert file_fingerprint(path) == before, (cut, name)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_legacy_file_truncated(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = _save(tmp_path, _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    with caplog.at_level(logging.ERROR, logger="dist_restore"):
        for k in range(1, 10):
            path.write_bytes(data[:len(data) * k // 10])
            with pytest.raises(CorruptCheckpointError) as ei:
                READER.load(tmp_path)
            _assert_names_file_and_rank(ei.value, path)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_non_torch_files_are_corrupt(tmp_path: Path) -> None:
    """Regression: a text file escaped as KeyError, random bytes as UnsafeCheckpointError."""
    path = rank_file(tmp_path, RANK)
    for content in (b"hello world, this is a text file\n" * 10, bytes(range(256)) * 4, b"\x80\x02",
                    b"PK\x03\x04" + b"\0" * 100):
        path.write_bytes(content)
        for name, call in _all_reads(tmp_path):
            with pytest.raises(CorruptCheckpointError) as ei:
                call()
            _assert_names_file_and_rank(ei.value, path)


def test_file_changed_between_index_and_read(tmp_path: Path) -> None:
    path = _save(tmp_path)
    index = READER.index(tmp_path)
    plan = READER.plan(index, None)
    with open(path, "ab") as f:
        f.write(b"\0" * 10)
    with pytest.raises(CorruptCheckpointError, match="changed size") as ei:
        READER.execute(index, plan, None)
    _assert_names_file_and_rank(ei.value, path)


# -- corrupted bytes ------------------------------------------------------------------------


def test_flipped_bit_in_tensor_data(tmp_path: Path) -> None:
    path = _save(tmp_path)
    expected = oracle(path)
    entry = read_index(path)["model.b"]
    data = bytearray(path.read_bytes())
    data[entry.file_offset + 13] ^= 0x10
    path.write_bytes(bytes(data))
    before = file_fingerprint(path)
    with pytest.raises(CorruptCheckpointError, match="CRC32") as ei:
        READER.load(tmp_path)
    _assert_names_file_and_rank(ei.value, path)
    assert ei.value.key == "model.b"
    with pytest.raises(CorruptCheckpointError, match="CRC32"):
        READER.load(tmp_path, {"model": {"b": torch.empty(7, dtype=torch.float64)}})
    # reading other storages only is fine
    res = READER.load(tmp_path, {"model": {"w": None}})
    assert tensor_bytes(res.state_dict["model"]["w"]) == tensor_bytes(expected["model"]["w"])
    # verify="none" reads the flipped bit as it is, without an error
    res = NO_VERIFY.load(tmp_path)
    got, want = tensor_bytes(res.state_dict["model"]["b"]), tensor_bytes(expected["model"]["b"])
    assert [i for i in range(len(got)) if got[i] != want[i]] == [13]
    assert got[13] ^ want[13] == 0x10
    assert res.bytes_verified == 0
    assert file_fingerprint(path) == before


def test_partial_view_of_a_storage_is_not_crc_checked(tmp_path: Path) -> None:
    """Only whole storage records are verified: a view reading part of one is not."""
    base = torch.arange(100, dtype=torch.float32)
    path = save({"head": base[:10], "tail": base[90:]}, tmp_path, rank=RANK)
    entry = read_index(path)["tail"]
    data = bytearray(path.read_bytes())
    data[entry.file_offset] ^= 0x01  # inside "tail", outside "head"
    path.write_bytes(bytes(data))
    res = READER.load(tmp_path, {"head": None})
    assert torch.equal(res.state_dict["head"], base[:10]) and res.bytes_verified == 0
    with pytest.raises(CorruptCheckpointError, match="CRC32"):
        READER.load(tmp_path)  # both views: the whole record is read, and checked


@pytest.mark.parametrize("reader", [READER, NO_VERIFY], ids=["crc32", "none"])
def test_flipped_byte_in_data_pkl(tmp_path: Path, reader: CheckpointReader) -> None:
    path = _save(tmp_path)
    name = record_name(path, "/data.pkl")
    with open(path, "rb") as f:
        raw = f.read()
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(name)
    # data of the record starts after its local header (30 bytes + name + extra)
    n_len, e_len = int.from_bytes(raw[info.header_offset + 26:info.header_offset + 28], "little"), \
        int.from_bytes(raw[info.header_offset + 28:info.header_offset + 30], "little")
    start = info.header_offset + 30 + n_len + e_len
    for rel in (0, info.file_size // 2, info.file_size - 1):
        data = bytearray(raw)
        data[start + rel] ^= 0xFF
        path.write_bytes(bytes(data))
        with pytest.raises(CorruptCheckpointError, match="data.pkl") as ei:
            reader.load(tmp_path)
        _assert_names_file_and_rank(ei.value, path)


@pytest.mark.parametrize("payload", [b"", b"\x80\x02}q\x00(X", b"not a pickle at all", b"\x80\x02K\x05."],
                         ids=["empty", "cut", "garbage", "int"])
def test_bad_pickle_with_valid_crc(tmp_path: Path, payload: bytes) -> None:
    path = _save(tmp_path)
    rewrite_zip(path, {"data.pkl": payload})
    if payload == b"\x80\x02K\x05.":  # a valid pickle of 5: not a state dict, but not corrupt either
        assert READER.load(tmp_path).state_dict == 5
        return
    for name, call in _all_reads(tmp_path):
        with pytest.raises(CorruptCheckpointError) as ei:
            call()
        _assert_names_file_and_rank(ei.value, path)


def test_storage_record_too_short_or_missing(tmp_path: Path) -> None:
    path = _save(tmp_path)
    key = read_index(path)["model.b"].storage_key
    rewrite_zip(path, {f"data/{key}": b"\0" * 8})  # the pickle says 7 float64 = 56 bytes
    for name, call in _all_reads(tmp_path):
        with pytest.raises(CorruptCheckpointError, match="56") as ei:
            call()
        _assert_names_file_and_rank(ei.value, path)

    path = _save(tmp_path)
    with zipfile.ZipFile(path) as z:
        records = [(i.filename, z.read(i.filename)) for i in z.infolist()]
    with zipfile.ZipFile(path, "w") as z:
        for n, d in records:
            if not n.endswith(f"/data/{key}"):
                z.writestr(n, d)
    with pytest.raises(CorruptCheckpointError, match="missing") as ei:
        READER.load(tmp_path)
    _assert_names_file_and_rank(ei.value, path)


def test_no_data_pkl(tmp_path: Path) -> None:
    path = rank_file(tmp_path, RANK)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/other.txt", b"hello")
    with pytest.raises(CorruptCheckpointError, match="data.pkl") as ei:
        READER.load(tmp_path)
    _assert_names_file_and_rank(ei.value, path)


def test_compressed_zip_record(tmp_path: Path) -> None:
    path = _save(tmp_path)
    with zipfile.ZipFile(path) as z:
        records = [(i.filename, z.read(i.filename)) for i in z.infolist()]
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for n, d in records:
            z.writestr(n, d)
    with pytest.raises(CorruptCheckpointError, match="compressed") as ei:
        READER.load(tmp_path)
    _assert_names_file_and_rank(ei.value, path)


def test_every_corrupted_byte_is_caught_or_harmless(tmp_path: Path) -> None:
    """Overwrite one byte at a time (every third position, and every byte from the last
    record's local header on: that record, the central directory, the end records): a read
    either raises CorruptCheckpointError or returns exactly torch.load's values of the intact
    file (the byte was in padding or an unused header field). Never another exception, never
    wrong values."""
    x = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    path = save({"w": x, "wt": x.t(), "b": torch.tensor([1, 2], dtype=torch.int16), "n": 3, "l": [1.5]},
                tmp_path, rank=RANK)
    raw = path.read_bytes()
    expected = oracle(path)
    with zipfile.ZipFile(path) as z:
        tail_start = max(i.header_offset for i in z.infolist())
    positions = sorted(set(range(0, len(raw), 3)) | set(range(tail_start, len(raw))) | {1, 2, 3})
    outcomes = {"caught": 0, "harmless": 0}
    logging.disable(logging.WARNING)
    try:
        for pos in positions:
            data = bytearray(raw)
            data[pos] ^= 0xFF
            path.write_bytes(bytes(data))
            try:
                res = READER.load(tmp_path)
            except CorruptCheckpointError:
                outcomes["caught"] += 1
                continue
            except Exception as e:  # noqa: BLE001
                raise AssertionError(f"byte {pos}: {type(e).__name__}: {str(e)[:200]}") from None
            try:
                assert_same(res.state_dict, expected)
                assert_same_ties(res.state_dict, expected)
            except AssertionError as e:
                raise AssertionError(f"byte {pos}: wrong values without an error: {e}") from None
            outcomes["harmless"] += 1
    finally:
        logging.disable(logging.NOTSET)
    assert outcomes["caught"] > len(positions) // 4, outcomes


# -- malicious pickles ----------------------------------------------------------------------


class _Evil:
    def __init__(self, cmd: str) -> None:
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


class _EvilExec:
    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self):
        return (exec, (self.code,))


def _assert_refused(tmp_path: Path, path: Path, marker: Path) -> None:
    for name, call in _all_reads(tmp_path) + [("read_index", lambda: read_index(path))]:
        with pytest.raises(UnsafeCheckpointError) as ei:
            call()
        if name == "read_index":  # no reader, no rank
            assert str(path) in str(ei.value)
        else:
            _assert_names_file_and_rank(ei.value, path)
        assert not marker.exists(), f"{name}: the payload ran"
    with pytest.raises(pickle.UnpicklingError):  # the oracle refuses it too
        torch.load(path, weights_only=True)
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [0, 2, 4])
def test_malicious_data_pkl(tmp_path: Path, protocol: int) -> None:
    marker = tmp_path / "MARKER"
    path = _save(tmp_path)
    rewrite_zip(path, {"data.pkl": pickle.dumps(_Evil(f"touch {marker}"), protocol=protocol)})
    _assert_refused(tmp_path, path, marker)
    # the payload does run when unpickled without restrictions (so the test is meaningful)
    pickle.loads(pickle.dumps(_Evil(f"touch {marker}"), protocol=protocol))
    assert marker.exists()


def test_malicious_object_among_tensors(tmp_path: Path) -> None:
    """torch.save writes any object; the global inside the state dict is refused."""
    marker = tmp_path / "MARKER"
    obj = {"model": {"w": torch.randn(3)}, "evil": _Evil(f"touch {marker}"),
           "evil2": [_EvilExec(f"open({str(marker)!r}, 'w').close()")]}
    path = _save(tmp_path, obj)
    _assert_refused(tmp_path, path, marker)
    # a target naming only safe keys is refused as well: the whole pickle is unpickled
    with pytest.raises(UnsafeCheckpointError, match="posix.system|os.system"):
        READER.load(tmp_path, {"model": {"w": None}})
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_malicious_legacy_file(tmp_path: Path) -> None:
    marker = tmp_path / "MARKER"
    path = _save(tmp_path, {"w": torch.randn(2), "evil": _Evil(f"touch {marker}")},
                 _use_new_zipfile_serialization=False)
    _assert_refused(tmp_path, path, marker)


# -- target mismatches: raise before anything is touched -----------------------------------


def _targets_and_snapshot():
    w = fill_garbage(torch.empty(64, 33))
    lw0 = fill_garbage(torch.empty(3, 3))
    target = {"model": {"w": w, "wt": None, "layers": [{"w": lw0}, {"w": None}], "b": None}, "step": 0}
    snap = {"w": tensor_bytes(w), "lw0": tensor_bytes(lw0)}
    return target, snap


def _assert_untouched(target: dict, snap: dict) -> None:
    assert tensor_bytes(target["model"]["w"]) == snap["w"]
    assert tensor_bytes(target["model"]["layers"][0]["w"]) == snap["lw0"]
    assert target["model"]["wt"] is None and target["model"]["layers"][1]["w"] is None
    assert target["step"] == 0 and set(target["model"]) == {"w", "wt", "layers", "b"}


@pytest.mark.parametrize("which", ["shape", "dtype", "both"])
def test_shape_and_dtype_mismatch(tmp_path: Path, which: str) -> None:
    path = _save(tmp_path)
    target, snap = _targets_and_snapshot()
    bad = {"shape": torch.empty(2, 4), "dtype": torch.empty(2, 5, dtype=torch.float16),
           "both": torch.empty(5, 2, dtype=torch.int32)}[which]
    fill_garbage(bad)
    bad_bytes = tensor_bytes(bad)
    target["model"]["layers"][1]["w"] = bad  # last in file order: everything before it is planned
    before = file_fingerprint(path)
    with pytest.raises(StateDictMismatchError) as ei:
        READER.load(tmp_path, target)
    msg = str(ei.value)
    assert ei.value.key == "model.layers[1].w" and "'model.layers[1].w'" in msg
    _assert_names_file_and_rank(ei.value, path)
    if which in ("shape", "both"):
        assert "(2, 5)" in msg and str(tuple(bad.shape)) in msg, msg
    if which in ("dtype", "both"):
        assert "torch.float32" in msg and str(bad.dtype) in msg, msg
    assert tensor_bytes(bad) == bad_bytes
    target["model"]["layers"][1]["w"] = None
    _assert_untouched(target, snap)
    assert file_fingerprint(path) == before
    assert isinstance(ei.value, ValueError)  # StateDictMismatchError is a ValueError too


def test_several_mismatches_are_counted(tmp_path: Path) -> None:
    _save(tmp_path)
    target = {"model": {"w": torch.empty(1), "b": torch.empty(7), "layers": [{"w": torch.empty(9)}]}}
    with pytest.raises(StateDictMismatchError, match=r"and 2 more mismatch"):
        READER.load(tmp_path, target)


@pytest.mark.parametrize("case", ["tensor_for_dict", "dict_for_tensor", "list_for_dict", "tensor_for_int",
                                  "dict_for_list", "dict_for_str"])
def test_structure_mismatch(tmp_path: Path, case: str) -> None:
    path = _save(tmp_path)
    target, snap = _targets_and_snapshot()
    where, value = {
        "tensor_for_dict": ("model.layers[0]", torch.empty(3, 3)),
        "dict_for_tensor": ("model.b", {"x": None}),
        "list_for_dict": ("model.layers[0]", [None]),
        "tensor_for_int": ("step", torch.empty(())),
        "dict_for_list": ("model.layers", {"0": None}),
        "dict_for_str": ("name", {"x": None}),
    }[case]
    saved = {"model.layers[0]": target["model"]["layers"][0], "model.b": None, "step": 0,
             "model.layers": target["model"]["layers"], "name": None}[where]
    _set(target, where, value)
    with pytest.raises(StateDictMismatchError) as ei:
        READER.load(tmp_path, target)
    assert ei.value.key == where and repr(where) in str(ei.value)
    _assert_names_file_and_rank(ei.value, path)
    if isinstance(value, torch.Tensor):
        assert "tensor" in str(ei.value)
    if where == "name":
        del target["name"]
    else:
        _set(target, where, saved)
    _assert_untouched(target, snap)


def _set(target: dict, where: str, value: object) -> None:
    import re

    parts = [int(p[1:-1]) if p.startswith("[") else p for p in re.findall(r"\[\d+\]|[^.\[\]]+", where)]
    node = target
    for p in parts[:-1]:
        node = node[p]
    node[parts[-1]] = value


def test_bad_arguments(tmp_path: Path) -> None:
    _save(tmp_path)
    with pytest.raises(ValueError, match="verify"):
        CheckpointReader(RankInfo(0, 1), verify="md5")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="mapping"):
        READER.load(tmp_path, [None])  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        RankInfo(4, 4)


# -- no tensor over the file's mapping survives an error --------------------------------------


_SEGV_SCRIPT = textwrap.dedent("""
    import os, sys, torch
    from dist_restore import CheckpointReader, CorruptCheckpointError, RankInfo, read_index
    d = sys.argv[1]
    f = os.path.join(d, "checkpoint_0.pt")
    torch.save({"w": torch.arange(1 << 16, dtype=torch.float32)}, f)
    off = read_index(f)["w"].file_offset
    b = bytearray(open(f, "rb").read()); b[off + 100] ^= 1; open(f, "wb").write(b)
    try:
        CheckpointReader(RankInfo(0, 1)).load(d)
    except CorruptCheckpointError as e:
        err = e
    # what a debugger, pytest's report or logging.exception(..., stack_info) may do:
    # look at the locals of the frames in the traceback
    seen = 0
    exc = err
    while exc is not None:
        tb = exc.__traceback__
        while tb is not None:
            for v in list(tb.tb_frame.f_locals.values()):
                if isinstance(v, torch.Tensor):
                    float(v.float().sum()); seen += 1
            tb = tb.tb_next
        exc = exc.__cause__
    print("ok", seen)
""")


def test_traceback_locals_do_not_alias_unmapped_file(tmp_path: Path) -> None:
    """Regression: the mapping was closed while tensors over it were still referenced by the
    frames of the propagating CorruptCheckpointError; reading them segfaulted. Run in a
    subprocess so that a regression fails this test instead of killing pytest."""
    proc = subprocess.run([sys.executable, "-c", _SEGV_SCRIPT, str(tmp_path)], capture_output=True,
                          text=True, timeout=50, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, f"exit code {proc.returncode}: {proc.stderr[-500:]}"
    assert proc.stdout.startswith("ok")


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("flip", [None, 0, 4999, 10_000, 39_999])
def test_large_records_split_across_threads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            threads: int, flip: int | None) -> None:
    """Records copied in pieces by several threads: exact bytes; a flip in any part is caught."""
    import dist_restore._bytes.read as rd

    monkeypatch.setattr(rd, "_SMALL", 1000)
    monkeypatch.setattr(rd, "_CHUNK", 1000)  # requests that straddle pages, several in flight
    g = torch.Generator().manual_seed(1)
    sd = {"big": torch.randint(0, 256, (40_000,), dtype=torch.uint8, generator=g),
          "odd": torch.randn(2_501, generator=g).double(), "tiny": torch.arange(3)}
    path = _save(tmp_path, sd)
    expected = oracle(path)
    if flip is not None:
        data = bytearray(path.read_bytes())
        data[read_index(path)["big"].file_offset + flip] ^= 0x01
        path.write_bytes(bytes(data))
    before = file_fingerprint(path)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        targets = {k: torch.zeros_like(v) for k, v in sd.items()}
        if flip is None:
            res = READER.load(tmp_path, targets)
            assert res.bytes_verified == sum(v.numel() * v.element_size() for v in sd.values())
            for k in sd:
                assert tensor_bytes(targets[k]) == tensor_bytes(expected[k]), k
            allocated = READER.load(tmp_path).state_dict
            for k in sd:
                assert tensor_bytes(allocated[k]) == tensor_bytes(expected[k]), k
        else:
            with pytest.raises(CorruptCheckpointError, match="CRC32") as ei:
                READER.load(tmp_path, targets)
            assert ei.value.key == "big"
            got = NO_VERIFY.load(tmp_path, {"big": None}).state_dict["big"]
            diff = (got != expected["big"]).nonzero().flatten().tolist()
            assert diff == [flip]
    finally:
        torch.set_num_threads(old)
    assert file_fingerprint(path) == before


@pytest.mark.parametrize("flip", [None, ("r3", 0), ("r5", 7_001), ("r9", -1)])
def test_pipelined_reads_in_flight(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   flip: tuple[str, int] | None) -> None:
    """Many mid-sized records read on the I/O pool, several in flight, in several requests each:
    exact bytes against torch.load; a flip in any record names that record's key."""
    import dist_restore._bytes.read as rd

    monkeypatch.setattr(rd, "_SMALL", 1000)
    monkeypatch.setattr(rd, "_CHUNK", 3000)  # requests that straddle pages
    g = torch.Generator().manual_seed(2)
    sd = {f"r{i}": torch.randint(0, 256, (1_000 + 2_999 * i,), dtype=torch.uint8, generator=g)
          for i in range(10)}
    sd["f"] = torch.randn(3_001, generator=g)
    path = _save(tmp_path, sd)
    expected = oracle(path)
    if flip is not None:
        key, at = flip
        e = read_index(path)[key]
        data = bytearray(path.read_bytes())
        data[e.file_offset + (at if at >= 0 else e.nbytes + at)] ^= 0x10
        path.write_bytes(bytes(data))
    targets = {k: torch.zeros_like(v) for k, v in sd.items()}
    if flip is None:
        res = READER.load(tmp_path, targets)
        assert res.bytes_verified == sum(v.numel() * v.element_size() for v in sd.values())
        allocated = READER.load(tmp_path).state_dict
        for k in sd:
            assert tensor_bytes(targets[k]) == tensor_bytes(expected[k]), k
            assert tensor_bytes(allocated[k]) == tensor_bytes(expected[k]), k
    else:
        with pytest.raises(CorruptCheckpointError, match="CRC32") as ei:
            READER.load(tmp_path, targets)
        assert ei.value.key == flip[0]


def test_file_truncated_after_mapping_before_a_large_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file that shrinks after it was opened: a clear error, not a SIGBUS from the mapping."""
    import dist_restore._bytes.read as rd

    monkeypatch.setattr(rd, "_SMALL", 1000)
    path = _save(tmp_path, {"big": torch.arange(50_000, dtype=torch.float32), "small": torch.ones(3)})
    orig = rd._RankFile.__init__

    def init_then_truncate(self: Any, *a: Any, **k: Any) -> None:
        orig(self, *a, **k)
        os.truncate(path, path.stat().st_size // 2)

    monkeypatch.setattr(rd._RankFile, "__init__", init_then_truncate)
    with pytest.raises(CorruptCheckpointError, match="changed size while being read"):
        READER.load(tmp_path, {"big": torch.zeros(50_000)})
