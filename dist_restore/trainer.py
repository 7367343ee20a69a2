"""Training-loop hooks: save and restore models, optimizers, schedulers, RNG states and extras.

Framework-neutral: a :class:`TrainingState` names the live objects of a training loop;
:func:`save_training_state` writes them with :class:`CheckpointWriter` (every rank) and
:func:`restore_training_state` / :func:`resume_latest` restore them in place with
:class:`RestoreCoordinator` (every rank). A plain loop::

    state = TrainingState(models={"net": model}, optimizers={"opt": opt},
                          schedulers={"lr": sched}, extra={"step": 0})

    # on_resume (all ranks): the newest complete checkpoint under ckpt/, if any
    if resume_latest("ckpt", state, shared_models=True) is not None:
        print("resumed at step", state.extra["step"])

    for step in range(state.extra["step"] + 1, total_steps + 1):
        train_one_step(...)
        state.extra["step"] = step
        if step % save_every == 0:  # on_save (all ranks)
            save_training_state(f"ckpt/step_{step}", state)

The file of each rank holds::

    {"models": {name: module.state_dict()}, "optimizers": {name: opt.state_dict()},
     "schedulers": {name: sched.state_dict()}, "rng": {...}, "extra": {...}}

Everything in it loads with weights-only semantics: the RNG states of ``random`` and
``numpy`` are stored as tensors, ints, floats and strings, not as their own objects.
RNG states are per rank (each rank's file holds its own); model entries can be marked
shared (replicated under DDP: read once on rank 0 and broadcast).
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from dist_restore._base.source import is_url, location
from dist_restore._format.manifest import IncompleteCheckpointError, rank_file_count, read_manifest
from dist_restore._bytes.read import MapLocation
from dist_restore._trainer_reshard import optimizer_target, strict_problems
from dist_restore._timeout import Timeout, to_seconds
from dist_restore._format.index import read_index
from dist_restore._types import rank_file_name
from dist_restore.coordinator import RestoreCoordinator, RestoreResult, _check_saved_world
from dist_restore.discovery import find_latest_checkpoint
from dist_restore.errors import RestoreError, StateDictMismatchError
from dist_restore.writer import CheckpointWriter

try:  # numpy is a dependency of the package, but the RNG hooks do not insist on it
    import numpy as np
except ImportError:  # pragma: no cover - numpy is installed with dist_restore
    np = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

T = TypeVar("T")

__all__ = ["TrainingState", "get_rng_state", "restore_training_state", "resume_latest", "save_training_state",
           "set_rng_state", "training_state_dict"]

_SECTIONS = ("models", "optimizers", "schedulers")


@dataclass
class TrainingState:
    """The live objects of a training loop that a checkpoint saves and restores in place.

    Attributes:
        models: Modules by name (under DDP pass ``ddp.module`` for keys without ``module.``).
        optimizers: Optimizers by name.
        schedulers: Learning-rate schedulers (anything with ``state_dict``/``load_state_dict``).
        rng: Save and restore this rank's RNG states (``random``, ``numpy``, torch CPU, CUDA).
        extra: Plain user values (``step``, ``epoch``, ...: ints, floats, strings, tensors,
            containers of them); a restore updates this very dict in place.
    """

    models: Mapping[str, torch.nn.Module] = field(default_factory=dict)
    optimizers: Mapping[str, torch.optim.Optimizer] = field(default_factory=dict)
    schedulers: Mapping[str, Any] = field(default_factory=dict)
    rng: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for section in _SECTIONS:
            objs = getattr(self, section)
            if not isinstance(objs, Mapping):
                raise TypeError(f"TrainingState.{section} must be a mapping of name -> object, got "
                                f"{type(objs).__name__}; wrap a single one as {{'main': obj}}")
            for name, obj in objs.items():
                if not isinstance(name, str) or not name:
                    raise ValueError(f"TrainingState.{section}: names must be non-empty strings, got {name!r}")
                if not (hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict")):
                    raise TypeError(f"TrainingState.{section}[{name!r}] is a {type(obj).__name__}, which has "
                                    "no state_dict()/load_state_dict()")
        if not isinstance(self.extra, dict):
            raise TypeError(f"TrainingState.extra must be a dict, got {type(self.extra).__name__}")


# -- saving ---------------------------------------------------------------------------------


def training_state_dict(state: TrainingState) -> dict[str, Any]:
    """The state dict :func:`save_training_state` writes (this rank's)."""
    sd: dict[str, Any] = {
        "models": {name: m.state_dict() for name, m in state.models.items()},
        "optimizers": {name: o.state_dict() for name, o in state.optimizers.items()},
        "schedulers": {name: s.state_dict() for name, s in state.schedulers.items()},
        "extra": dict(state.extra),
    }
    if state.rng:
        sd["rng"] = get_rng_state()
    return sd


def save_training_state(path: str | os.PathLike[str], state: TrainingState, *,
                        writer: CheckpointWriter | None = None,
                        metadata: Mapping[str, Any] | None = None, timeout: Timeout | None = None) -> Any:
    """Write ``state`` to the checkpoint directory ``path`` (call on every rank): on_save.

    Args:
        path: The checkpoint directory, e.g. ``ckpt/step_2000``.
        state: The live training objects.
        writer: The writer (default: ``CheckpointWriter()`` on the default process group,
            or a single process).
        metadata: JSON values for the commit manifest; default ``{"step": extra["step"]}``
            when ``state.extra["step"]`` is an int (``find_latest_checkpoint`` orders by it).
        timeout: Per collective, seconds or a ``timedelta``, for the default writer (a
            given ``writer`` has its own).

    Returns:
        The committed :class:`~dist_restore.Manifest` (``None`` where the writer cannot
        coordinate the ranks).

    Raises:
        TypeError, ValueError: a bad ``timeout``, or both ``writer`` and ``timeout``.
        RestoreError: on every rank, phase ``"write"``, if any rank failed to write.
    """
    writer = _given_or_default(writer, timeout, "writer", CheckpointWriter)
    if metadata is None:
        step = state.extra.get("step")
        if isinstance(step, int) and not isinstance(step, bool):
            metadata = {"step": step}
    return writer.write(path, training_state_dict(state), metadata=metadata)


# -- restoring ------------------------------------------------------------------------------


def restore_training_state(path: str | os.PathLike[str], state: TrainingState, *,
                           coordinator: RestoreCoordinator | None = None,
                           shared_models: bool | Iterable[str] = False, strict: bool = True,
                           map_location: MapLocation = None, timeout: Timeout | None = None) -> RestoreResult:
    """Restore ``state`` in place from the checkpoint directory ``path`` (every rank): on_resume.

    Steps: (all ranks) build the target from the live objects: model tensors are the
    modules' own ``state_dict()`` tensors, filled in place; optimizer and scheduler states
    and RNG states are allocated (an optimizer has no state before its first step);
    ``extra`` loads whatever was saved. (all ranks) :meth:`RestoreCoordinator.restore`
    with the model entries as shared when asked (read on rank 0, broadcast). (all ranks)
    ``load_state_dict`` on every module, optimizer and scheduler, set the RNG states,
    update ``state.extra`` in place. (all ranks) agree on the outcome of loading.

    Sharded models (FSDP2 ``fully_shard``, tensor parallel: DTensor parameters) restore
    from a checkpoint of any world size and layout: their DTensors are resharded. An
    optimizer over DTensor parameters is restored into its own state, which is created
    first when it does not exist yet (one ``step()`` with zero gradients and learning rate
    0, which leaves the parameters as they are; see
    :func:`._trainer_reshard.materialize_optimizer_state`). When the checkpoint was written
    by another number of ranks, every non-DTensor entry (plain model tensors, optimizer
    steps and hyperparameters, schedulers, ``extra``) comes from rank 0's file, and the RNG
    states are per rank: rank ``r`` takes file ``r``'s, and a rank without a file (the job
    grew) keeps its own; for such a job ``strict`` is checked after the read (the RNG
    states it lacks are no problem), before any ``load_state_dict``.

    Args:
        path: The checkpoint directory.
        state: The live training objects (the same names as when saved).
        coordinator: The coordinator (default: ``RestoreCoordinator()`` on the default group).
        shared_models: ``True``: every model is replicated on all ranks (DDP), read on
            rank 0 and broadcast; or the names of the replicated models; ``False``: each
            rank reads its own file's copy.
        strict: Fail on every rank if any rank's checkpoint misses or has extra keys
            (of a model, or a whole optimizer/scheduler/RNG section).
        map_location: Device for allocated tensors (default: where they were saved);
            models are filled where they live.
        timeout: Per collective, seconds or a ``timedelta``, for the default coordinator
            (a given ``coordinator`` has its own).

    Returns:
        The coordinator's result (``report`` on rank 0).

    Raises:
        ValueError: ``shared_models`` names an unknown model.
        TypeError, ValueError: a bad ``timeout``, or both ``coordinator`` and ``timeout``.
        RestoreError: on every rank, if any rank failed (missing or corrupt file, a shape
            mismatch, ``strict`` and a missing or unexpected key; phase ``"load"``: a
            ``load_state_dict`` refused what was read; the model tensors were already
            filled in place by then; phase ``"strict"``: the late strict check of a grown
            job).
    """
    coord = _given_or_default(coordinator, timeout, "coordinator", RestoreCoordinator)
    shared = _shared_spec(state, shared_models)
    pg = coord._pg  # the coordinator's group wrapper: collectives with its timeout
    # the same on every rank (one directory listing): decides how the collectives below run
    nfiles = rank_file_count(path) if is_url(path) or Path(path).is_dir() else pg.world_size
    changed = nfiles != pg.world_size
    target: dict[str, Any] = {
        "models": {name: m.state_dict() for name, m in state.models.items()},
        "optimizers": {name: optimizer_target(o) for name, o in state.optimizers.items()},
        "schedulers": {name: None for name in state.schedulers},
        "extra": None,
    }
    if state.rng:
        target["rng"] = None
    # another world size: RNG states from each rank's own file (ranks without one keep theirs),
    # so that strictness is judged here for a job that grew
    per_rank = ["rng"] if changed and state.rng else None
    late_strict = strict and per_rank is not None and pg.world_size > nfiles
    res = coord.restore(path, target, shared=shared, shared_mode="broadcast", strict=strict and not late_strict,
                        map_location=map_location, per_rank=per_rank)
    try:
        problem = strict_problems(res.missing_keys, res.unexpected_keys, own_file=pg.rank < nfiles) \
            if late_strict else None
        if problem:
            raise StateDictMismatchError(problem, file=path, rank=pg.rank)
        _load_back(state, res.state_dict, strict=strict)
        status: dict[str, Any] = {"ok": True}
    except StateDictMismatchError as e:
        status = {"ok": False, "error": str(e), "strict": True}
    except Exception as e:  # noqa: BLE001 - every rank learns of it below
        status = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    # (all ranks) agree, so that no rank trains on while another failed to load
    try:
        gathered = pg.all_gather_object(status)
    except Exception as e:
        raise RestoreError("load", {pg.rank: f"{status.get('error') or 'loaded'}; then {e}"}) from e
    failures = {r: s["error"] for r, s in enumerate(gathered) if not s["ok"]}
    if failures and all(s.get("strict") for s in gathered if not s["ok"]):
        raise RestoreError("strict", failures, detail=f"checkpoint {str(path)!r} (written by {nfiles} ranks, "
                                                      f"restored on {pg.world_size})")
    if failures:
        raise RestoreError("load", failures,
                           detail=f"checkpoint {str(path)!r} was read but could not be loaded into the "
                                  "live modules/optimizers/schedulers (load_state_dict)")
    logger.info("rank %d: restored training state from %s", pg.rank, path)
    return res


def resume_latest(root: str | os.PathLike[str], state: TrainingState, *,
                  coordinator: RestoreCoordinator | None = None, verify: bool = False,
                  timeout: Timeout | None = None, reshard: bool = True, **kwargs: Any) -> RestoreResult | None:
    """Restore the newest complete checkpoint under ``root`` (call on every rank).

    Steps: (rank 0) :func:`find_latest_checkpoint`, of any world size with ``reshard``
    (else of this one); (all ranks) agree on its choice over the coordinator's process
    group; (all ranks) :func:`restore_training_state`.

    Args:
        root: Directory of step directories (``ckpt/step_1000``, ...); may not exist yet.
        state: The live training objects.
        coordinator: As for :func:`restore_training_state`.
        verify: Let rank 0 check every candidate's CRC32s against its manifest.
        timeout: As for :func:`restore_training_state`.
        reshard: Also resume from a checkpoint written by another number of ranks (see
            :func:`restore_training_state`). A checkpoint without a commit manifest counts
            as one of another world size where its DTensors' meshes agree with its number of
            rank files, or where it holds no DTensor (DDP-style: every tensor whole in every
            file, so one file is enough); one whose meshes say rank files are missing is
            skipped for the newest checkpoint of this world size.
        **kwargs: Passed to :func:`restore_training_state` (``shared_models``, ``strict``, ...).

    Returns:
        The result, or ``None`` on every rank when there is no checkpoint to resume from.

    Raises:
        RestoreError: on every rank, phase ``"discover"``, if rank 0 could not look.
    """
    coord = _given_or_default(coordinator, timeout, "coordinator", RestoreCoordinator)
    pg = coord._pg  # the coordinator's group wrapper: collectives with its timeout
    choice: dict[str, Any] = {"ok": True, "path": None}
    if pg.rank == 0:
        try:
            if is_url(root) or Path(root).is_dir():
                found = _latest(root, pg.world_size, verify=verify, reshard=reshard)
                choice["path"] = None if found is None else str(found)
        except Exception as e:  # noqa: BLE001 - reported on every rank below
            choice = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    try:
        choice = pg.all_gather_object(choice)[0]
    except Exception as e:
        raise RestoreError("discover", {pg.rank: str(e)}) from e
    if not choice["ok"]:
        raise RestoreError("discover", {0: choice["error"]},
                           detail=f"finding the latest checkpoint under {str(root)!r}")
    if choice["path"] is None:
        logger.info("rank %d: no checkpoint under %s; starting fresh", pg.rank, root)
        return None
    return restore_training_state(choice["path"], state, coordinator=coord, **kwargs)


def _latest(root: str | os.PathLike[str], world: int, *, verify: bool, reshard: bool) -> Path | str | None:
    """(rank 0) The checkpoint :func:`resume_latest` restores (an object store: its URL)."""
    if is_url(root) and not location(root).exists() and not location(root).subdirs():
        return None  # (a prefix holding nothing yet: nothing to resume)
    if not reshard:
        return find_latest_checkpoint(root, world_size=world, verify=verify)
    found = find_latest_checkpoint(root, world_size=None, verify=verify)
    if found is None or read_manifest(found) is not None:
        return found
    nfiles = rank_file_count(found)
    if nfiles == world or is_url(found):  # (a URL's shards are checked to cover each tensor when planned)
        return found
    try:
        _check_saved_world(read_index(found / rank_file_name(0)), nfiles, world, target_given=True)
        return found
    except IncompleteCheckpointError as e:
        logger.warning("skipping checkpoint %s for one of %d ranks: %s", found, world, e)
        return find_latest_checkpoint(root, world_size=world, verify=verify)


def _given_or_default(given: T | None, timeout: Timeout | None, what: str, make: Callable[..., T]) -> T:
    """``given``, or a default one built with ``timeout``; a bad ``timeout`` raises here,
    before any collective."""
    if timeout is None:
        return given if given is not None else make()
    seconds = to_seconds(timeout)
    if given is not None:
        raise ValueError(f"pass timeout= to the {what} you give, not to this hook as well")
    return make(timeout=seconds)


def _shared_spec(state: TrainingState, shared_models: bool | Iterable[str]) -> list[str] | None:
    if shared_models is True:
        return ["models"] if state.models else None
    if shared_models is False or shared_models is None:
        return None
    names = [shared_models] if isinstance(shared_models, str) else list(shared_models)
    # a name may end with the separator, as prefixes do everywhere ("net." is "net")
    names = [n.rstrip(".") if isinstance(n, str) else n for n in names]
    unknown = sorted(n for n in names if n not in state.models)
    if unknown:
        raise ValueError(f"shared_models names unknown model(s) {unknown}; the models are "
                         f"{sorted(state.models)}")
    return [f"models.{n}" for n in names] or None


def _load_back(state: TrainingState, sd: Mapping[str, Any], *, strict: bool) -> None:
    """(all ranks) Put the restored values into the live objects."""
    for section in _SECTIONS:
        restored = sd.get(section) or {}
        for name, obj in getattr(state, section).items():
            if restored.get(name) is None:
                continue  # missing with strict=False (strict already failed on every rank)
            if section == "models":
                obj.load_state_dict(restored[name], strict=strict)
            else:
                obj.load_state_dict(restored[name])
    if state.rng and sd.get("rng") is not None:
        set_rng_state(sd["rng"])
    extra = sd.get("extra")
    if extra is not None:
        if not isinstance(extra, Mapping):
            raise TypeError(f"'extra' in the checkpoint is a {type(extra).__name__}, not a dict")
        state.extra.update(extra)


# -- RNG states -----------------------------------------------------------------------------


def get_rng_state() -> dict[str, Any]:
    """This process's RNG states as weights-only values (tensors, ints, floats, strings)."""
    version, internal, gauss_next = random.getstate()
    out: dict[str, Any] = {
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": gauss_next},
        "torch": torch.get_rng_state(),
    }
    if np is not None:
        kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
        out["numpy"] = {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)),
                        "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    if torch.cuda.is_available():
        out["cuda"] = list(torch.cuda.get_rng_state_all())
    return out


def set_rng_state(rng: Mapping[str, Any]) -> None:
    """Set this process's RNG states from :func:`get_rng_state`'s values (those present; a
    restore leaves ``None`` where a rank has no rank file of its own, and it keeps its state)."""
    py = rng.get("python")
    if py is not None and py.get("state") is not None:
        internal = tuple(int(v) for v in py["state"].tolist())
        gauss = py["gauss_next"]
        random.setstate((int(py["version"]), internal, None if gauss is None else float(gauss)))
    if rng.get("torch") is not None:
        torch.set_rng_state(rng["torch"].to("cpu", torch.uint8))
    state = rng.get("numpy")
    if state is not None and state.get("keys") is not None and np is not None:
        keys = state["keys"].cpu().numpy().astype(np.uint32)
        np.random.set_state((state["kind"], keys, int(state["pos"]), int(state["has_gauss"]),
                             float(state["cached_gaussian"])))
    cuda = rng.get("cuda")
    if cuda is not None and torch.cuda.is_available() and all(t is not None for t in cuda):
        cuda = [t.to("cpu", torch.uint8) for t in cuda]
        if len(cuda) != torch.cuda.device_count():
            logger.warning("checkpoint has CUDA RNG states for %d device(s), this process sees %d; "
                           "setting the first %d", len(cuda), torch.cuda.device_count(),
                           min(len(cuda), torch.cuda.device_count()))
        for i, t in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(t, i)
