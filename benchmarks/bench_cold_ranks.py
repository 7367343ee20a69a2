"""Cold restores of many ranks on one node: 8 processes each reading its own cold file vs one
process reading all 8 files (issue #14, item 2).

Run: ``python benchmarks/bench_cold_ranks.py [--ranks 8] [--mib-per-rank 128] [--repeats 3]``.

Writes ``checkpoint_{r}.pt`` (``--mib-per-rank`` MiB of float32 in 50 tensors each) to a temporary
directory, fsyncs them, then per round, with every file's pages dropped from the page cache
(``posix_fadvise(POSIX_FADV_DONTNEED)``) before each case:
  * one process restores all files one after the other (``CheckpointReader`` with each file's rank);
  * ``--ranks`` spawned processes (gloo, ``tests_multiprocess/harness.py: run_ranks``) each restore
    their own file between two barriers; the time is rank 0's from barrier to barrier, and each
    rank also times a barrier issued right after its own read (a rank's I/O must not starve the
    collectives of the others).
Prints the medians, aggregate GB/s and the ratio. Target: N ranks' aggregate >= one process's.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from dist_restore import CheckpointReader, RankInfo
from tests_multiprocess.harness import run_ranks

N_TENSORS = 50


def drop_all(d: Path) -> None:
    for f in d.glob("checkpoint_*.pt"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def targets_for(numel: int) -> dict[str, torch.Tensor]:
    return {f"t{i}": torch.ones(numel) for i in range(N_TENSORS)}


def rank_worker(rank: int, world: int, d: str, numel: int) -> tuple[float, float]:
    """(all ranks) Restore this rank's file between barriers; (seconds, post-read barrier seconds)."""
    import torch.distributed as dist

    targets = targets_for(numel)
    reader = CheckpointReader(RankInfo(rank, world))
    dist.barrier()
    t0 = time.perf_counter()
    reader.read(d, targets)
    t1 = time.perf_counter()
    dist.barrier()
    t2 = time.perf_counter()
    return t2 - t0, t2 - t1


def one_process(d: Path, world: int, numel: int) -> float:
    targets = [targets_for(numel) for _ in range(world)]
    t0 = time.perf_counter()
    for r in range(world):
        CheckpointReader(RankInfo(r, world)).read(d, targets[r])
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--ranks", type=int, default=8)
    p.add_argument("--mib-per-rank", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    numel = a.mib_per_rank * (1 << 20) // N_TENSORS // 4
    d = Path(tempfile.mkdtemp(prefix="bench_cold_ranks_"))
    try:
        for r in range(a.ranks):
            f = d / f"checkpoint_{r}.pt"
            torch.save({f"t{i}": torch.empty(numel).uniform_() for i in range(N_TENSORS)}, f)
            fd = os.open(f, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        total = a.ranks * N_TENSORS * numel * 4
        single, multi, barrier = [], [], []
        for rnd in range(a.repeats):
            for case in (("one", "ranks") if rnd % 2 == 0 else ("ranks", "one")):
                drop_all(d)
                if case == "one":
                    single.append(one_process(d, a.ranks, numel))
                else:
                    out = run_ranks(rank_worker, a.ranks, args=(str(d), numel), timeout=600, pg_timeout=300)
                    multi.append(out[0][0])
                    barrier.append(max(b for _, b in out))
        s, m = statistics.median(single), statistics.median(multi)
        print(f"{a.ranks} files x {a.mib_per_rank} MiB, cold, medians of {a.repeats}:")
        print(f"  one process, files in turn: {s:.3f} s ({total / s / 1e9:.2f} GB/s)  runs {[round(x, 2) for x in single]}")
        print(f"  {a.ranks} ranks, own file each: {m:.3f} s ({total / m / 1e9:.2f} GB/s)  runs {[round(x, 2) for x in multi]}")
        print(f"  longest wait at the barrier after a rank's own read: {max(barrier):.3f} s")
        print(f"  ranks / one process (time): {m / s:.2f}x  -> {'PASS' if m <= s else 'FAIL'} (target <= 1.0x)")
    finally:
        shutil.rmtree(d, ignore_errors=True)
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
