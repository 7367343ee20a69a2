"""Benchmark resharding restores of FSDP2 (+TP) model and AdamW state against DCP and naive loads.

Run: ``python benchmarks/bench_reshard.py [--mb 500] [--repeats 3] [--cold] [--markdown]``.

Workload: an MLP of ``--layers`` square ``Linear`` layers (no bias) sized so that model +
AdamW state (3 floats per parameter) is about ``--mb`` MB, trained one step, its
``{"model": model.state_dict(), "optim": opt.state_dict()}`` saved

* with ``torch.save`` per rank (``checkpoint_{rank}.pt``: our format), and
* with ``dcp.save`` (DCP's format), from the same ranks,

then restored on another world size into a freshly built model's and optimizer's own state
dicts (DTensor targets), in three ways:

* ``dist_restore``: ``RestoreCoordinator.restore``;
* ``dcp``: ``torch.distributed.checkpoint.load`` (DCP reshards its own format);
* ``dist_restore verify=none``: the same without the CRC32 check of whole records (DCP and
  the naive ways check nothing);
* ``naive``: ``torch.load`` (whole, ``weights_only=True``) of every file the rank needs (the
  files dist_restore's plan names; planned beforehand, untimed), then each shard's slices
  copied out;
* ``naive mmap``: the same with ``torch.load(mmap=True)``: only the pages the slices touch are
  read;

and two limits that fill no target: ``floor: pread`` (one plain ``preadv`` of each byte range
the plan reads, into one paged-in buffer, on the rank's own thread) and ``floor: pread+crc32``
(the same plus the CRC32 of each range, as the reader checks whole records, with the same CRC32
implementation: ``DIST_RESTORE_CRC=isal`` makes both use isal instead of libdeflate).

Scenarios: FSDP2 on 4 ranks -> 2, FSDP2+TP (2-D mesh dp=2 x tp=2, ``_StridedShard``) on 4 -> FSDP2
on 2, FSDP2 on 2 -> 4. Per method: one untimed warm-up (checked bit-exact against the values
saved), then ``--repeats`` rounds in rotated order, each after a barrier; ``--cold`` drops the page
cache of every checkpoint file (``posix_fadvise(DONTNEED)``, no root needed) before each round.

Reported per (scenario, method): ``wall`` = the slowest rank's time, median over rounds;
``read/shard`` = the largest over ranks of bytes read from files (``bytes_read``; for naive the
sizes of the files loaded; for DCP not measured) over the rank's shard bytes;
``x dcp`` = wall over DCP's wall (goal: <= 0.5x); ``x naive`` likewise; ``peak RSS MiB`` = the
largest over ranks of the peak RSS growth during the (untimed, first) restore, beyond the
preallocated targets (``VmHWM`` after resetting it through ``/proc/self/clear_refs``).
1 MB = 1e6 bytes. The machine is shared: read the load averages.
"""

from __future__ import annotations

import argparse
import mmap
import os
import platform
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from _common import drop_cache, print_table, reset_peak, status, timed_rounds  # noqa: E402
from tests_multiprocess.harness import run_ranks  # noqa: E402

METHODS = ("dist_restore", "dist_restore verify=none", "dcp", "naive", "naive mmap", "floor: pread", "floor: pread+crc32")
NOT_RESTORES = ("floor: pread", "floor: pread+crc32")  # limits: they fill no target


def build(kind: str, world: int, layers: int, width: int, seed: int) -> tuple[Any, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    torch.manual_seed(seed)
    with torch.device("meta"):
        m = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)])
    if kind == "fsdp_tp":
        mesh = init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("dp", "tp"))
        parallelize_module(m, mesh["tp"], {str(i): ColwiseParallel() if i % 2 == 0 else RowwiseParallel()
                                           for i in range(layers)})
        dp = mesh["dp"]
    else:
        dp = init_device_mesh("cpu", (world,), mesh_dim_names=("dp",))
    for layer in m:
        fully_shard(layer, mesh=dp)
    fully_shard(m, mesh=dp)
    m.to_empty(device="cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            local = p.to_local()
            local.copy_(torch.randn(local.shape, generator=g))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    for p in m.parameters():  # a step's state without a forward pass: grads of ones
        p.grad = torch.ones_like(p)
    opt.step()
    opt.zero_grad()
    return m, opt


def _sd(m: Any, opt: Any) -> dict[str, Any]:
    return {"model": m.state_dict(), "optim": opt.state_dict()}


def _leaves(sd: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(sd, dict):
        return [kv for k, v in sd.items() for kv in _leaves(v, f"{prefix}{k}.")]
    return [(prefix, sd)]


def save_worker(rank: int, world: int, root: str, kind: str, layers: int, width: int) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp

    m, opt = build(kind, world, layers, width, seed=1)
    sd = _sd(m, opt)
    ours = Path(root) / "ours"
    ours.mkdir(parents=True, exist_ok=True)
    torch.save(sd, ours / f"checkpoint_{rank}.pt")
    dcp.save(sd, checkpoint_id=str(Path(root) / "dcp"))
    full = {k: v.full_tensor() for k, v in _leaves(sd) if hasattr(v, "full_tensor")}
    if rank == 0:
        torch.save(full, Path(root) / "full.pt")
    dist.barrier()
    return {}


def restore_worker(rank: int, world: int, root: str, kind: str, layers: int, width: int, repeats: int,
                   cold: bool) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp

    from dist_restore import RestoreCoordinator
    from dist_restore._planning.reshard import plan_shards, split_leaves  # noqa: F401 - the naive path's files
    from dist_restore._bytes.slices import copy_boxes

    m, opt = build(kind, world, layers, width, seed=2)
    sd = _sd(m, opt)
    shard_bytes = sum(v.to_local().numel() * v.element_size() for _k, v in _leaves(sd) if hasattr(v, "to_local"))
    coord = RestoreCoordinator(timeout=600)
    ours = Path(root) / "ours"

    coord_nocrc = RestoreCoordinator(timeout=600, verify="none")

    def run_ours() -> int:
        return coord.restore(ours, sd).stats.bytes_read

    def run_ours_nocrc() -> int:
        return coord_nocrc.restore(ours, sd).stats.bytes_read

    plan_files: list[int] = []

    def run_dcp() -> int:
        dcp.load(sd, checkpoint_id=str(Path(root) / "dcp"))
        return 0

    def naive(mapped: bool) -> None:
        """``torch.load`` every file the plan names (whole, or mapped), then copy each shard's boxes."""
        from torch.distributed.tensor.placement_types import _StridedShard

        with torch.serialization.safe_globals([_StridedShard]):  # torch < 2.12 does not allow it
            loaded = {f: torch.load(ours / f"checkpoint_{f}.pt", weights_only=True, map_location="cpu", mmap=mapped)
                      for f in plan_files}
        with torch.no_grad():
            for job in naive_jobs:
                for piece in job.pieces:
                    v: Any = loaded[piece.file]
                    for p in job.path:
                        v = v[p]
                    copy_boxes(v.to_local() if hasattr(v, "to_local") else v, job.target, piece.boxes)

    def run_naive() -> int:
        naive(mapped=False)
        return sum(os.path.getsize(ours / f"checkpoint_{f}.pt") for f in plan_files)

    def run_naive_mmap() -> int:  # only the pages the slices touch are read
        naive(mapped=True)
        return shard_bytes

    def floor(crc: bool) -> int:
        """The limit: one plain ``preadv`` per byte range the plan reads (its records' spans,
        in file order, one file after another) into one buffer of the rank's shard bytes, on
        the rank's own thread; with ``crc`` the zip's CRC32 of each range as well (8 MiB steps,
        as the reader takes it)."""
        import ctypes

        from dist_restore._base.crc import crc32_at

        at = 0
        for f, spans in floor_spans.items():
            fd = os.open(ours / f"checkpoint_{f}.pt", os.O_RDONLY)
            try:
                for off, n in spans:
                    for lo in range(0, n, 8 << 20):
                        m = min(8 << 20, n - lo)
                        addr = scratch.data_ptr() + at
                        got = os.preadv(fd, [(ctypes.c_char * m).from_address(addr)], off + lo)
                        assert got == m
                        if crc:
                            crc32_at(addr, m)
                        at += m
            finally:
                os.close(fd)
        return at

    # the files and boxes dist_restore's plan picks; the naive way loads those files whole
    from dist_restore._format.index import read_index
    from dist_restore._planning.plan import plan_read

    nfiles = len(list(ours.glob("checkpoint_*.pt")))
    home = rank if nfiles == world else 0
    index = read_index(ours / f"checkpoint_{home}.pt")
    _plain, reshard = split_leaves(plan_read(sd, index.tree).leaves)
    shards = plan_shards(reshard, home=home, home_index=index, own=rank if rank < nfiles else None,
                         nfiles=nfiles, open_index=lambda f: read_index(ours / f"checkpoint_{f}.pt"), spread=rank)
    naive_jobs = shards.jobs
    plan_files.extend(sorted({p.file for j in naive_jobs for p in j.pieces}))
    from dist_restore._bytes.slices import _span_bytes

    floor_spans: dict[int, list[tuple[int, int]]] = {}
    for f in plan_files:  # each piece's byte span of its record, in file order
        idx = shards.indexes[f]
        spans = []
        with open(idx.file, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            for job in naive_jobs:
                for piece in job.pieces:
                    if piece.file == f:
                        ref = shards.entries[(f, job.key)]
                        lo, hi = _span_bytes(ref, piece.boxes)
                        spans.append((idx.data_offset(ref.storage.key, mm) + lo, hi - lo))
        floor_spans[f] = sorted(spans)
    scratch = torch.ones(sum(n for v in floor_spans.values() for _o, n in v), dtype=torch.uint8)  # paged in

    import torch.distributed.tensor as _dtensor  # noqa: F401 - torch.load of DTensors needs it

    full = torch.load(Path(root) / "full.pt", weights_only=True)
    runs = {"dist_restore": run_ours, "dist_restore verify=none": run_ours_nocrc, "dcp": run_dcp,
            "naive": run_naive, "naive mmap": run_naive_mmap, "floor: pread": lambda: floor(False),
            "floor: pread+crc32": lambda: floor(True)}
    out: dict[str, Any] = {"shard_bytes": shard_bytes}
    out["dcp_peak"] = out["naive_peak"] = out["dist_restore_peak"] = 0
    for name, fn in runs.items():  # warm-up, checked; its peak RSS beyond the targets
        with torch.no_grad():
            for _k, v in _leaves(sd):
                if hasattr(v, "to_local"):
                    v.to_local().zero_()
        base = reset_peak()
        fn()
        out[f"{name}_peak"] = status("VmHWM") - base
        for k, v in _leaves(sd):
            if name in NOT_RESTORES:
                break
            if hasattr(v, "full_tensor") and not torch.equal(v.full_tensor(), full[k]):
                raise AssertionError(f"{name}: {k} differs from the values saved")
        out[name] = []
    timed_rounds(runs, METHODS, repeats, out, before=(lambda: drop_cache(p for p in Path(root).rglob("*") if p.is_file())) if cold and rank == 0 else None)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=float, default=500.0, help="model + AdamW state, MB (default 500)")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cold", action="store_true", help="drop the page cache before every timed run")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    width = int((args.mb * 1e6 / (3 * 4 * args.layers)) ** 0.5) // 4 * 4
    scenarios = [("fsdp", 4, "fsdp", 2), ("fsdp_tp", 4, "fsdp", 2), ("fsdp", 2, "fsdp", 4)]
    print(f"# bench_reshard: {args.layers} x Linear({width}, {width}) + AdamW = "
          f"{3 * 4 * args.layers * width * width / 1e6:.0f} MB; {'cold' if args.cold else 'warm'}; "
          f"repeats {args.repeats}; {platform.node()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
          f"load avg {os.getloadavg()[0]:.2f}")
    rows = []
    for skind, sworld, dkind, dworld in scenarios:
        root = Path(tempfile.mkdtemp(prefix="bench_reshard_"))
        try:
            run_ranks(save_worker, sworld, args=(str(root), skind, args.layers, width), timeout=1200,
                      pg_timeout=600)
            out = run_ranks(restore_worker, dworld, args=(str(root), dkind, args.layers, width, args.repeats,
                                                           args.cold), timeout=3000, pg_timeout=600)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        walls = {name: statistics.median(max(o[name][i][0] for o in out) for i in range(args.repeats))
                 for name in METHODS}
        for name in METHODS:
            ratio = max(max(b for _t, b in o[name]) / o["shard_bytes"] for o in out)
            peak = max(o[f"{name}_peak"] for o in out) / 2**20
            rows.append((f"{skind}@{sworld} -> {dkind}@{dworld}", name, walls[name],
                         ratio if name != "dcp" else None, walls[name] / walls["dcp"], walls[name] / walls["naive"],
                         peak))
    head = ("scenario", "method", "wall s", "read/shard", "x dcp", "x naive", "peak RSS MiB")
    fmt = [lambda v: v, lambda v: v, lambda v: f"{v:.3f}", lambda v: "-" if v is None else f"{v:.2f}",
           lambda v: f"{v:.2f}", lambda v: f"{v:.2f}", lambda v: f"{v:.0f}"]
    print_table(head, [[f(v) for f, v in zip(fmt, r)] for r in rows], args.markdown)
    print(f"load avg after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
