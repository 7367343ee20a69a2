"""Planning a resharding restore at scale: one rank's whole plan phase against the number of saving ranks.

Run: ``python benchmarks/bench_plan_scale.py [--entries 10000] [--saved 64,256,1024,4096] [--target 512]``.

Workload: an FSDP2 checkpoint of ``--entries`` DTensor entries (``Shard(0)`` on a 1-D mesh of
``N`` saving ranks; ``2 max(N, target)`` rows of 8 float32), written by ``torch.save`` as real
DTensors whose DeviceMesh records all ``N`` ranks (made in one process: the mesh is built with
each saving rank's identity in turn, no process group of ``N`` ranks). Only the files the
measured rank needs are written with data (rank 0's, which plans the layout when the world size
changed, and those holding its rows); the other ``N`` rank files are empty placeholders, never
opened. The measured rank is rank 1 of a ``--target``-rank job whose targets are DTensors
``Shard(0)`` on a 1-D mesh.

Timed (median of ``--repeats``, after one warm-up): what the coordinator's plan phase does on that
rank before its agreement, with the same functions: index rank 0's file (zip directory and the
restricted unpickler), match the target (``plan_read``), and plan every entry's shard
(``plan_shards``: the saving mesh's holders of its region, the boxes, indexing the other files it
needs and checking their entries). Reported per ``N``: seconds, microseconds per entry, and the
part that is indexing. The goal (issue #20): <= 0.2 s at 1,024 saving ranks, flat in ``N``.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from _common import print_table  # noqa: E402

ROWS, COLS = 2, 8  # each saving rank's local shard of every entry


def _mesh(n: int, rank: int) -> Any:
    """A 1-D DeviceMesh of ``n`` ranks as rank ``rank`` sees it (no process groups made)."""
    import torch.distributed.device_mesh as dm

    real = dm.get_rank
    dm.get_rank = lambda *a, **k: rank  # type: ignore[assignment]
    try:
        return dm.DeviceMesh("cpu", torch.arange(n), _init_backend=False)
    finally:
        dm.get_rank = real  # type: ignore[assignment]


def _dtensors(n: int, rank: int, entries: int, rows: int, local: int | None = None) -> dict[str, Any]:
    from torch.distributed.tensor import DTensor, Shard

    mesh = _mesh(n, rank)
    assert mesh.get_coordinate() == (rank,)
    local_rows = rows // n if local is None else local
    out = {}
    for i in range(entries):
        t = torch.full((local_rows, COLS), float(rank))
        out[f"layers.{i}.w"] = DTensor.from_local(t, mesh, [Shard(0)], run_check=False, shape=(rows, COLS),
                                                  stride=(COLS, 1))
    return out


def write(root: Path, n: int, target: int, me: int, entries: int, index_files: bool) -> Path:
    from dist_restore._format.index import read_index
    from dist_restore._format.indexfile import build_index_file, index_path

    d = root / f"saved{n}{'i' if index_files else ''}"
    d.mkdir()
    rows = ROWS * max(n, target)
    per = rows // target  # the measured rank's rows: [me * per, (me + 1) * per)
    held = rows // n  # rows per saving rank
    need = {0} | set(range(me * per // held, -(-(me + 1) * per // held)))
    for r in range(n):
        f = d / f"checkpoint_{r}.pt"
        if r in need:
            torch.save({"model": _dtensors(n, r, entries, rows)}, f)
            if index_files:  # what CheckpointWriter writes beside each rank file
                index_path(f).write_bytes(build_index_file(read_index(f, use_index_file=False)))
        else:
            f.touch()
    return d


def plan_once(d: Path, n: int, target_sd: dict[str, Any], me: int) -> tuple[float, float]:
    """``(plan seconds, of which indexing)`` of one rank's plan, as the coordinator runs it."""
    from dist_restore._format.index import read_index

    indexing = 0.0

    def index(f: int) -> Any:
        nonlocal indexing
        t = time.perf_counter()
        ix = read_index(d / f"checkpoint_{f}.pt")
        ix.walkable  # noqa: B018 - the tree, as the plan needs it
        indexing += time.perf_counter() - t
        return ix

    from dist_restore._gc import paused

    with paused():  # as the coordinator plans: no cyclic GC over the plan's objects
        return _plan(d, n, target_sd, me, index, lambda: indexing)


def _plan(d: Path, n: int, target_sd: dict[str, Any], me: int, index: Any, indexing: Any) -> tuple[float, float]:
    from dist_restore._planning.plan import plan_read
    from dist_restore._planning.reshard import plan_shards, split_leaves

    t0 = time.perf_counter()
    home = index(0)
    plan = plan_read(target_sd, *home.walkable)
    _plain, reshard = split_leaves(plan.leaves)
    shards = plan_shards(reshard, home=0, home_index=home, own=me if me < n else None, nfiles=n,
                         open_index=index, spread=me)
    assert len(shards.jobs) == len(target_sd["model"])
    return time.perf_counter() - t0, indexing()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--entries", type=int, default=10_000)
    ap.add_argument("--saved", default="64,256,1024,4096")
    ap.add_argument("--target", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--index-files", choices=["no", "yes", "both"], default="both",
                    help="index files beside the rank files (as CheckpointWriter writes them)")
    args = ap.parse_args()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    dist.init_process_group("gloo", rank=0, world_size=1)  # DTensor.from_local needs one
    me = 1
    print(f"# bench_plan_scale: {args.entries} FSDP2 entries, restored on rank {me} of {args.target}; "
          f"{platform.node()}, {os.cpu_count()} cpus, torch {torch.__version__}, load avg {os.getloadavg()[0]:.2f}")
    rows = []
    root = Path(tempfile.mkdtemp(prefix="bench_plan_scale_"))
    try:
        kinds = {"no": [False], "yes": [True], "both": [False, True]}[args.index_files]
        for n, idx_files in [(int(x), k) for x in args.saved.split(",") for k in kinds]:
            d = write(root, n, args.target, me, args.entries, idx_files)
            files = sum(1 for f in d.glob("checkpoint_*.pt") if f.stat().st_size)
            target = {"model": _dtensors(args.target, me, args.entries, ROWS * max(n, args.target))}
            plan_once(d, n, target, me)  # warm-up
            got = [plan_once(d, n, target, me) for _ in range(args.repeats)]
            sec = statistics.median(s for s, _i in got)
            idx = statistics.median(i for _s, i in got)
            rows.append((n, "index files" if idx_files else "torch.save pickle", files, sec,
                         sec / args.entries * 1e6, idx))
            shutil.rmtree(d)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        dist.destroy_process_group()
    head = ("saved ranks", "indexed from", "files indexed", "plan s", "us / entry", "indexing s")
    table = [(str(n), k, str(f), f"{s:.3f}", f"{u:.1f}", f"{i:.3f}") for n, k, f, s, u, i in rows]
    print_table(head, table, args.markdown)


if __name__ == "__main__":
    main()
