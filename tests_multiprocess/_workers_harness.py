"""Module-level worker functions for ``test_harness.py`` (``spawn`` imports them by name)."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import torch
import torch.distributed as dist


def all_reduce_worker(rank: int, world_size: int, base: float) -> dict[str, Any]:
    """Sum ``base + rank`` over all ranks; return it with rank-specific facts."""
    t = torch.tensor([base + rank], dtype=torch.float64)
    dist.all_reduce(t)
    return {
        "rank": rank,
        "sum": t.item(),
        "pg_rank": dist.get_rank(),
        "pg_world_size": dist.get_world_size(),
        "env": {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                                           "MASTER_ADDR", "HARNESS_EXTRA")},
        "threads": torch.get_num_threads(),
        "backend": dist.get_backend(),
    }


def raise_on_rank_1(rank: int, world_size: int) -> int:
    """Rank 1 raises; the others return their rank."""
    if rank == 1:
        raise ValueError("boom on rank 1")
    return rank


def hang_on_rank_1(rank: int, world_size: int) -> str:
    """Rank 1 sleeps far past any test timeout; the others return at once."""
    if rank == 1:
        time.sleep(1000)
    return f"rank {rank} done"


def sigkill_rank_1(rank: int, world_size: int) -> int:
    """Rank 1 SIGKILLs itself (no chance to report); the others return their rank."""
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return rank


def peer_dies_mid_collective(rank: int, world_size: int) -> float:
    """Rank 1 SIGKILLs itself; rank 0 then runs an all_reduce that cannot complete."""
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    t = torch.ones(1)
    dist.all_reduce(t)
    return t.item()


def return_unpicklable(rank: int, world_size: int) -> Any:
    """Return a value that cannot be pickled (a lambda)."""
    return lambda: rank
