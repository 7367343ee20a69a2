"""Many small tensors: ``dist_restore`` against safetensors on the same bytes (issue #13).

Run: ``python benchmarks/bench_index.py [--params 20000] [--numel 256] [--repeats 3] [--markdown]``.

Writes an AdamW-like optimizer state (per parameter: a 0-d ``step`` and two ``numel``-element
float32 moments; 20,000 parameters: 60,000 tensors) three ways into a temporary directory
(removed at the end):

* ``torch.save``: a plain ``checkpoint_0.pt`` (no index file, no manifest);
* ``own writer``: the same state through ``dist_restore.CheckpointWriter`` (rank file, its index
  file and the manifest);
* ``safetensors``: the same tensors, keys ``state.{i}.{name}``, by ``safetensors.torch.save_file``.

Every file is read once before timing (warm page cache); the process runs one thread
(``torch.set_num_threads(1)``, ``OMP_NUM_THREADS=1``). Each number is the MEDIAN of ``--repeats``
rounds; within a round every case runs once, in an order rotated from round to round. Cases, each
into preallocated targets (``copy_`` from what safetensors returns):

* ``index``: restore one 0-d tensor (``state.0.step``): the cost of opening and indexing the file;
* ``1% partial``: every 100th parameter's three tensors;
* ``full``: all tensors (safetensors: the faster of ``load_file`` and ``safe_open`` +
  ``get_tensor`` per key, then ``copy_``).

Goals (#13): own-writer files: index and 1% <= 1.0x safetensors; torch.save files: both <= 3.0x;
full restore <= 0.5x safetensors.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from dist_restore import CheckpointReader, CheckpointWriter, RankInfo  # noqa: E402

NAMES = ("step", "exp_avg", "exp_avg_sq")


def make_state(params: int, numel: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    state = {i: {"step": torch.tensor(float(i)), "exp_avg": torch.randn(numel, generator=g),
                 "exp_avg_sq": torch.rand(numel, generator=g)} for i in range(params)}
    return {"state": state, "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": list(range(params))}]}


def target_for(state: dict[str, Any], ids: list[int]) -> dict[str, Any]:
    return {"state": {i: {n: torch.empty_like(state["state"][i][n]) for n in NAMES} for i in ids}}


def flat_keys(ids: list[int]) -> list[tuple[int, str, str]]:
    return [(i, n, f"state.{i}.{n}") for i in ids for n in NAMES]


def warm(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(64 << 20):
            pass


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--params", type=int, default=20_000)
    p.add_argument("--numel", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--markdown", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(1)
    state = make_state(a.params, a.numel)
    all_ids = list(range(a.params))
    partial_ids = all_ids[::100]
    with tempfile.TemporaryDirectory(prefix="bench_index_") as tmp:
        plain, own, st = Path(tmp) / "plain", Path(tmp) / "own", Path(tmp) / "state.safetensors"
        plain.mkdir()
        torch.save(state, plain / "checkpoint_0.pt")
        CheckpointWriter(RankInfo(0, 1)).write(own, state)
        save_file({k: state["state"][i][n] for i, n, k in flat_keys(all_ids)}, st)
        for f in [*plain.iterdir(), *own.iterdir(), st]:
            warm(f)
        reader = CheckpointReader(RankInfo(0, 1))
        targets = {"index": target_for(state, [0]), "1%": target_for(state, partial_ids),
                   "full": target_for(state, all_ids)}
        ids = {"index": [0], "1%": partial_ids, "full": all_ids}

        def ours(d: Path, what: str) -> Callable[[], Any]:
            return lambda: reader.load(d, targets[what])

        def st_open(what: str) -> Callable[[], Any]:
            def run() -> None:
                tgt = targets[what]["state"]
                with safe_open(st, "pt") as f:
                    for i, n, k in flat_keys(ids[what]):
                        tgt[i][n].copy_(f.get_tensor(k))
            return run

        def st_load_file() -> None:
            tgt = targets["full"]["state"]
            got = load_file(st)
            for i, n, k in flat_keys(all_ids):
                tgt[i][n].copy_(got[k])

        cases: dict[str, Callable[[], Any]] = {}
        for what in ("index", "1%", "full"):
            cases[f"{what}|torch.save"] = ours(plain, what)
            cases[f"{what}|own writer"] = ours(own, what)
            cases[f"{what}|safetensors"] = st_open(what)
        cases["full|safetensors load_file"] = st_load_file
        for fn in cases.values():  # warm-up, and a check against the source
            fn()
        for what in ("index", "1%", "full"):
            reader.load(own, targets[what])
            for i in ids[what]:
                for n in NAMES:
                    assert torch.equal(targets[what]["state"][i][n], state["state"][i][n]), (what, i, n)
        names = list(cases)
        times: dict[str, list[float]] = {n: [] for n in names}
        for r in range(a.repeats):
            order = names[r % len(names):] + names[: r % len(names)]
            for n in order:
                times[n].append(timed(cases[n]))
        med = {n: statistics.median(v) for n, v in times.items()}
        rows = []
        for what in ("index", "1%", "full"):
            ref = med[f"{what}|safetensors"]
            if what == "full":
                ref = min(ref, med["full|safetensors load_file"])
            for who in ("torch.save", "own writer"):
                m = med[f"{what}|{who}"]
                rows.append((what, f"dist_restore, {who} file", m, m / ref))
            rows.append((what, "safetensors", ref, 1.0))
        n_tensors = a.params * 3
        print(f"# {n_tensors:,} tensors ({a.params:,} params x {NAMES}, numel {a.numel}); "
              f"median of {a.repeats}; warm; 1 thread")
        print(f"# {platform.node()} {platform.machine()} cpus={os.cpu_count()} load={os.getloadavg()}; "
              f"torch {torch.__version__}; files: torch.save {(plain / 'checkpoint_0.pt').stat().st_size >> 20} MiB")
        sep = "|" if a.markdown else " "
        print(sep.join(["case".ljust(8), "reader".ljust(32), "ms".rjust(9), "x safetensors".rjust(14)]))
        for what, who, m, ratio in rows:
            print(sep.join([what.ljust(8), who.ljust(32), f"{m * 1e3:9.1f}", f"{ratio:14.2f}"]))


if __name__ == "__main__":
    main()
