"""``CheckpointWriter``: crash-safe ``checkpoint_{rank}.pt`` files committed by a manifest.

A drop-in for torch's experimental ``CheckpointWriter`` (same file layout, plain
``torch.save`` zip files that ``torch.load`` and both readers read) that never leaves a
directory that looks complete but is not. ``write`` runs four steps, each ending with an
exchange of statuses that is also a barrier:

1. prepare (all ranks): check the metadata, create the directory.
2. uncommit (rank 0): remove temp files of an interrupted write, create the pending
   marker ``.dist_restore_manifest.json.{pid}.{token}.tmp``, remove the old manifest,
   fsync the directory. Only now, with every rank ready, is the old checkpoint given up;
   no rank file is replaced before its manifest is gone.
3. write (all ranks): ``torch.save`` into a temp file in the same directory, fsync, CRC32
   it, rename it to ``checkpoint_{rank}.pt``, fsync the directory; exchange
   ``(size, checksum)`` or the error.
4. commit (rank 0): only if every rank succeeded, write the manifest through the marker
   (fsync, rename, fsync the directory); exchange the manifest, so that no rank returns
   before it exists and every rank returns the same :class:`Manifest`.

Any failure is raised on every rank as ``RestoreError("write", {rank: message})``. No
manifest is written then and, after step 2, the marker stays, so ``check_checkpoint``
reports the half-overwritten directory as incomplete; a crash leaves the marker (and the
dead rank's temp file or a missing rank file) behind likewise.

How ranks exchange statuses:

- a process group (``torch.distributed`` initialised, no ``barrier`` given): the group's
  ``all_gather`` with ``timeout`` on every call;
- a ``barrier`` (e.g. torch's experimental ``TCPStoreBarrier`` in a writer process that
  must not touch the training group): small JSON report files in the checkpoint
  directory (a shared file system), read after each barrier;
- neither, with one rank: nothing to exchange;
- neither, with several ranks: the ranks cannot agree, so each only writes its file, as
  torch's experimental writer does; rank 0 still removes an old manifest; ``write``
  returns ``None``.

Object stores (``s3://``, ``gs://``, ``az://`` URLs of a prefix): the same four steps and
exchanges, with what a store offers. An object appears whole or not at all, so there are no
temp objects, renames or fsyncs:

1. prepare (all ranks): check the metadata and the staging directory, open the store.
2. uncommit (rank 0): put the pending marker object, delete the old manifest object, then
   delete stale objects of ours: markers of interrupted writes and the rank and index
   objects of ranks beyond this world (a larger world's, written earlier).
3. write (all ranks): ``torch.save`` into a temp file in the staging directory
   (``$DIST_RESTORE_STAGING``, else the system temp directory: it must hold this rank's
   file), CRC32 it, build its index file, upload ``checkpoint_{rank}.pt`` (multipart when
   large) and the index file, remove the temp file; exchange as above.
4. commit (rank 0): only if every rank succeeded, put the manifest object, then delete the
   marker; exchange the manifest.

A failed or crashed write leaves no manifest and the marker, as on a file system. The
``barrier`` mode is refused for URLs: its report files need a shared file system.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from dist_restore._format.manifest import (  # noqa: I001
    _unlink_quietly,
    _OUR_TEMP,
    MANIFEST_NAME,
    TMP_SUFFIX,
    Manifest,
    RankFileInfo,
    checksum_fileobj,
    fsync_dir,
    remove_stale_temp_files,
    temp_path,
    write_manifest,
    write_synced,
)
from dist_restore._format.index import read_index
from dist_restore._format.indexfile import build_index_file, index_checksum, index_path
from dist_restore._base.source import Location, UrlPath, is_url, local_path, location
from dist_restore._paths import raise_with_path
from dist_restore._protocol.pg import CollectiveError, ProcessGroupWrapper
from dist_restore._protocol.writesync import Sync, make_sync
from dist_restore._timeout import Timeout, to_seconds
from dist_restore._types import STATE_DICT, RankInfo, rank_file_name
from dist_restore.errors import RestoreError

logger = logging.getLogger(__name__)

_PHASE = "write"
T = TypeVar("T")
#: Environment variable naming the local directory where each rank stages its file before
#: uploading it to an object store (default: the system temp directory).
STAGING_ENV = "DIST_RESTORE_STAGING"
_RANK_OR_INDEX = re.compile(r"^checkpoint_(\d+)\.(?:pt|idx)$")


class CheckpointWriter:
    """Writes ``path/checkpoint_{rank}.pt`` on every rank, then commits a manifest.

    Args:
        rank_info: This process's rank and the world size; default: from the process
            group (``process_group`` or the default one) when ``torch.distributed`` is
            initialised, else rank 0 of 1. Torch's experimental ``RankInfo`` works too.
        barrier: Synchronise through this callable (or an object with
            ``execute_barrier()``, like torch's experimental barriers) and report files in
            the checkpoint directory instead of the process group. Must wait for all
            ``rank_info.global_world_size`` ranks and time out on its own. Not for
            object-store URLs (with more than one rank).
        process_group: The group to exchange statuses on; default: the default group.
        timeout: How long each process-group collective may take: seconds or a
            ``datetime.timedelta``.

    Raises:
        TypeError, ValueError: ``timeout`` is neither positive seconds nor a ``timedelta``.
        ValueError: ``rank_info`` disagrees with the process group, or ``process_group``
            is given while ``torch.distributed`` is not initialised.
    """

    def __init__(self, rank_info: Any | None = None, barrier: Callable[[], None] | Any | None = None, *,
                 process_group: Any = None, timeout: Timeout = 600.0) -> None:
        timeout = to_seconds(timeout)
        if barrier is not None and process_group is not None:
            raise ValueError("pass a barrier or a process_group, not both: with a barrier the ranks "
                             "exchange statuses through files, never through a group")
        if barrier is not None and not callable(barrier):
            barrier = getattr(barrier, "execute_barrier", None) or _not_a_barrier(barrier)
        self._barrier: Callable[[], None] | None = barrier
        self._pg: ProcessGroupWrapper | None = None
        initialised = dist.is_available() and dist.is_initialized()
        if barrier is None and (initialised or process_group is not None):
            self._pg = ProcessGroupWrapper(process_group, timeout=timeout)
            mine = RankInfo(self._pg.rank, self._pg.world_size)
        elif initialised:
            mine = RankInfo(dist.get_rank(), dist.get_world_size())
        else:
            mine = RankInfo(0, 1)
        if rank_info is None:
            self._rank_info = mine
        else:
            self._rank_info = _as_rank_info(rank_info)
            if self._pg is not None and self._rank_info != mine:
                raise ValueError(f"rank_info {rank_info} disagrees with the process group, where this "
                                 f"process is rank {mine.global_rank} of {mine.global_world_size}; "
                                 "pass rank_info=None to take it from the group")

    @property
    def rank_info(self) -> RankInfo:
        return self._rank_info

    def write(self, path: str | os.PathLike[str], state_dict: STATE_DICT, *,
              metadata: Mapping[str, Any] | None = None) -> Manifest | None:
        """Write this rank's file and, with the other ranks, commit the checkpoint.

        Args:
            path: The checkpoint directory (created if needed; an existing checkpoint in
                it is replaced), or an object-store URL of a prefix (``s3://bucket/run/step_100``).
            state_dict: What to ``torch.save``.
            metadata: JSON-serialisable data for the manifest, e.g. ``{"step": 2000}``
                (rank 0's is written); ``find_latest_checkpoint`` orders by ``"step"``.

        Returns:
            The committed manifest (the same on every rank), or ``None`` where the ranks
            cannot coordinate (several ranks, no process group, no barrier).

        Raises:
            ValueError: ``path`` is a URL and this writer exchanges statuses through a
                ``barrier`` (report files need a shared file system).
            RestoreError: on every rank, with phase ``"write"``, if any rank failed (bad
                metadata, I/O error, an unpicklable value) or a peer died or timed out.
        """
        t0 = time.perf_counter()
        rank, world = self._rank_info.global_rank, self._rank_info.global_world_size
        target: _Target
        if is_url(path):
            if self._barrier is not None and world > 1:
                raise ValueError(f"cannot write {str(path)!r} with a barrier: the ranks would exchange statuses "
                                 "through report files in the checkpoint directory, which an object store is "
                                 "not; initialise torch.distributed (or pass process_group=) instead")
            target = _ObjectTarget(str(path))
        else:
            target = _LocalTarget(local_path(path))
        if world > 1 and self._pg is None and self._barrier is None:
            return self._write_uncoordinated(target, state_dict)
        sync = make_sync(self._pg, self._barrier, target.dir, rank, world)

        step, _ = _attempt(f"preparing {target.name!r}", target.prepare, metadata)
        self._agree(sync, "prepare", step)
        # only once every rank is ready does rank 0 take the old checkpoint's manifest away
        step, marker = _attempt(f"uncommitting {target.name!r}", target.uncommit, world) if rank == 0 else _ok()
        self._agree(sync, "uncommit", step)

        step, info = _attempt(f"writing {rank_file_name(rank)}", target.write_rank, rank, state_dict)
        if info is not None:
            step.status["info"] = [info.rank, info.file, info.size, info.checksum, info.index_file,
                                   info.index_size, info.index_checksum]
        infos = [RankFileInfo(*s["info"]) for s in self._agree(sync, "write", step)]

        if rank == 0:
            step, manifest = _attempt(f"committing {MANIFEST_NAME}", target.commit, infos, metadata, marker)
            if manifest is not None:
                step.status["manifest"] = manifest.to_json()
        else:
            step, _ = _ok()
        manifest_json = self._agree(sync, "commit", step)[0]["manifest"]
        sync.close()
        result = Manifest.from_json(manifest_json, file=target.join(MANIFEST_NAME))
        logger.info("rank %d: wrote %s (%d bytes); %d rank(s) committed in %.3fs", rank,
                    target.join(infos[rank].file), infos[rank].size, world, time.perf_counter() - t0)
        return result

    def close(self) -> None:
        """Nothing to release; for torch's ``CheckpointWriter`` interface."""

    # -- steps -----------------------------------------------------------------------

    def _write_uncoordinated(self, target: _Target, state_dict: STATE_DICT) -> None:
        rank = self._rank_info.global_rank
        logger.warning("rank %d: %d ranks but no process group and no barrier: writing %s without a "
                       "commit manifest (pass a barrier or initialise torch.distributed)",
                       rank, self._rank_info.global_world_size, target.name)
        target.prepare(None)
        if rank == 0:
            target.drop_manifest()
        target.write_rank(rank, state_dict)
        return None

    def _agree(self, sync: Sync, name: str, step: _Step) -> list[dict[str, Any]]:
        """(all ranks) Exchange statuses; raise the same RestoreError everywhere on any failure."""
        rank = self._rank_info.global_rank
        try:
            gathered = sync.gather(name, step.status)
        except CollectiveError as e:
            mine = step.status["error"]
            raise RestoreError(_PHASE, {rank: f"{mine}; then {e}" if mine else str(e)}) from e
        failures = {r: s.get("error") or "failed" for r, s in enumerate(gathered) if not s.get("ok")}
        if failures:
            logger.warning("rank %d: checkpoint write failed (%s) on ranks %s; no manifest written",
                           rank, name, sorted(failures))
            try:
                sync.close()
            except Exception as e:  # noqa: BLE001 - the failure being raised matters more
                logger.warning("rank %d: cleanup after the failed write failed too: %s", rank, e)
            raise RestoreError(_PHASE, failures) from step.exc
        return gathered


# -- helpers -----------------------------------------------------------------------------

@dataclass
class _Step:
    """One rank's outcome of one step: a plain status for the others, the exception for us."""

    status: dict[str, Any]
    exc: BaseException | None = None


def _attempt(what: str, fn: Callable[..., T], *args: Any) -> tuple[_Step, T | None]:
    """Run one rank's step, catching its failure so that it reaches every rank."""
    try:
        return _Step({"ok": True, "error": None}), fn(*args)
    except Exception as e:  # noqa: BLE001 - every failure must reach the other ranks
        return _Step({"ok": False, "error": f"{what}: {type(e).__name__}: {e}"}, e), None


def _ok() -> tuple[_Step, None]:
    return _Step({"ok": True, "error": None}), None


class _Target:
    """Where a checkpoint is written: the steps of :meth:`CheckpointWriter.write` that touch
    storage. ``name`` (path or URL) is what messages name."""

    name: str
    #: The directory on a shared file system (for a barrier's report files), if it is one.
    dir: Path | None = None

    def join(self, file: str) -> Path | str:
        raise NotImplementedError

    def prepare(self, metadata: Mapping[str, Any] | None) -> None:
        """(all ranks) Check the metadata; make the checkpoint's place ready."""
        raise NotImplementedError

    def uncommit(self, world: int) -> Any:
        """(rank 0) Give up the old checkpoint; returns the pending marker for :meth:`commit`."""
        raise NotImplementedError

    def write_rank(self, rank: int, state_dict: STATE_DICT) -> RankFileInfo:
        """(all ranks) Store this rank's file and its index file."""
        raise NotImplementedError

    def commit(self, infos: list[RankFileInfo], metadata: Mapping[str, Any] | None, marker: Any) -> Manifest:
        """(rank 0) Store the manifest: the checkpoint is complete."""
        raise NotImplementedError

    def drop_manifest(self) -> None:
        """(rank 0, no coordination) Remove an old manifest."""
        raise NotImplementedError


class _LocalTarget(_Target):
    """A directory on a (shared) file system: temp files, renames and fsyncs."""

    def __init__(self, d: Path) -> None:
        self.dir, self.name = d, str(d)

    def join(self, file: str) -> Path:
        return self.dir / file

    def prepare(self, metadata: Mapping[str, Any] | None) -> None:
        """(all ranks) Check the metadata, create the directory."""
        if metadata is not None:
            _check_metadata(metadata)
        self.dir.mkdir(parents=True, exist_ok=True)

    def uncommit(self, world: int) -> Path:
        """(rank 0) Mark the directory as being written; returns the pending marker.

        Sweeps temp files of an interrupted write, creates the marker (a temp file, kept
        until it becomes the new manifest), removes the old manifest and fsyncs the
        directory, so the removal is durable before any rank file is replaced.
        """
        d = self.dir
        stale = remove_stale_temp_files(d)
        if stale:
            logger.info("removed %d temp file(s) of an interrupted write from %s: %s", len(stale), d, stale)
        marker = temp_path(d / MANIFEST_NAME)
        marker.touch(exist_ok=False)
        _unlink_quietly(d / MANIFEST_NAME)
        fsync_dir(d)
        return marker

    def write_rank(self, rank: int, state_dict: STATE_DICT) -> RankFileInfo:
        """(all ranks) ``torch.save`` via a temp file; fsync; CRC32; rename; fsync the dir."""
        d = self.dir
        final = d / rank_file_name(rank)
        tmp = temp_path(final)
        try:
            size, checksum = _save(state_dict, tmp, fsync=True)
            index = self._write_index_file(rank, tmp, index_path(final))
            os.replace(tmp, final)
            if index is not None:
                os.replace(index[0], index_path(final))
        except BaseException:
            _unlink_quietly(tmp)
            raise
        fsync_dir(d)
        if index is None:
            return RankFileInfo(rank, final.name, size, checksum)
        return RankFileInfo(rank, final.name, size, checksum, index_path(final).name, index[1], index[2])

    @staticmethod
    def _write_index_file(rank: int, rank_file: Path, final: Path) -> tuple[Path, int, str] | None:
        """(all ranks) The index file of a rank file just written, as a fsynced temp file
        beside ``final``: ``(temp path, size, checksum)``; ``None`` (and any old index file
        removed) when the file holds entries the index format does not describe."""
        data = _index_data(rank, rank_file, final.name)
        if data is None:
            _unlink_quietly(final)
            return None
        tmp = temp_path(final)
        try:
            write_synced(tmp, data)
        except BaseException:
            _unlink_quietly(tmp)
            raise
        return tmp, len(data), index_checksum(data)

    def commit(self, infos: list[RankFileInfo], metadata: Mapping[str, Any] | None,
               marker: Path | None) -> Manifest:
        """(rank 0) Write the manifest through the marker: the checkpoint is complete."""
        manifest = Manifest.create(infos, dict(metadata or {}))
        write_manifest(self.dir, manifest, tmp=marker)
        return manifest

    def drop_manifest(self) -> None:
        _unlink_quietly(self.dir / MANIFEST_NAME)
        fsync_dir(self.dir)


class _ObjectTarget(_Target):
    """A prefix in an object store. Each rank stages its file locally, then uploads it; an
    object appears whole or not at all, so nothing is renamed and no temp object is made."""

    def __init__(self, url: str) -> None:
        self.name = url.rstrip("/")
        self._loc: Location | None = None

    @property
    def loc(self) -> Location:
        if self._loc is None:  # imports the client and opens the store: in a step, caught
            self._loc = location(self.name)
        return self._loc

    def join(self, file: str) -> str:
        return UrlPath(self.name) / file

    def prepare(self, metadata: Mapping[str, Any] | None) -> None:
        """(all ranks) Check the metadata and the staging directory, open the store."""
        if metadata is not None:
            _check_metadata(metadata)
        _staging_dir()
        _ = self.loc

    def uncommit(self, world: int) -> str:
        """(rank 0) Put the marker, delete the old manifest, then stale objects of ours
        (other markers, rank and index objects of ranks ``>= world``); returns the marker."""
        loc = self.loc
        marker = temp_path(MANIFEST_NAME).name
        loc.put_bytes(marker, b"")  # a manifest or a marker is there at every moment
        loc.delete(MANIFEST_NAME)
        stale = sorted(n for n in loc.files() if n != marker and (_OUR_TEMP.match(n) or _beyond(n, world)))
        for n in stale:
            loc.delete(n)
        if stale:
            logger.info("removed %d stale object(s) from %s: %s", len(stale), self.name, stale)
        return marker

    def write_rank(self, rank: int, state_dict: STATE_DICT) -> RankFileInfo:
        """(all ranks) ``torch.save`` into a staged temp file; CRC32; upload it and its index file."""
        loc, name = self.loc, rank_file_name(rank)
        index_name = index_path(name).name
        fd, staged = tempfile.mkstemp(prefix=f".{name}.", suffix=TMP_SUFFIX, dir=_staging_dir())
        os.close(fd)
        tmp = Path(staged)
        try:
            size, checksum = _save(state_dict, tmp, fsync=False)
            data = _index_data(rank, tmp, index_name)
            loc.put_file(tmp, name)
        finally:
            _unlink_quietly(tmp)
        if data is None:
            loc.delete(index_name)
            return RankFileInfo(rank, name, size, checksum)
        loc.put_bytes(index_name, data)
        return RankFileInfo(rank, name, size, checksum, index_name, len(data), index_checksum(data))

    def commit(self, infos: list[RankFileInfo], metadata: Mapping[str, Any] | None, marker: str | None) -> Manifest:
        """(rank 0) Put the manifest object, then delete the marker."""
        manifest = Manifest.create(infos, dict(metadata or {}))
        self.loc.put_bytes(MANIFEST_NAME, manifest.to_json().encode("utf-8"))
        if marker is not None:
            try:
                self.loc.delete(marker)
            except OSError as e:  # committed all the same; the next write sweeps it
                logger.warning("%s is committed, but its marker %s stays: %s", self.name, marker, e)
        return manifest

    def drop_manifest(self) -> None:
        self.loc.delete(MANIFEST_NAME)


def _save(state_dict: STATE_DICT, tmp: Path, *, fsync: bool) -> tuple[int, str]:
    """``torch.save`` into the new file ``tmp``; ``(size, "crc32:%08x")`` of what it holds."""
    try:
        # a file object, not the path: given a path, torch names the archive inside
        # after it (the temp name); given a file, "archive", as for any buffer
        with open(tmp, "wb") as f:
            torch.save(state_dict, f)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        with open(tmp, "rb", buffering=0) as f:  # CRC32 of what is on disk (page cache)
            return checksum_fileobj(f)
    except OSError as e:  # write, fsync, read: errors that name no file (a full disk)
        raise_with_path(e, tmp)


def _index_data(rank: int, rank_file: Path, name: str) -> bytes | None:
    """The index file of a rank file just written, or ``None`` when it holds entries the
    index format does not describe."""
    data = build_index_file(read_index(rank_file, use_index_file=False))
    if data is None:
        logger.info("rank %d: %s holds entries an index file cannot describe; writing none "
                    "(restores read its pickle)", rank, name)
    return data


def _staging_dir() -> str:
    """Where a rank stages its file before an upload: ``$DIST_RESTORE_STAGING`` or the temp dir."""
    d = os.environ.get(STAGING_ENV) or tempfile.gettempdir()
    if not os.path.isdir(d):
        raise NotADirectoryError(f"{STAGING_ENV}={d!r} is not a directory: set it to a local directory with room "
                                 "for this rank's checkpoint file, or unset it to use the system temp directory")
    return d


def _beyond(name: str, world: int) -> bool:
    """Whether ``name`` is a rank or index file of a rank ``>= world``."""
    m = _RANK_OR_INDEX.match(name)
    return m is not None and int(m.group(1)) >= world


def _check_metadata(metadata: Mapping[str, Any]) -> None:
    if not isinstance(metadata, Mapping):
        raise TypeError(f"metadata must be a dict, got {type(metadata).__name__}")
    bad = [k for k in metadata if not isinstance(k, str)]
    if bad:
        raise TypeError(f"metadata keys must be str, got {bad[:5]!r}")
    try:
        json.dumps(dict(metadata), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"metadata must be JSON-serialisable (numbers, strings, lists, dicts): {e}") from None


def _as_rank_info(info: Any) -> RankInfo:
    if isinstance(info, RankInfo):
        return info
    try:
        return RankInfo(int(info.global_rank), int(info.global_world_size))
    except AttributeError:
        raise TypeError(f"rank_info must have global_rank and global_world_size, got {info!r}") from None


def _not_a_barrier(obj: Any) -> Callable[[], None]:
    raise TypeError(f"barrier must be a callable or have execute_barrier(), got {type(obj).__name__}")
