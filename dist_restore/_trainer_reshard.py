"""What the trainer hooks need to resume on another world size or from DTensor (FSDP2/TP) state.

- :func:`optimizer_target`: an optimizer over DTensor parameters is restored into its own
  ``state_dict()`` (DTensor targets, resharded from any layout); its state is made first if it
  does not exist yet (:func:`materialize_optimizer_state`).
- :func:`strict_problems`: the strict check when the job grew: a rank without a rank file of
  its own keeps its RNG states (they are per rank), so their absence is no problem.

No collectives here; the hooks run them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch

from dist_restore._planning.reshard import is_dtensor

logger = logging.getLogger(__name__)


def has_dtensor_params(opt: torch.optim.Optimizer) -> bool:
    return any(is_dtensor(p) for g in opt.param_groups for p in g["params"])


def materialize_optimizer_state(opt: torch.optim.Optimizer) -> None:
    """Create an optimizer's lazily made state (Adam's ``exp_avg``, ``step``, ...) in place.

    One ``step()`` with zero gradients and a learning rate of 0 (restored after), as
    ``torch.distributed.checkpoint.state_dict`` does: the parameters do not change (every
    update is scaled by the learning rate, decoupled weight decay included) and the state's
    values are overwritten by the restore that follows. Gradients the parameters had are put
    back. Nothing happens when the state exists already.
    """
    if opt.state:
        return
    params = [p for g in opt.param_groups for p in g["params"] if p.requires_grad]
    grads = [p.grad for p in params]
    lrs = [g.get("lr") for g in opt.param_groups]
    try:
        for p in params:
            p.grad = torch.zeros_like(p)
        for g in opt.param_groups:
            if "lr" in g:
                g["lr"] = torch.zeros_like(g["lr"]) if isinstance(g["lr"], torch.Tensor) else 0.0
        opt.step()
    finally:
        for g, lr in zip(opt.param_groups, lrs):
            if lr is not None:
                g["lr"] = lr
        for p, grad in zip(params, grads):
            p.grad = grad
    logger.debug("materialized the state of %s (%d parameters) to restore into", type(opt).__name__, len(params))


def optimizer_target(opt: torch.optim.Optimizer) -> dict[str, Any] | None:
    """The restore target of one optimizer: ``None`` (allocate what was saved) for plain
    parameters; for DTensor parameters its own state (materialized first), filled in place,
    and the saved ``param_groups``."""
    if not has_dtensor_params(opt):
        return None
    materialize_optimizer_state(opt)
    return {"state": opt.state_dict()["state"], "param_groups": None}


def strict_problems(missing: Iterable[str], unexpected: Iterable[str], *, own_file: bool) -> str | None:
    """A strict restore's complaint about one rank's keys, or ``None``: a rank without a
    rank file of its own (``own_file`` false) keeps its RNG states."""
    miss = sorted(k for k in missing if own_file or not (k == "rng" or k.startswith(("rng.", "rng["))))
    extra = sorted(unexpected)
    parts = []
    if miss:
        parts.append(f"missing keys: {', '.join(map(repr, miss[:10]))}" + (" ..." if len(miss) > 10 else ""))
    if extra:
        parts.append(f"unexpected keys: {', '.join(map(repr, extra[:10]))}" + (" ..." if len(extra) > 10 else ""))
    return "strict restore: " + "; ".join(parts) if parts else None
