"""Workers for the GPU tests; module-level so that spawned ranks can import them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

DEVICE = os.environ.get("DR_GPU_DEVICE", "cuda")


def _dev() -> torch.device:
    if DEVICE == "cuda":
        torch.cuda.set_device(0)  # one GPU: every rank shares it
        return torch.device("cuda", 0)
    return torch.device("cpu")


def _bytes(t: torch.Tensor) -> bytes:
    return t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def save_plain(rank: int, world: int, path: str) -> dict[str, Any]:
    """Each rank saves its own entries plus replicated ``shared.*`` ones, on the CPU."""
    g = torch.Generator().manual_seed(100 + rank)
    own = {"w": torch.randn(64, 33, generator=g), "b": torch.randn(33, generator=g).bfloat16(),
           "big": torch.randn(3 << 20, generator=g)}
    gs = torch.Generator().manual_seed(7)
    shared = {"emb": torch.randn(1000, 17, generator=gs), "big": torch.randn(2 << 20, generator=gs),
              "step": torch.tensor(5)}
    Path(path).mkdir(parents=True, exist_ok=True)
    torch.save({"own": own, "shared": shared, "epoch": 3}, Path(path) / f"checkpoint_{rank}.pt")
    dist.barrier()
    return {}


def restore_plain(rank: int, world: int, path: str, mode: str) -> dict[str, Any]:
    """Restore into targets on the device (one non-contiguous); compare with torch.load."""
    from dist_restore import RestoreCoordinator

    dev = _dev()
    want = torch.load(Path(path) / f"checkpoint_{rank}.pt", weights_only=True)
    w_t = torch.zeros(33, 64, device=dev).t()  # non-contiguous target
    sd = {"own": {"w": w_t, "b": torch.zeros(33, dtype=torch.bfloat16, device=dev),
                  "big": torch.zeros(3 << 20, device=dev)},
          "shared": {"emb": torch.zeros(1000, 17, device=dev), "big": torch.zeros(2 << 20, device=dev),
                     "step": torch.zeros((), dtype=torch.int64, device=dev)},
          "epoch": None}
    ptrs = {k: v.data_ptr() for k, v in sd["own"].items()}
    res = RestoreCoordinator(timeout=60).restore(path, sd, shared=["shared"], shared_mode=mode)
    bad = []
    for grp in ("own", "shared"):
        for k, v in want[grp].items():
            got = res.state_dict[grp][k]
            if got.device != dev or got.dtype != v.dtype or got.shape != v.shape or _bytes(got) != _bytes(v):
                bad.append(f"{grp}.{k}")
    if any(sd["own"][k].data_ptr() != p for k, p in ptrs.items()) or res.state_dict["own"]["w"] is not w_t:
        bad.append("not in place")
    if res.state_dict["epoch"] != 3:
        bad.append("epoch")
    return {"bad": bad, "bytes_read": res.stats.bytes_read}


def restore_dtensor_handmade(rank: int, world: int, path: str) -> dict[str, Any]:
    """Hand-made DTensor targets on a device mesh: ``own.w`` split by rows over the ranks
    (so every rank reads slices of every file's records), the rest whole per rank."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard

    from dist_restore import RestoreCoordinator

    dev = _dev()
    mesh = init_device_mesh(dev.type, (world,))
    want = [torch.load(Path(path) / f"checkpoint_{r}.pt", weights_only=True) for r in range(world)]
    full = want[0]["shared"]["emb"]
    rows = full.shape[0]
    step = -(-rows // world)
    lo, hi = min(rank * step, rows), min((rank + 1) * step, rows)
    local = torch.zeros(hi - lo, full.shape[1], device=dev)
    emb = DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=full.shape,
                             stride=full.stride())
    rep = DTensor.from_local(torch.zeros(2 << 20, device=dev), mesh, [Replicate()], run_check=False)
    res = RestoreCoordinator(timeout=60).restore(path, {"shared": {"emb": emb, "big": rep}})
    bad = []
    if _bytes(local) != _bytes(full[lo:hi]):
        bad.append("shared.emb shard")
    if _bytes(rep.to_local()) != _bytes(want[0]["shared"]["big"]):
        bad.append("shared.big replica")
    return {"bad": bad, "bytes_read": res.stats.bytes_read, "files_opened": res.stats.files_opened}


def restore_fsdp_one_rank(rank: int, world: int, path: str) -> dict[str, Any]:
    """A real FSDP2 model and AdamW state on a one-rank device mesh (NCCL on a GPU), restored
    from a checkpoint saved by 2 CPU ranks; compared with the saving side's full tensors."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from dist_restore import RestoreCoordinator
    from tests_multiprocess._workers_dtensor import DIMS, MLP, _flat, _full, _state

    dev = _dev()
    full = torch.load(Path(path).parent / f"{Path(path).name}_full.pt", weights_only=True)
    torch.manual_seed(99)
    m = MLP().to(dev)
    mesh = init_device_mesh(dev.type, (world,), mesh_dim_names=("dp",))
    fully_shard(m.up, mesh=mesh)
    fully_shard(m, mesh=mesh)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    m(torch.randn(4, DIMS[0], device=dev)).sum().backward()
    opt.step()
    opt.zero_grad()
    sd = _state(m, opt)
    # where each target lives (AdamW keeps its ``step`` tensors on the CPU): restored in place
    where = {k: v.device for k, v in _flat(sd).items() if isinstance(v, torch.Tensor)}
    res = RestoreCoordinator(timeout=60).restore(path, sd)
    bad = []
    for k, v in _flat(res.state_dict).items():
        if not isinstance(v, torch.Tensor) or k.startswith("extra.rank_value"):
            continue
        f = _full(v)
        if v.device != where.get(k, v.device) or (k.startswith("model.") and f.device.type != dev.type):
            bad.append(f"{k}: on {v.device}")
        elif k not in full or f.shape != full[k].shape or _bytes(f) != _bytes(full[k]):
            bad.append(f"{k}: differs")
    for k, p in m.named_parameters():
        if _bytes(_full(p.detach())) != _bytes(full[f"model.{k}"]):
            bad.append(f"param {k}: differs")
    # the restored model still trains: a step on the device runs
    m(torch.randn(4, DIMS[0], device=dev)).sum().backward()
    opt.step()
    return {"bad": bad, "files_opened": res.stats.files_opened, "n": len(_flat(res.state_dict))}
