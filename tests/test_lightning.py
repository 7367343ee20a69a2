"""The Lightning adapter: an interrupted and resumed fit ends bit-identical to an uninterrupted one."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

pl = pytest.importorskip("lightning.pytorch")

from dist_restore.lightning import DistRestoreCallback  # noqa: E402 - after the importorskip

pytestmark = pytest.mark.timeout(60)

_BATCHES_PER_EPOCH = 4


class _TinyModule(pl.LightningModule):
    """Dropout and a shuffling loader make the result depend on the restored RNG states too."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Dropout(0.3),
                                       torch.nn.Linear(16, 1))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        g = torch.Generator().manual_seed(1)
        x = torch.randn(4 * _BATCHES_PER_EPOCH, 6, generator=g)
        y = x.sum(dim=1, keepdim=True) + 0.1 * torch.randn(4 * _BATCHES_PER_EPOCH, 1, generator=g)
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4, shuffle=True)

    def configure_optimizers(self):  # noqa: ANN201 - Lightning's own union of return types
        opt = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _fit(max_steps: int, callbacks: list[pl.Callback]) -> tuple[pl.Trainer, _TinyModule]:
    torch.manual_seed(0)  # the same initial weights in every run; a resume overwrites them
    model = _TinyModule()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, callbacks=callbacks,
                         enable_progress_bar=False, logger=False, enable_checkpointing=False,
                         enable_model_summary=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        trainer.fit(model)
    return trainer, model


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path: Path) -> None:
    full_trainer, full = _fit(8, [])
    assert full_trainer.global_step == 8

    root = tmp_path / "ckpt"
    first, _ = _fit(4, [DistRestoreCallback(root, save_every_n_steps=4)])
    assert first.global_step == 4
    assert sorted(p.name for p in root.iterdir()) == ["step_4"]

    second_cb = DistRestoreCallback(root, save_every_n_steps=4)
    second, resumed = _fit(8, [second_cb])
    assert second.global_step == 8
    assert second.current_epoch == full_trainer.current_epoch
    assert sorted(p.name for p in root.iterdir()) == ["step_4", "step_8"]

    want, got = _params(full), _params(resumed)
    assert want.keys() == got.keys()
    for k in want:
        # bytes, not values: bit-identical, not merely close
        assert torch.equal(want[k].view(torch.uint8), got[k].view(torch.uint8)), k
    assert second.optimizers[0].param_groups[0]["lr"] == full_trainer.optimizers[0].param_groups[0]["lr"]
    # the resumed run differs from a fresh one (the restore did something)
    fresh_trainer, fresh = _fit(4, [])
    assert any(not torch.equal(fresh_state, got[k]) for k, fresh_state in _params(fresh).items())


def test_no_checkpoint_starts_fresh(tmp_path: Path) -> None:
    trainer, _ = _fit(2, [DistRestoreCallback(tmp_path / "none_yet", save_every_n_steps=5)])
    assert trainer.global_step == 2
    assert not (tmp_path / "none_yet").exists()


@pytest.mark.parametrize("n", [0, -1, 2.0, True])
def test_save_every_n_steps_must_be_a_positive_int(n: object) -> None:
    with pytest.raises(ValueError, match="save_every_n_steps"):
        DistRestoreCallback("ckpt", save_every_n_steps=n)  # type: ignore[arg-type]


def test_timeout_takes_timedelta_and_is_checked_in_the_constructor() -> None:
    from datetime import timedelta

    assert DistRestoreCallback("ckpt", save_every_n_steps=1, timeout=timedelta(seconds=45)).timeout == 45.0
    assert DistRestoreCallback("ckpt", save_every_n_steps=1).timeout is None
    with pytest.raises(ValueError, match="timeout"):
        DistRestoreCallback("ckpt", save_every_n_steps=1, timeout=0)
    with pytest.raises(TypeError, match="timeout"):
        DistRestoreCallback("ckpt", save_every_n_steps=1, timeout="45")  # type: ignore[arg-type]
