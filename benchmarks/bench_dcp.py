"""Benchmark restores of DCP checkpoints (``torch.distributed.checkpoint.save``) of FSDP2 model and
AdamW state: dist_restore against ``dcp.load`` and a plain ``pread`` floor.

Run: ``python benchmarks/bench_dcp.py [--mb 500] [--repeats 3] [--cold] [--markdown]``.

Workload: the MLP of :mod:`bench_reshard` (``--layers`` square ``Linear`` layers, no bias,
FSDP2 on a 1-D CPU mesh) sized so that model + AdamW state (3 floats per parameter) is about
``--mb`` MB, one optimizer step taken; its state taken the torchtitan way,
``msd, osd = get_state_dict(model, opt)``, and saved with ``dcp.save({"model": msd, "optim":
osd})`` on 2 ranks and on 4 ranks. Each checkpoint is restored into a freshly built model's and
optimizer's ``get_state_dict`` (DTensor targets, the saved step counters and ``param_groups``)
in three ways:

* ``dist_restore``: ``RestoreCoordinator.restore`` (reads the DCP metadata, each chunk's item
  framing, then only the byte ranges of the records the rank's shards need; CRC32 of the
  records read whole);
* ``dist_restore verify=none``: the same without the CRC32 check;
* ``dcp``: ``torch.distributed.checkpoint.load`` of the same checkpoint into the same kind of
  target;

and a limit that fills no target: ``floor: pread`` (one plain ``preadv`` of each byte range the
rank needs, in 8 MiB steps, into one paged-in buffer, on the rank's own thread). The ranges are
taken from dist_restore's plan (``plan_source``: each job's located chunks and boxes, turned into
runs by ``box_runs``; adjacent runs merged), planned beforehand and untimed; tensors only (the
few small non-tensor items are left out).

Scenarios: 2 -> 2, 2 -> 4 (grow: every rank needs half of one saved chunk), 4 -> 2. Per method:
one untimed warm-up after zeroing every target tensor, checked bit-exact against the values
saved (every tensor leaf, ``full_tensor()`` of the DTensors; the non-tensor leaves compared with
``==``), then ``--repeats`` rounds in rotated order, each after a barrier; ``--cold`` drops the
page cache of every checkpoint file (``.metadata`` too; ``posix_fadvise(DONTNEED)``) before each
timed run.

Reported per (scenario, method): ``wall`` = the slowest rank's time, median over rounds;
``spread`` = (slowest - fastest round) / median, of those times;
``read/shard`` = the largest over ranks of the bytes read from files over the rank's shard bytes
(the local bytes of its target tensors): dist_restore's ``stats.bytes_read``; for ``dcp`` what
``FileSystemReader`` reads, computed: the whole item (``_StorageInfo.length``) of every read
item of ``DefaultLoadPlanner``'s local plan on the same target, i.e. of every chunk that
overlaps one of the rank's shards, and every non-tensor item; for the floor its ranges.
``x dcp`` = wall over DCP's wall (goal: <= 0.5x); ``x floor`` = wall over the floor's;
``peak RSS MiB`` = the largest over ranks of the peak RSS growth during the (untimed, first)
run beyond the preallocated targets. 1 MB = 1e6 bytes. The machine is shared: read the load
averages.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import platform
import shutil
import statistics
import subprocess
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
from bench_reshard import build  # noqa: E402
from tests_multiprocess.harness import run_ranks  # noqa: E402

METHODS = ("dist_restore", "dist_restore verify=none", "dcp", "floor: pread")
NOT_RESTORES = ("floor: pread",)  # a limit: it fills no target
_STEP = 8 << 20  # bytes per preadv of the floor (as the reader takes parts)


def _state(m: Any, opt: Any) -> dict[str, Any]:
    """What torchtitan saves: ``get_state_dict`` of the model and optimizer (optimizer state
    keyed by parameter FQN)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(m, opt)
    return {"model": msd, "optim": osd}


def _flat(sd: dict[str, Any]) -> dict[str, Any]:
    """Leaves keyed as DCP keys them (its own flattening)."""
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict

    return flatten_state_dict(sd)[0]


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def save_worker(rank: int, world: int, root: str, layers: int, width: int) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp

    m, opt = build("fsdp", world, layers, width, seed=1)
    sd = _state(m, opt)
    dcp.save(sd, checkpoint_id=str(Path(root) / "dcp"))
    full = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v.clone()) if isinstance(v, torch.Tensor) else v
            for k, v in _flat(sd).items()}  # full_tensor: a collective per key, the same order on every rank
    if rank == 0:
        torch.save(full, Path(root) / "full.pt")
    dist.barrier()
    return {}


def _floor_ranges(ckpt: Path, sd: dict[str, Any]) -> tuple[dict[Path, list[tuple[int, int]]], int]:
    """The byte ranges this rank's shards need, from dist_restore's plan (each located chunk's
    boxes as runs, adjacent runs merged), per file; and their total."""
    from dist_restore._bytes.ranges import box_runs
    from dist_restore._sources import plan_source

    plan = plan_source(ckpt, sd)
    assert not plan.missing and not plan.mismatched, (plan.missing, plan.mismatched)
    runs: dict[Path, list[tuple[int, int]]] = {}
    for job in plan.jobs:
        isz = job.dtype.itemsize
        for chunk, boxes in job.pieces:
            assert chunk.strides is None, f"{job.key}: a strided chunk (the floor reads row-major runs only)"
            for box in boxes:
                offs, run, _k = box_runs(chunk, box, isz)
                runs.setdefault(plan.catalog.path(chunk.file), []).extend((o, run) for o in offs.tolist())
    out: dict[Path, list[tuple[int, int]]] = {}
    for f, rs in runs.items():
        merged: list[tuple[int, int]] = []
        for o, n in sorted(rs):
            if merged and merged[-1][0] + merged[-1][1] == o:
                merged[-1] = (merged[-1][0], merged[-1][1] + n)
            else:
                merged.append((o, n))
        out[f] = merged
    return out, sum(n for rs in out.values() for _o, n in rs)


def _dcp_read_bytes(ckpt: Path, sd: dict[str, Any], rank: int) -> int:
    """What ``dcp.load`` reads on this rank: ``FileSystemReader`` reads the whole item of each
    read item of the local plan (one per (target shard, overlapping chunk), and one per
    non-tensor value)."""
    from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader

    md = FileSystemReader(str(ckpt)).read_metadata()
    planner = DefaultLoadPlanner()
    planner.set_up_planner(sd, md, rank == 0)
    return sum(md.storage_data[it.storage_index].length for it in planner.create_local_plan().items)


def _check(name: str, sd: dict[str, Any], full: dict[str, Any]) -> list[str]:
    """Raise on a tensor leaf that differs from the values saved; the non-tensor leaves that
    differ, as text."""
    got = _flat(sd)
    missing = sorted(set(full) - set(got))
    if missing:
        raise AssertionError(f"{name}: the target lacks {missing}")
    odd = []
    for k, want in full.items():
        v = got[k]
        if isinstance(want, torch.Tensor):
            have = v.full_tensor() if hasattr(v, "full_tensor") else v
            if not (have.dtype == want.dtype and have.shape == want.shape and torch.equal(have, want)):
                raise AssertionError(f"{name}: {k} differs from the values saved")
        elif v != want:
            odd.append(f"{name}: {k} = {v!r}, saved {want!r}")
    return odd


def restore_worker(rank: int, world: int, root: str, layers: int, width: int, repeats: int,
                   cold: bool) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp

    from dist_restore import RestoreCoordinator

    m, opt = build("fsdp", world, layers, width, seed=2)
    sd = _state(m, opt)
    tensors = [v for v in _flat(sd).values() if isinstance(v, torch.Tensor)]
    shard_bytes = sum(_local(v).nbytes for v in tensors)
    ckpt = Path(root) / "dcp"
    coord = RestoreCoordinator(timeout=600)
    coord_nocrc = RestoreCoordinator(timeout=600, verify="none")
    dcp_bytes = _dcp_read_bytes(ckpt, sd, rank)
    ranges, floor_bytes = _floor_ranges(ckpt, sd)
    scratch = torch.ones(floor_bytes, dtype=torch.uint8)  # paged in
    notes: list[str] = []

    def run_ours(c: Any) -> int:
        res = c.restore(ckpt, sd)
        if res.missing_keys or res.unexpected_keys:
            notes.append(f"missing {res.missing_keys}, unexpected {res.unexpected_keys}")
        return res.stats.bytes_read

    def run_dcp() -> int:
        dcp.load(sd, checkpoint_id=str(ckpt))
        return dcp_bytes

    def floor() -> int:
        at = 0
        for f, spans in ranges.items():
            fd = os.open(f, os.O_RDONLY)
            try:
                for off, n in spans:
                    for lo in range(0, n, _STEP):
                        k = min(_STEP, n - lo)
                        got = os.preadv(fd, [(ctypes.c_char * k).from_address(scratch.data_ptr() + at)], off + lo)
                        assert got == k
                        at += k
            finally:
                os.close(fd)
        return at

    import torch.distributed.tensor as _dtensor  # noqa: F401 - torch.load of DTensors needs it

    full = torch.load(Path(root) / "full.pt", weights_only=True, mmap=True)
    runs = {"dist_restore": lambda: run_ours(coord), "dist_restore verify=none": lambda: run_ours(coord_nocrc),
            "dcp": run_dcp, "floor: pread": floor}
    out: dict[str, Any] = {"shard_bytes": shard_bytes}
    for name, fn in runs.items():  # warm-up, checked; its peak RSS beyond the targets
        with torch.no_grad():
            for v in tensors:
                _local(v).zero_()
        base = reset_peak()
        fn()
        out[f"{name}_peak"] = status("VmHWM") - base
        if name not in NOT_RESTORES:
            notes.extend(_check(name, sd, full))
        out[name] = []
    del full
    timed_rounds(runs, METHODS, repeats, out,
                 before=(lambda: drop_cache(p for p in Path(root).rglob("*") if p.is_file())) if cold and rank == 0
                 else None)
    out["notes"] = notes
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
    saves = [(2, (2, 4)), (4, (2,))]  # a save's world size, the world sizes restoring it
    commit = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True,
                            text=True, check=False).stdout.strip() or "?"
    print(f"# bench_dcp: {args.layers} x Linear({width}, {width}) + AdamW = "
          f"{3 * 4 * args.layers * width * width / 1e6:.0f} MB, FSDP2, get_state_dict + dcp.save; "
          f"{'cold' if args.cold else 'warm'}; repeats {args.repeats}; {platform.node()}, {os.cpu_count()} cpus, "
          f"torch {torch.__version__}, dist_restore {commit}, load avg {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    rows = []
    notes: list[str] = []
    for sworld, dworlds in saves:
        root = Path(tempfile.mkdtemp(prefix="bench_dcp_"))
        try:
            run_ranks(save_worker, sworld, args=(str(root), args.layers, width), timeout=1200, pg_timeout=600)
            for dworld in dworlds:
                out = run_ranks(restore_worker, dworld, args=(str(root), args.layers, width, args.repeats,
                                                               args.cold), timeout=3000, pg_timeout=600)
                scen = f"fsdp@{sworld} -> fsdp@{dworld}"
                notes += [f"{scen} rank {r}: {n}" for r, o in enumerate(out) for n in dict.fromkeys(o["notes"])]
                slowest = {name: [max(o[name][i][0] for o in out) for i in range(args.repeats)] for name in METHODS}
                walls = {name: statistics.median(ts) for name, ts in slowest.items()}
                for name in METHODS:
                    ratio = max(max(b for _t, b in o[name]) / o["shard_bytes"] for o in out)
                    peak = max(o[f"{name}_peak"] for o in out) / 2**20
                    spread = (max(slowest[name]) - min(slowest[name])) / walls[name]
                    rows.append((scen, name, walls[name], spread, ratio, walls[name] / walls["dcp"],
                                 walls[name] / walls["floor: pread"], peak))
        finally:
            shutil.rmtree(root, ignore_errors=True)
    head = ("scenario", "method", "wall s", "spread", "read/shard", "x dcp", "x floor", "peak RSS MiB")
    fmt = [lambda v: v, lambda v: v, lambda v: f"{v:.3f}", lambda v: f"{100 * v:.0f}%", lambda v: f"{v:.2f}",
           lambda v: f"{v:.2f}",
           lambda v: f"{v:.2f}", lambda v: f"{v:.0f}"]
    print_table(head, [[f(v) for f, v in zip(fmt, r)] for r in rows], args.markdown)
    for n in notes:
        print(f"note: {n}")
    print(f"load avg after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
