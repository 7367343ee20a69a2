"""The index file (``checkpoint_{rank}.idx``) written by ``CheckpointWriter``: what it holds
equals what the pickle says, restores through it equal ``torch.load``, and a damaged,
edited, stale or foreign index file is never used."""

from __future__ import annotations

import collections
import json
import logging
import shutil
import struct
import zlib
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from dist_restore import CheckpointReader, CheckpointWriter, RankInfo, read_index
from dist_restore._format.indexfile import FileIndex, index_path
from dist_restore._format.manifest import check_checkpoint, read_manifest
from dist_restore.errors import CorruptCheckpointError

from _util import assert_same, assert_same_index, assert_same_ties


def _state(seed: int = 0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(40, generator=g)
    return {
        "model": collections.OrderedDict([
            ("w", torch.randn(6, 4, generator=g)),
            ("p", torch.nn.Parameter(torch.randn(3, generator=g))),
            ("frozen", torch.nn.Parameter(torch.randn(2, generator=g), requires_grad=False)),
            ("bf16", torch.randn(5, generator=g).to(torch.bfloat16)),
            ("i8", torch.randint(-5, 5, (7,), generator=g, dtype=torch.int8)),
            ("flag", torch.tensor([True, False])),
            ("empty", torch.empty(0, 3)),
            ("scalar", torch.tensor(float(seed))),
            ("grad", torch.randn(2, generator=g).requires_grad_()),
        ]),
        "views": {"a": base[2:12], "b": base[10:].view(5, 6)[:, ::2], "t": base[:20].view(4, 5).t()},
        "conj": torch.randn(3, dtype=torch.complex64, generator=g).conj(),
        "optim": {"state": {i: {"step": torch.tensor(float(i)), "exp_avg": torch.randn(4, generator=g)}
                            for i in range(3)},
                  "param_groups": [{"lr": 0.1, "betas": (0.9, 0.99), "params": [0, 1, 2], "name": None}]},
        "values": [1, 2.5, "s", b"bytes", None, True, torch.Size([2, 3]), torch.float16, (), [], {}],
        "step": seed,
    }


def _write(d: Path, sd: dict[str, Any] | None = None, *, rank: int = 0, world: int = 1) -> Path:
    CheckpointWriter(RankInfo(rank, world)).write(d, _state() if sd is None else sd)
    return d


def test_index_file_holds_what_the_pickle_says(tmp_path: Path) -> None:
    d = _write(tmp_path)
    f = d / "checkpoint_0.pt"
    ix, ref = read_index(f), read_index(f, use_index_file=False)
    assert isinstance(ix, FileIndex) and ix.source == "index file" and ref.source == "pickle"
    assert_same_index(ix, ref)
    assert ix.tensor_nbytes == ref.tensor_nbytes


def test_restores_through_the_index_equal_torch_load(tmp_path: Path) -> None:
    d = _write(tmp_path)
    expect = torch.load(d / "checkpoint_0.pt", weights_only=True)
    reader = CheckpointReader(RankInfo(0, 1))
    got = reader.read(d)[0]
    assert_same(got, expect)
    assert_same_ties(got, expect)  # views of one storage stay views of one storage
    assert isinstance(got["model"]["p"], torch.nn.Parameter) and got["model"]["p"].requires_grad
    # partial, into targets and into None leaves; missing and unexpected keys as ever
    target = {"model": {"w": torch.zeros(6, 4), "i8": None, "nope": None},
              "optim": {"state": {1: {"exp_avg": torch.zeros(4)}}}, "step": -1}
    res = reader.load(d, target)
    assert torch.equal(target["model"]["w"], expect["model"]["w"])
    assert torch.equal(target["model"]["i8"], expect["model"]["i8"])
    assert torch.equal(target["optim"]["state"][1]["exp_avg"], expect["optim"]["state"][1]["exp_avg"])
    assert target["step"] == 0
    assert res.missing_keys == ["model.nope"]
    assert "model.p" in res.unexpected_keys and "optim.state.0" in res.unexpected_keys
    assert res.bytes_read == 6 * 4 * 4 + 7 + 4 * 4
    with pytest.raises(Exception, match="shape"):  # checks still hold
        reader.load(d, {"model": {"w": torch.zeros(4, 6)}})


def test_entries_without_a_format_get_no_index_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    sd = {"dense": torch.ones(3), "sparse": torch.eye(3).to_sparse()}
    with caplog.at_level(logging.INFO, logger="dist_restore.writer"):
        man = _write(tmp_path, sd) and read_manifest(tmp_path)
    assert "cannot describe" in caplog.text
    assert not index_path(tmp_path / "checkpoint_0.pt").exists()
    assert man is not None and man.ranks[0].index_file is None
    got = CheckpointReader(RankInfo(0, 1)).read(tmp_path)[0]
    assert torch.equal(got["sparse"].to_dense(), torch.eye(3)) and torch.equal(got["dense"], torch.ones(3))


def _rewrite(idx: Path, edit: Callable[[bytearray, dict[str, Any]], None]) -> None:
    """Edit an index file's body and give it a valid CRC32 again."""
    data = bytearray(idx.read_bytes()[:-4])
    hlen = struct.unpack_from("<I", data, 8)[0]
    edit(data, json.loads(bytes(data[12 : 12 + hlen])))
    idx.write_bytes(bytes(data) + struct.pack("<I", zlib.crc32(data)))


def _shift_first_data_offset(data: bytearray, header: dict[str, Any]) -> None:
    off = header["sections"]["storages"][0] + 8  # storage 0's data offset
    struct.pack_into("<q", data, off, struct.unpack_from("<q", data, off)[0] + 4)


def _damage(kind: str, d: Path, tmp: Path) -> None:
    idx = d / "checkpoint_0.idx"
    if kind == "truncated":
        idx.write_bytes(idx.read_bytes()[:-100])
    elif kind == "flipped byte":
        data = bytearray(idx.read_bytes())
        data[len(data) // 2] ^= 0xFF
        idx.write_bytes(bytes(data))
    elif kind == "edited, CRC fixed":
        _rewrite(idx, _shift_first_data_offset)
    elif kind == "from another step":  # same layout, other values: the old step's index
        old = _write(tmp / "old", _state(5))
        shutil.copy(old / "checkpoint_0.idx", idx)
    elif kind == "from another world size":  # rank 1's index of a 2-rank checkpoint
        CheckpointWriter(RankInfo(1, 2)).write(tmp / "two", _state(1))
        shutil.copy(tmp / "two" / "checkpoint_1.idx", idx)
    elif kind == "deleted":
        idx.unlink()
    elif kind == "not an index file":
        idx.write_bytes(b"hello")
    else:
        raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["truncated", "flipped byte", "edited, CRC fixed", "from another step",
                                  "from another world size", "deleted", "not an index file"])
def test_a_bad_index_file_is_never_used(tmp_path: Path, kind: str, caplog: pytest.LogCaptureFixture) -> None:
    d = _write(tmp_path / "ckpt", _state(3))
    _damage(kind, d, tmp_path)
    with caplog.at_level(logging.DEBUG, logger="dist_restore._format.indexfile"):
        ix = read_index(d / "checkpoint_0.pt")
        assert ix.source == "pickle"
        got = CheckpointReader(RankInfo(0, 1)).read(d)[0]
    if kind != "deleted":
        assert "index file not used" in caplog.text
    assert_same(got, torch.load(d / "checkpoint_0.pt", weights_only=True))
    assert_same(got["model"]["w"], _state(3)["model"]["w"])


def test_an_index_of_another_rank_file_is_never_used_without_a_manifest(tmp_path: Path) -> None:
    """Without a manifest only the rank file's own directory can vouch for an index file."""
    a, b = _write(tmp_path / "a", _state(1)), _write(tmp_path / "b", _state(2))
    for d in (a, b):
        (d / "dist_restore_manifest.json").unlink()
    shutil.copy(b / "checkpoint_0.idx", a / "checkpoint_0.idx")
    assert read_index(a / "checkpoint_0.pt").source == "pickle"
    assert_same(CheckpointReader(RankInfo(0, 1)).read(a)[0]["model"]["w"], _state(1)["model"]["w"])
    # a rank file replaced in place by one of the same size: its directory differs
    shutil.copy(b / "checkpoint_0.pt", a / "checkpoint_0.pt")
    shutil.copy(tmp_path / "b" / "checkpoint_0.idx", a / "checkpoint_0.idx")
    CheckpointWriter(RankInfo(0, 1)).write(tmp_path / "c", _state(1))
    shutil.copy(tmp_path / "c" / "checkpoint_0.idx", a / "checkpoint_0.idx")
    assert read_index(a / "checkpoint_0.pt").source == "pickle"


def test_an_edited_index_without_a_manifest_fails_loudly_not_silently(tmp_path: Path) -> None:
    """Nothing vouches for an index file edited consistently (CRC fixed) in a directory
    without a manifest; the zip's CRC32 of the bytes then catches the wrong offset."""
    d = _write(tmp_path, _state(4))
    (d / "dist_restore_manifest.json").unlink()
    _rewrite(d / "checkpoint_0.idx", _shift_first_data_offset)
    assert read_index(d / "checkpoint_0.pt").source == "index file"
    with pytest.raises(CorruptCheckpointError, match="CRC32 mismatch"):
        CheckpointReader(RankInfo(0, 1)).read(d)


def test_verify_warns_about_a_damaged_index_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    d = _write(tmp_path)
    assert check_checkpoint(d, world_size=1, verify=True) is not None
    _damage("flipped byte", d, tmp_path)
    with caplog.at_level(logging.WARNING, logger="dist_restore._format.manifest"):
        assert check_checkpoint(d, world_size=1, verify=True) is not None  # the data is intact
    assert "index file checkpoint_0.idx is crc32:" in caplog.text


def test_rewrite_with_unsupported_entries_removes_the_old_index_file(tmp_path: Path) -> None:
    _write(tmp_path)
    assert (tmp_path / "checkpoint_0.idx").exists()
    _write(tmp_path, {"s": torch.eye(2).to_sparse()})
    assert not (tmp_path / "checkpoint_0.idx").exists()
    assert read_index(tmp_path / "checkpoint_0.pt").source == "pickle"


@pytest.mark.parametrize("fmt", ["torch", "safetensors"])
def test_consolidate_through_index_files_writes_what_the_pickles_give(tmp_path: Path, fmt: str) -> None:
    from dist_restore import consolidate

    for r in range(2):
        CheckpointWriter(RankInfo(r, 2)).write(tmp_path / "ckpt", _state(r) if fmt == "torch" else
                                               {"w": torch.randn(3, 4), "v": torch.arange(6.0)[::2]})
    shutil.copytree(tmp_path / "ckpt", tmp_path / "plain")
    for f in (tmp_path / "plain").glob("*.idx"):
        f.unlink()
    (tmp_path / "plain" / "dist_restore_manifest.json").unlink(missing_ok=True)
    assert read_index(tmp_path / "ckpt" / "checkpoint_0.pt").source == "index file"
    a = consolidate(tmp_path / "ckpt", tmp_path / f"a.{fmt}", format=fmt)
    b = consolidate(tmp_path / "plain", tmp_path / f"b.{fmt}", format=fmt)
    assert (a.tensors, a.tensor_bytes, a.bytes_read) == (b.tensors, b.tensor_bytes, b.bytes_read)
    if fmt == "torch":
        assert_same(torch.load(a.out, weights_only=True), torch.load(b.out, weights_only=True))
    else:
        from safetensors.torch import load_file

        assert_same(load_file(a.out), load_file(b.out))


def test_a_damaged_pickle_is_not_hidden_by_the_index_file(tmp_path: Path) -> None:
    """The index describes ``data.pkl``'s bytes: damaged ones (the zip directory intact) make
    the restore read the pickle, and fail on its CRC32 as it would without an index file."""
    d = _write(tmp_path, _state(2))
    (d / "dist_restore_manifest.json").unlink()
    f = d / "checkpoint_0.pt"
    data = bytearray(f.read_bytes())
    at = data.find(b"data.pkl") + 60
    data[at : at + 8] = b"\xff" * 8
    f.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="CRC32 mismatch in data.pkl"):
        CheckpointReader(RankInfo(0, 1)).read(d)


@pytest.mark.parametrize("sd", [{}, {"a": 1, "b": [1, (2, None)]}, {"t": torch.ones(0), "s": torch.tensor(3)}],
                         ids=["empty", "values only", "empty and 0-d tensors"])
def test_small_and_empty_state_dicts(tmp_path: Path, sd: dict[str, Any]) -> None:
    _write(tmp_path, sd)
    assert read_index(tmp_path / "checkpoint_0.pt").source == "index file"
    assert_same(CheckpointReader(RankInfo(0, 1)).read(tmp_path)[0], torch.load(tmp_path / "checkpoint_0.pt",
                                                                         weights_only=True))


def _mixed_state() -> dict[str, Any]:
    """Rows the bulk full read takes (whole small records of their own) next to every kind it
    leaves to the general path."""
    g = torch.Generator().manual_seed(7)
    base = torch.randn(30, generator=g)
    sd = _state(1)
    sd["many"] = {i: {"step": torch.tensor(float(i)), "m": torch.randn(5, generator=g),
                      "w": torch.randn(3, 2, generator=g).to(torch.float16)} for i in range(40)}
    sd["odd"] = {
        "large": torch.randn(70_000, generator=g),  # a record of 280,000 bytes: the pipelined read
        "row_t": torch.randn(5, 1, generator=g).t(),  # shape (1, 5), strides (1, 1): not torch.empty's
        "tail": base[20:],  # a view at an offset into a storage it shares with...
        "head": base[:10],
        "tied": {"a": base.view(5, 6), "b": base},  # ...two more views of it
        "neg": torch.randn(3, dtype=torch.complex64, generator=g).conj()._neg_view(),
        "wide": torch.arange(12, dtype=torch.int32).view(3, 4),
        "bool": torch.tensor([[True], [False]]),
        "u16": torch.arange(5, dtype=torch.int32).to(torch.uint16),  # its storage record is untyped (bytes)
    }
    return sd


_GENERAL = {"model.p", "model.frozen", "model.empty", "model.grad", "views.a", "views.b", "views.t", "conj",
            "odd.large", "odd.row_t", "odd.tail", "odd.head", "odd.tied.a", "odd.tied.b", "odd.neg"}


def test_full_read_takes_common_rows_in_bulk_and_the_rest_as_ever(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """``state_dict=None`` through an index file: equal to ``torch.load`` (types, strides, ties,
    conj/neg bits, Parameters); only the rows that are not whole small records of their own
    went through the general path; byte counts as the pickle path counts them."""
    import dist_restore._bytes.readall as ra

    d = _write(tmp_path / "own", _mixed_state())
    assert read_index(d / "checkpoint_0.pt").source == "index file"
    general: list[str] = []
    produce = ra.produce
    monkeypatch.setattr(ra, "produce", lambda index, leaves, **kw: general.extend(lf.key for lf in leaves)
                        or produce(index, leaves, **kw))
    expect = torch.load(d / "checkpoint_0.pt", weights_only=True)
    reader = CheckpointReader(RankInfo(0, 1))
    res = reader.load(d)
    assert_same(res.state_dict, expect)
    assert_same_ties(res.state_dict, expect)
    assert set(general) == _GENERAL
    plain = tmp_path / "plain"
    plain.mkdir()
    shutil.copy(d / "checkpoint_0.pt", plain / "checkpoint_0.pt")
    ref = reader.load(plain)
    assert (res.bytes_read, res.bytes_verified) == (ref.bytes_read, ref.bytes_verified)
    assert res.missing_keys == res.unexpected_keys == []
    for loc in ("cpu", torch.device("cpu"), {"cpu": "cpu"}):
        assert_same(reader.read(d, map_location=loc)[0], expect)
    assert_same(CheckpointReader(RankInfo(0, 1), verify="none").read(d)[0], expect)


@pytest.mark.parametrize("key", ["many.17.m", "odd.tail"], ids=["common row", "general row"])
def test_full_read_through_the_index_file_checks_crc32(tmp_path: Path, key: str) -> None:
    d = _write(tmp_path, _mixed_state(), rank=1, world=2)
    f = d / "checkpoint_1.pt"
    entry = read_index(f).entries[key]
    data = bytearray(f.read_bytes())
    data[entry.file_offset + 1] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="CRC32 mismatch") as ei:
        CheckpointReader(RankInfo(1, 2)).read(d)
    assert ei.value.key == key and ei.value.rank == 1 and ei.value.file == str(f)
    got = CheckpointReader(RankInfo(1, 2), verify="none").read(d)[0]  # read as it is
    assert_same(got, torch.load(f, weights_only=True))


def test_full_read_of_a_row_named_twice_gives_one_tensor(tmp_path: Path) -> None:
    """An index file whose skeleton names one row twice (CheckpointWriter gives every leaf a
    row of its own) still reads both leaves, as one tensor, as torch.load does for one object;
    one whose skeleton names a row nowhere reads the others."""
    d = _write(tmp_path, {"a": torch.arange(4.0), "b": torch.ones(2)})
    ix = read_index(d / "checkpoint_0.pt")
    assert isinstance(ix, FileIndex)
    ix._skeleton = {"a": ix._skeleton["a"], "b": ix._skeleton["b"], "again": ix._skeleton["a"]}
    from dist_restore._bytes.readall import read_all

    got = read_all(ix)
    assert got["a"] is got["again"] and torch.equal(got["a"], torch.arange(4.0))
    assert torch.equal(got["b"], torch.ones(2))
    ix = read_index(d / "checkpoint_0.pt")
    ix._skeleton = {"a": ix._skeleton["a"]}  # and one that names a row nowhere
    got = read_all(ix)
    assert list(got) == ["a"] and torch.equal(got["a"], torch.arange(4.0))


def test_full_read_of_a_skeleton_that_shares_a_container(tmp_path: Path) -> None:
    """A dict at two places of the skeleton (the writer makes none) is not filled in place
    twice: each place gets its own, with the values (an int value is not taken for a row)."""
    d = _write(tmp_path, {"a": {"t": torch.arange(3.0), "n": 5}, "b": 1})
    ix = read_index(d / "checkpoint_0.pt")
    assert isinstance(ix, FileIndex)
    sub = ix._skeleton["a"]
    ix._skeleton = {"a": sub, "again": sub, "b": ix._skeleton["b"]}
    from dist_restore._bytes.readall import read_all

    got = read_all(ix)
    assert got["a"] is not got["again"] and got["a"]["n"] == got["again"]["n"] == 5 and got["b"] == 1
    assert got["a"]["t"] is got["again"]["t"] and torch.equal(got["a"]["t"], torch.arange(3.0))
