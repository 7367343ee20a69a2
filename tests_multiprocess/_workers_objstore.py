"""Workers for the object-store tests: an FSDP2 model (the tiny Llama of
:mod:`tests_multiprocess._workers_hf`, ``fully_shard`` on a CPU mesh) restored from ``s3://``
URLs served by moto in the parent pytest process (the ranks inherit ``AWS_ENDPOINT_URL`` and
the credentials), compared bit for bit, through ``full_tensor()``, with the local copy of the
same checkpoint (``safetensors.torch.load_file``; ``dcp.load`` into an identically built target)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tests_multiprocess import _workers_dcp as wd
from tests_multiprocess import _workers_hf as wh


def _local_bytes(sd: dict[str, Any]) -> int:
    return sum(wd._local(v).nbytes for v in wd.flatten(sd).values() if isinstance(v, torch.Tensor))


def safetensors_state_dict() -> dict[str, torch.Tensor]:
    """The tiny Llama with distinct seeded values, keyed as transformers' ``LlamaForCausalLM``."""
    m = wh.Llama()
    with torch.no_grad():
        for i, (_k, p) in enumerate(m.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(100 + i)))
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def restore_fsdp(rank: int, world: int, hf_url: str, hf_local: str, dcp_url: str, dcp_local: str) -> dict[str, Any]:
    """Restore the safetensors directory and the DCP checkpoint at their URLs into FSDP2 targets
    on this rank; return the keys that differ from the local oracle and the bytes read."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file

    from dist_restore import RestoreCoordinator

    out: dict[str, Any] = {}
    # safetensors: every parameter's full_tensor() against load_file of the local shards
    oracle: dict[str, torch.Tensor] = {}
    for f in sorted(Path(hf_local).glob("*.safetensors")):
        oracle |= load_file(f)
    m = wh.build("fsdp", world)
    sd = m.state_dict()
    res = RestoreCoordinator(timeout=60).restore(hf_url, sd, strict=True)
    bad = [k for k, p in m.named_parameters() if not torch.equal(wh._full(p.detach()), oracle[k])]
    out["hf"] = {"bad": bad, "bytes_read": res.stats.bytes_read, "shard_bytes": _local_bytes(sd),
                 "whole_bytes": sum(t.nbytes for t in oracle.values()), "files_opened": res.stats.files_opened}
    # DCP: model and optimizer state against dcp.load of the local copy into a second target
    _m, _opt, sd = wd.fresh_target("fsdp", world)
    _m2, _opt2, want_sd = wd.fresh_target("fsdp", world)
    dcp.load(want_sd, checkpoint_id=dcp_local)
    want = wd.full_values(want_sd)
    before = wd.full_values(sd)
    res = RestoreCoordinator(timeout=60).restore(dcp_url, sd)
    out["dcp"] = {"bad": wd.compare(wd.full_values(sd), want), "bytes_read": res.stats.bytes_read,
                  "shard_bytes": _local_bytes(sd), "missing": list(res.missing_keys),
                  "unexpected": list(res.unexpected_keys),
                  "whole_bytes": sum(v.nbytes for v in want.values() if isinstance(v, torch.Tensor)),
                  "same_before": sorted(k for k, v in before.items() if isinstance(v, torch.Tensor)
                                        and wd._same(v, want[k]))}
    return out
