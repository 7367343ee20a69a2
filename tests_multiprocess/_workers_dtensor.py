"""Workers for the resharding tests: real FSDP2 / FSDP2+TP models on CPU meshes (gloo).

Every rank builds the same model from the same seed, takes one AdamW step (so optimizer
state exists), and saves ``{"model", "optim", "extra"}`` with plain ``torch.save`` (or our
writer). Rank 0 also saves every entry's ``full_tensor()``: the oracle a restore on another
layout is compared with, bit for bit.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

# uneven on purpose: 10, 14 and 6 rows do not split evenly over 3 or 4 ranks
DIMS = (10, 14, 6)


class MLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = torch.nn.Linear(DIMS[0], DIMS[1])
        self.down = torch.nn.Linear(DIMS[1], DIMS[2])
        self.norm = torch.nn.LayerNorm(DIMS[2])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.down(torch.relu(self.up(x))))


def build(kind: str, world: int, seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """``kind``: ``fsdp`` (1-D mesh), ``fsdp_tp`` (2-D (dp, tp) mesh, tp=2), ``tp`` (1-D tensor
    parallel), ``plain`` (no sharding: every rank holds every tensor whole)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    torch.manual_seed(seed)
    m = MLP()
    if kind == "fsdp":
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("dp",))
        fully_shard(m.up, mesh=mesh)
        fully_shard(m, mesh=mesh)
    elif kind == "fsdp_tp":
        mesh = init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("dp", "tp"))
        parallelize_module(m, mesh["tp"], {"up": ColwiseParallel(), "down": RowwiseParallel()})
        fully_shard(m, mesh=mesh["dp"])
    elif kind == "tp":
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
        parallelize_module(m, mesh, {"up": ColwiseParallel(), "down": RowwiseParallel()})
    elif kind != "plain":
        raise ValueError(kind)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    torch.manual_seed(seed + 1)
    x = torch.randn(4, DIMS[0])
    m(x).sum().backward()
    opt.step()
    opt.zero_grad()
    return m, opt


def _full(v: Any) -> Any:
    return v.full_tensor() if hasattr(v, "full_tensor") else v


def _state(m: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    return {"model": m.state_dict(), "optim": opt.state_dict(),
            "extra": {"step": 7, "rank_value": torch.tensor([float(dist.get_rank())])}}


def _flat(sd: dict[str, Any]) -> dict[str, Any]:
    from dist_restore._format.index import iter_leaves

    return {k: v for k, _p, v in iter_leaves(sd)}


def save(rank: int, world: int, path: str, kind: str, writer: bool = False) -> dict[str, Any]:
    m, opt = build(kind, world, seed=1234)
    sd = _state(m, opt)
    if writer:
        from dist_restore import CheckpointWriter

        CheckpointWriter(timeout=60).write(path, sd)
    else:
        os.makedirs(path, exist_ok=True)
        torch.save(sd, Path(path) / f"checkpoint_{rank}.pt")
    full = {k: _full(v) for k, v in _flat(sd).items() if isinstance(v, torch.Tensor)}
    if rank == 0:
        torch.save(full, Path(path).parent / f"{Path(path).name}_full.pt")
    dist.barrier()
    return {}


def restore(rank: int, world: int, path: str, kind: str, target: str = "dtensor",
            per_rank: Any = None) -> dict[str, Any]:
    """Restore into a freshly built (other seed) model of ``kind``; compare full tensors.

    ``target``: ``dtensor`` (the model's and optimizer's own state dicts) or ``full``
    (plain zero tensors of every entry's global shape)."""
    from dist_restore import RestoreCoordinator

    full = torch.load(Path(path).parent / f"{Path(path).name}_full.pt", weights_only=True)
    m, opt = build(kind, world, seed=99)
    sd = _state(m, opt)
    if target == "full":
        sd = {"model": {k: torch.zeros_like(full[f"model.{k}"]) for k in sd["model"]},
              "optim": {"state": {i: {k: torch.zeros_like(full[f"optim.state.{i}.{k}"]) for k in st}
                                  for i, st in sd["optim"]["state"].items()},
                        "param_groups": None},
              "extra": None}
    shard_bytes = sum(v.to_local().numel() * v.element_size() if hasattr(v, "to_local")
                      else v.numel() * v.element_size()
                      for v in _flat(sd).values() if isinstance(v, torch.Tensor))
    res = RestoreCoordinator(timeout=60).restore(path, sd, per_rank=per_rank)
    got = {k: _full(v) for k, v in _flat(res.state_dict).items() if isinstance(v, torch.Tensor)}
    bad = []
    for k, v in got.items():
        if k.startswith("extra.rank_value"):
            continue
        if k not in full:
            bad.append(f"{k}: not saved")
        elif v.dtype != full[k].dtype or v.shape != full[k].shape or not torch.equal(v, full[k]):
            bad.append(f"{k}: differs")
    # the model's own parameters (not just the state dict's views) hold the values
    for k, p in m.named_parameters():
        if target == "dtensor" and not torch.equal(_full(p.detach()), full[f"model.{k}"]):
            bad.append(f"param {k}: differs")
    return {"bad": bad, "bytes_read": res.stats.bytes_read, "shard_bytes": shard_bytes,
            "bytes_verified": res.stats.bytes_verified,
            "files_opened": res.stats.files_opened, "missing": res.missing_keys,
            "report": res.report.render() if res.report else None,
            "rank_value": got.get("extra.rank_value"), "step": res.state_dict["extra"]["step"]
            if isinstance(res.state_dict.get("extra"), dict) else None}


def _snapshot(m: torch.nn.Module) -> list[torch.Tensor]:
    return [(p.to_local() if hasattr(p, "to_local") else p).detach().clone() for p in m.parameters()]


def _untouched(m: torch.nn.Module, before: list[torch.Tensor]) -> bool:
    now = _snapshot(m)
    return all(torch.equal(a, b) for a, b in zip(before, now))


def _expect_error(path: str, m: torch.nn.Module, sd: dict[str, Any]) -> dict[str, Any]:
    from dist_restore import RestoreCoordinator, RestoreError

    before = _snapshot(m)
    try:
        RestoreCoordinator(timeout=60).restore(path, sd)
    except RestoreError as e:
        return {"error": f"{type(e).__name__}: {e}", "untouched": _untouched(m, before)}
    return {"error": "", "untouched": _untouched(m, before)}


def restore_expect_error(rank: int, world: int, path: str, kind: str) -> dict[str, Any]:
    m, opt = build(kind, world, seed=99)
    return _expect_error(path, m, _state(m, opt))


def restore_mismatch(rank: int, world: int, path: str) -> dict[str, Any]:
    """A target whose global shape differs from the saved one (15 rows, saved 14)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    m, opt = build("fsdp", world, seed=99)
    sd = _state(m, opt)
    mesh = init_device_mesh("cpu", (world,))
    sd["model"]["up.weight"] = distribute_tensor(torch.zeros(15, DIMS[0]), mesh, [Shard(0)])
    return _expect_error(path, m, sd)


def restore_partial(rank: int, world: int, path: str) -> dict[str, Any]:
    """A target placement that is not a slice of the global tensor."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial

    m, opt = build("fsdp", world, seed=99)
    sd = _state(m, opt)
    mesh = init_device_mesh("cpu", (world,))
    sd["model"]["norm.bias"] = DTensor.from_local(torch.zeros(DIMS[2]), mesh, [Partial()])
    return _expect_error(path, m, sd)


#: Large enough that every rank's piece of it (>= 256 KiB) goes by the I/O pool.
BIG = (1024, 384)


def _big_full() -> torch.Tensor:
    return torch.randn(*BIG, generator=torch.Generator().manual_seed(5))


def save_big(rank: int, world: int, path: str, dim: int = 0) -> dict[str, Any]:
    """One large weight sharded on ``dim`` (0: by rows, as FSDP2 shards it; 1: by columns, as
    a row-parallel layer's is), saved with plain torch.save."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    w = distribute_tensor(_big_full(), mesh, [Shard(dim)])
    os.makedirs(path, exist_ok=True)
    torch.save({"w": w, "b": torch.arange(10.0)}, Path(path) / f"checkpoint_{rank}.pt")
    dist.barrier()
    return {}


def restore_big(rank: int, world: int, path: str) -> dict[str, Any]:
    """Restore into a row-sharded DTensor on this world; compare with the full tensor."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from dist_restore import RestoreCoordinator

    mesh = init_device_mesh("cpu", (world,))
    w = distribute_tensor(torch.zeros(*BIG), mesh, [Shard(0)])
    res = RestoreCoordinator(timeout=60).restore(path, {"w": w})
    local = w.to_local()
    rows = -(-BIG[0] // world)
    want = _big_full()[rank * rows:(rank + 1) * rows]
    return {"ok": torch.equal(local, want), "bytes_read": res.stats.bytes_read,
            "verified": res.stats.bytes_verified if hasattr(res.stats, "bytes_verified") else None,
            "files_opened": res.stats.files_opened}
