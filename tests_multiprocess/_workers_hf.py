"""Workers for the Hugging Face safetensors tests: a Llama-shaped model (the parameter names and
shapes of transformers' ``LlamaForCausalLM``, built here in plain torch so that a rank does not
import transformers) sharded for real with ``fully_shard`` / ``parallelize_module`` on CPU
meshes, restored from a ``save_pretrained`` directory, and compared bit for bit with
``safetensors.torch.load_file`` of the same files (the oracle)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

#: The tiny Llama config the tests save with transformers (uneven on purpose: a vocab of 250
#: and an MLP of 96 split over 3 or 4 ranks leave short shards).
CONFIG = dict(vocab_size=250, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
              num_hidden_layers=2, max_position_embeddings=64, tie_word_embeddings=False)


class _Attn(nn.Module):
    def __init__(self, h: int, kv: int) -> None:
        super().__init__()
        self.q_proj, self.k_proj = nn.Linear(h, h, bias=False), nn.Linear(h, kv, bias=False)
        self.v_proj, self.o_proj = nn.Linear(h, kv, bias=False), nn.Linear(h, h, bias=False)


class _MLP(nn.Module):
    def __init__(self, h: int, i: int) -> None:
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(h, i, bias=False), nn.Linear(h, i, bias=False)
        self.down_proj = nn.Linear(i, h, bias=False)


class _Layer(nn.Module):
    def __init__(self, h: int, i: int, kv: int) -> None:
        super().__init__()
        self.self_attn, self.mlp = _Attn(h, kv), _MLP(h, i)
        self.input_layernorm, self.post_attention_layernorm = nn.RMSNorm(h), nn.RMSNorm(h)


class _Body(nn.Module):
    def __init__(self, c: dict[str, Any]) -> None:
        super().__init__()
        h = c["hidden_size"]
        kv = h // c["num_attention_heads"] * c["num_key_value_heads"]
        self.embed_tokens = nn.Embedding(c["vocab_size"], h)
        self.layers = nn.ModuleList(_Layer(h, c["intermediate_size"], kv) for _ in range(c["num_hidden_layers"]))
        self.norm = nn.RMSNorm(h)


class Llama(nn.Module):
    def __init__(self, c: dict[str, Any] = CONFIG, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.model = _Body(c)
        self.lm_head = nn.Linear(c["hidden_size"], c["vocab_size"], bias=False)
        self.to(dtype)
        if next(self.parameters()).device.type != "meta":
            with torch.no_grad():
                for p in self.parameters():
                    p.fill_(-7.0)  # nothing like the saved values


def _tp(m: Llama, mesh: Any) -> None:
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    plan: dict[str, Any] = {"model.embed_tokens": RowwiseParallel(input_layouts=Replicate()),
                            "lm_head": ColwiseParallel(output_layouts=Replicate())}
    for i in range(len(m.model.layers)):
        p = f"model.layers.{i}."
        plan |= {p + "self_attn.q_proj": ColwiseParallel(), p + "self_attn.k_proj": ColwiseParallel(),
                 p + "self_attn.v_proj": ColwiseParallel(), p + "self_attn.o_proj": RowwiseParallel(),
                 p + "mlp.gate_proj": ColwiseParallel(), p + "mlp.up_proj": ColwiseParallel(),
                 p + "mlp.down_proj": RowwiseParallel()}
    parallelize_module(m, mesh, plan)


def build(layout: str, world: int, dtype: torch.dtype = torch.float32, *, config: dict[str, Any] = CONFIG,
          meta: bool = False) -> Llama:
    """``layout``: ``fsdp`` (FSDP2, 1-D), ``tp`` (tensor parallel only: embeddings and
    projections sharded, norms plain on every rank), ``fsdp_tp`` (2-D (dp, tp), tp=2),
    ``hsdp`` (2-D (replicate, shard)), ``plain`` (every rank holds every tensor). ``meta``:
    built on the meta device, sharded, then given uninitialised memory (a large model)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if meta:
        with torch.device("meta"):
            m = Llama(config, dtype)
    else:
        m = Llama(config, dtype)
    if layout == "fsdp":
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("dp",))
        for layer in m.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(m, mesh=mesh)
    elif layout == "tp":
        _tp(m, init_device_mesh("cpu", (world,), mesh_dim_names=("tp",)))
    elif layout == "fsdp_tp":
        mesh = init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("dp", "tp"))
        _tp(m, mesh["tp"])
        for layer in m.model.layers:
            fully_shard(layer, mesh=mesh["dp"])
        fully_shard(m, mesh=mesh["dp"])
    elif layout == "hsdp":
        mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
        fully_shard(m, mesh=mesh)
    elif layout != "plain":
        raise ValueError(layout)
    if meta:
        m.to_empty(device="cpu")
    return m


def _full(v: torch.Tensor) -> torch.Tensor:
    return v.full_tensor() if hasattr(v, "full_tensor") else v


def _local_bytes(sd: dict[str, Any]) -> int:
    n = 0
    for v in sd.values():
        t = v.to_local() if hasattr(v, "to_local") else v
        n += t.numel() * t.element_size()
    return n


def restore(rank: int, world: int, path: str, layouts: list[str], cast: bool = False) -> dict[str, Any]:
    """Restore ``path`` into each layout in turn; every tensor's ``full_tensor()`` against the
    oracle (the saved values, cast to the target's dtype with ``cast``)."""
    from safetensors.torch import load_file

    from dist_restore import RestoreCoordinator

    files = sorted(Path(path).glob("*.safetensors"))
    oracle: dict[str, torch.Tensor] = {}
    for f in files:
        oracle |= load_file(f)
    out: dict[str, Any] = {}
    for layout in layouts:
        m = build(layout, world, torch.float32)
        sd = m.state_dict()
        res = RestoreCoordinator(timeout=60).restore(path, sd, strict=True, cast=cast)
        bad = []
        for k, p in list(m.named_parameters()):
            want = oracle[k].to(torch.float32) if cast else oracle[k]
            got = _full(p.detach())
            if got.dtype != want.dtype or not torch.equal(got, want):
                bad.append(k)
        out[layout] = {"bad": bad, "bytes_read": res.stats.bytes_read, "shard_bytes": _local_bytes(sd),
                       "files_opened": res.stats.files_opened, "collectives": res.stats.collectives,
                       "report": res.report.render() if res.report else None,
                       "scale": (oracle["lm_head.weight"].element_size() / 4) if cast else 1.0}
    return out


def restore_bad(rank: int, world: int, path: str, mode: str) -> dict[str, Any]:
    """A restore that must fail on every rank before any target is touched: ``dtype`` (bf16
    files into fp32 targets without ``cast``), ``corrupt`` (rank 1 sees a damaged file
    because its key map sends it to another directory)."""
    from dist_restore import RestoreCoordinator, RestoreError

    m = build("fsdp", world)
    before = [_full(p.detach()).clone() for p in m.parameters()]
    target = path
    if mode == "corrupt" and rank == 1:
        target = str(Path(path).parent / "corrupt")
    try:
        RestoreCoordinator(timeout=60).restore(target, m.state_dict())
    except RestoreError as e:
        untouched = all(torch.equal(a, _full(p.detach())) for a, p in zip(before, m.parameters()))
        return {"error": str(e), "phase": e.phase, "failed": sorted(e.failures), "untouched": untouched}
    return {"error": None}


def save_odd(path: str) -> dict[str, torch.Tensor]:
    """Tensors whose shards are empty on some of 4 ranks, 0-d, or need staging: written by
    ``safetensors.torch.save_file`` into one file (the oracle is the dict itself)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(5)
    sd = {"tiny": torch.randn(2, 5, generator=g), "cols": torch.randn(3, 9, generator=g),
          "scalar": torch.tensor(4.25), "empty": torch.empty(0, 3), "i8": torch.randint(-9, 9, (6, 300), generator=g,
                                                                                        dtype=torch.int8),
          "strided": torch.randn(6, 8, 4, generator=g), "bf": torch.randn(7, 3, generator=g).to(torch.bfloat16)}
    save_file(sd, path)
    return sd


def restore_odd(rank: int, world: int, path: str) -> dict[str, Any]:
    """DTensor targets made by ``distribute_tensor`` on 1-D and 2-D meshes: empty shards (2 rows
    over 4 ranks), column shards, ``_StridedShard``, Replicate, a 0-d tensor, a cast."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.placement_types import _StridedShard

    from dist_restore import RestoreCoordinator

    mesh = init_device_mesh("cpu", (world,))
    mesh2 = init_device_mesh("cpu", (2, world // 2))
    sd = {
        "tiny": distribute_tensor(torch.zeros(2, 5), mesh, [Shard(0)]),
        "cols": distribute_tensor(torch.zeros(3, 9), mesh, [Shard(1)]),
        "scalar": distribute_tensor(torch.zeros(()), mesh, [Replicate()]),
        "empty": distribute_tensor(torch.zeros(0, 3), mesh, [Shard(0)]),
        "i8": distribute_tensor(torch.zeros(6, 300, dtype=torch.int8), mesh2, [Shard(1), Shard(0)]),
        "strided": distribute_tensor(torch.zeros(6, 8, 4), mesh2, [_StridedShard(1, split_factor=2), Shard(1)]),
        "bf": distribute_tensor(torch.zeros(7, 3), mesh2, [Replicate(), Shard(0)]),  # cast bf16 -> fp32
    }
    locals_ = {k: tuple(v.to_local().shape) for k, v in sd.items()}
    res = RestoreCoordinator(timeout=60).restore(path, sd, strict=True, cast=True)
    full = {k: v.full_tensor() for k, v in res.state_dict.items()}
    return {"full": full, "locals": locals_, "bytes_read": res.stats.bytes_read,
            "shard_bytes": sum(v.to_local().numel() * v.to_local().element_size() for v in sd.values())}
