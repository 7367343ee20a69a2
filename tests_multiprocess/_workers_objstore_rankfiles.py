"""Workers for restoring our own rank files from an S3 server (moto, started by the test
process; the endpoint comes in the environment): real FSDP2 / FSDP2+TP models, compared bit
for bit with the full tensors saved beside the local copy."""

from __future__ import annotations

from typing import Any

import torch

from tests_multiprocess import _workers_dtensor as w


def restore(rank: int, world: int, url: str, full_path: str, kind: str) -> dict[str, Any]:
    from dist_restore import RestoreCoordinator

    full = torch.load(full_path, weights_only=True)
    m, opt = w.build(kind, world, seed=99)
    sd = w._state(m, opt)
    shard_bytes = sum(v.to_local().numel() * v.element_size() if hasattr(v, "to_local")
                      else v.numel() * v.element_size()
                      for v in w._flat(sd).values() if isinstance(v, torch.Tensor))
    res = RestoreCoordinator(timeout=60).restore(url, sd)
    got = {k: w._full(v) for k, v in w._flat(res.state_dict).items() if isinstance(v, torch.Tensor)}
    bad = []
    for k, v in got.items():
        if k.startswith("extra.rank_value"):
            continue
        if k not in full:
            bad.append(f"{k}: not saved")
        elif v.dtype != full[k].dtype or v.shape != full[k].shape or not torch.equal(v, full[k]):
            bad.append(f"{k}: differs")
    for k, p in m.named_parameters():
        if not torch.equal(w._full(p.detach()), full[f"model.{k}"]):
            bad.append(f"param {k}: differs")
    return {"bad": bad, "bytes_read": res.stats.bytes_read, "shard_bytes": shard_bytes,
            "bytes_verified": res.stats.bytes_verified, "missing": res.missing_keys,
            "rank_value": float(got["extra.rank_value"][0]), "step": res.state_dict["extra"]["step"],
            "report": res.report.render() if res.report else None}
