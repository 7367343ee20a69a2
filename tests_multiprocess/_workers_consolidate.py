"""Workers for the consolidate tests: real FSDP2 / FSDP2+TP checkpoints on CPU meshes (gloo).

One spawn saves every checkpoint the tests use: the small FSDP2 and FSDP2+TP models of
:mod:`._workers_dtensor` (rank 0 also saves the oracle: the same state dict with every
DTensor replaced by its ``full_tensor()``, nesting and container types kept), and a larger
FSDP2+TP model whose largest tensor is 32 MiB, for the peak-memory test.
"""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from tests_multiprocess import _workers_dtensor as w

BIG_IN, BIG_OUT = 1024, 8192  # the first weight: 8192 x 1024 float32 = 32 MiB


def full_tree(v: Any) -> Any:
    """``v`` with every DTensor gathered into a full tensor (a collective), containers kept."""
    if hasattr(v, "full_tensor"):
        return v.full_tensor()
    if isinstance(v, dict):
        out = type(v)() if type(v) in (dict, collections.OrderedDict) else {}
        if isinstance(out, collections.OrderedDict):
            out.__dict__.update(getattr(v, "__dict__", {}))
        for k, c in v.items():
            out[k] = full_tree(c)
        return out
    if isinstance(v, list):
        return [full_tree(c) for c in v]
    if isinstance(v, tuple) and not isinstance(v, torch.Size):
        return tuple(full_tree(c) for c in v)
    return v


def _big(world: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    with torch.device("meta"):
        m = torch.nn.Sequential(torch.nn.Linear(BIG_IN, BIG_OUT, bias=False),
                                torch.nn.Linear(BIG_OUT, BIG_IN // 2, bias=False))
    mesh = init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("dp", "tp"))
    # only the state is saved (no forward): the first weight's columns split over tp, its rows
    # over dp, so no file holds whole rows and consolidate assembles it in memory
    parallelize_module(m, mesh["tp"], {"0": RowwiseParallel(), "1": ColwiseParallel()})
    fully_shard(m, mesh=mesh["dp"])
    m.to_empty(device="cpu")
    g = torch.Generator().manual_seed(dist.get_rank())
    with torch.no_grad():
        for p in m.parameters():
            p.to_local().copy_(torch.randn(p.to_local().shape, generator=g))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    for p in m.parameters():  # state without a forward pass
        p.grad = torch.ones_like(p)
    opt.step()
    return m, opt


def save_all(rank: int, world: int, root: str) -> dict[str, Any]:
    for kind in ("fsdp", "fsdp_tp"):
        m, opt = w.build(kind, world, seed=1234)
        sd = w._state(m, opt)
        d = Path(root) / kind
        d.mkdir(parents=True, exist_ok=True)
        torch.save(sd, d / f"checkpoint_{rank}.pt")
        full = full_tree(sd)
        if rank == 0:
            torch.save(full, Path(root) / f"{kind}_full.pt")
    m, opt = _big(world)
    d = Path(root) / "big"
    d.mkdir(parents=True, exist_ok=True)
    torch.save({"model": m.state_dict(), "optim": opt.state_dict()}, d / f"checkpoint_{rank}.pt")
    dist.barrier()
    return {}
