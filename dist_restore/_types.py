"""Types shared with torch's experimental checkpointer (same names, same fields)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeAlias

#: A (possibly nested) state dict: str keys at the top, any picklable value below.
STATE_DICT: TypeAlias = dict[str, Any]


@dataclass(frozen=True)
class RankInfo:
    """Where this process sits in the job.

    Attributes:
        global_rank: This process's rank, ``0 <= global_rank < global_world_size``.
        global_world_size: Number of processes (and rank files) in the job.
    """

    global_rank: int
    global_world_size: int

    def __post_init__(self) -> None:
        if self.global_world_size < 1:
            raise ValueError(
                f"global_world_size must be >= 1, got {self.global_world_size}"
            )
        if not 0 <= self.global_rank < self.global_world_size:
            raise ValueError(
                f"global_rank must be in [0, {self.global_world_size}), got {self.global_rank}"
            )


def rank_file_name(rank: int) -> str:
    """The file name a rank reads: ``checkpoint_{rank}.pt``."""
    return f"checkpoint_{rank}.pt"
