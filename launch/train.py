"""A tiny deterministic DDP or FSDP2 trainer that saves and resumes: ``torchrun --nproc_per_node=N launch/train.py``.

Gloo on CPU, a small MLP with dropout, Adam and a StepLR scheduler; replicated by DDP, or
with ``--fsdp`` sharded by FSDP2 (``fully_shard`` on a 1-D CPU mesh of all ranks). The data of each
(rank, step) comes from a generator seeded by both, plus noise from the process-global
``random``, ``numpy`` and torch RNGs (seeded per rank), so a resumed run reproduces an
uninterrupted one bit for bit only if the model, optimizer, scheduler *and* every RNG
state of every rank come back exactly.

    torchrun --nproc_per_node=2 launch/train.py --steps 8 --save-every 4 --ckpt-root ck
    torchrun --nproc_per_node=2 launch/train.py --steps 8 --save-every 4 --ckpt-root ck --stop-after 4
    torchrun --nproc_per_node=2 launch/train.py --steps 8 --save-every 4 --ckpt-root ck --resume

Checkpoints go to ``ckpt-root/step_{n}`` (:func:`dist_restore.trainer.save_training_state`);
``--resume`` restores the newest complete one (:func:`dist_restore.trainer.resume_latest`;
DDP models read on rank 0 and broadcast), also one written by another number of ranks:
FSDP2 parameters and optimizer state are resharded, the RNG states of ranks that have a
rank file come back, the others keep theirs (the losses then differ from a run that never
stopped; the restored state does not).

    torchrun --nproc_per_node=4 launch/train.py --fsdp --steps 8 --save-every 4 --ckpt-root ck --stop-after 4
    torchrun --nproc_per_node=2 launch/train.py --fsdp --steps 8 --save-every 4 --ckpt-root ck --resume

``--out FILE`` (rank 0) is a ``torch.save`` of ``{"losses": {rank: {step: loss}}, "model",
"optimizer", "scheduler", "first_step", "last_step"}``, model and optimizer as full
tensors (FSDP2's gathered); ``--restored-out FILE`` the same state right after resuming.
Runs as a single process too (``python launch/train.py ...``, DDP only).
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import sys
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install
from dist_restore import RestoreError  # noqa: E402
from dist_restore._timeout import to_seconds  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # launch/: its shared helper, however it is loaded
from _teardown import exit_now  # noqa: E402
from dist_restore.trainer import TrainingState, resume_latest, save_training_state  # noqa: E402

log = logging.getLogger("dist_restore.train")

IN, HIDDEN, OUT, BATCH = 16, 32, 4, 8


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, required=True, help="train until this global step")
    p.add_argument("--save-every", type=int, default=0, help="save every K steps (0: never)")
    p.add_argument("--ckpt-root", type=Path, required=True, help="directory of step_{n} checkpoints")
    p.add_argument("--resume", action="store_true", help="resume from the newest complete checkpoint")
    p.add_argument("--stop-after", type=int, default=None, metavar="T",
                   help="stop after global step T (simulates a crash)")
    p.add_argument("--out", type=Path, default=None, help="rank 0 writes losses and final state here")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--timeout", type=seconds_arg, default=120.0, help="seconds per collective, > 0")
    p.add_argument("--fsdp", action="store_true", help="shard the model with FSDP2 instead of DDP (torchrun)")
    p.add_argument("--restored-out", type=Path, default=None, metavar="FILE",
                   help="rank 0 writes the full model/optimizer/scheduler state right after resuming")
    args = p.parse_args(argv)
    if args.steps < 1 or args.save_every < 0:
        p.error("--steps must be >= 1 and --save-every >= 0")
    if args.fsdp and "WORLD_SIZE" not in os.environ:
        p.error("--fsdp runs under torchrun (torchrun --nproc_per_node=1 for one process)")
    return args


def seconds_arg(text: str) -> float:
    """``--timeout``: a positive, finite number of seconds (checked as the library checks it)."""
    try:
        return to_seconds(float(text), "--timeout")
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a finite number of seconds > 0, got {text!r}") from None


def batch(seed: int, rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's batch of ``step``: a seeded generator, plus global-RNG noise (to test RNG restore)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + rank * 7919 + step)
    x = torch.randn(BATCH, IN, generator=g)
    y = torch.randn(BATCH, OUT, generator=g)
    x = x + 0.01 * torch.from_numpy(np.random.standard_normal((BATCH, IN)).astype(np.float32))
    x = x * random.uniform(0.9, 1.1)
    x = x + 0.01 * torch.randn(BATCH, IN)
    return x, y


def _full(value: object) -> object:
    """DTensors (FSDP2's shards) gathered into full tensors, anywhere in a state dict (a
    collective: every rank calls it)."""
    if hasattr(value, "full_tensor"):
        return value.full_tensor()  # type: ignore[union-attr]
    if isinstance(value, dict):
        return type(value)((k, _full(v)) for k, v in value.items())
    if isinstance(value, list):
        return [_full(v) for v in value]
    return value


def full_state(model: torch.nn.Module, opt: torch.optim.Optimizer, sched: object) -> dict[str, object]:
    return {"model": _full(model.state_dict()), "optimizer": _full(opt.state_dict()),
            "scheduler": sched.state_dict()}  # type: ignore[attr-defined]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        dist.init_process_group("gloo", timeout=timedelta(seconds=args.timeout))
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    logging.basicConfig(level=logging.INFO, format=f"[rank {rank}] %(message)s")
    try:
        return train(args, rank, world, distributed)
    except RestoreError as e:
        log.error("restore failed: %s", e)
        return 1
    finally:
        if distributed:
            dist.destroy_process_group()


def train(args: argparse.Namespace, rank: int, world: int, distributed: bool) -> int:
    # same initial model on every rank; per-rank global RNGs (dropout, noise)
    torch.manual_seed(args.seed)
    model = torch.nn.Sequential(torch.nn.Linear(IN, HIDDEN), torch.nn.ReLU(), torch.nn.Dropout(0.1),
                                torch.nn.Linear(HIDDEN, OUT))
    torch.manual_seed(args.seed + 1 + rank)
    random.seed(args.seed + 2 + rank)
    np.random.seed(args.seed + 3 + rank)
    if args.fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("dp",))
        for layer in (model[0], model[3]):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        ddp = model
    else:
        ddp = torch.nn.parallel.DistributedDataParallel(model) if distributed else model
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)  # over the (sharded) parameters
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)

    state = TrainingState(models={"net": model}, optimizers={"adam": opt}, schedulers={"lr": sched},
                          extra={"step": 0})
    first = 1
    if args.resume:
        res = resume_latest(args.ckpt_root, state, shared_models=not args.fsdp, timeout=args.timeout)
        if res is not None:
            first = int(state.extra["step"]) + 1
            log.info("resumed at step %d", first - 1)
            if res.report is not None and res.report.notes:
                log.info("%s", "; ".join(res.report.notes))
    if args.restored_out is not None:
        full = full_state(model, opt, sched)  # every rank takes part in the gathers
        if rank == 0:
            torch.save({**full, "step": state.extra["step"]}, args.restored_out)
    last = args.steps if args.stop_after is None else min(args.steps, args.stop_after)

    losses: dict[int, float] = {}
    for step in range(first, last + 1):
        x, y = batch(args.seed, rank, step)
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(ddp(x), y)
        loss.backward()
        opt.step()
        sched.step()
        losses[step] = loss.item()
        state.extra["step"] = step
        if args.save_every and step % args.save_every == 0:
            save_training_state(args.ckpt_root / f"step_{step}", state, timeout=args.timeout)
            log.info("saved step %d", step)
    if args.stop_after is not None and last < args.steps:
        log.info("stopping after step %d (--stop-after)", last)

    all_losses = [losses]
    if distributed:
        all_losses = [None] * world  # type: ignore[list-item]
        dist.all_gather_object(all_losses, losses)
    if args.out is not None:
        full = full_state(model, opt, sched)
        if rank == 0:
            torch.save({"losses": dict(enumerate(all_losses)), **full, "first_step": first, "last_step": last},
                       args.out)
    log.info("done: steps %d-%d, last loss %s", first, last, losses.get(last))
    return 0


if __name__ == "__main__":
    exit_now(main())
