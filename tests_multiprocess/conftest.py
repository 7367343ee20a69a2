"""Mark every test in this folder ``multiprocess``; check that no test leaves a child behind."""

from __future__ import annotations

import multiprocessing
from pathlib import Path
from typing import Iterator

import pytest

from tests_multiprocess.harness import live_child_pids

_HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Add the ``multiprocess`` marker to the tests collected from this folder."""
    for item in items:
        if _HERE in item.path.parents:
            item.add_marker(pytest.mark.multiprocess)


@pytest.fixture(autouse=True)
def _no_child_outlives_its_test() -> Iterator[None]:
    """Fail a test that leaves a child process running (or unreaped) behind."""
    yield
    assert multiprocessing.active_children() == []
    assert live_child_pids() == []
