"""CheckpointWriter on real processes: gloo on 127.0.0.1 (2 and 4 ranks), a store barrier, crashes.

The writes that need a process group and kill no rank run in one spawn per world size (``jobs``:
a :class:`~tests_multiprocess._batch.Batch` each, each job in a root directory of its own).
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import pytest
import torch

from dist_restore._format.manifest import (
    MANIFEST_NAME,
    IncompleteCheckpointError,
    Manifest,
    check_checkpoint,
    is_temp_file,
    read_manifest,
)
from dist_restore.discovery import find_latest_checkpoint
from tests_multiprocess import _workers_writer as w
from tests_multiprocess._batch import Batch
from tests_multiprocess.harness import RanksFailed, run_ranks

pytestmark = pytest.mark.multiprocess

#: The (world, victim) cases of test_one_rank_failing_fails_every_rank_and_leaves_no_manifest.
_FAIL_CASES = [(2, 0)]


@pytest.fixture(scope="module")
def jobs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[int, Batch]]:
    """The root of the jobs' directories and ``{world: Batch}``: job ``write[world]`` writes
    ``root/write{world}/step_300``; job ``fail[world-victim]`` writes ``root/fail{world}-{victim}/step``."""
    root = tmp_path_factory.mktemp("writer")
    b = {world: Batch(world, timeout=200) for world in (2, 4)}
    for world in (2, 4):
        b[world].add(f"write[{world}]", w.write_step, str(root / f"write{world}" / "step_300"), 300)
    for world, victim in _FAIL_CASES:
        b[world].add(f"fail[{world}-{victim}]", w.write_then_fail, str(root / f"fail{world}-{victim}" / "step"), victim)
    return root, b


def _assert_state_equal(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for k, v in expected.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(got[k], v), k
        elif isinstance(v, dict):
            _assert_state_equal(got[k], v)
        else:
            assert got[k] == v, k


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world", [2, 4])
def test_all_ranks_write_and_commit(jobs: tuple[Path, dict[int, Batch]], world: int) -> None:
    root = jobs[0] / f"write{world}"
    tmp_path = root / "step_300"
    out = jobs[1][world].results(f"write[{world}]")
    on_disk = read_manifest(tmp_path)
    assert on_disk is not None
    assert all(o["manifest_on_disk"] for o in out)  # no rank returned before the commit
    assert {o["manifest"] for o in out} == {on_disk.to_json()}  # the same manifest everywhere
    assert on_disk.world_size == world
    assert on_disk.metadata == {"step": 300, "epoch": 1}
    for r in range(world):
        f = tmp_path / f"checkpoint_{r}.pt"
        data = f.read_bytes()
        assert on_disk.ranks[r].file == f.name
        assert on_disk.ranks[r].size == len(data)
        assert on_disk.ranks[r].checksum == "crc32:%08x" % zlib.crc32(data)
        _assert_state_equal(torch.load(f, weights_only=True), w.rank_state(r, 300))
    assert len({i.size for i in on_disk.ranks}) == world  # rank files really differ
    for r in range(world):  # each rank file's index file, committed with it
        idx = (tmp_path / f"checkpoint_{r}.idx").read_bytes()
        assert (on_disk.ranks[r].index_file, on_disk.ranks[r].index_size) == (f"checkpoint_{r}.idx", len(idx))
        assert on_disk.ranks[r].index_checksum == "crc32:%08x" % zlib.crc32(idx[:-4])
    assert sorted(os.listdir(tmp_path)) == sorted([MANIFEST_NAME] + [f"checkpoint_{r}.{ext}" for r in range(world)
                                                                     for ext in ("pt", "idx")])
    assert check_checkpoint(tmp_path, world_size=world, verify=True) == on_disk
    assert find_latest_checkpoint(root, world_size=world) == tmp_path


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("world", "victim"), _FAIL_CASES)
def test_one_rank_failing_fails_every_rank_and_leaves_no_manifest(jobs: tuple[Path, dict[int, Batch]], world: int,
                                                                  victim: int) -> None:
    root = jobs[0] / f"fail{world}-{victim}"
    tmp_path = root / "step"
    out = jobs[1][world].results(f"fail[{world}-{victim}]")
    for r, o in enumerate(out):
        err = o["error"]
        assert err is not None and err["type"] == "RestoreError", (r, err)
        assert err["phase"] == "write"
        assert err["ranks"] == [victim]
        assert "boom while pickling" in err["text"]
        assert not o["manifest_after"]
        assert o["seconds"] < 20  # failures travel with the statuses, not by timeout
    assert read_manifest(tmp_path) is None
    with pytest.raises(IncompleteCheckpointError, match="no commit manifest; temp files present"):
        check_checkpoint(tmp_path, world_size=world)
    # the victim's old file is untouched; the others hold step 2 (hence: never complete-looking)
    _assert_state_equal(torch.load(tmp_path / f"checkpoint_{victim}.pt", weights_only=True), w.rank_state(victim, 1))
    other = (victim + 1) % world
    _assert_state_equal(torch.load(tmp_path / f"checkpoint_{other}.pt", weights_only=True), w.rank_state(other, 2))
    assert find_latest_checkpoint(root, world_size=world) is None


@pytest.mark.timeout(150)
def test_killed_writers_leave_an_incomplete_directory(tmp_path: Path) -> None:
    world = 4
    victims = {1: "mid_save", 3: "before_rename"}
    with pytest.raises(RanksFailed) as info:
        run_ranks(w.write_then_die, world, args=(str(tmp_path), victims), timeout=120)
    outcomes = {o.rank: o for o in info.value.outcomes}
    assert info.value.failed_ranks == [1, 3]
    assert outcomes[1].exitcode == outcomes[3].exitcode == -9
    for r in (0, 2):
        res = outcomes[r].result
        assert res is not None, outcomes[r]
        assert res["error"]["type"] == "RestoreError" and res["error"]["phase"] == "write", res["error"]
        assert res["seconds"] < 60
    step_200 = tmp_path / "step_200"
    assert not (step_200 / MANIFEST_NAME).exists()
    temps = sorted(n for n in os.listdir(step_200) if is_temp_file(n))
    # rank 3 died at the rename, after writing its rank file and its index file
    names = [t.rsplit(".", 3)[0] for t in temps]
    assert names == [".checkpoint_1.pt", ".checkpoint_3.idx", ".checkpoint_3.pt", f".{MANIFEST_NAME}"], temps
    assert os.path.getsize(step_200 / temps[2]) > 0  # the one killed before the rename wrote everything
    with pytest.raises(IncompleteCheckpointError) as err:
        check_checkpoint(step_200, world_size=world)
    assert err.value.reason.startswith("incomplete checkpoint: no commit manifest; ranks 1,3 have no file; "
                                       "temp files present: .checkpoint_1.pt.")
    assert find_latest_checkpoint(tmp_path, world_size=world) == tmp_path / "step_100"
    man = check_checkpoint(tmp_path / "step_100", world_size=world, verify=True)
    assert isinstance(man, Manifest) and man.metadata == {"step": 100}


@pytest.mark.timeout(120)
def test_store_barrier_without_process_group(tmp_path: Path) -> None:
    world = 2
    out = run_ranks(w.write_with_store_barrier, world, args=(str(tmp_path), 1), timeout=90,
                    init_process_group=False)
    files = sorted([MANIFEST_NAME] + [f"checkpoint_{r}.{ext}" for r in range(world) for ext in ("pt", "idx")])
    man_json = out[0]["manifest"]
    for o in out:
        assert o["manifest"] == man_json
        assert o["files_after_commit"] == files  # report files cleaned up
        assert o["error"]["type"] == "RestoreError" and o["error"]["ranks"] == [1], o["error"]
        assert "boom while pickling" in o["error"]["text"]
    after = out[0]["files_after_failure"]
    assert MANIFEST_NAME not in after
    assert [n for n in after if is_temp_file(n)] == [n for n in after if n.startswith(f".{MANIFEST_NAME}.")]
    with pytest.raises(IncompleteCheckpointError):
        check_checkpoint(tmp_path, world_size=world)
    assert Manifest.from_json(man_json).world_size == world
