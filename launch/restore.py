"""Restore a checkpoint on every rank: ``torchrun --nproc_per_node=N launch/restore.py``.

With no ``--checkpoint`` it runs the embedded demo: every rank writes a synthetic
``checkpoint_{rank}.pt`` (its own entries plus replicated "shared" ones) into a temp dir,
then all ranks restore it through :class:`dist_restore.RestoreCoordinator` and rank 0
prints the aggregated report and throughput. Exits non-zero on every rank on failure.
Runs as a single process too (``python launch/restore.py``).

A checkpoint written by another number of ranks restores too: its DTensor entries (FSDP2,
tensor parallel) are resharded, by default into an even ``Shard(0)`` split over this job's
ranks (``--reshard-to full``: every rank gets whole tensors); the other entries come from
rank 0's file, and ``--per-rank PATTERN`` entries from each rank's own file.

``--checkpoint`` may also be a Hugging Face safetensors directory (or file) or a DCP directory
(``dcp.save``'s ``.metadata`` + ``.distcp`` files): every tensor is then restored as a DTensor
split evenly by rows over this job's ranks (``--reshard-to full``: whole tensors on every rank),
each rank reading only its rows' bytes; DCP's non-tensor values are loaded on every rank (keys
flattened as DCP flattens them). Either may be an object-store URL (``s3://bucket/prefix``,
``gs://``, ``az://``; endpoint and credentials from the environment: ``AWS_ENDPOINT_URL``,
``AWS_REGION``, ...).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install
from dist_restore import RestoreCoordinator, RestoreError  # noqa: E402
from dist_restore._timeout import to_seconds  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # launch/: its shared helper, however it is loaded
from _teardown import exit_now  # noqa: E402

log = logging.getLogger("dist_restore.launch")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="checkpoint directory, or an s3://, gs://, az:// URL of a safetensors or DCP "
                                        "checkpoint (default: write and restore a synthetic one)")
    p.add_argument("--shared", action="append", default=None, metavar="PATTERN",
                   help="replicated entries: key prefix or glob (repeatable); demo default: 'shared'")
    p.add_argument("--mode", choices=["broadcast", "spread", "local"], default="broadcast",
                   help="how shared entries are read (default: broadcast)")
    p.add_argument("--strict", action="store_true", help="fail if any rank misses or has unexpected keys")
    p.add_argument("--map-location", default="cpu", help="device for restored tensors (default: cpu)")
    p.add_argument("--report-json", metavar="FILE", help="write the aggregated report as JSON (rank 0)")
    p.add_argument("--timeout", type=seconds_arg, default=300.0,
                   help="seconds per collective, > 0 (default: 300)")
    p.add_argument("--no-shared-memory", action="store_true",
                   help="broadcast shared entries even when every rank runs on one host")
    p.add_argument("--demo-mib", type=float, default=64.0, help="demo checkpoint size per rank, MiB")
    p.add_argument("--per-rank", action="append", default=None, metavar="PATTERN",
                   help="checkpoint of another world size: entries each rank takes from its own file "
                        "(repeatable; e.g. 'rng'); the rest come from rank 0's file")
    p.add_argument("--reshard-to", choices=["shard", "full"], default="shard",
                   help="checkpoint of another world size: DTensor entries into an even Shard(0) split over "
                        "this job's ranks (default) or whole tensors on every rank")
    return p.parse_args(argv)


def checkpoint_arg(text: str) -> Path | str:
    """``--checkpoint``: a local path, or an object-store URL kept as it is (``s3://``, ``gs://``,
    ``az://``: a ``Path`` would fold ``s3://bucket`` into ``s3:/bucket``)."""
    from dist_restore._base.source import is_url

    return text if is_url(text) else Path(text)


def reshard_target(path: Path | str, world: int, how: str) -> dict | None:
    """The restore target for a checkpoint of another world size: its DTensor entries as
    DTensors split over this job's ranks (``how="shard"``) or whole tensors (``"full"``);
    everything else ``None`` (loaded as saved). ``None`` when the world size is the same or
    the checkpoint has no DTensor (then the coordinator needs no target)."""
    from dist_restore import read_catalog, read_index
    from dist_restore._format.dtensor import DTensorRef
    from dist_restore._format.manifest import rank_file_count
    from dist_restore._sources import source_format

    fmt = source_format(path)
    # a catalogue: safetensors, DCP, or our rank files in an object store (read by range requests)
    safetensors = fmt is not None
    if fmt in (None, "rank files") and rank_file_count(path) == world:
        return None
    mesh = None
    if how == "shard" and dist.is_initialized():
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cuda" if torch.cuda.is_available() else "cpu", (world,))
    if safetensors:
        from torch.distributed.tensor import Replicate, Shard
        from torch.distributed.tensor import empty as dtensor_empty

        cat = read_catalog(path)
        out = {k: torch.empty(e.shape, dtype=e.dtype) if mesh is None else
               dtensor_empty(e.shape, dtype=e.dtype, device_mesh=mesh, placements=[Shard(0) if e.shape else Replicate()])
               for k, e in cat.entries.items()}
        out.update({k: None for k in cat.objects})  # DCP's non-tensor values: loaded as saved
        return out
    tree = read_index(path / "checkpoint_0.pt").tree
    found = []

    def build(v):
        if isinstance(v, dict):
            return {k: build(c) for k, c in v.items()}
        if isinstance(v, (list, tuple)) and not isinstance(v, torch.Size):
            return [build(c) for c in v]
        if isinstance(v, DTensorRef):
            found.append(v)
            if mesh is None:
                return torch.empty(tuple(v.size), dtype=v.dtype)
            from torch.distributed.tensor import Shard
            from torch.distributed.tensor import empty as dtensor_empty

            return dtensor_empty(tuple(v.size), dtype=v.dtype, device_mesh=mesh,
                                 placements=[Shard(0)] if v.size else [])
        return None

    target = build(tree)
    return target if found else None


def seconds_arg(text: str) -> float:
    """``--timeout``: a positive, finite number of seconds (checked as the library checks it)."""
    try:
        return to_seconds(float(text), "--timeout")
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a finite number of seconds > 0, got {text!r}") from None


def init_distributed(timeout: float | timedelta) -> None:
    """Initialise the default group when launched by torchrun (gloo on CPU, NCCL with CUDA).

    ``timeout``: seconds or a ``timedelta``, as every timeout of dist_restore."""
    seconds = to_seconds(timeout)
    if "WORLD_SIZE" not in os.environ or dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=timedelta(seconds=seconds))


def write_demo(path: Path, rank: int, world: int, mib: float) -> None:
    """Every rank writes its own entries plus identical shared ones (same seed on all ranks)."""
    per_tensor = 1 << 20  # 4 MiB of float32
    n = max(1, int(mib * (1 << 20) / 4 / per_tensor))
    g = torch.Generator().manual_seed(1234 + rank)
    own = {f"layers.{i}.w": torch.randn(per_tensor, generator=g) for i in range(n)}
    sg = torch.Generator().manual_seed(99)
    shared = {"embedding": torch.randn(1 << 18, generator=sg), "step": 1000,
              "lr_schedule": {"base": 3e-4, "warmup": 100}}
    torch.save({"model": own, "shared": shared, "rank": rank, "world_size": world},
               path / f"checkpoint_{rank}.pt")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[rank %(rank)s] %(message)s")
    init_distributed(args.timeout)
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    old_factory = logging.getLogRecordFactory()

    def factory(*a, **k):  # every line says which rank printed it
        rec = old_factory(*a, **k)
        rec.rank = rank
        return rec

    logging.setLogRecordFactory(factory)
    if rank != 0:  # the library's progress and report on rank 0 only; this script's lines on every rank
        logging.getLogger().setLevel(logging.WARNING)
        log.setLevel(logging.INFO)
    tmp = None
    try:
        if args.checkpoint:
            path = checkpoint_arg(args.checkpoint)
            shared = args.shared
        else:
            tmp = Path(tempfile.mkdtemp(prefix="dist_restore_demo_")) if rank == 0 else None
            holder = [str(tmp) if tmp else None]
            if dist.is_initialized():
                dist.broadcast_object_list(holder, src=0)
            path = Path(holder[0])
            write_demo(path, rank, world, args.demo_mib)
            if dist.is_initialized():
                dist.barrier()
            shared = args.shared or ["shared"]
            if rank == 0:
                log.info("demo: wrote a synthetic %d-rank checkpoint to %s", world, path)
        coord = RestoreCoordinator(timeout=args.timeout, shared_memory=not args.no_shared_memory)
        target = reshard_target(path, world, args.reshard_to) if args.checkpoint else None
        t0 = time.perf_counter()
        res = coord.restore(path, target, shared=shared, shared_mode=args.mode, strict=args.strict,
                            map_location=args.map_location, per_rank=args.per_rank)
        dt = time.perf_counter() - t0
        st = res.stats
        mib = (st.bytes_read + st.bytes_received + st.bytes_shm) / (1 << 20)
        log.info("restored %.1f MiB on this rank (%.1f MiB read from file, %.1f MiB received by collectives, "
                 "%.1f MiB from other ranks' memory files) in %.3fs: %.0f MiB/s; %d collectives", mib,
                 st.bytes_read / (1 << 20), st.bytes_received / (1 << 20), st.bytes_shm / (1 << 20), dt,
                 mib / dt if dt else 0.0, st.collectives)
        # the aggregated report itself is logged once, on rank 0, by the coordinator
        if rank == 0 and res.report is not None and args.report_json:
            Path(args.report_json).write_text(res.report.to_json())
        return 0
    except RestoreError as e:
        log.error("restore failed:\n%s", e)
        return 1
    except Exception as e:  # noqa: BLE001 - any failure exits non-zero on this rank
        log.exception("restore failed: %s", e)
        return 1
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    exit_now(main())
