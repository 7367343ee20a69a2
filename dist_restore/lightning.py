"""Optional PyTorch Lightning adapter: save and resume with dist_restore from callback hooks.

Needs ``lightning`` (``pip install dist_restore[lightning]``); ``import dist_restore`` never
imports it. A sketch::

    from dist_restore.lightning import DistRestoreCallback

    trainer = pl.Trainer(max_steps=10_000, enable_checkpointing=False,
                         callbacks=[DistRestoreCallback("ckpt", save_every_n_steps=500)])
    trainer.fit(model, datamodule)  # resumes from the newest complete ckpt/step_* if any

What is saved: the LightningModule (``models["model"]``), every optimizer (``opt0``, ...),
every LR scheduler (``sched0``, ...), this rank's RNG states and, in ``extra``,
``global_step``, ``epoch`` and Lightning's own fit-loop progress (``fit_loop``: plain ints,
the same record Lightning's ``ModelCheckpoint`` stores under ``loops``). Restoring it with
``trainer.fit_loop.load_state_dict`` at ``on_fit_start`` is what Lightning itself does when
given ``ckpt_path``, at the same point of ``Trainer.fit`` (after the strategy has set up the
optimizers, before the fit loop starts), so the loop continues from the restored step.
"""

from __future__ import annotations

import logging
import os
from typing import Any

try:
    import lightning.pytorch as pl
except ImportError as e:  # pragma: no cover - exercised only where lightning is missing
    raise ImportError(
        "dist_restore.lightning needs PyTorch Lightning, which is not installed; "
        "install it with `pip install dist_restore[lightning]` (or `pip install lightning`)"
    ) from e

from dist_restore._timeout import Timeout, to_seconds
from dist_restore.trainer import TrainingState, resume_latest, save_training_state

logger = logging.getLogger(__name__)

__all__ = ["DistRestoreCallback"]


class DistRestoreCallback(pl.Callback):
    """Resume from the newest checkpoint under ``root`` at fit start; save every N global steps.

    Every rank runs the hooks (Lightning calls callbacks on all ranks), so the collectives
    of :func:`~dist_restore.resume_latest` and :func:`~dist_restore.save_training_state`
    line up across ranks.

    Args:
        root: Directory of step directories (``{root}/step_{global_step}``); may not exist yet.
        save_every_n_steps: Save when ``trainer.global_step`` is a positive multiple of this.
        shared_models: The module is replicated on every rank (DDP): read on rank 0 and
            broadcast. ``False`` for sharded modules, where each rank reads its own file.
        strict: Fail on every rank if a checkpoint misses or has extra keys.
        timeout: Per collective of a save or a resume: seconds or a ``datetime.timedelta``
            (default: the writer's and the coordinator's own).

    Raises:
        ValueError: ``save_every_n_steps`` is not a positive int.
        TypeError, ValueError: ``timeout`` is neither positive seconds nor a ``timedelta``.
    """

    def __init__(self, root: str | os.PathLike[str], *, save_every_n_steps: int,
                 shared_models: bool = True, strict: bool = True, timeout: Timeout | None = None) -> None:
        if isinstance(save_every_n_steps, bool) or not isinstance(save_every_n_steps, int) \
                or save_every_n_steps < 1:
            raise ValueError(f"save_every_n_steps must be a positive int, got {save_every_n_steps!r}")
        self.root = os.fspath(root)
        self.save_every_n_steps = save_every_n_steps
        self.shared_models = shared_models
        self.strict = strict
        self.timeout = None if timeout is None else to_seconds(timeout)
        self._last_saved_step: int | None = None

    def _state(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> TrainingState:
        return TrainingState(
            models={"model": pl_module},
            optimizers={f"opt{i}": o for i, o in enumerate(trainer.optimizers)},
            schedulers={f"sched{i}": c.scheduler for i, c in enumerate(trainer.lr_scheduler_configs)},
            extra={"global_step": trainer.global_step, "epoch": trainer.current_epoch,
                   "fit_loop": trainer.fit_loop.state_dict()},
        )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """(all ranks) Restore the newest complete checkpoint under ``root``, if any."""
        # on_fit_start, not on_train_start: the latter runs inside the fit loop after it
        # has reset its progress and built the data iterator, too late to move its counters.
        state = self._state(trainer, pl_module)
        res = resume_latest(self.root, state, shared_models=self.shared_models, strict=self.strict,
                            timeout=self.timeout)
        if res is None:
            return
        fit_loop = state.extra.get("fit_loop")
        if not isinstance(fit_loop, dict) or not fit_loop:
            raise ValueError(f"the checkpoint restored from {self.root!r} has no 'fit_loop' progress in "
                             "'extra'; it was not written by DistRestoreCallback")
        # the same call Lightning makes for Trainer.fit(ckpt_path=...); marks the loop as restarting
        trainer.fit_loop.load_state_dict(fit_loop)
        step = state.extra["global_step"]
        if trainer.global_step != step:  # pragma: no cover - a Lightning change would show here
            raise RuntimeError(f"restored fit-loop progress gives global_step {trainer.global_step}, but the "
                               f"checkpoint was saved at global_step {step}; this Lightning version "
                               f"({pl.__version__}) does not fit DistRestoreCallback")
        self._last_saved_step = step
        logger.info("rank %d: resumed at global_step %d, epoch %d from %s", trainer.global_rank, step,
                    state.extra["epoch"], self.root)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        """(all ranks) Save ``{root}/step_{global_step}`` every ``save_every_n_steps`` steps."""
        step = trainer.global_step
        # with gradient accumulation several batches end on the same global step: save once
        if step <= 0 or step % self.save_every_n_steps or step == self._last_saved_step:
            return
        save_training_state(f"{self.root}/step_{step}", self._state(trainer, pl_module),
                            metadata={"step": step}, timeout=self.timeout)
        self._last_saved_step = step
