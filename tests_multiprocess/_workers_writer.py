"""Module-level rank workers for the ``CheckpointWriter`` multi-process tests.

They run in spawned processes (see ``harness.run_ranks``), with the default gloo group
initialised unless the test says otherwise, and return plain picklable results.
"""

from __future__ import annotations

import os
from datetime import timedelta
import signal
import time
from pathlib import Path
from typing import Any

import torch

from dist_restore import RankInfo, RestoreError
from dist_restore._format.manifest import MANIFEST_NAME
from dist_restore.writer import CheckpointWriter


def rank_state(rank: int, step: int = 0) -> dict[str, Any]:
    """A different state dict per rank (and step); sizes differ too."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    return {
        "model": {"w": torch.randn(32 + 8 * rank, 16, generator=g), "b": torch.randn(16, generator=g)},
        "optim": {"step": step, "rank": rank, "lr": [0.1, 0.01]},
        "ids": torch.arange(rank + 1),
    }


class Explodes:
    """Raises while ``torch.save`` pickles it."""

    def __reduce__(self) -> Any:
        raise RuntimeError("boom while pickling")


class DiesWhilePickled:
    """SIGKILLs its own process while ``torch.save`` pickles it: a crash mid-write."""

    def __reduce__(self) -> Any:
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(60)  # pragma: no cover - the signal arrives first
        raise AssertionError("unreachable")


def _error(e: BaseException) -> dict[str, Any]:
    if isinstance(e, RestoreError):
        return {"type": "RestoreError", "phase": e.phase, "ranks": sorted(e.failures), "text": str(e)}
    return {"type": type(e).__name__, "text": str(e)}


def write_step(rank: int, world: int, path: str, step: int) -> dict[str, Any]:
    """Every rank writes its state; returns the manifest it got back."""
    man = CheckpointWriter(timeout=30).write(path, rank_state(rank, step), metadata={"step": step, "epoch": 1})
    assert man is not None
    return {"manifest": man.to_json(), "manifest_on_disk": (Path(path) / MANIFEST_NAME).exists()}


def write_then_fail(rank: int, world: int, path: str, victim: int) -> dict[str, Any]:
    """Commit step 1, then overwrite it with step 2 while ``victim`` fails to pickle."""
    writer = CheckpointWriter(timeout=30)
    writer.write(path, rank_state(rank, 1), metadata={"step": 1})
    sd = rank_state(rank, 2)
    if rank == victim:
        sd["optim"]["bad"] = Explodes()
    t0 = time.monotonic()
    try:
        writer.write(path, sd, metadata={"step": 2})
        err = None
    except Exception as e:  # noqa: BLE001 - the test asserts what it is
        err = _error(e)
    return {"error": err, "seconds": time.monotonic() - t0,
            "manifest_after": (Path(path) / MANIFEST_NAME).exists()}


def write_then_die(rank: int, world: int, root: str, victims: dict[int, str]) -> dict[str, Any]:
    """Commit ``root/step_100``; then ``root/step_200``, where each victim SIGKILLs itself.

    ``victims[rank]`` is ``"mid_save"`` (dies while torch.save pickles, its temp file
    just created) or ``"before_rename"`` (dies with a whole temp file, before the rename).
    """
    writer = CheckpointWriter(timeout=20)
    writer.write(os.path.join(root, "step_100"), rank_state(rank, 100), metadata={"step": 100})
    sd = rank_state(rank, 200)
    how = victims.get(rank)
    if how == "mid_save":
        sd["optim"]["die"] = DiesWhilePickled()
    elif how == "before_rename":
        real_replace = os.replace

        def replace_then_die(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
            if str(dst).endswith(f"checkpoint_{rank}.pt"):
                assert os.path.getsize(src) > 0
                os.kill(os.getpid(), signal.SIGKILL)
            real_replace(src, dst, *args, **kwargs)

        os.replace = replace_then_die  # this spawned process only
    t0 = time.monotonic()
    try:
        writer.write(os.path.join(root, "step_200"), sd, metadata={"step": 200})
        err = None
    except Exception as e:  # noqa: BLE001
        err = _error(e)
    return {"error": err, "seconds": time.monotonic() - t0}


def write_with_store_barrier(rank: int, world: int, path: str, victim: int) -> dict[str, Any]:
    """No process group: torch's experimental TCPStoreBarrier and report files.

    Commits once, then overwrites with ``victim`` failing.
    """
    from torch.distributed.checkpoint._experimental.barriers import TCPStoreBarrier

    assert not torch.distributed.is_initialized()
    barrier = TCPStoreBarrier(global_rank=rank, global_world_size=world, barrier_prefix="ckpt",
                              timeout_barrier_init_secs=30, use_checkpoint_barrier_tcpstore_libuv=False,
                              tcpstore_port=int(os.environ["MASTER_PORT"]), master_address="127.0.0.1",
                              timeout_secs=30)
    writer = CheckpointWriter(RankInfo(rank, world), barrier)
    man = writer.write(path, rank_state(rank, 1), metadata={"step": 1})
    assert man is not None
    barrier.execute_barrier()  # each rank removes its last report file after the last barrier
    files_after_commit = sorted(os.listdir(path))
    barrier.execute_barrier()  # nobody starts the next write while another rank still looks
    sd = rank_state(rank, 2)
    if rank == victim:
        sd["bad"] = Explodes()
    try:
        writer.write(path, sd, metadata={"step": 2})
        err = None
    except Exception as e:  # noqa: BLE001
        err = _error(e)
    barrier.execute_barrier()  # every rank has cleaned up its report files
    # rank 0 hosts the store: it must outlive the others' last use of it
    store = barrier._tcp_store
    if rank != 0:
        store.set(f"done/{rank}", b"1")
    else:
        store.wait([f"done/{r}" for r in range(1, world)], timedelta(seconds=30))
    return {"manifest": man.to_json(), "files_after_commit": files_after_commit, "error": err,
            "files_after_failure": sorted(os.listdir(path))}
