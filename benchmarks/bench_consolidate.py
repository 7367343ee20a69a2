"""Benchmark ``consolidate`` (one file from a sharded checkpoint) against DCP's ``dcp_to_torch_save``.

Run: ``python benchmarks/bench_consolidate.py [--mb 500] [--repeats 3] [--kind fsdp|fsdp_tp] [--markdown]``.

Workload: ``bench_reshard.py``'s: an MLP of ``--layers`` square ``Linear`` layers (no bias)
sharded with FSDP2 (or FSDP2+TP on a 2x2 mesh) on 4 ranks, model + AdamW state about
``--mb`` MB, its ``{"model": model.state_dict(), "optim": opt.state_dict()}`` saved with
``torch.save`` per rank (our format) and with ``dcp.save`` (DCP's), by ``bench_reshard``'s
``save_worker``. Then, each in a fresh process, one after the other in rotated order:

* ``dist_restore``: ``dist_restore.consolidate.consolidate(ours, out.pt)`` (streams tensor by tensor);
* ``dist_restore st``: the same with ``format="safetensors"``;
* ``dcp``: ``torch.distributed.checkpoint.format_utils.dcp_to_torch_save(dcp, out.pt)`` (loads the
  whole state dict, then ``torch.save``).

Reported per method: ``wall`` = median seconds of the call itself (not the interpreter start),
``x dcp`` = over DCP's; ``peak RSS`` = the process's peak RSS growth during the call over its RSS
before it (``VmHWM`` after resetting it through ``/proc/self/clear_refs``), largest over rounds,
and ``x dcp`` of that; ``out MB`` = the file written. Goals: <= 0.5x DCP's time and <= 0.25x its
peak memory. Each output is checked once against ``full.pt`` (every entry's ``full_tensor()``
saved at save time). Warm page cache (the files were just written); 1 MB = 1e6 bytes. The
machine is shared: read the load averages.
"""

from __future__ import annotations

import argparse
import json
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

METHODS = ("dist_restore", "dist_restore st", "dcp")

# runs in a fresh interpreter: imports first, then the peak RSS is reset and the call timed
_CHILD = r"""
import json, sys, time
sys.path.insert(0, {root!r})
import torch
from dist_restore.consolidate import consolidate
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

def status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0

method, src, out = sys.argv[1:4]
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = status("VmRSS")
t0 = time.perf_counter()
if method == "dcp":
    dcp_to_torch_save(src, out)
else:
    consolidate(src, out, format="safetensors" if method.endswith("st") else "torch")
dt = time.perf_counter() - t0
print(json.dumps({{"seconds": dt, "peak": status("VmHWM") - base}}))
"""


def _run(method: str, src: Path, out: Path) -> dict[str, Any]:
    code = _CHILD.format(root=str(ROOT))
    p = subprocess.run([sys.executable, "-c", code, method, str(src), str(out)], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=3600)
    if p.returncode != 0:
        raise RuntimeError(f"{method} failed:\n{p.stdout}\n{p.stderr}")
    res = json.loads(p.stdout.strip().splitlines()[-1])
    res["size"] = out.stat().st_size
    return res


def _check(method: str, out: Path, full_path: Path) -> None:
    """The output holds every saved entry's full value (run once per method, untimed)."""
    import torch

    from dist_restore._format.index import iter_leaves

    full = torch.load(full_path, weights_only=True)
    if method.endswith("st"):
        from safetensors.torch import load_file

        got = load_file(out)
    else:
        got = {k: v for k, _p, v in iter_leaves(torch.load(out, weights_only=True, mmap=True))}
    # DCP's flat keys and ours differ only in spelling where lists are involved; both nest the same
    bad = [k for k, v in full.items() if k.rstrip(".") not in got or not torch.equal(got[k.rstrip(".")], v)]
    if bad:
        raise AssertionError(f"{method}: {len(bad)} entries differ from the values saved, e.g. {bad[:3]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=float, default=500.0, help="model + AdamW state, MB (default 500)")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--kind", choices=["fsdp", "fsdp_tp"], default="fsdp")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    import torch

    from bench_reshard import save_worker
    from tests_multiprocess.harness import run_ranks

    width = int((args.mb * 1e6 / (3 * 4 * args.layers)) ** 0.5) // 4 * 4
    print(f"# bench_consolidate: {args.kind} on 4 ranks, {args.layers} x Linear({width}, {width}) + AdamW = "
          f"{3 * 4 * args.layers * width * width / 1e6:.0f} MB; warm; repeats {args.repeats}; {platform.node()}, "
          f"{os.cpu_count()} cpus, torch {torch.__version__}, load avg {os.getloadavg()[0]:.2f}")
    root = Path(tempfile.mkdtemp(prefix="bench_consolidate_"))
    results: dict[str, list[dict[str, Any]]] = {m: [] for m in METHODS}
    try:
        run_ranks(save_worker, 4, args=(str(root), args.kind, args.layers, width), timeout=1200, pg_timeout=600)
        src = {"dist_restore": root / "ours", "dist_restore st": root / "ours", "dcp": root / "dcp"}
        outs = {"dist_restore": root / "out.pt", "dist_restore st": root / "out.safetensors",
                "dcp": root / "out_dcp.pt"}
        for r in range(args.repeats):
            order = METHODS[r % 3:] + METHODS[:r % 3]
            for m in order:
                outs[m].unlink(missing_ok=True)
                results[m].append(_run(m, src[m], outs[m]))
                if r == 0:
                    _check(m, outs[m], root / "full.pt")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    wall = {m: statistics.median(x["seconds"] for x in results[m]) for m in METHODS}
    peak = {m: max(x["peak"] for x in results[m]) for m in METHODS}
    head = ("method", "wall s", "x dcp", "peak RSS MiB", "x dcp", "out MB")
    rows = [(m, f"{wall[m]:.3f}", f"{wall[m] / wall['dcp']:.2f}", f"{peak[m] / 2**20:.0f}",
             f"{peak[m] / peak['dcp']:.2f}", f"{results[m][0]['size'] / 1e6:.0f}") for m in METHODS]
    if args.markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for row in rows:
            print("| " + " | ".join(row) + " |")
    else:
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
        print("  ".join(h.ljust(w) for h, w in zip(head, widths)))
        for row in rows:
            print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
    print(f"load avg after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
