"""How the ranks of a :class:`~dist_restore.writer.CheckpointWriter` exchange statuses.

Each exchange (``gather``) is also a barrier: a process group's ``all_gather`` with a
timeout, or report files in the checkpoint directory read after a caller's barrier, or
nothing with one rank.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dist_restore._format.manifest import TMP_SUFFIX, _unlink_quietly
from dist_restore._protocol.pg import CollectiveError, ProcessGroupWrapper

logger = logging.getLogger(__name__)


class Sync:
    """One rank's end of the status exchange: ``gather`` is also a barrier."""

    def gather(self, step: str, status: dict[str, Any]) -> list[dict[str, Any]]:
        return [status]

    def close(self) -> None:
        """Release what the exchange left behind (after the last gather, on every rank)."""


class GroupSync(Sync):
    def __init__(self, pg: ProcessGroupWrapper) -> None:
        self._pg = pg

    def gather(self, step: str, status: dict[str, Any]) -> list[dict[str, Any]]:
        return self._pg.all_gather_object(status)


class FileSync(Sync):
    """Report files ``.dist_restore_sync.{step}.rank{r}.tmp`` in the checkpoint directory.

    Each rank writes its report, waits at the barrier, reads everyone's. A rank removes
    its report of one step after the next barrier (when every rank has read it), and its
    last one in :meth:`close`, after one more barrier.
    """

    def __init__(self, barrier: Callable[[], None], d: Path, rank: int, world: int) -> None:
        self._barrier, self._dir, self._rank, self._world = barrier, d, rank, world
        self._mine: Path | None = None
        self._closed = False

    def _file(self, step: str, rank: int) -> Path:
        return self._dir / f".dist_restore_sync.{step}.rank{rank}{TMP_SUFFIX}"

    def gather(self, step: str, status: dict[str, Any]) -> list[dict[str, Any]]:
        mine = self._file(step, self._rank)
        _unlink_quietly(mine)  # a stale report must never be read as this one
        try:
            self._dir.mkdir(parents=True, exist_ok=True)
            with open(mine, "w", encoding="utf-8") as f:
                json.dump(status, f)
        except OSError as e:
            logger.warning("rank %d: could not write %s: %s", self._rank, mine, e)
        self._wait(step)
        if self._mine is not None:
            _unlink_quietly(self._mine)
        self._mine = mine
        out = []
        for r in range(self._world):
            try:
                out.append(json.loads(self._file(step, r).read_text(encoding="utf-8")))
            except (OSError, ValueError) as e:
                out.append({"ok": False, "error": f"no readable {step} report from rank {r}: {e}"})
        return out

    def _wait(self, step: str) -> None:
        try:
            self._barrier()
        except Exception as e:  # noqa: BLE001 - store timeouts & co.: a peer died or hung
            raise CollectiveError(f"barrier after {step!r} failed on rank {self._rank}: "
                                  f"{type(e).__name__}: {e}") from e

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._wait("close")
        if self._mine is not None:
            _unlink_quietly(self._mine)


def make_sync(pg: ProcessGroupWrapper | None, barrier: Callable[[], None] | None, d: Path | None,
              rank: int, world: int) -> Sync:
    """The exchange for these arguments (``d``: the checkpoint directory, for report files;
    ``None`` where there is no shared directory)."""
    if barrier is not None and world > 1:
        if d is None:
            raise ValueError("exchanging statuses through a barrier needs a checkpoint directory for report files")
        return FileSync(barrier, d, rank, world)
    if pg is not None:
        return GroupSync(pg)
    return Sync()
