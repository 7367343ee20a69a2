"""Peak memory of restoring many small tensors with ``state_dict=None`` (an optimizer state).

Run: ``python benchmarks/bench_small_memory.py [--params 20000] [--numel 2880] [--repeats 3]``.

Writes an AdamW-like state twice (torch.save, and CheckpointWriter with its index file; per parameter: a 0-d ``step`` and two ``numel``-element float32
moments; 20,000 parameters: 60,000 tensors, ~440 MiB) to a temporary directory, then, in one
fresh SUBPROCESS per variant and round, resets ``VmHWM`` (``/proc/self/clear_refs``), restores the
whole file and reports the peak growth of the total RSS (file pages included) against the
payload (the bytes of the tensors returned). Variants: ``CheckpointReader.read(d)``,
``torch.load(weights_only=True)``, and safetensors' ``load_file`` of the same tensors (when
``safetensors`` is installed). Prints a markdown table of medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

MIB = 1 << 20


def child(variant: str, d: Path) -> None:
    import gc

    import torch

    from dist_restore import CheckpointReader, RankInfo

    def kib(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1])
        raise RuntimeError(field)

    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    base = kib("VmRSS:")
    if variant.startswith("dist_restore"):
        sd = CheckpointReader(RankInfo(0, 1)).read(d / "own" if "own" in variant else d)[0]
        tensors = [t for s in sd["state"].values() for t in s.values()]
    elif variant == "torch.load":
        sd = torch.load(d / "checkpoint_0.pt", weights_only=True)
        tensors = [t for s in sd["state"].values() for t in s.values()]
    else:
        from safetensors.torch import load_file

        tensors = list(load_file(d / "state.safetensors").values())
    peak = (kib("VmHWM:") - base) * 1024
    print(json.dumps({"peak": peak, "payload": sum(t.numel() * t.element_size() for t in tensors),
                      "n": len(tensors)}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--params", type=int, default=20_000)
    p.add_argument("--numel", type=int, default=2_880)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(a.child, a.dir)
    import torch

    variants = ["dist_restore", "dist_restore (own writer: index file)", "torch.load"]
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        g = torch.Generator().manual_seed(0)
        state = {i: {"step": torch.tensor(float(i)), "exp_avg": torch.randn(a.numel, generator=g),
                     "exp_avg_sq": torch.rand(a.numel, generator=g)} for i in range(a.params)}
        torch.save({"state": state, "param_groups": [{"lr": 1e-3, "params": list(range(a.params))}]},
                   d / "checkpoint_0.pt")
        from dist_restore import CheckpointWriter, RankInfo

        CheckpointWriter(RankInfo(0, 1)).write(d / "own", {"state": state, "param_groups": [
            {"lr": 1e-3, "params": list(range(a.params))}]})
        try:
            from safetensors.torch import save_file

            save_file({f"{i}.{k}": t for i, s in state.items() for k, t in s.items()}, d / "state.safetensors")
            variants.append("safetensors")
        except ImportError:
            pass
        del state
        rows = []
        for v in variants:
            runs = [json.loads(subprocess.run([sys.executable, __file__, "--child", v, "--dir", str(d)],
                                              capture_output=True, text=True, check=True).stdout.splitlines()[-1])
                    for _ in range(a.repeats)]
            peak = statistics.median(r["peak"] for r in runs) / MIB
            payload = runs[0]["payload"] / MIB
            rows.append(f"| {v} | {runs[0]['n']:,} | {payload:.1f} MiB | {peak:.1f} MiB | "
                        f"{peak - payload:+.1f} MiB | {a.repeats} |")
    print("| variant | tensors | payload | VmHWM growth | beyond payload | runs |")
    print("|:---|---:|---:|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
