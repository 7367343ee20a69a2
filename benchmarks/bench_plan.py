"""Split the coordinator's ``plan`` phase into indexing and the rest (a profiling aid).

Run: ``python benchmarks/bench_plan.py [--ranks 2] [--repeats 7] [--mode broadcast] [--cprofile]``.

Writes the ``small`` payload of ``bench_coordinator.py`` (10,000 shared float32 tensors of 64
elements, 4 per-rank tensors of 4 MiB; ``--quick``: 2,000 and 256 KiB), then restores it
``--repeats`` times (after one warm-up) into preallocated targets with ``shared="shared"`` in
one ``--mode`` (``+coll``: ``shared_memory=False``), a ``dist.barrier()`` before each. Per
restore and rank it records, by wrapping the coordinator's private methods in the benchmark
process only:

* ``plan``: ``res.stats.seconds["plan"]`` (wall);
* ``index``: wall seconds in ``RestoreCoordinator._open`` (zip directory + restricted unpickle);
* ``plan-index``: their difference: the coordinator's own work, collectives, and the wait
  for the slowest rank;
* ``own cpu``: CPU seconds (``time.process_time``) of ``_plan`` minus ``_open``, plus
  ``_canonical_shared``: this rank's own work without the waits (robust to a loaded machine).

Printed per column: per round the max over ranks, then the median over rounds, in ms.
``--cprofile`` prints rank 0's profile of one more restore (``cumulative`` and ``tottime``).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout; also makes tests_multiprocess importable
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch
import torch.distributed as dist

from bench_coordinator import _empty_like_tree, _uptime, machine, payloads, write_checkpoint
from dist_restore import RestoreCoordinator
from tests_multiprocess.harness import run_ranks

COLUMNS = ("plan", "index", "plan-index", "own cpu")


def _instrument(acc: dict[str, float]) -> None:
    """Wrap ``_open`` / ``_plan`` / ``_canonical_shared`` of this process's class to fill ``acc``."""
    def wrap(name: str) -> None:
        orig = getattr(RestoreCoordinator, name)

        def timed(self: Any, *a: Any, **k: Any) -> Any:
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                return orig(self, *a, **k)
            finally:
                cpu = time.process_time() - c0
                acc["own cpu"] += -cpu if name == "_open" else cpu
                if name == "_open":
                    acc["index"] += time.perf_counter() - t0

        setattr(RestoreCoordinator, name, timed)

    for name in ("_open", "_plan", "_canonical_shared"):
        wrap(name)


def worker(rank: int, world: int, path: str, mode: str, repeats: int, profile: bool) -> dict[str, Any]:
    """(all ranks) One warm-up, then ``repeats`` timed restores; optionally one profiled."""
    ref = torch.load(os.path.join(path, f"checkpoint_{rank}.pt"), mmap=True, weights_only=True)
    target = _empty_like_tree(ref)
    del ref
    coord = RestoreCoordinator(timeout=120, shared_memory=not mode.endswith("+coll"))
    name = mode.removesuffix("+coll")
    acc = {"index": 0.0, "own cpu": 0.0}
    _instrument(acc)
    rows: dict[str, list[float]] = {c: [] for c in COLUMNS}
    for i in range(repeats + 1):
        acc["index"] = acc["own cpu"] = 0.0
        dist.barrier()
        plan = coord.restore(path, target, shared="shared", shared_mode=name).stats.seconds["plan"]
        if i:
            for c, v in zip(COLUMNS, (plan, acc["index"], plan - acc["index"], acc["own cpu"])):
                rows[c].append(v)
    out: dict[str, Any] = {"rows": rows}
    if profile:
        pr = cProfile.Profile()
        dist.barrier()
        pr.enable()
        coord.restore(path, target, shared="shared", shared_mode=name)
        pr.disable()
        if rank == 0:
            texts = []
            for order in ("cumulative", "tottime"):
                s = io.StringIO()
                pstats.Stats(pr, stream=s).sort_stats(order).print_stats(30)
                texts.append(s.getvalue())
            out["profile"] = "\n".join(texts)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--ranks", type=int, default=2, help="world size")
    ap.add_argument("--repeats", type=int, default=7, help="timed restores")
    ap.add_argument("--mode", default="broadcast",
                    choices=["broadcast", "spread", "local", "broadcast+coll", "spread+coll"])
    ap.add_argument("--quick", action="store_true", help="smaller payload")
    ap.add_argument("--cprofile", action="store_true", help="print rank 0's profile of one more restore")
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.ranks < 2:
        ap.error("--repeats must be >= 1 and --ranks >= 2")
    print(machine())
    print(f"start: {_uptime()}")
    print(f"command: {' '.join([os.path.basename(sys.executable), *sys.argv])}", flush=True)
    p = next(x for x in payloads(args.quick) if x.name == "small")
    tmp = Path(tempfile.mkdtemp(prefix="bench_plan_"))
    try:
        write_checkpoint(tmp, args.ranks, p)
        results = run_ranks(worker, args.ranks, args=(str(tmp), args.mode, args.repeats, args.cprofile),
                            timeout=1200, pg_timeout=300)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ms = {c: statistics.median(max(per_rank) for per_rank in zip(*(r["rows"][c] for r in results))) * 1e3
          for c in COLUMNS}
    print(f"\nworld {args.ranks}, {p.n_shared} shared tensors, mode {args.mode}, {args.repeats} rounds "
          "(per round max over ranks, median of rounds, ms)")
    print("  ".join(f"{c:>10}" for c in COLUMNS))
    print("  ".join(f"{ms[c]:>10.1f}" for c in COLUMNS))
    print(f"end: {_uptime()}")
    if args.cprofile:
        print("\nrank 0, one restore under cProfile:\n" + results[0]["profile"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
