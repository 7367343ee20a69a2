"""Benchmark restoring a Hugging Face safetensors directory into sharded models.

Run: ``python benchmarks/bench_hf.py [--mb 1000] [--repeats 3] [--cold] [--markdown]``.

Workload: a bf16 Llama-like model (the parameter names and shapes of ``LlamaForCausalLM``:
hidden 2048, MLP 5632, 4 KV heads, vocab 32000, ``--layers`` layers; about ``--mb`` MB) written
locally as ``model-0000k-of-0000n.safetensors`` shards of about 250 MB plus
``model.safetensors.index.json`` (no download). It is restored into a freshly built model of the
same dtype, on CPU gloo ranks:

* ``fsdp@2``, ``fsdp@4``: FSDP2 (``fully_shard`` per layer and the root) on 2 and 4 ranks;
* ``tp@4``: tensor parallel on 4 ranks (q/k/v/gate/up Colwise, o/down Rowwise, the embedding
  Rowwise and lm_head Colwise; the norms are plain tensors on every rank).

Methods, each filling the model's own ``state_dict()``:

* ``dist_restore``: ``RestoreCoordinator.restore(dir, sd)``;
* ``dcp hf``, ``dcp hf t4``: ``dcp.load(sd, storage_reader=HuggingFaceStorageReader(dir))``, with
  ``thread_count`` 1 (its default) and 4;
* ``rank0 bcast``: rank 0 ``safetensors.torch.load_file`` of every file, then every full tensor
  broadcast, and each rank copies its shard out (accelerate's way);
* ``safe_open slices``: every rank ``safe_open`` + ``get_slice(key)[slices]`` of its shard, then
  ``copy_`` into the target (vLLM's and transformers' way);
* ``floor: pread``: the limit: one plain ``pread`` of each byte range dist_restore's plan reads
  (the same bytes), into one paged-in buffer, on the rank's own thread; it fills no target.

Per method: one untimed warm-up (checked bit-exact against ``load_file`` on a few keys), with
its peak RSS growth beyond the targets (``VmHWM`` reset through ``/proc/self/clear_refs``), then
``--repeats`` rounds in rotated order after a barrier; ``--cold`` drops the page cache of the
files (``posix_fadvise(DONTNEED)``) before each round. Reported: ``wall`` = the slowest rank,
median over rounds; ``read/shard`` = the largest over ranks of bytes read from the files over
the rank's shard bytes (``-``: reads through a memory map, not counted); ``x dcp`` = wall over
``dcp hf``; ``x floor`` = wall over ``floor: pread``. 1 MB = 1e6 bytes. The machine is shared:
read the load averages.
"""

from __future__ import annotations

import argparse
import json
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
from tests_multiprocess import _workers_hf as w  # noqa: E402
from tests_multiprocess.harness import run_ranks  # noqa: E402

METHODS = ("dist_restore", "dcp hf", "dcp hf t4", "rank0 bcast", "safe_open slices", "floor: pread")
NOT_RESTORES = ("floor: pread",)


def config(layers: int) -> dict[str, Any]:
    return dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_attention_heads=16,
                num_key_value_heads=4, num_hidden_layers=layers, max_position_embeddings=64,
                tie_word_embeddings=False)


def write_checkpoint(root: Path, cfg: dict[str, Any], shard_bytes: int = 250 * 10**6) -> Path:
    """``root/hf``: the model's tensors (random bf16) in HF shard files plus the index."""
    from safetensors.torch import save_file

    with torch.device("meta"):
        names = {k: (tuple(v.shape)) for k, v in w.Llama(cfg, torch.bfloat16).state_dict().items()}
    d = root / "hf"
    d.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    groups: list[list[str]] = [[]]
    size = 0
    for k, shape in names.items():
        n = torch.Size(shape).numel() * 2
        if groups[-1] and size + n > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(k)
        size += n
    weight_map = {}
    for i, keys in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({k: torch.randn(names[k], generator=g).to(torch.bfloat16) for k in keys}, d / name,
                  metadata={"format": "pt"})
        weight_map |= {k: name for k in keys}
    total = sum(torch.Size(s).numel() * 2 for s in names.values())
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                "weight_map": weight_map}))
    return d


def _local_slices(t: Any) -> tuple[Any, tuple[slice, ...]] | None:
    """``(local tensor, its global slices)`` (one run per dim in these layouts)."""
    from dist_restore._planning.reshard import target_region

    got = target_region("", t)
    if got is None:
        return None
    local, runs = got
    sl = []
    for r in runs:
        assert len(r) <= 1, "one run per dimension in this benchmark's layouts"
        sl.append(slice(r[0][0], r[0][0] + r[0][1]) if r else slice(0, 0))
    return local, tuple(sl)


def restore_worker(rank: int, world: int, d: str, layout: str, layers: int, repeats: int,
                   cold: bool) -> dict[str, Any]:
    import ctypes

    import torch.distributed.checkpoint as dcp
    from safetensors import safe_open
    from safetensors.torch import load_file

    from dist_restore import RestoreCoordinator
    from dist_restore._bytes.ranges import box_runs, split_box
    from dist_restore._sources import plan_source

    path = Path(d)
    cfg = config(layers)
    m = w.build(layout, world, torch.bfloat16, config=cfg, meta=True)
    sd = m.state_dict()
    shard_bytes = sum((v.to_local() if hasattr(v, "to_local") else v).nbytes for v in sd.values())
    coord = RestoreCoordinator(timeout=1200)
    weight_map = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    files = sorted(set(weight_map.values()))

    def run_ours() -> int:
        return coord.restore(path, sd).stats.bytes_read

    def run_dcp(threads: int) -> int:
        dcp.load(sd, storage_reader=dcp.HuggingFaceStorageReader(str(path), thread_count=threads))
        return -1

    def run_bcast() -> int:
        full: dict[str, torch.Tensor] = {}
        if rank == 0:
            for f in files:
                full |= load_file(path / f)
        with torch.no_grad():
            for k, v in sd.items():
                t = full.get(k) if rank == 0 else torch.empty(tuple(v.shape), dtype=v.dtype)
                dist.broadcast(t, 0)
                got = _local_slices(v)
                if got is not None:
                    got[0].copy_(t[got[1]])
        return sum(os.path.getsize(path / f) for f in files) if rank == 0 else 0

    def run_safe_open() -> int:
        by_file: dict[str, list[str]] = {}
        for k in sd:
            by_file.setdefault(weight_map[k], []).append(k)
        with torch.no_grad():
            for f, keys in by_file.items():
                with safe_open(path / f, framework="pt") as fh:
                    for k in keys:
                        got = _local_slices(sd[k])
                        if got is not None and got[0].numel():
                            got[0].copy_(fh.get_slice(k)[got[1]])
        return -1

    # the byte ranges dist_restore's plan reads: the floor reads exactly these
    plan = plan_source(path, dict(sd))
    ranges: dict[str, list[tuple[int, int]]] = {}
    for job in plan.jobs:
        isz = job.dtype.itemsize
        for chunk, boxes in job.pieces:
            for box in boxes:
                for b in split_box(box, isz):
                    offs, run, _k = box_runs(chunk, b, isz)
                    ranges.setdefault(chunk.file, []).extend((o, run) for o in offs.tolist())
    for v in ranges.values():
        v.sort()
    scratch = torch.ones(sum(n for v in ranges.values() for _o, n in v), dtype=torch.uint8)

    def run_floor() -> int:
        at = 0
        for f, spans in ranges.items():
            fd = os.open(path / f, os.O_RDONLY)
            try:
                for off, n in spans:
                    got = os.preadv(fd, [(ctypes.c_char * n).from_address(scratch.data_ptr() + at)], off)
                    assert got == n
                    at += n
            finally:
                os.close(fd)
        return at

    oracle_keys = [k for k in sd if k.endswith(("embed_tokens.weight", "layers.0.self_attn.o_proj.weight",
                                                "layers.1.mlp.gate_proj.weight", "model.norm.weight"))]
    oracle: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(path / f, framework="pt") as fh:
            for k in oracle_keys:
                if weight_map[k] == f:
                    oracle[k] = fh.get_tensor(k)
    runs = {"dist_restore": run_ours, "dcp hf": lambda: run_dcp(1), "dcp hf t4": lambda: run_dcp(4),
            "rank0 bcast": run_bcast, "safe_open slices": run_safe_open, "floor: pread": run_floor}
    out: dict[str, Any] = {"shard_bytes": shard_bytes}
    for name, fn in runs.items():
        with torch.no_grad():
            for v in sd.values():
                (v.to_local() if hasattr(v, "to_local") else v).zero_()
        base = reset_peak()
        fn()
        out[f"{name}_peak"] = status("VmHWM") - base
        if name not in NOT_RESTORES:
            for k in oracle_keys:
                v = sd[k]
                full = v.full_tensor() if hasattr(v, "full_tensor") else v
                if not torch.equal(full, oracle[k]):
                    raise AssertionError(f"{name}: {k} differs from the file")
        out[name] = []
    timed_rounds(runs, METHODS, repeats, out, before=(lambda: drop_cache(path.iterdir())) if cold and rank == 0 else None)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=8, help="decoder layers (8: ~1 GB in bf16)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cold", action="store_true", help="drop the page cache before every timed run")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--scenarios", default="fsdp@2,fsdp@4,tp@4")
    args = ap.parse_args()
    cfg = config(args.layers)
    root = Path(tempfile.mkdtemp(prefix="bench_hf_"))
    rows = []
    try:
        d = write_checkpoint(root, cfg)
        total = sum(f.stat().st_size for f in d.glob("*.safetensors"))
        print(f"# bench_hf: Llama-like bf16, {args.layers} layers, {total / 1e6:.0f} MB in "
              f"{len(list(d.glob('*.safetensors')))} files; {'cold' if args.cold else 'warm'}; repeats "
              f"{args.repeats}; {platform.node()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
              f"load avg {os.getloadavg()[0]:.2f}")
        for sc in args.scenarios.split(","):
            layout, world = sc.split("@")
            out = run_ranks(restore_worker, int(world), args=(str(d), layout, args.layers, args.repeats, args.cold),
                            timeout=3000, pg_timeout=1200)
            walls = {n: statistics.median(max(o[n][i][0] for o in out) for i in range(args.repeats)) for n in METHODS}
            for n in METHODS:
                reads = [max(b for _t, b in o[n]) for o in out]
                ratio = None if min(reads) < 0 else max(b / o["shard_bytes"] for b, o in zip(reads, out))
                peak = max(o[f"{n}_peak"] for o in out) / 2**20
                rows.append((sc, n, walls[n], ratio, walls[n] / walls["dcp hf"], walls[n] / walls["floor: pread"],
                             peak))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    head = ("scenario", "method", "wall s", "read/shard", "x dcp", "x floor", "peak RSS MiB")
    fmt = [lambda v: v, lambda v: v, lambda v: f"{v:.3f}", lambda v: "-" if v is None else f"{v:.2f}",
           lambda v: f"{v:.2f}", lambda v: f"{v:.2f}", lambda v: f"{v:.0f}"]
    print_table(head, [[f(v) for f, v in zip(fmt, r)] for r in rows], args.markdown)
    print(f"load avg after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
