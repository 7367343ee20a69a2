"""Benchmark ``dist_restore.RestoreCoordinator`` across ranks and shared-entry modes.

Run: ``python benchmarks/bench_coordinator.py [--ranks 2 4 8] [--repeats 3] [--quick] [--markdown] [--writer]``
(``--writer``: the files as ``CheckpointWriter`` writes them, with index files and a manifest).

For each world size and each of two payloads a checkpoint directory (``checkpoint_{rank}.pt``
per rank) is written once to a temporary directory (removed at the end):

* ``large``: 4 shared float32 tensors of 16 MiB (1 MiB with ``--quick``), identical on every rank;
* ``small``: 10,000 shared float32 tensors of 64 elements (2,000 with ``--quick``);

both plus 4 per-rank float32 tensors of 4 MiB (256 KiB with ``--quick``), different on each rank.

One ``run_ranks`` call (spawned processes, gloo on 127.0.0.1) per (world, payload) restores the
checkpoint into preallocated targets (``shared="shared"``) with every mode in ``broadcast``,
``spread``, ``local``, and once more in ``broadcast`` with ``None`` targets for the shared entries
(``broadcast/alloc``: allocated by the restore). All ranks run on one host, so by default shared
buckets go through the owner's memory file; the ``+coll`` modes set ``shared_memory=False`` and
move them by broadcasts (what ranks on different hosts do). One untimed
warm-up per mode (checked against ``torch.load``), then
``--repeats`` rounds, each running every mode once in an order rotated from round to round so that
machine noise hits the modes alike. Each restore starts after a ``dist.barrier()``.

Reported per row (world, payload, mode):

* ``wall``: restore wall time; per round the max over ranks, then the median over rounds;
* ``plan`` / ``read`` / ``exchange`` / ``finish``: ``res.stats.seconds`` phases, same reduction;
* ``read MB``: ``bytes_read`` (from each rank's own file) summed over ranks;
* ``shared MB``: the shared part of it: ``bytes_read`` minus the rank's own (per-rank) bytes;
* ``max recv MB``: the largest ``bytes_received`` of a rank (by collectives: shared tensors +
  control data);
* ``max shm MB``: the largest ``bytes_shm`` of a rank (copied from other ranks' memory files);
* ``coll``: collectives issued per rank (``min-max`` when ranks differ);
* ``1bcast``: in the same processes, a single ``dist.broadcast`` from rank 0 of one flat uint8
  tensor of the total shared bytes (barrier before, max over ranks, median of rounds): the floor
  for moving the shared bytes once;
* ``exch/1bcast``: the ``exchange`` phase over ``1bcast`` for ``broadcast`` and ``spread``
  (target for ``broadcast``, payload ``small``: <= 1.5x).

For the memory-file modes the owners' packing happens in the ``read`` phase (it replaces the
staging of the first bucket), so compare ``read + exch`` too, or ``wall``.

1 MB = 1e6 bytes. Times are in milliseconds. The machine is shared: read the load averages.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout; also makes tests_multiprocess importable

import torch
import torch.distributed as dist

from dist_restore import RestoreCoordinator
from tests_multiprocess.harness import run_ranks

MIB = 1 << 20
#: /alloc: None shared targets; +coll: shared_memory=False (broadcasts, as across hosts)
MODES = ("broadcast", "spread", "local", "broadcast/alloc", "broadcast+coll", "spread+coll",
         "broadcast/alloc+coll")
PHASES = ("plan", "read", "exchange", "finish")


@dataclass(frozen=True)
class Payload:
    """Shape of one benchmark checkpoint."""

    name: str
    n_shared: int
    shared_elems: int  # float32 elements per shared tensor
    n_own: int
    own_elems: int  # float32 elements per per-rank tensor

    @property
    def shared_bytes(self) -> int:
        return self.n_shared * self.shared_elems * 4

    @property
    def own_bytes(self) -> int:
        return self.n_own * self.own_elems * 4


def payloads(quick: bool) -> list[Payload]:
    own = (256 << 10) // 4 if quick else (4 * MIB) // 4
    big = MIB // 4 if quick else (16 * MIB) // 4
    return [Payload("large", 4, big, 4, own), Payload("small", 2_000 if quick else 10_000, 64, 4, own)]


def write_checkpoint(path: Path, world: int, p: Payload, writer: bool = False) -> None:
    """``checkpoint_{r}.pt``: ``{"own": per-rank tensors, "shared": identical tensors, "step"}``.

    ``writer``: as ``CheckpointWriter`` writes them (each rank file with its index file, and a
    commit manifest); else plain ``torch.save`` files."""
    from dist_restore import CheckpointWriter, RankInfo
    from dist_restore._format.indexfile import index_checksum, index_path
    from dist_restore._format.manifest import Manifest, RankFileInfo, file_checksum, write_manifest

    g = torch.Generator().manual_seed(0)
    shared = {f"t{i}": torch.randn(p.shared_elems, generator=g) for i in range(p.n_shared)}
    infos = []
    for r in range(world):
        own = {f"w{i}": torch.full((p.own_elems,), float(r * 10 + i)) for i in range(p.n_own)}
        sd = {"own": own, "shared": shared, "step": 7}
        f = path / f"checkpoint_{r}.pt"
        if not writer:
            torch.save(sd, f)
            continue
        # one process writes every rank's file: each rank's writer alone, then the manifest
        # that a coordinated CheckpointWriter.write would commit
        logging.getLogger("dist_restore.writer").setLevel(logging.ERROR)
        CheckpointWriter(RankInfo(r, world)).write(path, sd)
        idx = index_path(f).read_bytes()
        infos.append(RankFileInfo(r, f.name, f.stat().st_size, file_checksum(f), index_path(f).name, len(idx),
                                  index_checksum(idx)))
    if writer:
        write_manifest(path, Manifest.create(infos))


def _empty_like_tree(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _empty_like_tree(x) for k, x in v.items()}
    return torch.zeros_like(v) if isinstance(v, torch.Tensor) else v


def _leaves(v: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(v, dict):
        return [kv for k, x in v.items() for kv in _leaves(x, f"{prefix}{k}.")]
    return [(prefix, v)]


def _check(got: Any, ref: Any, rank: int, mode: str) -> None:
    for (k, a), (_, b) in zip(_leaves(got), _leaves(ref), strict=True):
        if isinstance(b, torch.Tensor) and not torch.equal(a, b):
            raise AssertionError(f"rank {rank}, mode {mode}: {k!r} differs from torch.load")


def worker(rank: int, world: int, path: str, repeats: int, shared_bytes: int) -> dict[str, Any]:
    """(all ranks) Warm up and check each mode, then time ``repeats`` rotated rounds."""
    ref = torch.load(os.path.join(path, f"checkpoint_{rank}.pt"), mmap=True, weights_only=True)
    target = _empty_like_tree(ref)  # preallocated once, reused by every restore
    coords = {shm: RestoreCoordinator(timeout=120, shared_memory=shm) for shm in (True, False)}

    last: list[Any] = [None]

    def one(mode: str) -> dict[str, Any]:
        tgt = target
        name, coll = mode.removesuffix("+coll"), mode.endswith("+coll")
        if name.endswith("/alloc"):  # the shared entries allocated by the restore
            tgt = {**target, "shared": {k: None for k in target["shared"]}}
        dist.barrier()
        t0 = time.perf_counter()
        res = coords[not coll].restore(path, tgt, shared="shared", shared_mode=name.split("/")[0])
        wall = time.perf_counter() - t0
        last[0] = res.state_dict
        s = res.stats
        return {"wall": wall, **{ph: s.seconds.get(ph, 0.0) for ph in PHASES}, "bytes_read": s.bytes_read,
                "bytes_received": s.bytes_received, "bytes_shm": s.bytes_shm, "collectives": s.collectives}

    for mode in MODES:  # warm-up, and proof that every mode restores the right bytes
        for _, t in _leaves(target):
            if isinstance(t, torch.Tensor):
                t.zero_()
        one(mode)
        _check(last[0], ref, rank, mode)
        last[0] = None
    del ref
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
    for i in range(repeats):
        for j in range(len(MODES)):
            mode = MODES[(i + j) % len(MODES)]
            runs[mode].append(one(mode))
    flat = torch.zeros(shared_bytes, dtype=torch.uint8)
    bcast: list[float] = []
    for i in range(repeats + 1):  # the first is a warm-up
        dist.barrier()
        t0 = time.perf_counter()
        dist.broadcast(flat, src=0)
        if i:
            bcast.append(time.perf_counter() - t0)
    return {"runs": runs, "bcast": bcast}


@dataclass(frozen=True)
class Row:
    world: int
    payload: str
    mode: str
    ms: dict[str, float]  # wall and phases, rank-max then median
    read_mb: float
    shared_mb: float
    max_recv_mb: float
    max_shm_mb: float
    coll: str
    bcast_ms: float
    ratio: float | None


def summarize(world: int, p: Payload, results: list[dict[str, Any]]) -> list[Row]:
    """Reduce per-rank results: per round the max over ranks, then the median over rounds."""
    def med_max(series: list[list[float]]) -> float:
        return statistics.median(max(per_rank) for per_rank in zip(*series)) * 1e3

    bcast = med_max([r["bcast"] for r in results])
    rows = []
    for mode in MODES:
        runs = [r["runs"][mode] for r in results]  # [rank][round]
        ms = {k: med_max([[x[k] for x in rr] for rr in runs]) for k in ("wall", *PHASES)}
        last = [rr[-1] for rr in runs]
        read = sum(x["bytes_read"] for x in last)
        colls = sorted({x["collectives"] for x in last})
        rows.append(Row(world, p.name, mode, ms, read / 1e6, (read - world * p.own_bytes) / 1e6,
                        max(x["bytes_received"] for x in last) / 1e6, max(x["bytes_shm"] for x in last) / 1e6,
                        str(colls[0]) if len(colls) == 1 else f"{colls[0]}-{colls[-1]}", bcast,
                        ms["exchange"] / bcast if mode != "local" and bcast > 0 else None))
    return rows


HEADERS = ["world", "payload", "mode", "wall ms", "plan ms", "read ms", "exch ms", "finish ms",
           "read MB", "shared MB", "max recv MB", "max shm MB", "coll", "1bcast ms", "exch/1bcast"]


def cells(r: Row) -> list[str]:
    return [str(r.world), r.payload, r.mode, *(f"{r.ms[k]:.1f}" for k in ("wall", *PHASES)),
            f"{r.read_mb:.1f}", f"{r.shared_mb:.1f}", f"{r.max_recv_mb:.1f}", f"{r.max_shm_mb:.1f}", r.coll, f"{r.bcast_ms:.1f}",
            "-" if r.ratio is None else f"{r.ratio:.2f}x"]


def render(rows: list[Row], markdown: bool) -> str:
    table = [HEADERS] + [cells(r) for r in rows]
    if markdown:
        lines = ["| " + " | ".join(row) + " |" for row in table]
        lines.insert(1, "|" + "|".join("---" if i < 3 else "---:" for i in range(len(HEADERS))) + "|")
        return "\n".join(lines)
    widths = [max(len(row[i]) for row in table) for i in range(len(HEADERS))]
    fmt = ["{:<%d}" % w if i < 3 else "{:>%d}" % w for i, w in enumerate(widths)]
    return "\n".join("  ".join(f.format(c) for f, c in zip(fmt, row)) for row in table)


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "load average: %.2f, %.2f, %.2f" % os.getloadavg()


def machine() -> str:
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)
    return (f"cpu: {cpu}; cores: {os.cpu_count()} ({len(os.sched_getaffinity(0))} usable); "
            f"ram: {ram:.1f} GiB\ntorch {torch.__version__}, python {platform.python_version()}, "
            f"{platform.platform()}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8], help="world sizes")
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds per mode")
    ap.add_argument("--quick", action="store_true", help="smaller payloads")
    ap.add_argument("--markdown", action="store_true", help="also print a GitHub markdown table")
    ap.add_argument("--writer", action="store_true",
                    help="write the checkpoints as CheckpointWriter does (index files, manifest), not torch.save")
    args = ap.parse_args(argv)
    if args.repeats < 1 or any(w < 2 for w in args.ranks):
        ap.error("--repeats must be >= 1 and every --ranks value >= 2")
    print(machine())
    print(f"start: {_uptime()}")
    print(f"command: {' '.join([os.path.basename(sys.executable), *sys.argv])}", flush=True)
    rows: list[Row] = []
    t_all = time.perf_counter()
    for world in args.ranks:
        for p in payloads(args.quick):
            tmp = Path(tempfile.mkdtemp(prefix="bench_coord_"))
            try:
                t0 = time.perf_counter()
                write_checkpoint(tmp, world, p, args.writer)
                t1 = time.perf_counter()
                results = run_ranks(worker, world, args=(str(tmp), args.repeats, p.shared_bytes),
                                    timeout=1200, pg_timeout=300)
                new = summarize(world, p, results)
                rows += new
                print(f"[world {world}, {p.name}: shared {p.shared_bytes / 1e6:.1f} MB in {p.n_shared} "
                      f"tensors, own {p.own_bytes / 1e6:.1f} MB/rank; write {t1 - t0:.1f}s, "
                      f"ranks {time.perf_counter() - t1:.1f}s]", flush=True)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    print()
    print(render(rows, markdown=False))
    if args.markdown:
        print()
        print(render(rows, markdown=True))
    print()
    print(f"end: {_uptime()}  (total {time.perf_counter() - t_all:.0f}s, {args.repeats} rounds/mode)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
