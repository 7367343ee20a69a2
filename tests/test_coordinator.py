"""RestoreCoordinator in a single process (no process group): arguments, reports, values.

The multi-rank protocol is tested on real processes in ``tests_multiprocess/``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from _util import assert_same, oracle, save, value_types_sample
from dist_restore import RestoreCoordinator, RestoreError

pytestmark = pytest.mark.timeout(60)


def _ckpt(tmp_path: Path) -> Path:
    save({"model": {"w": torch.arange(6.0), "b": torch.ones(2)}, "opt": {"lr": 0.1}, "v": value_types_sample()},
         tmp_path)
    return tmp_path


def test_value_types_with_shared_values(tmp_path: Path) -> None:
    """Shared non-tensor values (a torch.Size among them) keep their types, as torch.load's."""
    path = _ckpt(tmp_path)
    expected = oracle(path / "checkpoint_0.pt")
    res = RestoreCoordinator().restore(path, None, shared=["v", "model."])
    assert_same(res.state_dict, expected)
    res = RestoreCoordinator().restore(path, {"v": None}, shared="v.")
    assert_same(res.state_dict["v"], expected["v"], "v")


def test_shared_pattern_that_selects_nothing_is_named_and_logged_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = _ckpt(tmp_path)
    with caplog.at_level(logging.INFO, logger="dist_restore"):
        res = RestoreCoordinator().restore(path, None, shared=["model.", "embed", "*.bais"])
    assert res.report is not None and res.report.unmatched_shared == ("embed", "*.bais")
    assert not res.report.ok and res.report.missing_keys == ()
    said = [r for r in caplog.records if "'embed'" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.WARNING and "'*.bais'" in said[0].getMessage()
    assert "'model.'" not in said[0].getMessage()  # the prefix with its separator selected model.*

    res = RestoreCoordinator().restore(path, None, shared=["model."])
    assert res.report is not None and res.report.unmatched_shared == () and res.report.ok


def test_shared_pattern_that_selects_nothing_fails_strict(tmp_path: Path) -> None:
    path = _ckpt(tmp_path)
    with pytest.raises(RestoreError, match="'embed'") as ei:
        RestoreCoordinator().restore(path, None, shared=["model", "embed"], strict=True)
    assert ei.value.phase == "strict" and list(ei.value.failures) == [0]
    RestoreCoordinator().restore(path, None, shared=["model."], strict=True)  # selects: fine


def test_predicate_that_selects_nothing_is_named(tmp_path: Path) -> None:
    path = _ckpt(tmp_path)

    def no_key(key: str) -> bool:
        return False

    res = RestoreCoordinator().restore(path, None, shared=no_key)
    assert res.report is not None and res.report.unmatched_shared == (no_key.__qualname__,)
