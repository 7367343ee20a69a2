"""dist_restore: fast, correct, rank-aware restore of torch.save checkpoints."""

from dist_restore._index import CheckpointIndex, IndexEntry, read_index
from dist_restore._report import RestoreReport
from dist_restore._types import STATE_DICT, RankInfo
from dist_restore.coordinator import RestoreCoordinator, RestoreResult, RestoreStats
from dist_restore.errors import (
    CheckpointError,
    CorruptCheckpointError,
    RestoreError,
    StateDictMismatchError,
    UnsafeCheckpointError,
)
from dist_restore.reader import CheckpointReader, ReadResult

__all__ = [
    "STATE_DICT",
    "CheckpointError",
    "CheckpointIndex",
    "CheckpointReader",
    "CorruptCheckpointError",
    "IndexEntry",
    "RankInfo",
    "ReadResult",
    "RestoreCoordinator",
    "RestoreError",
    "RestoreReport",
    "RestoreResult",
    "RestoreStats",
    "StateDictMismatchError",
    "UnsafeCheckpointError",
    "read_index",
]
