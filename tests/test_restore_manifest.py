"""Restore trusts only whole checkpoints: the reader and coordinator against the manifest."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from dist_restore import CheckpointReader, CorruptCheckpointError, RankInfo, RestoreCoordinator, RestoreError
from dist_restore._format.manifest import IncompleteCheckpointError
from dist_restore.writer import CheckpointWriter

pytestmark = pytest.mark.timeout(60)


def _write(d: Path) -> dict[str, torch.Tensor]:
    sd = {"w": torch.arange(1024, dtype=torch.float32), "b": torch.ones(3)}
    CheckpointWriter(RankInfo(0, 1)).write(d, sd, metadata={"step": 7})
    return sd


def test_committed_checkpoint_restores(tmp_path: Path) -> None:
    sd = _write(tmp_path)
    assert (tmp_path / "dist_restore_manifest.json").exists()
    res = CheckpointReader(RankInfo(0, 1)).load(tmp_path, verify=True)
    assert torch.equal(res.state_dict["w"], sd["w"])
    out = RestoreCoordinator().restore(tmp_path, None, verify=True)
    assert torch.equal(out.state_dict["b"], sd["b"])


def test_temp_file_without_manifest_is_refused(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(2)}, tmp_path / "checkpoint_0.pt")
    (tmp_path / ".checkpoint_0.pt.123.deadbeef.tmp").write_bytes(b"half")
    with pytest.raises(IncompleteCheckpointError, match="incomplete checkpoint: no commit manifest; temp files"):
        CheckpointReader(RankInfo(0, 1)).load(tmp_path)
    with pytest.raises(RestoreError, match="temp files present"):
        RestoreCoordinator().restore(tmp_path)


def test_plain_torch_save_directory_still_restores(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(2)}, tmp_path / "checkpoint_0.pt")
    assert torch.equal(CheckpointReader(RankInfo(0, 1)).read(tmp_path)[0]["w"], torch.ones(2))
    assert torch.equal(RestoreCoordinator().restore(tmp_path).state_dict["w"], torch.ones(2))


def test_truncated_after_commit_is_refused_before_reading(tmp_path: Path) -> None:
    _write(tmp_path)
    f = tmp_path / "checkpoint_0.pt"
    os.truncate(f, f.stat().st_size - 1)
    with pytest.raises(CorruptCheckpointError, match="size mismatch"):
        CheckpointReader(RankInfo(0, 1)).load(tmp_path)


def test_flipped_bit_caught_by_manifest_checksum_with_verify(tmp_path: Path) -> None:
    _write(tmp_path)
    f = tmp_path / "checkpoint_0.pt"
    idx = CheckpointReader(RankInfo(0, 1)).index(tmp_path)
    off = idx["w"].file_offset + 100
    data = bytearray(f.read_bytes())
    data[off] ^= 0x01
    f.write_bytes(bytes(data))
    # a partial read of "b" never touches w's bytes: only the whole-file checksum sees it
    reader = CheckpointReader(RankInfo(0, 1))
    assert torch.equal(reader.load(tmp_path, {"b": None}).state_dict["b"], torch.ones(3))
    with pytest.raises(CorruptCheckpointError, match="checksum mismatch"):
        reader.load(tmp_path, {"b": None}, verify=True)
    with pytest.raises(RestoreError, match="checksum mismatch"):
        RestoreCoordinator().restore(tmp_path, {"b": None}, verify=True)


def test_world_size_mismatch_without_manifest_or_mesh_is_named(tmp_path: Path) -> None:
    """Plain files, no manifest: a lost last file would look like a smaller world; refused."""
    sd = {"w": torch.ones(2)}
    for r in range(2):
        torch.save(sd, tmp_path / f"checkpoint_{r}.pt")
    with pytest.raises(RestoreError, match="world size mismatch.*no commit manifest"):
        RestoreCoordinator().restore(tmp_path)  # a 1-rank job, a 2-rank checkpoint


def test_world_size_change_takes_plain_entries_from_src_and_says_so(tmp_path: Path) -> None:
    """A 1-rank job, a committed 2-rank checkpoint: non-DTensor entries come from rank src's
    file, and the report says they were taken from one rank."""
    for r in range(2):
        torch.save({"w": torch.full((2,), float(r)), "step": r}, tmp_path / f"checkpoint_{r}.pt")
    _commit(tmp_path, 2)
    res = RestoreCoordinator().restore(tmp_path)
    assert torch.equal(res.state_dict["w"], torch.zeros(2)) and res.state_dict["step"] == 0
    assert res.report is not None and res.report.ok
    assert any("written by 2 rank(s), restored on 1" in n and "rank 0's file" in n for n in res.report.notes)
    assert "note: resharded" in res.report.render()


def _commit(d: Path, world: int) -> None:
    """A commit manifest for the rank files already in ``d`` (as CheckpointWriter writes it)."""
    from dist_restore._format.manifest import Manifest, RankFileInfo, file_checksum, write_manifest

    ranks = [RankFileInfo(r, f"checkpoint_{r}.pt", os.path.getsize(d / f"checkpoint_{r}.pt"),
                          file_checksum(d / f"checkpoint_{r}.pt")) for r in range(world)]
    write_manifest(d, Manifest.create(ranks))


def test_plain_files_without_manifest_restore_into_a_target_on_another_world(tmp_path: Path) -> None:
    """DDP-style files, no manifest, a target given: one file is enough (a lost one changes no
    value); the report says the entries came from rank 0's file."""
    sd = {"w": torch.arange(6.0), "step": 4}
    for r in range(3):
        torch.save(sd, tmp_path / f"checkpoint_{r}.pt")
    res = RestoreCoordinator().restore(tmp_path, {"w": torch.zeros(6), "step": None})
    assert torch.equal(res.state_dict["w"], sd["w"]) and res.state_dict["step"] == 4
    assert "no commit manifest" in res.report.render() and "taken from rank 0's file" in res.report.render()


def test_trainer_discovery_takes_plain_files_without_manifest(tmp_path: Path) -> None:
    from dist_restore.trainer import _latest

    step = tmp_path / "step_5"
    step.mkdir()
    for r in range(4):
        torch.save({"models": {"net": {"w": torch.ones(2)}}}, step / f"checkpoint_{r}.pt")
    assert _latest(tmp_path, 2, verify=False, reshard=True) == step


def test_consolidate_plain_files_without_manifest(tmp_path: Path) -> None:
    from dist_restore import consolidate

    d = tmp_path / "ck"
    d.mkdir()
    for r in range(4):
        torch.save({"model": {"w": torch.arange(4.0)}}, d / f"checkpoint_{r}.pt")
    res = consolidate(d, tmp_path / "out.pt")
    assert torch.equal(torch.load(tmp_path / "out.pt", weights_only=True)["model"]["w"], torch.arange(4.0))
    assert res.rank_files == 4
