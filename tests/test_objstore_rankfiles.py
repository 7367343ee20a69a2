"""Our own rank files read from a real S3 server (moto, ``tests/_s3.py``) in one process: every
tensor, view, parameter and value as ``torch.load`` gives it; a partial target reads only its
tensors' bytes; a lost rank object, a write in progress and an object replaced between plan and
read are refused, naming the URL, before any target is touched."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dist_restore import CheckpointReader, CheckpointWriter, RankInfo, RestoreCoordinator
from dist_restore._base.source import pinned_listings
from dist_restore._sources import plan_source, read_source
from dist_restore.errors import CheckpointError, CorruptCheckpointError
from tests._s3 import s3_server

pytestmark = pytest.mark.timeout(90)


def _state() -> dict:
    torch.manual_seed(0)
    a = torch.randn(64, 16)
    return {"model": {"a": a, "view": a[8:20], "t": torch.randn(6, 5).t(), "ids": torch.arange(100),
                      "w": torch.nn.Parameter(torch.randn(7))},
            "optim": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(16)}},
                      "param_groups": [{"lr": 0.1, "params": [0]}]},
            "extra": {"step": 7, "names": ["x", "y"], "pair": (torch.ones(2), 5)}}


def _same(a, b) -> None:
    if isinstance(a, torch.Tensor):
        # (values, dtype, shape, Parameter-ness; this path allocates contiguous tensors and does
        # not rebuild views sharing a storage, which torch.load does)
        assert type(a) is type(b) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            _same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            _same(x, y)
    else:
        assert a == b


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("objstore_rf")
    CheckpointWriter(RankInfo(0, 1)).write(root / "ck", _state(), metadata={"step": 7})
    torch.save(_state(), root / "plain_0.pt")
    with s3_server() as server:
        server.upload_dir(root / "ck", "ck")
        server.put("plain/checkpoint_0.pt", (root / "plain_0.pt").read_bytes())
        server.local = root  # type: ignore[attr-defined]
        yield server


def test_everything_as_torch_load_gives_it(s3) -> None:
    oracle = torch.load(s3.local / "ck" / "checkpoint_0.pt", weights_only=True)
    for prefix in ("ck", "plain"):
        res = CheckpointReader(RankInfo(0, 1)).load(s3.url(prefix))
        _same(oracle, res.state_dict)
        assert res.bytes_verified >= 0.8 * res.bytes_read


def test_targets_filled_in_place_and_a_partial_target_reads_only_its_bytes(s3) -> None:
    src = _state()
    tgt = {"model": {"a": torch.zeros(64, 16), "ids": torch.zeros(100, dtype=torch.int64)}, "extra": None}
    ptr = tgt["model"]["a"].data_ptr()
    res = RestoreCoordinator().restore(s3.url("ck"), tgt)
    assert tgt["model"]["a"].data_ptr() == ptr
    _same(src["model"]["a"], tgt["model"]["a"])
    _same(src["model"]["ids"], tgt["model"]["ids"])
    _same(src["extra"], tgt["extra"])  # a None: the whole subtree, nested as saved
    assert "model.t" in res.report.unexpected if hasattr(res.report, "unexpected") else True
    need = 64 * 16 * 4 + 100 * 8  # a and ids (the tensor inside extra.pair: with the values)
    assert need <= res.stats.bytes_read <= need + 4096


def test_a_lost_rank_object_or_a_write_in_progress_is_refused_untouched(s3) -> None:
    s3.put("gap/checkpoint_0.pt", s3.get("plain/checkpoint_0.pt"))
    s3.put("gap/checkpoint_2.pt", s3.get("plain/checkpoint_0.pt"))
    tgt = {"model": {"a": torch.zeros(64, 16)}}
    with pytest.raises(CheckpointError, match="rank 1 has no file") as e:
        RestoreCoordinator().restore(s3.url("gap"), tgt)
    assert "s3://" in str(e.value)
    for key in s3.keys("ck"):
        s3.put(key.replace("ck/", "busy/", 1), s3.get(key))
    s3.put("busy/.dist_restore_manifest.json.123.abcd.tmp", b"")
    s3.delete("busy/dist_restore_manifest.json")
    with pytest.raises(CheckpointError, match="(?i)temp|incomplete"):
        RestoreCoordinator().restore(s3.url("busy"), tgt)
    assert not tgt["model"]["a"].any()


def test_an_object_replaced_between_plan_and_read_is_an_error(s3) -> None:
    for key in s3.keys("ck"):
        s3.put(key.replace("ck/", "swap/", 1), s3.get(key))
    tgt = {"model": {"a": torch.zeros(64, 16)}}
    with pinned_listings():
        plan = plan_source(s3.url("swap"), tgt)
        other = _state()
        other["model"]["a"] += 1
        torch.save(other, s3.local / "other.pt")
        data = (s3.local / "other.pt").read_bytes()
        s3.put("swap/checkpoint_0.pt", data)
        with pytest.raises(CorruptCheckpointError, match="changed since the restore was planned"):
            read_source(plan)
    assert not torch.equal(tgt["model"]["a"], other["model"]["a"])


def test_world_size_other_than_saved_takes_plain_entries_from_file_0(s3) -> None:
    tgt = {"model": {"ids": torch.zeros(100, dtype=torch.int64)}}
    res = CheckpointReader(RankInfo(1, 3)).load(s3.url("ck"), tgt)
    _same(_state()["model"]["ids"], res.state_dict["model"]["ids"])


def test_local_copy_untouched(s3) -> None:
    before = Path(s3.local / "ck" / "checkpoint_0.pt").read_bytes()
    CheckpointReader(RankInfo(0, 1)).load(s3.url("ck"))
    assert Path(s3.local / "ck" / "checkpoint_0.pt").read_bytes() == before


def test_cli_inspect_verify_consolidate_rank_files_at_a_url(s3, tmp_path: Path, capsys) -> None:
    from dist_restore import cli

    for key in s3.keys("ck"):
        s3.put(key.replace("ck/", "cli/", 1), s3.get(key))
    url = s3.url("cli")
    assert cli.main(["inspect", url]) == 0
    out = capsys.readouterr().out
    assert "model.a" in out and "float32" in out and "[64, 16]" in out
    assert cli.main(["verify", url]) == 0
    assert "verify: OK" in capsys.readouterr().out
    assert cli.main(["consolidate", url, str(tmp_path / "one.pt")]) == 0
    _same(torch.load(s3.local / "ck" / "checkpoint_0.pt", weights_only=True),
          torch.load(tmp_path / "one.pt", weights_only=True))
    data = bytearray(s3.get("cli/checkpoint_0.pt"))
    data[len(data) // 2] ^= 1
    s3.put("cli/checkpoint_0.pt", bytes(data))
    capsys.readouterr()
    assert cli.main(["verify", url]) == 1
    out = capsys.readouterr().out
    assert "checksum mismatch" in out and "checkpoint_0.pt" in out and "verify: FAILED" in out
