"""dist_restore: fast, correct, rank-aware restore of torch.save checkpoints."""

from dist_restore._format.index import CheckpointIndex, IndexEntry, read_index
from dist_restore._format.manifest import IncompleteCheckpointError, Manifest, RankFileInfo, check_checkpoint
from dist_restore._protocol.report import RestoreReport
from dist_restore._format.catalog import Catalog, CatalogEntry, Chunk
from dist_restore._sources import read_catalog
from dist_restore._types import STATE_DICT, RankInfo
from dist_restore.consolidate import ConsolidateResult, consolidate
from dist_restore.coordinator import RestoreCoordinator, RestoreResult, RestoreStats
from dist_restore.discovery import find_latest_checkpoint
from dist_restore.errors import (
    CheckpointError,
    CorruptCheckpointError,
    RestoreError,
    StateDictMismatchError,
    UnsafeCheckpointError,
)
from dist_restore.reader import CheckpointReader, ReadResult
from dist_restore.trainer import TrainingState, restore_training_state, resume_latest, save_training_state
from dist_restore.writer import CheckpointWriter



def configure_object_store(url: str, **options: object) -> None:
    """Options for the object stores of URLs starting with ``url`` (``"s3://my-bucket"``), passed
    to ``obstore.store.from_url`` on top of the environment: ``config={...}``,
    ``client_options={...}`` (``timeout``, ``allow_http``, ...), ``retry_config={...}``,
    ``credential_provider=...``. Call it on every rank before the restore (see
    :func:`dist_restore._base.objstore.configure_object_store`)."""
    from dist_restore._base import objstore

    objstore.configure_object_store(url, **options)


__all__ = [
    "configure_object_store",
    "STATE_DICT",
    "Catalog",
    "CatalogEntry",
    "Chunk",
    "CheckpointError",
    "CheckpointIndex",
    "CheckpointReader",
    "CheckpointWriter",
    "ConsolidateResult",
    "CorruptCheckpointError",
    "IncompleteCheckpointError",
    "IndexEntry",
    "Manifest",
    "RankFileInfo",
    "RankInfo",
    "ReadResult",
    "RestoreCoordinator",
    "RestoreError",
    "RestoreReport",
    "RestoreResult",
    "RestoreStats",
    "StateDictMismatchError",
    "TrainingState",
    "UnsafeCheckpointError",
    "check_checkpoint",
    "consolidate",
    "find_latest_checkpoint",
    "read_catalog",
    "read_index",
    "restore_training_state",
    "resume_latest",
    "save_training_state",
]
