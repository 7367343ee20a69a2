"""``CheckpointReader``: read one rank's ``checkpoint_{rank}.pt``, fully or partially."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dist_restore._gc import gc_paused
from dist_restore._format.index import CheckpointIndex, read_index
from dist_restore._format.manifest import IncompleteCheckpointError, check_checkpoint, is_temp_file, rank_file_count, \
    read_manifest
from dist_restore._planning.catalog import KeyMap
from dist_restore._base.regions import LayoutError
from dist_restore._base.source import pinned_listings
from dist_restore._sources import plan_source, read_source, source_format
from dist_restore._planning.reshard import ShardPlan, plan_shards, split_leaves
from dist_restore._bytes.shares import check_records
from dist_restore._bytes.slices import read_jobs
from dist_restore._planning.plan import ReadPlan, assemble, first_out_of_bounds, plan_read
from dist_restore._bytes.read import MapLocation, ReadStats, Verify, produce
from dist_restore._bytes.readall import read_all, readable
from dist_restore._types import STATE_DICT, RankInfo, rank_file_name
from dist_restore.errors import CheckpointError, CorruptCheckpointError, StateDictMismatchError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReadResult:
    """What :meth:`CheckpointReader.load` returns.

    Attributes:
        state_dict: The restored state dict (the target object itself when one was given).
        missing_keys: Keys the target asked for that the file lacks.
        unexpected_keys: Keys in the file, under a level the target named, not asked for.
        bytes_read: Bytes of tensor data taken from the file.
        bytes_verified: Bytes whose zip CRC32 was checked.
        seconds: Wall time of the whole call.
        index_seconds: Part of it spent indexing the file.
    """

    state_dict: STATE_DICT
    missing_keys: list[str]
    unexpected_keys: list[str]
    bytes_read: int
    bytes_verified: int = 0
    seconds: float = 0.0
    index_seconds: float = 0.0
    fallback_loads: int = field(default=0, repr=False)


class CheckpointReader:
    """Reads ``path/checkpoint_{global_rank}.pt``: a drop-in for torch's experimental reader.

    Only the keys the target names are read; tensors in the target are filled in place
    with one copy from the (memory-mapped) file; the file is never modified.

    Args:
        rank_info: Which rank file to read.
        verify: ``"crc32"`` (default) checks the zip CRC32 of every storage record that is
            read whole (and always of ``data.pkl``); ``"none"`` skips the data check.
    """

    def __init__(self, rank_info: RankInfo, *, verify: Verify = "crc32") -> None:
        if verify not in ("crc32", "none"):
            raise ValueError(f"verify must be 'crc32' or 'none', got {verify!r}")
        self._rank_info = rank_info
        self._verify = verify

    @property
    def rank_info(self) -> RankInfo:
        return self._rank_info

    def file_path(self, path: str | os.PathLike[str]) -> Path:
        """``path/checkpoint_{global_rank}.pt``."""
        return Path(path) / rank_file_name(self._rank_info.global_rank)

    def index(self, path: str | os.PathLike[str]) -> CheckpointIndex:
        """Index this rank's file: every entry's key, dtype, shape, stride and offset."""
        return self._index(self.file_path(path))

    def read(
        self,
        path: str | os.PathLike[str],
        state_dict: STATE_DICT | None = None,
        *,
        map_location: MapLocation = None,
        key_map: KeyMap = None,
        cast: bool = False,
        **kwargs: Any,
    ) -> tuple[STATE_DICT, list[str]]:
        """Read this rank's file; the reference reader's signature and result.

        Args:
            path: The checkpoint directory.
            state_dict: ``None`` to load everything (as ``torch.load(weights_only=True)``);
                else the keys to load: tensors are filled in place, ``None`` values allocated.
            map_location: Device (or ``{saved: device}`` mapping) for allocated tensors.
            key_map, cast: For safetensors sources (see :meth:`load`).
            **kwargs: Accepted for compatibility with the reference; ignored.

        Returns:
            ``(state_dict, missing_keys)``.
        """
        if kwargs:
            logger.debug("ignoring reader kwargs %s", sorted(kwargs))
        res = self.load(path, state_dict, map_location=map_location, key_map=key_map, cast=cast)
        return res.state_dict, res.missing_keys

    @gc_paused
    def load(
        self,
        path: str | os.PathLike[str],
        state_dict: STATE_DICT | None = None,
        *,
        map_location: MapLocation = None,
        strict: bool = False,
        verify: bool = False,
        key_map: KeyMap = None,
        cast: bool = False,
    ) -> ReadResult:
        """Like :meth:`read`, with unexpected keys, byte counts and timing.

        When the directory has a commit manifest (written by :class:`CheckpointWriter`),
        this rank's file must be listed there with its recorded size; a directory with
        leftover temp files of an interrupted write and no manifest is refused.

        Args:
            strict: Raise :class:`StateDictMismatchError` if any key is missing or unexpected.
            verify: Also check this rank's whole file against the manifest's CRC32 (reads
                the file once more; without a manifest there is nothing to check against).
            key_map: A Hugging Face safetensors source (a directory of ``*.safetensors``
                files, or one file, read instead of a rank file): target key -> file key (a
                dict, or a callable; ``None`` skips the key). DTensor targets get the
                byte ranges of their local shard.
            cast: Safetensors sources: cast a file dtype other than the target's while copying.

        Raises:
            FileNotFoundError: the rank file does not exist.
            CorruptCheckpointError: truncated/corrupt file or CRC32 mismatch.
            UnsafeCheckpointError: the pickle would construct non-allowlisted objects.
            StateDictMismatchError: a target's shape/dtype/structure does not match
                (raised before any target is modified).
        """
        t0 = time.perf_counter()
        with pinned_listings():
            if source_format(path) is not None:
                return self._load_source(path, state_dict, map_location, strict, key_map, cast, t0)
        file = self.file_path(path)
        self.check_committed(path, verify=verify)
        index = self._index(file, tables=state_dict is None)
        stats = ReadStats()
        if state_dict is None and readable(index):  # everything: no plan, no object per entry
            sd = self._read_all(index, map_location, stats)
            missing: tuple[str, ...] = ()
            unexpected: tuple[str, ...] = ()
        else:
            plan = self.plan(index, state_dict)
            if strict and (plan.missing or plan.unexpected):
                raise StateDictMismatchError(_strict_message(plan), file=file, rank=self._rank_info.global_rank)
            sd = self.execute(index, plan, state_dict, map_location=map_location, stats=stats)
            missing, unexpected = plan.missing, plan.unexpected
        seconds = time.perf_counter() - t0
        if missing:
            logger.warning("rank %d: %d key(s) missing from %s: %s", self._rank_info.global_rank,
                           len(missing), file, _preview(missing))
        logger.debug("rank %d: read %d bytes from %s in %.3fs", self._rank_info.global_rank,
                     stats.bytes_read, file, seconds)
        return ReadResult(sd, list(missing), list(unexpected), stats.bytes_read,
                          stats.bytes_verified, seconds, index.seconds, stats.fallback_loads)

    def _load_source(self, path: Any, state_dict: STATE_DICT | None, map_location: MapLocation, strict: bool,
                     key_map: KeyMap, cast: bool, t0: float) -> ReadResult:
        """:meth:`load` of a safetensors source: plan every target, refuse mismatches before any
        target is touched, then read the byte ranges of this rank's shards."""
        rank = self._rank_info.global_rank
        plan = plan_source(path, state_dict, key_map=key_map, cast=cast, map_location=map_location, rank=rank,
                           world=self._rank_info.global_world_size)
        if plan.mismatched:
            key, msg = plan.mismatched[0]
            more = f" (and {len(plan.mismatched) - 1} more mismatch(es))" if len(plan.mismatched) > 1 else ""
            raise StateDictMismatchError(msg + more, file=path, rank=rank, key=key)
        if strict and (plan.missing or plan.unexpected):
            raise StateDictMismatchError(_strict_message(plan), file=path, rank=rank)  # type: ignore[arg-type]
        t1 = time.perf_counter()
        nbytes, _files, verified = read_source(plan, verify=self._verify == "crc32")
        if plan.missing:
            logger.warning("rank %d: %d key(s) missing from %s: %s", rank, len(plan.missing), path,
                           _preview(plan.missing))
        return ReadResult(plan.result(state_dict), list(plan.missing), list(plan.unexpected), nbytes, verified,
                          time.perf_counter() - t0, t1 - t0, 0)

    # -- the pieces, for the coordinator -------------------------------------------------

    def check_committed(self, path: str | os.PathLike[str], *, verify: bool = False,
                        world_size: int | None = None) -> None:
        """Refuse an uncommitted or damaged checkpoint before reading this rank's file.

        With a manifest: world size (when given), this rank's file size and, with
        ``verify``, its CRC32. Without one: with ``world_size``, every rank file must exist;
        always, no temp file of an interrupted write may be left. A plain ``torch.save``
        directory passes.
        """
        rank = self._rank_info.global_rank
        d = Path(path)
        if not d.is_dir():
            if d.exists():
                raise NotADirectoryError(f"checkpoint path is not a directory: {str(d)!r}")
            raise FileNotFoundError(f"checkpoint directory not found: {str(d)!r}")
        if read_manifest(d) is not None or world_size is not None:
            check_checkpoint(d, world_size=world_size, ranks=[rank], verify=verify)
            return
        temps = sorted(n for n in os.listdir(d) if is_temp_file(n))
        if temps:
            raise IncompleteCheckpointError(
                "incomplete checkpoint: no commit manifest; temp files present: "
                + ", ".join(temps[:10]) + (" ..." if len(temps) > 10 else ""), file=d, rank=rank)

    def _index(self, file: Path, *, tables: bool = False) -> CheckpointIndex:
        try:
            return read_index(file, tables=tables)
        except CheckpointError as e:
            if e.rank is None:
                raise type(e)(e.reason, file=e.file or file, rank=self._rank_info.global_rank,
                              key=e.key) from e
            raise

    def plan(self, index: CheckpointIndex, state_dict: STATE_DICT | None) -> ReadPlan:
        """Match a target against an index; raise if any shape/dtype/structure conflicts."""
        plan = plan_read(state_dict, *index.walkable)
        if plan.mismatched:
            key, msg = plan.mismatched[0]
            more = f" (and {len(plan.mismatched) - 1} more mismatch(es))" if len(plan.mismatched) > 1 else ""
            raise StateDictMismatchError(msg + more, file=index.file,
                                         rank=self._rank_info.global_rank, key=key)
        bad = first_out_of_bounds(plan.leaves)
        if bad:
            raise CorruptCheckpointError(bad[1], file=index.file, rank=self._rank_info.global_rank, key=bad[0].key)
        return plan

    def execute(self, index: CheckpointIndex, plan: ReadPlan, state_dict: STATE_DICT | None, *,
                map_location: MapLocation = None, stats: ReadStats | None = None,
                skip: frozenset[str] = frozenset(), values: dict[Any, Any] | None = None) -> STATE_DICT:
        """Run a checked plan and assemble the result (mutating the target containers).

        Args:
            skip: Keys of leaves produced elsewhere (e.g. received by broadcast); their
                values must be in ``values`` unless they were filled in place.
            values: Pre-produced ``{raw path: value}`` to use for skipped leaves.
        """
        leaves = [lf for lf in plan.leaves if lf.key not in skip] if skip else list(plan.leaves)
        leaves, reshard = split_leaves(leaves)
        try:
            shards = self.plan_shards(index, reshard) if reshard else None
            produced = produce(index, leaves, map_location=map_location, verify=self._verify, stats=stats)
            if shards is not None:
                stats = stats if stats is not None else ReadStats()
                read_jobs(shards.jobs, shards.indexes, shards.entries, stats, verify=self._verify == "crc32")
                if stats.pieces:  # records read in pieces here: checked when the pieces cover them
                    bad, verified = check_records([stats.piece_reports()])
                    if bad:
                        raise CorruptCheckpointError(bad[0], file=index.file, rank=self._rank_info.global_rank)
                    stats.bytes_verified += verified[0]
        except CheckpointError as e:
            if e.rank is None:
                raise type(e)(e.reason, file=e.file, rank=self._rank_info.global_rank, key=e.key) from e
            raise
        if values:
            produced.update(values)
        tree, leaf = index.walkable
        return assemble(state_dict, tree, produced, leaf)

    def _read_all(self, index: CheckpointIndex, map_location: MapLocation, stats: ReadStats) -> STATE_DICT:
        try:
            return read_all(index, map_location=map_location, verify=self._verify, stats=stats)
        except CheckpointError as e:
            if e.rank is None:
                raise type(e)(e.reason, file=e.file, rank=self._rank_info.global_rank, key=e.key) from e
            raise

    def plan_shards(self, index: CheckpointIndex, leaves: list[Any]) -> ShardPlan:
        """Plan DTensor targets (or DTensor entries into whole tensors) from this rank's file
        and, where their shards need them, the other rank files of the same directory."""
        rank = self._rank_info.global_rank
        directory = index.file.parent
        try:
            return plan_shards(leaves, home=rank, home_index=index, own=rank, nfiles=rank_file_count(directory),
                               open_index=lambda f: self._index(directory / rank_file_name(f)), spread=rank)
        except LayoutError as e:
            raise StateDictMismatchError(str(e), file=index.file, rank=rank) from None


def _preview(keys: tuple[str, ...] | list[str], n: int = 10) -> str:
    shown = ", ".join(repr(k) for k in sorted(keys)[:n])
    return shown + (f" ... and {len(keys) - n} more" if len(keys) > n else "")


def _strict_message(plan: Any) -> str:
    parts = []
    if plan.missing:
        parts.append(f"missing keys: {_preview(plan.missing)}")
    if plan.unexpected:
        parts.append(f"unexpected keys: {_preview(plan.unexpected)}")
    return "strict restore: " + "; ".join(parts)
