"""Hostile DTensor layouts, stray rank files and manifests (issue 23): each gives our own error
naming the file (and the key), quickly and in little memory, never a hang, a signal or a bare
builtin exception.

The cases that once hung or took gigabytes (a split factor of 10^12, a mesh of 10^9, a rank
file numbered 10^17) run in child processes of ``fuzz/run_cases.py`` (a 4 GiB address-space
limit, a timeout, peak memory measured); the rest, and the caps themselves, are checked here.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from dist_restore import CheckpointReader, RankInfo, RestoreCoordinator, RestoreError, check_checkpoint, \
    find_latest_checkpoint
from dist_restore._base import regions as R
from dist_restore._format import manifest as M
from dist_restore._format.dtensor import DLayout, MeshInfo
from dist_restore._planning import reshard as RS
from dist_restore.cli import main as cli_main
from dist_restore.errors import CorruptCheckpointError

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from fuzz import run_cases  # (the kit: fuzz/hostile_cases.py, fuzz/run_cases.py)

pytestmark = pytest.mark.timeout(60)

CASES = ["strided_split_factor", "mesh_layout_1e9", "mesh_zero_size", "layout_shard_dim", "stray_huge_rank",
         "manifest_deep"]
CHILD_TIMEOUT = 25.0
CHILD_MEM = 4 << 30


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """The crafted checkpoints, built by the kit in a process of its own (DTensor files need a
    gloo group)."""
    out = tmp_path_factory.mktemp("hostile_layout")
    listing = out / "cases.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, str(ROOT / "fuzz" / "run_cases.py"), "--build", str(out), str(listing),
                    "--only", *CASES], check=True, cwd=str(ROOT), env=env, timeout=50, capture_output=True)
    built = {c["name"]: c for c in json.loads(listing.read_text())}
    assert not [c for c in built.values() if "error" in c], built
    return built


def _exercise(case: dict[str, Any], label: str) -> dict[str, Any]:
    return next(ex for ex in case["exercises"] if run_cases._ex_label(ex) == label)


# -- in child processes: what once hung or took gigabytes -------------------------------------

@pytest.mark.parametrize("name,label", [
    ("strided_split_factor", "cli inspect"), ("strided_split_factor", "reshard(target)"),
    ("mesh_layout_1e9", "cli inspect"), ("mesh_layout_1e9", "reshard(target)"),
    ("layout_shard_dim", "reshard(target)"),
    ("stray_huge_rank", "restore"), ("stray_huge_rank", "cli verify"), ("stray_huge_rank", "find_latest"),
])
def test_case_in_a_child(cases: dict[str, dict[str, Any]], tmp_path: Path, name: str, label: str) -> None:
    ex = _exercise(cases[name], label)
    r = run_cases.run_child(ex, CHILD_TIMEOUT, CHILD_MEM, tmp_path)
    outcome, detail = run_cases.classify(ex, r, None)
    want = "OK" if label == "find_latest" else "OUR-ERROR"  # find_latest skips it: nothing qualifies
    assert outcome == want, f"{outcome}: {detail}\n{run_cases.where(r)}\n{r.get('stderr', '')[-2000:]}"
    # (the call includes a gloo group's start for a reshard: ~1.5 s; these once ran past 30 s or 3 GiB)
    assert r.get("call_s", 99) < 10.0 and r["peak_rss"] < 1 << 30, (r.get("call_s"), r["peak_rss"])
    if label in ("reshard(target)", "restore"):
        msg = r["msg"]
        assert "CorruptCheckpointError" in msg and "checkpoint_" in msg, msg
        if name != "stray_huge_rank":
            assert "key 'w'" in msg, msg


def test_coordinator_names_the_file_of_a_layout_error(tmp_path: Path) -> None:
    """A LayoutError met while the coordinator plans a reshard (here: a Partial target) is our
    StateDictMismatchError naming the home file, as the reader's is."""
    script = textwrap.dedent(f"""
        import json, sys, torch
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import DTensor, Partial, Shard
        from dist_restore import RestoreCoordinator, RestoreError
        dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
        mesh = init_device_mesh("cpu", (1,))
        torch.save({{"w": DTensor.from_local(torch.arange(8.0), mesh, [Shard(0)])}}, {str(tmp_path)!r} + "/checkpoint_0.pt")
        target = {{"w": DTensor.from_local(torch.zeros(8), mesh, [Partial()])}}
        try:
            RestoreCoordinator().restore({str(tmp_path)!r}, target)
            out = "no error"
        except RestoreError as e:
            out = str(e)
        dist.destroy_process_group()
        print(json.dumps(out))
    """)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=50,
                       env=env, cwd=str(ROOT), check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    msg = json.loads(p.stdout.strip().splitlines()[-1])
    assert "StateDictMismatchError" in msg and "partial value" in msg, msg
    assert "checkpoint_0.pt" in msg, msg


# -- in process: the same files, where nothing can hang ---------------------------------------

@pytest.mark.parametrize("name,why", [
    ("mesh_zero_size", "mode size 0"),
    ("layout_shard_dim", "Shard(dim=5) on mesh dim 0 of a 1-d tensor"),
    ("strided_split_factor", "split factor must be at least 1 and at most the size of dim 0 (8)"),
])
def test_inspect_reports_a_bad_layout_in_one_line(cases: dict[str, dict[str, Any]], name: str, why: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    d = _exercise(cases[name], "cli inspect")["args"][1]
    rc = cli_main(["inspect", d])
    err = capsys.readouterr().err
    assert rc == 1
    lines = [ln for ln in err.splitlines() if ln.startswith("dist-restore: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "rank 0: checkpoint_0.pt: key 'w': DTensor layout not understood" in lines[0] and why in lines[0], err


def test_deep_manifest_is_our_error(cases: dict[str, dict[str, Any]], capsys: pytest.CaptureFixture[str]) -> None:
    d = Path(_exercise(cases["manifest_deep"], "read")["dir"])
    with pytest.raises(CorruptCheckpointError, match="nested too deeply") as info:
        CheckpointReader(RankInfo(0, 1)).read(d)
    assert info.value.file == str(d / M.MANIFEST_NAME)
    with pytest.raises(RestoreError, match=r"CorruptCheckpointError: invalid commit manifest: nested too deeply"):
        RestoreCoordinator().restore(d, None)
    assert find_latest_checkpoint(d.parent) is None
    assert cli_main(["verify", str(d)]) == 1
    assert "dist_restore_manifest.json: manifest: invalid commit manifest: nested too deeply" in capsys.readouterr().out


def test_manifest_size_cap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / M.MANIFEST_NAME).write_text("{" + " " * 200 + "}")
    monkeypatch.setattr(M, "MAX_MANIFEST_BYTES", 100)
    with pytest.raises(CorruptCheckpointError, match="larger than the 100 bytes accepted") as info:
        M.read_manifest(tmp_path)
    assert info.value.file == str(tmp_path / M.MANIFEST_NAME)
    with pytest.raises(CorruptCheckpointError, match="more than the 100 accepted"):
        M.Manifest.from_json("{" + " " * 200 + "}")


# -- stray rank files ---------------------------------------------------------------------------

def _rank_files(d: Path, ranks: list[int]) -> None:
    d.mkdir(exist_ok=True)
    for r in ranks:
        torch.save({"r": r}, d / f"checkpoint_{r}.pt")


def test_rank_number_cap(tmp_path: Path) -> None:
    _rank_files(tmp_path, [0])
    big = tmp_path / f"checkpoint_{M.MAX_RANK_FILES}.pt"
    big.write_bytes(b"")
    for call in (lambda: M.rank_file_count(tmp_path), lambda: check_checkpoint(tmp_path, world_size=None)):
        with pytest.raises(CorruptCheckpointError, match=f"numbered {M.MAX_RANK_FILES}, beyond") as info:
            call()
        assert info.value.file == str(big)
    # the job's world size bounds the work: a stray number is a world size mismatch, as before
    with pytest.raises(M.IncompleteCheckpointError, match=f"ranks up to {M.MAX_RANK_FILES}"):
        check_checkpoint(tmp_path, world_size=1)


def test_missing_ranks_from_gaps(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The highest rank number accepted, beside rank 0 and 5: the missing ranks are told as
    ranges, at once, and verify reports a long gap as one problem."""
    top = M.MAX_RANK_FILES - 1
    _rank_files(tmp_path, [0, 5])
    (tmp_path / f"checkpoint_{top}.pt").write_bytes(b"")
    t0 = time.perf_counter()
    assert M.rank_file_count(tmp_path) == top + 1
    with pytest.raises(M.IncompleteCheckpointError) as info:
        check_checkpoint(tmp_path, world_size=None)
    assert info.value.reason == f"incomplete checkpoint: no commit manifest; ranks 1-4,6-{top - 1} have no file"
    rc = cli_main(["verify", str(tmp_path)])
    out = capsys.readouterr().out
    assert time.perf_counter() - t0 < 2.0
    assert rc == 1
    assert [ln.strip() for ln in out.splitlines() if ": missing:" in ln] == [
        *(f"rank {r}: checkpoint_{r}.pt: missing: rank file not found" for r in range(1, 5)),
        (f"-: -: missing: ranks 6-{top - 1} have no file (checkpoint_6.pt to checkpoint_{top - 1}.pt: "
         f"{top - 6} files)")], out
    assert f"rank {top}: checkpoint_{top}.pt:" in out  # the empty file itself: a parse problem


def test_gaps() -> None:
    assert M._gaps([], 0) == [] and M._gaps([], 3) == [(0, 2)]
    assert M._gaps([0, 1, 2], 3) == [] and M._gaps([1, 4], 6) == [(0, 0), (2, 3), (5, 5)]
    assert M._gaps([0, 9], 5) == [(1, 4)]


# -- the caps, on the layout types and the region math -----------------------------------------

def _mesh(shape: tuple[int, ...] = (2,), coord: tuple[int, ...] | None = (0,)) -> MeshInfo:
    n = 1
    for k in shape:
        n *= k
    return MeshInfo(shape, None, coord, 0, (tuple(range(n)),))


@pytest.mark.parametrize("shape,placements,mesh,why", [
    ((8,), (R.Shard(5),), _mesh(), "Shard(dim=5) on mesh dim 0 of a 1-d tensor"),
    ((8,), (R.Shard(-1),), _mesh(), "of a 1-d tensor"),
    ((8,), (R.Shard(0, 9),), _mesh(), "split factor"),
    ((10**12,), (R.Shard(0, R.MAX_SPLIT_FACTOR + 1),), _mesh(), "split factor"),
    ((8,), (R.Shard(0, -1),), _mesh(), "split factor"),
    ((-1,), (R.Replicate(),), _mesh(), "global shape"),
    ((8,), (R.Replicate(), R.Replicate()), _mesh(), "2 placements on a 1-d mesh"),
    ((8,), (R.Replicate(),), _mesh(coord=(2,)), "coordinate (2,) outside mesh (2,)"),
    ((8,), (R.Replicate(),), _mesh(coord=(0, 0)), "outside mesh"),
])
def test_layout_refused(shape: tuple[int, ...], placements: tuple[Any, ...], mesh: MeshInfo, why: str) -> None:
    with pytest.raises(R.LayoutError, match=why.replace("(", r"\(").replace(")", r"\)")):
        DLayout(shape, placements, mesh)


def test_layout_limits_accepted() -> None:
    DLayout((8,), (R.Shard(0, 8),), _mesh())  # a split factor of the whole dim
    DLayout((0, 3), (R.Shard(0, 10**12),), _mesh())  # nothing to split: any factor
    DLayout((1 << 40,), (R.Shard(0, R.MAX_SPLIT_FACTOR),), _mesh())


@pytest.mark.parametrize("shape,groups,why", [
    ((0,), None, "sizes must be integers >= 1"),
    ((1 << 11, 1 << 10), None, "more than 1048576 ranks"),
    ((2,), ((0, 1, 2),), "not 2 ranks each"),
])
def test_mesh_refused(shape: tuple[int, ...], groups: Any, why: str) -> None:
    with pytest.raises(R.LayoutError, match=why):
        MeshInfo(shape, None, None, None, groups)


@pytest.mark.parametrize("axes,world,why", [
    ([((10**9,), (1,))], 1, "spans more ranks than its rank map's 1"),
    ([((1 << 15,), (1,)), ((1 << 15,), (1 << 15,))], 1 << 16, "spans more ranks"),
    ([((0,), (1,))], 1, "mode size 0"),
    ([((2,), (-1,))], 2, "strides >= 0"),
    ([((3,), (1,))], 4, "not a tiling of 4 ranks"),
    ([(((1,) * 100_000 + (2,)), ((1,) * 100_000 + (1,)))], 2, None),  # many size-1 modes: fine, quickly
])
def test_mesh_groups_checks_before_expanding(axes: Any, world: int, why: str | None) -> None:
    t0 = time.perf_counter()
    if why is None:
        assert R.mesh_groups(axes, tuple(range(world))) == [[0, 1]]
    else:
        with pytest.raises(R.LayoutError, match=why):
            R.mesh_groups(axes, tuple(range(world)))
    assert time.perf_counter() - t0 < 1.0


def test_mesh_groups_rank_map_cap() -> None:
    with pytest.raises(R.LayoutError, match="a rank map of 0 ranks"):
        R.mesh_groups([((1,), (1,))], ())
    with pytest.raises(R.LayoutError, match=f"a rank map of {R.MAX_MESH_RANKS + 1} ranks"):
        R.mesh_groups([((1,), (1,))], range(R.MAX_MESH_RANKS + 1))


def _split_loop(runs: R.DimRuns, k: int, c: int, p: R.Shard) -> R.DimRuns:
    """The split as torch's ``_StridedShard._split_tensor`` describes it, piece by piece."""
    if p.split_factor:
        parts: list[tuple[int, int]] = []
        for j in range(p.split_factor):
            parts.extend(R._chunk(R._chunk(runs, p.split_factor, j), k, c))
        return R._merge(parts)
    return R._chunk(runs, k, c)


def test_split_runs_and_shard_box_match_the_loop() -> None:
    rng = random.Random(23)
    for _ in range(3000):
        n = rng.randint(0, 40)
        runs: R.DimRuns = ((0, n),) if n else ()
        for _ in range(rng.randint(0, 2)):  # runs left by earlier placements
            k = rng.randint(1, 5)
            runs = _split_loop(runs, k, rng.randrange(k), R.Shard(0, rng.choice([0, rng.randint(1, 12)])))
        k = rng.randint(1, 6)
        c, p = rng.randrange(k), R.Shard(0, rng.choice([0, rng.randint(1, 50)]))
        assert R.split_runs(runs, k, c, p) == _split_loop(runs, k, c, p), (runs, k, c, p)
    for _ in range(3000):
        nd, md = rng.randint(1, 3), rng.randint(1, 3)
        shape = tuple(rng.randint(0, 30) for _ in range(nd))
        mesh = tuple(rng.randint(1, 5) for _ in range(md))
        pl = [R.Replicate() if rng.random() < .2 else R.Shard(rng.randrange(nd), rng.choice([0, rng.randint(1, 12)]))
              for _ in range(md)]
        coord = tuple(rng.randrange(k) for k in mesh)
        runs_all = R._shard_runs(shape, mesh, pl, coord)
        want = None if any(len(r) > 1 for r in runs_all) else \
            tuple((r[0][0], r[0][1]) if r else (0, 0) for r in runs_all)
        assert R.shard_box(shape, mesh, pl, coord) == want, (shape, mesh, pl, coord)


def test_region_math_at_the_caps_is_quick() -> None:
    t0 = time.perf_counter()
    n, sf = 1 << 40, R.MAX_SPLIT_FACTOR
    assert R.split_runs(((0, n),), 1, 0, R.Shard(0, sf)) == ((0, n),)  # the pieces join up
    assert R.split_runs(((0, n),), 2, 1, R.Shard(0, n)) == ()  # one element a piece: all at coordinate 0
    layout = DLayout((n,), (R.Shard(0, sf),), _mesh())
    assert layout.box_at((0,)) is None  # not a box, found without listing 65,536 runs
    assert DLayout((8,), (R.Shard(0),), _mesh()).box_at((1,)) == ((4, 4),)
    with pytest.raises(R.LayoutError, match="more than"):  # pieces of 4, two elements of each kept
        R.split_runs(((0, 4 * (R.MAX_RUNS + 1)),), 2, 0, R.Shard(0, R.MAX_RUNS + 1))
    assert time.perf_counter() - t0 < 1.0


def test_plan_runs_cap() -> None:
    """Over all coordinates of a saved mesh, a dimension's runs are capped before memory goes."""
    steps = ((0, 64, R.Shard(0, R.MAX_SPLIT_FACTOR)),)
    t0 = time.perf_counter()
    with pytest.raises(R.LayoutError, match=f"more than {RS.MAX_PLAN_RUNS} pieces"):
        RS._dim_options(1 << 40, steps)
    assert time.perf_counter() - t0 < 5.0
