"""Workers for the DCP tests: checkpoints written by ``torch.distributed.checkpoint.save`` from
real plain / FSDP2 / TP / FSDP2+TP models on CPU meshes (gloo), restored by our coordinator
and compared bit for bit with ``torch.distributed.checkpoint.load`` (the oracle) into an
identically built second target on the same ranks.

The model is the tiny Llama of :mod:`tests_multiprocess._workers_hf` (a 250 x 64 embedding and
an MLP of 96: shards are uneven over 3 and 4 ranks). Every parameter gets distinct seeded
values (the same global tensor on every rank, sliced to the rank's shard), then one AdamW
step with seeded gradients, so that ``exp_avg``/``exp_avg_sq``/``step`` exist. The state is
taken the torchtitan way, ``get_state_dict(model, opt)`` (optimizer state keyed by parameter
FQN), and saved as ``{"model": msd, "optim": osd, "train": {"step": 7, "epoch": 2}}``.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from tests_multiprocess._workers import bits
from tests_multiprocess._workers_hf import _full
from tests_multiprocess._workers_hf import build as build_llama

#: The values a checkpoint is saved with and the ones a fresh target starts from: other
#: parameter seeds, and other hyperparameters so that the non-tensor leaves differ too.
SAVED = {"seed": 1234, "lr": 1e-2, "betas": (0.9, 0.95), "weight_decay": 0.1, "train": {"step": 7, "epoch": 2}}
TARGET = {"seed": 99, "lr": 0.5, "betas": (0.8, 0.9), "weight_decay": 0.0, "train": {"step": 0, "epoch": 0}}


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` (the same on every rank) cut to ``like``'s shard, without communication."""
    if not hasattr(like, "device_mesh"):
        return full
    from torch.distributed.tensor import distribute_tensor

    local = distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None).to_local()
    assert local.shape == _local(like).shape, (local.shape, _local(like).shape, like.placements)
    return local


def build(layout: str, world: int, spec: dict[str, Any]) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The model in ``layout`` (see ``_workers_hf.build``) with ``spec``'s seeded values, after
    one AdamW step with ``spec``'s hyperparameters and seeded gradients."""
    m = build_llama(layout, world)
    params = list(m.named_parameters())
    with torch.no_grad():
        for i, (_name, p) in enumerate(params):
            g = torch.Generator().manual_seed(spec["seed"] * 1000 + i)
            _local(p).copy_(_like(torch.randn(p.shape, generator=g), p))
    opt = torch.optim.AdamW(m.parameters(), lr=spec["lr"], betas=spec["betas"],
                            weight_decay=spec["weight_decay"])
    for i, (_name, p) in enumerate(params):
        g = torch.Generator().manual_seed(spec["seed"] * 1000 + 500 + i)
        grad = torch.randn(p.shape, generator=g)
        if hasattr(p, "device_mesh"):
            from torch.distributed.tensor import distribute_tensor

            grad = distribute_tensor(grad, p.device_mesh, p.placements, src_data_rank=None)
        p.grad = grad
    opt.step()
    opt.zero_grad(set_to_none=True)
    return m, opt


def state(m: torch.nn.Module, opt: torch.optim.Optimizer, spec: dict[str, Any]) -> dict[str, Any]:
    """What is saved (and what a target passes): ``get_state_dict`` plus a non-tensor entry."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(m, opt)
    return {"model": msd, "optim": osd, "train": copy.deepcopy(spec["train"])}


def fresh_target(layout: str, world: int) -> tuple[torch.nn.Module, torch.optim.Optimizer, dict[str, Any]]:
    """A target unlike any saved checkpoint: other values, zeroed optimizer state (step 0)."""
    m, opt = build(layout, world, TARGET)
    with torch.no_grad():
        for st in opt.state.values():
            for v in st.values():
                if isinstance(v, torch.Tensor):
                    _local(v).zero_()
    return m, opt, state(m, opt, TARGET)


def flatten(sd: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys as DCP flattens a state dict: dicts by key; lists by index when they hold
    containers or tensors (``param_groups``), else a list is a leaf (``params``, ``betas``)."""
    out: dict[str, Any] = {}
    if isinstance(sd, dict):
        for k, v in sd.items():
            out |= flatten(v, f"{prefix}{k}.")
    elif isinstance(sd, list) and any(isinstance(v, (dict, list, torch.Tensor)) for v in sd):
        for i, v in enumerate(sd):
            out |= flatten(v, f"{prefix}{i}.")
    else:
        out[prefix[:-1]] = sd
    return out


def _tensors(flat: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in flat.items() if isinstance(v, torch.Tensor)}


def full_values(sd: Any) -> dict[str, Any]:
    """Every leaf: tensors as clones of their ``full_tensor()`` (a collective per DTensor, in
    the same key order on every rank), other leaves deep-copied."""
    out = {}
    for k, v in flatten(sd).items():
        out[k] = _full(v).detach().clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(bits(a), bits(b)))
    return type(a) is type(b) and a == b


def compare(got: dict[str, Any], want: dict[str, Any]) -> list[str]:
    """Keys whose leaves differ (bits, dtype, shape; type and ``==`` for other leaves)."""
    bad = [f"{k}: missing" for k in want if k not in got]
    bad += [f"{k}: unexpected" for k in got if k not in want]
    bad += [f"{k}: differs" for k in want if k in got and not _same(got[k], want[k])]
    return bad


def _params(m: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: _full(p.detach()).clone() for k, p in m.named_parameters()}


def save(rank: int, world: int, path: str, layout: str) -> dict[str, Any]:
    """``dcp.save`` of the ``SAVED`` model and optimizer in ``layout``."""
    import torch.distributed.checkpoint as dcp

    m, opt = build(layout, world, SAVED)
    dcp.save(state(m, opt, SAVED), checkpoint_id=path)
    return {}


def save_in_own_group(rank: int, world: int, path: str, layout: str) -> dict[str, Any]:
    """:func:`save` on a 1-rank process group of its own (an in-memory store), destroyed after:
    for a rank spawned without a process group (``run_ranks(..., init_process_group=False)``)."""
    import torch.distributed as dist

    assert world == 1 and not dist.is_initialized(), (world, dist.is_initialized())
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        return save(rank, world, path, layout)
    finally:
        dist.destroy_process_group()


def save_many(rank: int, world: int, jobs: list[tuple[str, str]]) -> dict[str, Any]:
    """:func:`save` for each ``(path, layout)``, in one process group."""
    for path, layout in jobs:
        save(rank, world, path, layout)
    return {}


def _partial(sd: dict[str, Any]) -> dict[str, Any]:
    """A target that asks for two keys the checkpoint lacks and not for one it has."""
    del sd["train"]["epoch"]
    sd["train"]["not_saved"] = 5
    sd["extra"] = {"new": torch.zeros(3)}
    return sd


def restore(rank: int, world: int, path: str, layout: str, use_ours: bool,
            partial: bool = False) -> dict[str, Any]:
    """Restore ``path`` into a fresh ``layout`` target with ours (``use_ours``) or ``dcp.load``;
    compare with ``dcp.load`` into a second fresh target. ``partial``: the targets miss
    ``train.epoch`` and add ``train.not_saved`` and ``extra.new`` (the oracle loads with
    ``allow_partial_load``; both keep their values for the keys not saved).

    Returns ``bad`` (leaves that differ from the oracle), ``params_bad`` (model parameters
    that do not hold the oracle's values), ``same_before`` (tensor leaves that already
    equalled the oracle before the restore: none, or the check proves nothing),
    ``not_in_place`` (tensor leaves whose object or local storage changed), ``missing``,
    ``unexpected``, ``bytes_read`` and ``collectives`` (ours only), ``shard_bytes`` (the
    target's local tensor bytes), ``n_tensors``/``n_objects``, and ``report`` (rank 0)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultLoadPlanner

    m, _opt, sd = fresh_target(layout, world)
    if partial:
        sd = _partial(sd)
    before = full_values(sd)
    tensors = _tensors(flatten(sd))
    ptrs = {k: _local(v).data_ptr() for k, v in tensors.items()}
    shard_bytes = sum(_local(v).nbytes for v in tensors.values())

    m2, _opt2, sd2 = fresh_target(layout, world)
    if partial:
        sd2 = _partial(sd2)
    dcp.load(sd2, checkpoint_id=path, planner=DefaultLoadPlanner(allow_partial_load=partial))
    want = full_values(sd2)

    out: dict[str, Any] = {"missing": [], "unexpected": [], "bytes_read": None, "collectives": None,
                           "report": None}
    if use_ours:
        from dist_restore import RestoreCoordinator

        res = RestoreCoordinator(timeout=60).restore(path, sd)
        got_sd = res.state_dict
        # the contract names them ``missing``/``unexpected``; RestoreResult has had ``*_keys``
        out["missing"] = list(getattr(res, "missing", getattr(res, "missing_keys", None)))
        out["unexpected"] = list(getattr(res, "unexpected", getattr(res, "unexpected_keys", None)))
        out["bytes_read"] = res.stats.bytes_read
        out["bytes_verified"] = res.stats.bytes_verified
        out["collectives"] = res.stats.collectives
        out["report"] = res.report.render() if res.report is not None else None
    else:
        dcp.load(sd, checkpoint_id=path, planner=DefaultLoadPlanner(allow_partial_load=partial))
        got_sd = sd
    got_flat = flatten(got_sd)
    out["bad"] = compare(full_values(got_sd), want)
    out["params_bad"] = compare(_params(m), _params(m2))
    out["same_before"] = sorted(k for k, v in _tensors(before).items() if k in want and _same(v, want[k]))
    out["not_in_place"] = sorted(k for k, v in tensors.items()
                                 if got_flat.get(k) is not v or _local(v).data_ptr() != ptrs[k])
    out["objects"] = {k: v for k, v in got_flat.items() if not isinstance(v, torch.Tensor)}
    out["shard_bytes"] = shard_bytes
    out["n_tensors"] = len(tensors)
    out["n_objects"] = len(want) - len(tensors)
    return out


def restore_many(rank: int, world: int, jobs: list[tuple[str, str, bool]], use_ours: bool) -> list[dict[str, Any]]:
    """:func:`restore` for each ``(path, layout, partial)``, in one process group."""
    return [restore(rank, world, path, layout, use_ours, partial) for path, layout, partial in jobs]


def restore_expect_error(rank: int, world: int, path: str, layout: str) -> dict[str, Any]:
    """Restore a damaged checkpoint with ours into a fresh target; return what was raised
    (``type``, ``error``; ``None`` if nothing) and the leaves of the target (local shards and
    non-tensor leaves) that are no longer as before (``changed``). No collective outside ours, so a
    rank that wrongly succeeds does not hang the others here."""
    from dist_restore import RestoreCoordinator

    _m, _opt, sd = fresh_target(layout, world)
    before = {k: (_local(v).clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v))
              for k, v in flatten(sd).items()}
    typ = err = None
    try:
        RestoreCoordinator(timeout=30).restore(path, sd)
    except Exception as e:  # noqa: BLE001 - the test checks the type
        typ, err = type(e).__name__, str(e)
    now = {k: (_local(v) if isinstance(v, torch.Tensor) else v) for k, v in flatten(sd).items()}
    return {"type": typ, "error": err, "changed": [b.split(":")[0] for b in compare(now, before)]}


def restore_expect_errors(rank: int, world: int, jobs: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """:func:`restore_expect_error` for each ``(path, layout)``, in one process group."""
    return [restore_expect_error(rank, world, path, layout) for path, layout in jobs]


def dcp_diff(rank: int, world: int, path_a: str, path_b: str, layout: str) -> dict[str, Any]:
    """``dcp.load`` of two checkpoints into fresh targets: the keys whose values differ
    (``differ``), or what ``dcp.load`` of ``path_a`` raised (``error``)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    _m, _o, sd_a = fresh_target(layout, world)
    _m2, _o2, sd_b = fresh_target(layout, world)
    try:
        dcp.load(sd_a, checkpoint_id=path_a)
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - reported; CheckpointException is a BaseException
        return {"error": f"{type(e).__name__}: {e}", "differ": None}
    dcp.load(sd_b, checkpoint_id=path_b)
    return {"error": None, "differ": [b.split(":")[0] for b in compare(full_values(sd_a), full_values(sd_b))]}


def dcp_diff_many(rank: int, world: int, jobs: list[tuple[str, str, str]]) -> list[dict[str, Any]]:
    """:func:`dcp_diff` for each ``(path_a, path_b, layout)``, in one process group."""
    return [dcp_diff(rank, world, a, b, layout) for a, b, layout in jobs]
