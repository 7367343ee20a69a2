"""Tests of the multi-process harness itself, with real spawned processes and gloo."""

from __future__ import annotations

import signal
import time

import pytest

from tests_multiprocess import _workers_harness as w
from tests_multiprocess.harness import RanksFailed, free_port, live_child_pids, run_ranks


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world_size", [2, 4])
def test_all_reduce_returns_per_rank_results(world_size: int) -> None:
    results = run_ranks(w.all_reduce_worker, world_size, args=(10.0,), env={"HARNESS_EXTRA": "x"})
    expected_sum = sum(10.0 + r for r in range(world_size))
    assert results == [
        {
            "rank": r,
            "sum": expected_sum,
            "pg_rank": r,
            "pg_world_size": world_size,
            "env": {"RANK": str(r), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(r),
                    "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1",
                    "HARNESS_EXTRA": "x"},
            "threads": 1,
            "backend": "gloo",
        }
        for r in range(world_size)
    ]


@pytest.mark.timeout(60)
def test_child_exception_comes_back_with_traceback() -> None:
    with pytest.raises(RanksFailed) as info:
        run_ranks(w.raise_on_rank_1, 2)
    ok, bad = info.value.outcomes
    assert info.value.failed_ranks == [1]
    assert ok.ok and ok.result == 0 and ok.error is None and ok.exitcode == 0
    assert bad.exitcode == 1 and not bad.timed_out and bad.result is None
    assert bad.error is not None
    assert "Traceback (most recent call last)" in bad.error
    assert "in raise_on_rank_1" in bad.error
    assert bad.error.rstrip().endswith('ValueError: boom on rank 1')
    message = str(info.value)
    assert "1 of 2 ranks failed: [1]" in message
    assert "--- rank 1 (exitcode 1) ---" in message
    assert "ValueError: boom on rank 1" in message and "in raise_on_rank_1" in message


@pytest.mark.timeout(60)
def test_hung_child_is_killed_at_timeout() -> None:
    # Rank 0 must start (spawn + `import torch`: ~3 s, over 10 s on a loaded 2-core box)
    # and return before the deadline, so the test can tell finished from timed-out ranks.
    timeout = 15.0
    start = time.monotonic()
    with pytest.raises(RanksFailed) as info:
        run_ranks(w.hang_on_rank_1, 2, timeout=timeout, init_process_group=False)
    elapsed = time.monotonic() - start
    ok, hung = info.value.outcomes
    assert ok.ok and ok.result == "rank 0 done" and not ok.timed_out
    assert hung.timed_out and hung.exitcode == -signal.SIGTERM
    assert hung.error == "rank 1 did not finish within 15 s and was killed"
    assert "--- rank 1 (timed out) ---" in str(info.value)
    assert timeout <= elapsed < timeout + 5.0
    assert live_child_pids() == []


@pytest.mark.timeout(60)
def test_sigkilled_child_reports_negative_exitcode() -> None:
    with pytest.raises(RanksFailed) as info:
        run_ranks(w.sigkill_rank_1, 2)
    ok, dead = info.value.outcomes
    assert ok.ok and ok.result == 0
    assert dead.exitcode == -signal.SIGKILL and not dead.timed_out
    assert dead.error == "rank 1 was killed by SIGKILL without reporting"


@pytest.mark.timeout(60)
def test_peer_death_fails_survivor_collective() -> None:
    with pytest.raises(RanksFailed) as info:
        run_ranks(w.peer_dies_mid_collective, 2, pg_timeout=10.0)
    survivor, dead = info.value.outcomes
    assert dead.exitcode == -signal.SIGKILL
    assert survivor.exitcode == 1 and not survivor.timed_out
    assert survivor.error is not None and "all_reduce" in survivor.error
    assert "RuntimeError" in survivor.error or "DistBackendError" in survivor.error


@pytest.mark.timeout(60)
def test_unpicklable_result_is_reported_as_error() -> None:
    with pytest.raises(RanksFailed) as info:
        run_ranks(w.return_unpicklable, 2, init_process_group=False)
    assert info.value.failed_ranks == [0, 1]
    for o in info.value.outcomes:
        assert o.exitcode == 1 and o.error is not None and "pickle" in o.error.lower()


def test_argument_validation_and_free_port() -> None:
    with pytest.raises(ValueError, match="world_size"):
        run_ranks(w.raise_on_rank_1, 0)
    with pytest.raises(ValueError, match="timeout"):
        run_ranks(w.raise_on_rank_1, 1, timeout=0)
    assert 0 < free_port() < 65536
