"""Several rank jobs in one spawn: what each test asserts stays per job, the ranks start once.

Starting N ranks (python, ``import torch``, a gloo group per rank) costs 5-15 s on a small
machine; the restores the tests check take well under a second each. A :class:`Batch`
collects named jobs (module-level workers ``fn(rank, world, *args)``, as for
:func:`~tests_multiprocess.harness.run_ranks`), runs them in order on one set of ranks and
one process group (:func:`run_jobs`), and hands each test the per-rank results of its own
job. A job that raises on a rank comes back as that rank's traceback, raised in the test
that asks for the job; the later jobs still run. A spawn that fails as a whole (a rank died or
timed out) is not started again: every test that asks for one of its jobs fails at once with
the first failure's message.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from tests_multiprocess.harness import run_ranks

__all__ = ["Batch", "run_jobs"]


def run_jobs(rank: int, world: int, jobs: Sequence[tuple[str, Callable[..., Any], tuple[Any, ...]]]
             ) -> dict[str, tuple[bool, Any]]:
    """(every rank) Run ``fn(rank, world, *args)`` for each ``(name, fn, args)`` in order:
    ``{name: (True, result)}``, or ``(False, traceback text)`` for a job that raised."""
    out: dict[str, tuple[bool, Any]] = {}
    for name, fn, args in jobs:
        try:
            out[name] = (True, fn(rank, world, *args))
        except Exception:  # noqa: BLE001 - goes back to the test that asks for this job
            text = traceback.format_exc()
            print(f"[rank {rank}] job {name!r} raised:\n{text}", file=sys.stderr, flush=True)
            out[name] = (False, text)
    return out


class Batch:
    """Named jobs for one spawn of ``world`` ranks; run once, on the first :meth:`results`.

    Args:
        world: Ranks to spawn.
        timeout: Seconds for the whole spawn (all jobs), as ``run_ranks``'s ``timeout``.
        **run_kwargs: Passed on to ``run_ranks`` (``pg_timeout``, ``init_process_group``, ...).
    """

    def __init__(self, world: int, *, timeout: float, **run_kwargs: Any) -> None:
        self.world = world
        self._timeout = timeout
        self._run_kwargs = run_kwargs
        self._jobs: list[tuple[str, Callable[..., Any], tuple[Any, ...]]] = []
        self._outs: list[dict[str, tuple[bool, Any]]] | None = None
        self._failed: str | None = None

    def add(self, name: str, fn: Callable[..., Any], *args: Any) -> str:
        """Queue ``fn(rank, world, *args)`` as job ``name``; returns ``name``."""
        if self._outs is not None:
            raise RuntimeError(f"job {name!r} added after the batch ran")
        if any(n == name for n, _f, _a in self._jobs):
            raise ValueError(f"job {name!r} added twice")
        self._jobs.append((name, fn, tuple(args)))
        return name

    def run(self) -> None:
        """Spawn the ranks and run every job (once; later calls do nothing, or raise
        ``AssertionError`` if that spawn failed)."""
        if self._failed is not None:
            raise AssertionError(f"the batch of {len(self._jobs)} jobs on {self.world} ranks failed earlier:\n"
                                 f"{self._failed}")
        if self._outs is not None:
            return
        try:
            self._outs = run_ranks(run_jobs, self.world, args=(self._jobs,), timeout=self._timeout,
                                   **self._run_kwargs)
        except KeyboardInterrupt:
            raise
        except BaseException as e:  # also a pytest-timeout failure: no test starts this spawn again
            self._failed = f"{type(e).__name__}: {e}"
            raise

    def check(self) -> None:
        """Run the batch if it has not run; raise ``AssertionError`` if any job raised."""
        for name, _fn, _args in self._jobs:
            self.results(name)

    def results(self, name: str) -> list[Any]:
        """Job ``name``'s result on each rank, in rank order; raises ``AssertionError`` with
        the tracebacks of the ranks where it raised."""
        self.run()
        assert self._outs is not None
        per_rank = [o[name] for o in self._outs]
        failed = [f"--- rank {r} ---\n{v}" for r, (ok, v) in enumerate(per_rank) if not ok]
        if failed:
            raise AssertionError(f"job {name!r} raised on {len(failed)} of {self.world} ranks:\n" + "\n".join(failed))
        return [v for _ok, v in per_rank]
