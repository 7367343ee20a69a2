"""Run a module-level worker function on N spawned ranks with a gloo process group.

Each rank is a ``spawn`` process that calls ``worker(rank, world_size, *args)``. Its
outcome (the return value, or the traceback of what it raised) travels back to the parent
as a pickle in a per-rank file in a temporary directory, written atomically just before
the child exits. A child that dies without writing one (SIGKILL, segfault, ``os._exit``)
is reported by its exit code. A rank leaves by ``os._exit`` once its outcome is written. No child outlives :func:`run_ranks`: stragglers are
terminated, then SIGKILLed, and every child is joined, also on ``KeyboardInterrupt``.

A failing rank does not stop the others early: peers of a dead rank are expected to
fail on their own collective timeouts, which a test may want to observe.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.resource_tracker
import os
import pickle
import signal
import socket
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Mapping, Sequence

__all__ = ["RankOutcome", "RanksFailed", "free_port", "live_child_pids", "run_ranks"]

#: Seconds a straggler gets between SIGTERM and SIGKILL.
_TERMINATE_GRACE_S = 1.0


@dataclass(frozen=True)
class RankOutcome:
    """What became of one rank.

    Attributes:
        rank: The rank.
        exitcode: The process exit code; negative ``-N`` means killed by signal ``N``;
            ``None`` only if it could not be reaped.
        result: The worker's return value (``None`` if it failed).
        error: The traceback text of what the worker raised, or a description of how the
            process died or timed out; ``None`` on success.
        timed_out: Whether the rank was still running at the deadline and was killed.
    """

    rank: int
    exitcode: int | None
    result: Any = None
    error: str | None = None
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        """Whether the rank returned normally."""
        return self.error is None and not self.timed_out and self.exitcode == 0


class RanksFailed(RuntimeError):
    """One or more ranks raised, died, or timed out; ``outcomes`` holds every rank's outcome."""

    def __init__(self, outcomes: Sequence[RankOutcome]) -> None:
        self.outcomes: list[RankOutcome] = list(outcomes)
        failed = [o for o in self.outcomes if not o.ok]
        parts = [f"{len(failed)} of {len(self.outcomes)} ranks failed: {[o.rank for o in failed]}"]
        for o in failed:
            how = "timed out" if o.timed_out else f"exitcode {o.exitcode}"
            parts.append(f"--- rank {o.rank} ({how}) ---\n{(o.error or '').rstrip()}")
        super().__init__("\n".join(parts))

    @property
    def failed_ranks(self) -> list[int]:
        """The ranks that did not return normally, in order."""
        return [o.rank for o in self.outcomes if not o.ok]


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago (bind to port 0, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _child_main(worker: Callable[..., Any], rank: int, world_size: int, args: tuple[Any, ...],
                port: int, env: Mapping[str, str], init_pg: bool, backend: str,
                pg_timeout: float, out_path: str) -> None:
    """Body of one spawned rank: set up env and group, run the worker, write the outcome."""
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(world_size)})
    os.environ.update(env)
    failed = False
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)  # N ranks share few cores; oversubscription makes tests crawl
        if init_pg:
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                    world_size=world_size, timeout=timedelta(seconds=pg_timeout))
        try:
            result = worker(rank, world_size, *args)
        finally:
            if init_pg and dist.is_initialized():
                dist.destroy_process_group()
        payload = pickle.dumps(("ok", result))  # fails here if the result will not pickle
    except BaseException:  # noqa: BLE001 - everything, incl. SystemExit, goes back as text
        failed = True
        payload = pickle.dumps(("error", traceback.format_exc()))
    tmp = f"{out_path}.tmp"
    with open(tmp, "wb") as f:
        f.write(payload)
    os.replace(tmp, out_path)  # atomic: the parent never sees half a file
    sys.stdout.flush()
    sys.stderr.flush()
    # Leave without the interpreter's teardown: torch's gloo and device-mesh objects are
    # destroyed there, and in torch 2.13 that sometimes ends in std::terminate ("terminate
    # called without an active exception", SIGABRT) after the worker has returned and its
    # group has been destroyed. The outcome is already on disk; the exit code still tells
    # the parent whether the worker failed.
    os._exit(1 if failed else 0)


def _read_outcome(rank: int, path: str, exitcode: int | None, timed_out: bool,
                  timeout: float) -> RankOutcome:
    """Build a rank's outcome from its file (if any) and how the process ended."""
    if os.path.exists(path):
        try:
            with open(path, "rb") as f:
                kind, value = pickle.load(f)
        except Exception:  # noqa: BLE001 - e.g. the result's class is not importable here
            kind = "error"
            value = f"rank {rank}'s result could not be unpickled:\n{traceback.format_exc()}"
        if kind == "ok" and exitcode != 0:  # e.g. crashed at interpreter shutdown
            value = f"rank {rank} returned a result but exited with code {exitcode}"
        elif kind == "ok":
            return RankOutcome(rank, exitcode, result=value, timed_out=timed_out)
        return RankOutcome(rank, exitcode, error=value, timed_out=timed_out)
    if timed_out:
        msg = f"rank {rank} did not finish within {timeout:g} s and was killed"
    elif exitcode is not None and exitcode < 0:
        msg = f"rank {rank} was killed by {signal.Signals(-exitcode).name} without reporting"
    else:
        msg = f"rank {rank} exited with code {exitcode} without reporting a result"
    return RankOutcome(rank, exitcode, error=msg, timed_out=timed_out)


def run_ranks(worker: Callable[..., Any], world_size: int, *, args: Sequence[Any] = (),
              timeout: float = 60.0, init_process_group: bool = True, backend: str = "gloo",
              pg_timeout: float = 30.0, env: Mapping[str, str] | None = None) -> list[Any]:
    """Run ``worker(rank, world_size, *args)`` on ``world_size`` spawned processes.

    Args:
        worker: A module-level (importable, picklable) function; its return value must pickle.
        world_size: Number of ranks to spawn.
        args: Extra positional arguments for ``worker``; must pickle.
        timeout: Seconds all ranks together may take, spawn and import included; then the
            stragglers are killed.
        init_process_group: Initialise (and finally destroy) the default process group
            over a TCP store on 127.0.0.1 before calling ``worker``.
        backend: The process-group backend.
        pg_timeout: The process group's collective timeout in seconds.
        env: Extra environment variables for the children, set before the group is made
            (after ``torch`` is imported, so not for variables torch reads at import).

    Returns:
        The workers' return values, indexed by rank.

    Raises:
        ValueError: ``world_size < 1`` or ``timeout <= 0``.
        RanksFailed: Any rank raised, died, or timed out; carries every rank's outcome.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if timeout <= 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
    ctx = multiprocessing.get_context("spawn")
    port = free_port()
    procs: list[Any] = []
    deadline = time.monotonic() + timeout
    with tempfile.TemporaryDirectory(prefix="run_ranks_") as tmp:
        paths = [os.path.join(tmp, f"rank{r}.pkl") for r in range(world_size)]
        try:
            for r in range(world_size):
                p = ctx.Process(target=_child_main, name=f"rank{r}", daemon=True,
                                args=(worker, r, world_size, tuple(args), port, dict(env or {}),
                                      init_process_group, backend, pg_timeout, paths[r]))
                p.start()
                procs.append(p)
            for p in procs:
                p.join(max(0.0, deadline - time.monotonic()))
            timed_out = [p.is_alive() for p in procs]
        finally:
            _reap(procs)
        outcomes = [_read_outcome(r, paths[r], p.exitcode, timed_out[r], timeout)
                    for r, p in enumerate(procs)]
    if any(not o.ok for o in outcomes):
        raise RanksFailed(outcomes)
    return [o.result for o in outcomes]


def _reap(procs: Sequence[Any]) -> None:
    """Terminate, then SIGKILL, then join every child still alive; returns when all are reaped."""
    for p in procs:
        if p.is_alive():
            p.terminate()
    grace_end = time.monotonic() + _TERMINATE_GRACE_S
    for p in procs:
        p.join(max(0.0, grace_end - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join()


def live_child_pids() -> list[int]:
    """Return the PIDs of this process's children, zombies included (Linux ``/proc``).

    The ``multiprocessing`` resource tracker is left out: it lives as long as the parent.
    """
    tracker = getattr(multiprocessing.resource_tracker._resource_tracker, "_pid", None)
    me = str(os.getpid())
    pids: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == tracker:
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                ppid = next(line.split()[1] for line in f if line.startswith("PPid:"))
        except (OSError, StopIteration):
            continue  # exited while we looked
        if ppid == me:
            pids.append(int(entry))
    return pids
