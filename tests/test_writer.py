"""Tests of ``CheckpointWriter`` and ``find_latest_checkpoint`` in one process."""

from __future__ import annotations

import json
import logging
import os
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.distributed.checkpoint._experimental.checkpoint_reader import CheckpointReader as TorchReader
from torch.distributed.checkpoint._experimental.checkpoint_writer import CheckpointWriter as TorchWriter
from torch.distributed.checkpoint._experimental.checkpoint_writer import CheckpointWriterConfig
from torch.distributed.checkpoint._experimental.types import RankInfo as TorchRankInfo

from dist_restore import CheckpointReader, RankInfo, RestoreError
from dist_restore._format.manifest import (
    MANIFEST_NAME,
    IncompleteCheckpointError,
    check_checkpoint,
    file_checksum,
    is_temp_file,
    read_manifest,
)
from dist_restore.discovery import find_latest_checkpoint
from dist_restore.writer import CheckpointWriter

pytestmark = pytest.mark.timeout(60)


def _state(seed: int = 0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model": {"w": torch.randn(64, 32, generator=g), "b": torch.randn(32, generator=g).to(torch.bfloat16),
                  "t": torch.randn(8, 6, generator=g).t(), "ids": torch.arange(10)},
        "optim": {"step": 12, "groups": [{"lr": 0.1, "betas": (0.9, 0.999)}]},
        "seed": seed,
    }


def _assert_same(a: Any, b: Any, where: str = "") -> None:
    assert type(a) is type(b), f"{where}: {type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride(), where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def _files(d: Path) -> list[str]:
    return sorted(os.listdir(d))


class _Explodes:
    """Fails while ``torch.save`` pickles it: a write that dies half-way through."""

    def __reduce__(self) -> Any:
        raise RuntimeError("cannot pickle this on purpose")


# -- writing -------------------------------------------------------------------------------


def test_write_then_torch_load(tmp_path: Path) -> None:
    sd = _state()
    man = CheckpointWriter().write(tmp_path / "ckpt", sd)
    d = tmp_path / "ckpt"
    assert _files(d) == ["checkpoint_0.idx", "checkpoint_0.pt", MANIFEST_NAME]
    _assert_same(torch.load(d / "checkpoint_0.pt", weights_only=True), sd)
    assert man is not None and man.world_size == 1
    f = d / "checkpoint_0.pt"
    assert man.ranks[0].file == "checkpoint_0.pt"
    assert man.ranks[0].size == f.stat().st_size
    assert man.ranks[0].checksum == file_checksum(f)
    assert man.ranks[0].index_file == "checkpoint_0.idx"  # the index file is committed too
    assert man.ranks[0].index_size == (d / "checkpoint_0.idx").stat().st_size
    idx = (d / "checkpoint_0.idx").read_bytes()
    assert man.ranks[0].index_checksum == f"crc32:{zlib.crc32(idx[:-4]):08x}"
    assert read_manifest(d) == man
    assert check_checkpoint(d, world_size=1, verify=True) == man


def test_readable_by_both_readers(tmp_path: Path) -> None:
    sd = _state(1)
    CheckpointWriter(RankInfo(0, 1)).write(str(tmp_path), sd)
    got, missing = TorchReader(TorchRankInfo(0, 1)).read(str(tmp_path))
    assert missing == []
    _assert_same(got, sd)
    got, missing = CheckpointReader(RankInfo(0, 1)).read(tmp_path)
    assert missing == []
    _assert_same(got, sd)
    target = {"model": {"w": torch.zeros(64, 32)}}  # a partial, in-place read
    CheckpointReader(RankInfo(0, 1)).read(tmp_path, target)
    assert torch.equal(target["model"]["w"], sd["model"]["w"])


def test_torch_writer_directory_passes_and_restores(tmp_path: Path) -> None:
    sd = _state(2)
    step = tmp_path / "step_5"
    TorchWriter(CheckpointWriterConfig(), TorchRankInfo(0, 1)).write(str(step), sd)
    assert check_checkpoint(step, world_size=1) is None
    got, missing = CheckpointReader(RankInfo(0, 1)).read(step)
    assert missing == []
    _assert_same(got, sd)
    assert find_latest_checkpoint(tmp_path, world_size=1) == step


def test_torch_rank_info_is_accepted(tmp_path: Path) -> None:
    w = CheckpointWriter(TorchRankInfo(0, 1))
    assert w.rank_info == RankInfo(0, 1)
    assert w.write(tmp_path, {"x": torch.ones(2)}) is not None


def test_manifest_metadata(tmp_path: Path) -> None:
    man = CheckpointWriter().write(tmp_path, _state(), metadata={"step": 2000, "epoch": 3, "run": "r7"})
    assert man.metadata == {"step": 2000, "epoch": 3, "run": "r7"}
    doc = json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert doc["metadata"] == {"step": 2000, "epoch": 3, "run": "r7"}
    assert doc["world_size"] == 1 and doc["ranks"][0]["file"] == "checkpoint_0.pt"
    assert doc["created"].endswith("Z") and doc["created_unix"] > 1.6e9


def test_bad_metadata_fails_before_touching_the_old_checkpoint(tmp_path: Path) -> None:
    old = CheckpointWriter().write(tmp_path, _state(), metadata={"step": 1})
    before = (tmp_path / "checkpoint_0.pt").read_bytes()
    with pytest.raises(RestoreError) as info:
        CheckpointWriter().write(tmp_path, _state(5), metadata={"step": torch.tensor(2)})
    assert info.value.phase == "write"
    assert list(info.value.failures) == [0]
    assert "JSON-serialisable" in info.value.failures[0]
    assert isinstance(info.value.__cause__, ValueError)
    assert check_checkpoint(tmp_path, world_size=1, verify=True) == old  # still committed
    assert (tmp_path / "checkpoint_0.pt").read_bytes() == before


def test_failed_overwrite_never_looks_complete(tmp_path: Path) -> None:
    CheckpointWriter().write(tmp_path, _state(), metadata={"step": 1})
    before = (tmp_path / "checkpoint_0.pt").read_bytes()
    bad = _state(9)
    bad["optim"]["hook"] = _Explodes()
    with pytest.raises(RestoreError) as info:
        CheckpointWriter().write(tmp_path, bad, metadata={"step": 2})
    assert info.value.phase == "write"
    assert "cannot pickle this on purpose" in info.value.failures[0]
    assert isinstance(info.value.__cause__, RuntimeError)
    # the old manifest went first; the old rank file is untouched; the pending marker stays
    assert read_manifest(tmp_path) is None
    assert (tmp_path / "checkpoint_0.pt").read_bytes() == before
    temps = [n for n in _files(tmp_path) if is_temp_file(n)]
    assert len(temps) == 1 and temps[0].startswith(f".{MANIFEST_NAME}.")
    with pytest.raises(IncompleteCheckpointError, match="no commit manifest; temp files present"):
        check_checkpoint(tmp_path, world_size=1)
    # the next write sweeps the marker and commits
    man = CheckpointWriter().write(tmp_path, _state(3), metadata={"step": 3})
    assert _files(tmp_path) == ["checkpoint_0.idx", "checkpoint_0.pt", MANIFEST_NAME]
    assert check_checkpoint(tmp_path, world_size=1, verify=True) == man


def test_failure_after_the_rank_file_was_replaced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dist_restore.writer as writer_mod

    CheckpointWriter().write(tmp_path, _state(), metadata={"step": 1})

    def no_commit(*args: Any, **kwargs: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writer_mod, "write_manifest", no_commit)
    with pytest.raises(RestoreError, match="committing dist_restore_manifest.json: OSError"):
        CheckpointWriter().write(tmp_path, _state(4))
    _assert_same(torch.load(tmp_path / "checkpoint_0.pt", weights_only=True), _state(4))  # new file ...
    with pytest.raises(IncompleteCheckpointError, match="temp files present"):  # ... but uncommitted
        check_checkpoint(tmp_path, world_size=1)


def test_uncoordinated_ranks_write_without_manifest(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / MANIFEST_NAME).write_text("{}")  # an old manifest must not outlive the overwrite
    CheckpointWriter(RankInfo(1, 2)).write(tmp_path, {"x": torch.ones(1)})
    with caplog.at_level(logging.WARNING, logger="dist_restore.writer"):
        assert CheckpointWriter(RankInfo(0, 2)).write(tmp_path, {"x": torch.zeros(1)}) is None
    assert "without a commit manifest" in caplog.text
    assert _files(tmp_path) == ["checkpoint_0.idx", "checkpoint_0.pt", "checkpoint_1.idx", "checkpoint_1.pt"]
    assert check_checkpoint(tmp_path, world_size=2) is None


def test_file_url_is_a_local_directory(tmp_path: Path) -> None:
    from dist_restore._base.source import LocalDir

    url = f"file://{tmp_path}/ckpt"
    man = CheckpointWriter().write(url, _state(), metadata={"step": 5})
    d = tmp_path / "ckpt"
    assert _files(d) == ["checkpoint_0.idx", "checkpoint_0.pt", MANIFEST_NAME]
    assert read_manifest(url) == man == read_manifest(LocalDir(d))
    assert check_checkpoint(url, world_size=1, verify=True) == man == check_checkpoint(LocalDir(d), world_size=1)
    assert find_latest_checkpoint(f"file://{tmp_path}") == d


def test_constructor_checks_arguments() -> None:
    with pytest.raises(ValueError, match="timeout"):
        CheckpointWriter(timeout=0)
    with pytest.raises(ValueError, match="not both"):
        CheckpointWriter(barrier=lambda: None, process_group=object())
    with pytest.raises(ValueError, match="not initialised"):
        CheckpointWriter(process_group=object())
    with pytest.raises(TypeError, match="barrier"):
        CheckpointWriter(barrier=42)
    with pytest.raises(TypeError, match="global_rank"):
        CheckpointWriter(rank_info=(0, 1))


def test_barrier_object_with_one_rank(tmp_path: Path) -> None:
    calls = []

    class B:
        def execute_barrier(self) -> None:
            calls.append(1)

    assert CheckpointWriter(RankInfo(0, 1), B()).write(tmp_path, {"x": torch.ones(1)}) is not None
    assert calls == []  # one rank: nothing to wait for


# -- find_latest_checkpoint ----------------------------------------------------------------


def _write_step(root: Path, step: int, **kwargs: Any) -> Path:
    d = root / f"step_{step}"
    CheckpointWriter().write(d, _state(step), metadata={"step": step, **kwargs})
    return d


def test_latest_skips_incomplete_and_corrupt(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    good = _write_step(tmp_path, 100)
    _write_step(tmp_path, 50)
    incomplete = _write_step(tmp_path, 2000)
    (incomplete / MANIFEST_NAME).unlink()
    (incomplete / ".checkpoint_0.pt.99.0badf00d.tmp").write_bytes(b"half")
    corrupt = _write_step(tmp_path, 3000)
    f = corrupt / "checkpoint_0.pt"
    os.truncate(f, f.stat().st_size // 2)
    (tmp_path / "logs").mkdir()  # not a checkpoint: ignored silently
    (tmp_path / "logs" / "x.txt").write_text("hi")
    with caplog.at_level(logging.WARNING, logger="dist_restore.discovery"):
        assert find_latest_checkpoint(tmp_path, world_size=1) == good
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings
    assert "step_3000 (corrupt: size mismatch" in warnings[0]
    assert "step_2000 (incomplete: incomplete checkpoint: no commit manifest; temp files present" in warnings[1]


def test_latest_skips_other_world_size_and_unparsable_plain_files(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    good = _write_step(tmp_path, 1)
    plain = tmp_path / "step_5"  # torch.save directory, no manifest, truncated: only parsing finds it
    plain.mkdir()
    torch.save(_state(), plain / "checkpoint_0.pt")
    os.truncate(plain / "checkpoint_0.pt", 300)
    two = tmp_path / "step_9"
    for r in range(2):
        CheckpointWriter(RankInfo(r, 2)).write(two, {"r": torch.tensor(r)})  # uncoordinated: plain
    with caplog.at_level(logging.WARNING, logger="dist_restore.discovery"):
        assert find_latest_checkpoint(tmp_path, world_size=1) == good
    text = caplog.text
    assert "step_5 (corrupt:" in text
    assert ("step_9 (world size mismatch: world size mismatch: checkpoint has files for ranks up to 1 "
            "(no commit manifest), this job has 1") in text
    wrong = _write_step(tmp_path, 10)
    man = json.loads((wrong / MANIFEST_NAME).read_text())
    man["world_size"] = 2
    man["ranks"].append({"rank": 1, "file": "checkpoint_1.pt", "size": 1, "checksum": "crc32:00000000"})
    (wrong / MANIFEST_NAME).write_text(json.dumps(man))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dist_restore.discovery"):
        assert find_latest_checkpoint(tmp_path, world_size=1) == good
    assert "step_10 (world size mismatch: world size mismatch: checkpoint was written by 2 ranks, this job has 1" \
        in caplog.text
    assert find_latest_checkpoint(tmp_path, world_size=2) == two


def test_latest_verify_catches_a_flipped_bit(tmp_path: Path) -> None:
    good = _write_step(tmp_path, 1)
    newer = _write_step(tmp_path, 2)
    f = newer / "checkpoint_0.pt"
    data = bytearray(f.read_bytes())
    at = data.find(_state(2)["model"]["w"].numpy().tobytes())  # inside a tensor's data record
    assert at > 0
    data[at + 100] ^= 1
    f.write_bytes(bytes(data))
    assert find_latest_checkpoint(tmp_path) == newer  # same size, the index parses
    assert find_latest_checkpoint(tmp_path, verify=True) == good


def test_latest_ordering(tmp_path: Path) -> None:
    misc = tmp_path / "misc"  # no step at all: older than every directory with one
    CheckpointWriter().write(misc, _state())
    assert find_latest_checkpoint(tmp_path) == misc
    nine = _write_step(tmp_path, 9)
    assert find_latest_checkpoint(tmp_path) == nine
    final = tmp_path / "final"  # no integer in the name, but its manifest says step 100
    CheckpointWriter().write(final, _state(), metadata={"step": 100})
    assert find_latest_checkpoint(tmp_path) == final
    plain = tmp_path / "step_200"  # a plain torch.save directory: the step comes from the name
    plain.mkdir()
    torch.save(_state(), plain / "checkpoint_0.pt")
    assert find_latest_checkpoint(tmp_path) == plain
    later = tmp_path / "run2_step_200"  # same step: the newer manifest wins
    CheckpointWriter().write(later, _state(), metadata={"step": 200})
    assert find_latest_checkpoint(tmp_path) == later


def test_latest_none_and_missing_root(tmp_path: Path) -> None:
    assert find_latest_checkpoint(tmp_path) is None
    (tmp_path / "empty").mkdir()
    assert find_latest_checkpoint(tmp_path) is None
    with pytest.raises(FileNotFoundError, match="nope"):
        find_latest_checkpoint(tmp_path / "nope")
