"""Every public timeout takes a ``datetime.timedelta`` as well as seconds, as torch's do
(``init_process_group``, ``new_group``, ``TCPStore``); a bad one fails where it is given."""

from __future__ import annotations

import importlib.util
import math
import sys
from datetime import timedelta
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from _util import save
from dist_restore import CheckpointWriter, RestoreCoordinator
from dist_restore._protocol.pg import ProcessGroupWrapper
from dist_restore._timeout import to_seconds
from dist_restore.trainer import TrainingState, restore_training_state, resume_latest, save_training_state

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[1]
BAD_TYPES = ["30", None, True, [30], 30j]
BAD_VALUES = [0, -1, 0.0, math.nan, math.inf, -math.inf, timedelta(0), timedelta(seconds=-5), 1e20]


@pytest.mark.parametrize(("value", "seconds"), [
    (30, 30.0), (2.5, 2.5), (timedelta(seconds=30), 30.0), (timedelta(minutes=2, milliseconds=500), 120.5),
    (np.float32(1.5), 1.5), (np.int64(7), 7.0)])
def test_to_seconds_accepts_seconds_and_timedelta(value: object, seconds: float) -> None:
    assert to_seconds(value) == seconds


@pytest.mark.parametrize("bad", BAD_TYPES)
def test_to_seconds_refuses_other_types(bad: object) -> None:
    with pytest.raises(TypeError, match="timedelta"):
        to_seconds(bad, "my_timeout")


@pytest.mark.parametrize("bad", BAD_VALUES)
def test_to_seconds_refuses_non_positive_and_non_finite(bad: object) -> None:
    with pytest.raises(ValueError, match="my_timeout must be more than 0 seconds"):
        to_seconds(bad, "my_timeout")


def test_constructors_take_timedelta() -> None:
    assert RestoreCoordinator(timeout=timedelta(seconds=30))._pg.timeout == 30.0
    assert RestoreCoordinator(timeout=timedelta(minutes=1), barrier="store")._pg.timeout == 60.0
    assert ProcessGroupWrapper(timeout=timedelta(seconds=5)).timeout == 5.0
    CheckpointWriter(timeout=timedelta(seconds=30))


@pytest.mark.parametrize("bad", BAD_TYPES[:3] + BAD_VALUES[:5])
def test_bad_timeout_raises_in_the_constructor(bad: object) -> None:
    """TypeError/ValueError in the constructor, not an error in the middle of a restore
    (NaN and infinity were accepted and failed inside the first collective)."""
    for make in (lambda: RestoreCoordinator(timeout=bad), lambda: CheckpointWriter(timeout=bad),
                 lambda: ProcessGroupWrapper(timeout=bad)):
        with pytest.raises((TypeError, ValueError), match="timeout"):
            make()


def test_restore_and_hooks_take_timedelta(tmp_path: Path) -> None:
    save({"w": torch.arange(3.0)}, tmp_path / "ck")
    coord = RestoreCoordinator(timeout=300)
    res = coord.restore(tmp_path / "ck", None, timeout=timedelta(seconds=20))
    assert torch.equal(res.state_dict["w"], torch.arange(3.0)) and coord._pg.timeout == 300.0
    with pytest.raises(TypeError, match="timeout"):
        coord.restore(tmp_path / "ck", None, timeout="20")
    with pytest.raises(ValueError, match="timeout"):
        coord.restore(tmp_path / "ck", None, timeout=math.nan)

    state = TrainingState(models={"m": torch.nn.Linear(2, 2)}, extra={"step": 3})
    save_training_state(tmp_path / "steps" / "step_3", state, timeout=timedelta(seconds=30))
    fresh = TrainingState(models={"m": torch.nn.Linear(2, 2)}, extra={"step": 0})
    restore_training_state(tmp_path / "steps" / "step_3", fresh, timeout=timedelta(seconds=30))
    assert fresh.extra["step"] == 3
    fresh.extra["step"] = 0
    assert resume_latest(tmp_path / "steps", fresh, timeout=timedelta(seconds=30)) is not None
    assert fresh.extra["step"] == 3


def test_hooks_refuse_a_bad_timeout_before_anything(tmp_path: Path) -> None:
    state = TrainingState(extra={"step": 1})
    for bad, err in (("30", TypeError), (0, ValueError), (math.inf, ValueError)):
        with pytest.raises(err, match="timeout"):
            save_training_state(tmp_path / "never", state, timeout=bad)
        with pytest.raises(err, match="timeout"):
            restore_training_state(tmp_path / "missing", state, timeout=bad)
        with pytest.raises(err, match="timeout"):
            resume_latest(tmp_path / "missing", state, timeout=bad)
    assert not (tmp_path / "never").exists()
    with pytest.raises(ValueError, match="coordinator you give"):
        restore_training_state(tmp_path / "missing", state, coordinator=RestoreCoordinator(), timeout=5)
    with pytest.raises(ValueError, match="writer you give"):
        save_training_state(tmp_path / "never", state, writer=CheckpointWriter(), timeout=5)


def _launch_module(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"_launch_{name}", ROOT / "launch" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("script", ["restore", "train"])
def test_launch_timeout_option(script: str, capsys: pytest.CaptureFixture[str]) -> None:
    mod = _launch_module(script)
    base = [] if script == "restore" else ["--steps", "1", "--ckpt-root", "x"]
    assert mod.parse_args(base + ["--timeout", "2.5"]).timeout == 2.5
    for bad in ("0", "-3", "nan", "inf", "soon"):
        with pytest.raises(SystemExit) as ei:
            mod.parse_args(base + ["--timeout", bad])
        assert ei.value.code == 2 and "--timeout" in capsys.readouterr().err
    if script == "restore":  # no torchrun here: checks the value, initialises nothing
        mod.init_distributed(timedelta(seconds=30))
        with pytest.raises(TypeError, match="timeout"):
            mod.init_distributed("30")
    sys.modules.pop(f"_launch_{script}", None)
