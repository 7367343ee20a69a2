"""Worker for the trainer-hook test of a job that grew: restore a 1-rank checkpoint on 2 ranks."""

from __future__ import annotations

from typing import Any

import torch


def restore_grown(rank: int, world: int, path: str) -> dict[str, Any]:
    from dist_restore.trainer import TrainingState, restore_training_state

    torch.manual_seed(99)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    state = TrainingState(models={"net": model}, optimizers={"adam": opt}, extra={"step": 0})
    torch.manual_seed(100 + rank)
    before = torch.get_rng_state()
    res = restore_training_state(path, state, strict=True, timeout=60)
    return {"model": model.state_dict(), "opt": opt.state_dict(), "step": state.extra["step"],
            "rng_before": before, "rng_after": torch.get_rng_state(), "missing": res.missing_keys}
