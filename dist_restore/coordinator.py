"""``RestoreCoordinator``: every rank restores its own file; shared entries are read once.

The protocol of :meth:`RestoreCoordinator.restore`, in order:

1. **plan** (all ranks): index this rank's file, match the target, select the shared
   entries; nothing is read or modified. (all ranks) ``all_gather`` of each rank's
   status, key report and a digest of its shared-entry list. Any failure -> every rank
   raises the same :class:`RestoreError`; ``strict`` and a missing/unexpected key
   anywhere -> likewise. (src -> all) src's shared non-tensor values, if any; only where
   the digests differ, src's list and then every rank's (to compare them). Every rank
   derives the same owners and bucket layout from the same list.
2. **read** (all ranks): read this rank's own entries, plus the shared ones it owns,
   straight into the targets. (all ranks) ``all_gather`` of the status.
3. **exchange** (owner -> all): shared tensors travel in flat byte buckets per
   (owner, dtype), one ``broadcast`` each; a lone tensor lands directly in its target.
   How each rank packs and unpacks a bucket (in place, views, row copies, vectored
   syscalls, or copies) is prepared at the end of the read phase (see :mod:`dist_restore._protocol.exchange`).
   When every rank runs on one host, owners instead pack their buckets into a memory
   file during the read phase and the others copy them out of it (see :mod:`dist_restore._bytes.shm`).
4. **finish** (all ranks): agree that every copy succeeded (and broadcast what a rank
   could not copy from a memory file); assemble the result; closing barrier (when shared
   entries were exchanged: otherwise the read agreement was the last step every rank
   passed). (rank 0) log the report.

Every collective has a timeout: a rank that died or hung makes the others raise
:class:`RestoreError` instead of blocking.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dist_restore._bytes import shm as _shm
from dist_restore._gc import paused
from dist_restore._protocol.pg import BarrierKind, CollectiveError, ProcessGroupWrapper
from dist_restore._planning.plan import PlannedLeaf, first_out_of_bounds, plan_read
from dist_restore._format.dtensor import DTensorRef
from dist_restore._protocol.exchange import BucketIO, prepare_buckets
from dist_restore._format.manifest import IncompleteCheckpointError, check_checkpoint, rank_file_count, read_manifest
from dist_restore._planning.catalog import KeyMap
from dist_restore._planning.reshard import is_dtensor, plan_shards, split_leaves
from dist_restore._rankplan import RankPlan
from dist_restore._base.source import pinned_listings
from dist_restore._sources import plan_source, source_format
from dist_restore._bytes.readall import readable
from dist_restore._bytes.read import MapLocation, ReadStats, Verify, resolve_device
from dist_restore._bytes.shares import check_records
from dist_restore._protocol.report import RankReport, RestoreReport, format_ranks
from dist_restore._planning.shared import (SharedItem, SharedMode, SharedSpec, assign_owners, make_buckets, make_selector,
                                  unmatched_patterns)
from dist_restore._planning.shared import shared_items as shared_items_of
from dist_restore._timeout import Timeout, to_seconds
from dist_restore._types import STATE_DICT, RankInfo, rank_file_name
from dist_restore._base.regions import LayoutError
from dist_restore.errors import CorruptCheckpointError, RestoreError, StateDictMismatchError
from dist_restore.reader import CheckpointReader

logger = logging.getLogger(__name__)

_MODES = ("broadcast", "spread", "local")


@dataclass
class RestoreStats:
    """Counters of one restore on this rank.

    Attributes:
        bytes_read: Tensor bytes read from this rank's file.
        bytes_received: Bytes received by collectives (shared tensors and control data).
        bytes_shm: Bytes of shared tensors copied from another rank's memory file (ranks on
            one host; see ``shared_memory``).
        bytes_verified: Bytes read whose CRC32 was checked: records read whole, and this
            rank's part of records that the ranks read in pieces and together covered whole.
        bytes_sent: Bytes this rank sent by collectives.
        files_opened: Rank files this rank opened (indexed or read); for a safetensors source,
            the files it read tensor bytes from.
        bytes_metadata: Header and metadata bytes read to plan (safetensors headers).
        collectives: Number of collectives issued (barriers included).
        seconds: Wall seconds per phase (``plan``, ``read``, ``exchange``, ``finish``).
    """

    bytes_read: int = 0
    bytes_received: int = 0
    bytes_shm: int = 0
    bytes_verified: int = 0
    bytes_sent: int = 0
    files_opened: int = 0
    bytes_metadata: int = 0
    collectives: int = 0
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class RestoreResult:
    """What :meth:`RestoreCoordinator.restore` returns on each rank.

    Attributes:
        state_dict: The restored state dict (the target object when one was given).
        missing_keys: Keys this rank's target asked for that its file lacks.
        unexpected_keys: Keys in this rank's file under a level the target named, not asked for.
        report: The aggregated report of all ranks, on rank 0; ``None`` elsewhere.
        stats: This rank's counters.
    """

    state_dict: STATE_DICT
    missing_keys: list[str]
    unexpected_keys: list[str]
    report: RestoreReport | None
    stats: RestoreStats


class RestoreCoordinator:
    """Restores a checkpoint directory on every rank of a process group.

    Args:
        process_group: The group; ``None`` uses the default group, or a single process
            when ``torch.distributed`` is not initialised. Rank files are numbered by the
            rank within this group.
        barrier: Closing barrier: ``"process_group"``, ``"store"`` (a TCPStore counter,
            as torch's experimental ``TCPStoreBarrier``) or ``"none"``.
        store: Store for ``barrier="store"`` (default: the default group's store).
        timeout: How long any one collective may wait before every rank gives up: seconds
            or a ``datetime.timedelta`` (as ``init_process_group`` takes it).
        bucket_bytes: Upper size of a flat bucket of shared tensors.
        verify: CRC32 checking of whole storage records (see :class:`CheckpointReader`).
        shared_memory: When every rank runs on one host (and the group is on the CPU),
            move shared buckets through the owner's memory file instead of broadcasts.
        shared_memory_bytes: The most bytes of buckets one owner packs into its memory
            file at once; an owner with more broadcasts them.

    Raises:
        TypeError, ValueError: a bad argument (e.g. a timeout that is neither positive
            seconds nor a ``timedelta``), here, before any collective.
    """

    def __init__(self, process_group: Any = None, *, barrier: BarrierKind = "process_group",
                 store: Any = None, timeout: Timeout = 300.0, bucket_bytes: int = 16 << 20,
                 verify: Verify = "crc32", shared_memory: bool = True,
                 shared_memory_bytes: int = 1 << 30) -> None:
        if barrier not in ("process_group", "store", "none"):
            raise ValueError(f"barrier must be 'process_group', 'store' or 'none', got {barrier!r}")
        timeout = to_seconds(timeout)
        if bucket_bytes < 1:
            raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
        self._pg = ProcessGroupWrapper(process_group, timeout=timeout, barrier=barrier, store=store)
        self._bucket_bytes = int(bucket_bytes)
        self._shm = bool(shared_memory) and self._pg.device.type == "cpu"
        self._shm_bytes = int(shared_memory_bytes)
        self._reader = CheckpointReader(self.rank_info, verify=verify)

    @property
    def rank_info(self) -> RankInfo:
        """This process's rank and the group's size."""
        return RankInfo(self._pg.rank, self._pg.world_size)

    def restore(
        self,
        path: str | os.PathLike[str],
        state_dict: STATE_DICT | None = None,
        *,
        shared: SharedSpec = None,
        shared_mode: SharedMode = "broadcast",
        src: int = 0,
        strict: bool = False,
        map_location: MapLocation = None,
        timeout: Timeout | None = None,
        verify: bool = False,
        per_rank: SharedSpec = None,
        key_map: KeyMap = None,
        cast: bool = False,
    ) -> RestoreResult:
        """Restore ``path/checkpoint_{rank}.pt`` on every rank (call on all ranks).

        ``path`` may also be a Hugging Face safetensors checkpoint (a directory of
        ``*.safetensors`` files, with or without ``model.safetensors.index.json``, or one
        ``.safetensors`` file): every rank then reads only the byte ranges of its own shards
        (see :mod:`dist_restore._planning.catalog`); ``shared``/``per_rank``/``verify`` do not apply.

        Args:
            path: The checkpoint directory (or safetensors file).
            state_dict: This rank's target (``None``: everything in its file).
            shared: Replicated entries: key-path prefixes, glob patterns, or a predicate.
            shared_mode: ``"broadcast"`` (rank ``src`` reads, the others receive),
                ``"spread"`` (reading split across ranks by bytes, then exchanged) or
                ``"local"`` (each rank reads its own copy).
            src: The reading rank in ``broadcast`` mode (and the source of shared
                non-tensor values in every mode but ``local``).
            strict: Fail on every rank if any rank misses or has unexpected keys.
            map_location: Device (or mapping) for allocated tensors.
            timeout: Per collective for this call, seconds or a ``timedelta`` (default: the
                coordinator's).
            verify: Check each rank's whole file against the commit manifest's CRC32.
            per_rank: When the checkpoint was written by another number of ranks: entries
                (prefixes, globs or a predicate, as ``shared``) that rank ``r`` takes from
                file ``r`` (missing on ranks without one). Other non-DTensor entries come
                from rank ``src``'s file, broadcast.
            key_map: Safetensors sources: target key -> file key, a dict (keys it lacks keep
                their names) or a callable; ``None`` as the file key skips the target key.
            cast: Safetensors sources: a file dtype other than the target's is cast while
                copying (``file_tensor.to(target.dtype)``, bit for bit) instead of refused.

        DTensor targets (and DTensor entries restored into whole tensors) are resharded:
        each rank reads the byte ranges of the rank files that overlap its shard, whatever
        the world size and layout that saved them (see :mod:`dist_restore._planning.reshard`).

        Before anything is read, every rank checks the checkpoint is committed: with a
        manifest, the world size and its own file's size (and checksum with ``verify``);
        without one, that every rank file exists and no temp file is left.

        Raises:
            RestoreError: on every rank, if any rank failed (names ranks, phase, messages).
        """
        seconds = None if timeout is None else to_seconds(timeout)
        default_timeout = self._pg.timeout
        if seconds is not None:
            self._pg.timeout = seconds
        try:
            with paused(), pinned_listings():  # many small objects, no cycles; one listing per store prefix
                return self._restore(path, state_dict, shared, shared_mode, src, strict, map_location, verify,
                                     per_rank, key_map, cast)
        finally:
            self._pg.timeout = default_timeout

    def _restore(self, path: Any, state_dict: STATE_DICT | None, shared: SharedSpec, shared_mode: SharedMode,
                 src: int, strict: bool, map_location: MapLocation, verify: bool,
                 per_rank: SharedSpec = None, key_map: KeyMap = None, cast: bool = False) -> RestoreResult:
        pg = self._pg
        stats = RestoreStats()
        pg.stats.collectives = pg.stats.bytes_received = pg.stats.bytes_sent = 0
        rank, world = pg.rank, pg.world_size

        # 1. plan -----------------------------------------------------------------------
        t0 = time.perf_counter()
        rp = RankPlan()
        try:
            if source_format(path) is not None:
                payload = self._plan_catalog(path, state_dict, map_location, key_map, cast, rp)
            else:
                payload = self._plan(path, state_dict, shared, shared_mode, src, verify, rp, per_rank)
        except Exception as e:  # noqa: BLE001 - every failure is reported, on every rank
            payload = {"ok": False, "error": _describe(e)}
        gathered = self._agree("plan", payload)
        report = _judge(gathered, world, src, strict)
        try:
            items, objects = self._canonical_shared(gathered, rp.mode, src, rp.shared, rp.shared_objects)
        except CollectiveError as e:
            raise RestoreError("plan", {rank: str(e)}) from e
        pg.barrier_token = gathered[0]["token"]
        stats.seconds["plan"] = time.perf_counter() - t0
        self._progress("plan", stats, f"{rp.tensors} tensors here, {len(items)} shared")

        # 2. read -----------------------------------------------------------------------
        t0 = time.perf_counter()
        by_key = {lf.key: lf for lf in rp.plan.leaves}
        received = {it.key for it in items if it.owner not in (-1, rank)}
        hosts = {p.get("host") for p in gathered}
        one_host = self._shm and len(hosts) == 1 and None not in hosts and pg.distributed
        read_stats = ReadStats()
        values: dict[Any, Any] = {}
        ios: list[BucketIO] = []
        owner_file: _shm.OwnerFile | None = None
        try:
            values = rp.read(received, map_location=map_location, verify=self._reader._verify, stats=read_stats)

            def place(lf: PlannedLeaf) -> torch.device:
                return resolve_device(lf.source.storage.location, map_location, file=rp.index.file, key=lf.key)

            ios = prepare_buckets(make_buckets(items, self._bucket_bytes), items, rank, pg.device, by_key,
                                  values, place, stage_bytes=-1 if one_host else self._bucket_bytes)
            if one_host:
                owner_file = self._pack_into_file(ios)
            status: dict[str, Any] = {"ok": True, "offer": _offer_tuple(owner_file)}
            if read_stats.pieces:  # records this rank read in part: checked with the others' pieces
                status["pieces"] = read_stats.piece_reports()
        except Exception as e:  # noqa: BLE001
            status = {"ok": False, "error": _describe(e)}
        try:  # from here on, buffers and the memory file are released however this ends
            read_status = self._agree("read", status)
            stats.bytes_read = read_stats.bytes_read
            stats.bytes_verified = read_stats.bytes_verified
            if any(p.get("pieces") for p in read_status):  # (every rank, the same verdict) records read in parts
                bad, verified = check_records([p.get("pieces") for p in read_status])
                if bad:
                    raise RestoreError("read", bad)
                stats.bytes_verified += verified[rank]
            stats.files_opened = rp.files_opened
            stats.bytes_metadata = rp.catalog.catalog.header_bytes if rp.catalog is not None else 0
            stats.seconds["read"] = time.perf_counter() - t0
            self._progress("read", stats, f"{stats.bytes_read / 2**20:.1f} MiB from {stats.files_opened} file(s)")

            # 3. exchange ---------------------------------------------------------------
            t0 = time.perf_counter()
            shm_at = _memory_file_places(read_status, ios)  # bucket index -> (offer, offset in its file)
            failed: str | None = None  # a local copy failure: collectives go on, then all agree
            unreachable: set[int] = set()  # owners whose memory file this rank could not open
            peers: dict[int, _shm.PeerFile | None] = {}
            try:
                for i, io in enumerate(ios):
                    owner = io.bucket.owner
                    if i not in shm_at:  # (owner -> all) one broadcast per bucket
                        failed = self._broadcast(io, None, not io.owner, failed)
                        io.close()
                        continue
                    if io.owner or failed is not None:
                        continue
                    offer, off = shm_at[i]
                    if owner not in peers:
                        peers[owner] = self._open_peer(offer, owner)
                    peer = peers[owner]
                    if peer is None:
                        unreachable.add(owner)
                        continue
                    try:
                        io.unpack_from(peer.region(off, io.bucket.nbytes), peer.fd, off)
                        stats.bytes_shm += io.bucket.nbytes
                    except Exception as e:  # noqa: BLE001
                        failed = _describe(e)
                    io.close()
            finally:
                for peer in peers.values():
                    if peer is not None:
                        peer.close()
            if objects is not None:
                for key, value in objects.items():
                    lf_path = rp.object_paths.get(key)
                    if lf_path is not None:
                        values[lf_path] = value
            stats.seconds["exchange"] = time.perf_counter() - t0
            self._progress("exchange", stats, f"{(pg.stats.bytes_received + stats.bytes_shm) / 2**20:.1f} "
                           f"MiB received")

            # 4. finish -----------------------------------------------------------------
            t0 = time.perf_counter()
            if ios:  # (all ranks) a failed copy anywhere fails every rank
                said = self._agree("exchange", {"ok": failed is None, "error": failed,
                                                "unreachable": sorted(unreachable)})
                again = sorted(set().union(*(p["unreachable"] for p in said)))
                if again:  # memory files some rank could not open: broadcast those buckets
                    if rank == 0:
                        logger.warning("shared entries of rank(s) %s go by broadcast: a rank could not open "
                                       "their memory files", again)
                    for i, io in enumerate(ios):
                        if i in shm_at and io.bucket.owner in again:
                            off = shm_at[i][1]
                            send = owner_file.region(off, io.bucket.nbytes) if io.owner and owner_file else None
                            failed = self._broadcast(io, send, io.bucket.owner in unreachable, failed)
                            io.close()
                    self._agree("exchange", {"ok": failed is None, "error": failed})
        finally:
            for io in ios:  # staged buffers, memory files: released now
                io.close()
            if owner_file is not None:  # every rank has agreed its copies are done (or failed)
                owner_file.close()
        result_sd = rp.result(state_dict, values)
        if ios:  # nothing exchanged (the same on every rank): the read agreement was the last step all passed
            try:
                pg.barrier()
            except CollectiveError as e:
                raise RestoreError("finish", {rank: str(e)}) from e
        stats.seconds["finish"] = time.perf_counter() - t0
        stats.collectives = pg.stats.collectives
        stats.bytes_received = pg.stats.bytes_received
        stats.bytes_sent = pg.stats.bytes_sent
        if rank == 0:
            log = logger.warning if not report.ok else logger.info
            log("%s", report.render())
            logger.info("restored %s on %d rank(s): rank 0 read %d bytes, %d collectives, %s",
                        path, world, stats.bytes_read, stats.collectives,
                        ", ".join(f"{k} {v:.3f}s" for k, v in stats.seconds.items()))
        return RestoreResult(result_sd, rp.missing, rp.unexpected, report if rank == 0 else None, stats)

    def _plan_catalog(self, path: Any, state_dict: STATE_DICT | None, map_location: MapLocation, key_map: KeyMap,
                      cast: bool, rp: RankPlan) -> dict[str, Any]:
        """The plan of a catalogue source (safetensors): this rank's shards' byte ranges. Nothing
        is shared or exchanged: a replicated target is read by each rank that holds it (from the
        page cache, on one host), with no collective per tensor."""
        rank = self._pg.rank
        plan = plan_source(path, state_dict, key_map=key_map, cast=cast, map_location=map_location, rank=rank,
                           world=self._pg.world_size)
        rp.catalog, rp.mode = plan, "local"
        note = None
        if rank == 0:
            note = (f"{plan.catalog.format} checkpoint: every rank reads the byte ranges of its own shards "
                    f"({len(plan.files)} file(s) on rank 0)")
            if plan.tied:
                note += f"; {len(plan.tied)} tied target(s) filled through the tensor they share (e.g. {plan.tied[0]!r})"
        return self._plan_payload(RankReport(rank, tuple(plan.missing), tuple(plan.unexpected), tuple(plan.mismatched),
                                             ()), 0, 0, _NO_ITEMS, note)

    # -- phases ---------------------------------------------------------------------------

    def _broadcast(self, io: BucketIO, send: torch.Tensor | None, unpack: bool, failed: str | None) -> str | None:
        """(all ranks) One bucket's broadcast from its owner, then (``unpack``) the copy into
        this rank's targets. Local failures are returned (the first one kept), so that every
        rank still issues every collective; a failed collective raises."""
        pg = self._pg
        try:
            if send is None:
                try:
                    send = io.buffer() if io.owner or unpack else torch.empty(
                        io.bucket.nbytes, dtype=torch.uint8, device=pg.device)
                except Exception as e:  # noqa: BLE001 - still send, to keep every rank in step
                    failed = failed or _describe(e)
                    send = torch.zeros(io.bucket.nbytes, dtype=torch.uint8, device=pg.device)
                    unpack = False
            pg.broadcast_(send, io.bucket.owner)
            if unpack and failed is None:
                try:
                    io.unpack()
                except Exception as e:  # noqa: BLE001
                    failed = _describe(e)
        except CollectiveError as e:
            raise RestoreError("exchange", {pg.rank: str(e)}) from e
        except Exception as e:  # noqa: BLE001 - cannot go on in step: the others time out
            raise RestoreError("exchange", {pg.rank: _describe(e)}) from e
        return failed

    def _pack_into_file(self, ios: list[BucketIO]) -> _shm.OwnerFile | None:
        """(owners, one host) This rank's buckets, packed into a memory file the other ranks
        can open; ``None`` (they go by broadcast) if there are none, too many bytes, or no
        memory file can be made here. A bucket sent in place (``direct``: one large tensor,
        or a flat buffer) is left to the broadcast, which needs no copy of it here."""
        mine = [(i, io) for i, io in enumerate(ios) if io.owner and io.mode != "direct"]
        offsets, total = _shm.layout([io.bucket.nbytes for _i, io in mine])
        if not mine or total > self._shm_bytes:
            return None
        try:
            file = _shm.OwnerFile(total, tuple(i for i, _io in mine))
        except OSError as e:
            logger.warning("rank %d: no memory file for %d bytes of shared entries (%s): they go by broadcast",
                           self._pg.rank, total, e)
            return None
        try:
            for (_i, io), off in zip(mine, offsets):
                io.pack_into(file.mem, off)
                io.close()  # a packed copy (copy mode) is not needed twice
        except BaseException:
            file.close()
            raise
        return file

    def _open_peer(self, offer: _shm.Offer, owner: int) -> _shm.PeerFile | None:
        try:
            return _shm.PeerFile(offer)
        except Exception as e:  # noqa: BLE001 - whatever it is, the bytes can still come by broadcast
            logger.warning("rank %d: cannot open the memory file of rank %d (%s): its shared entries will "
                           "come by broadcast", self._pg.rank, owner, e)
            return None

    def _progress(self, phase: str, stats: RestoreStats, what: str) -> None:
        if self._pg.rank == 0:  # progress on rank 0 only; the launch script shows INFO there
            logger.info("%s done in %.3fs: %s", phase, stats.seconds[phase], what)

    def _plan(self, path: Any, state_dict: STATE_DICT | None, shared: SharedSpec, mode: str, src: int,
              verify: bool, rp: RankPlan, per_rank: SharedSpec = None) -> dict[str, Any]:
        pg = self._pg
        if mode not in _MODES:
            raise ValueError(f"shared_mode must be one of {_MODES}, got {mode!r}")
        if not 0 <= src < pg.world_size:
            raise ValueError(f"src must be a rank in [0, {pg.world_size}), got {src}")
        select = make_selector(shared)
        rank, world = pg.rank, pg.world_size
        if not Path(path).is_dir():
            raise FileNotFoundError(f"checkpoint directory not found: {str(path)!r}")
        nfiles = rank_file_count(path)
        same = nfiles == world
        # home: the file this rank plans against (plain entries, the saved layout)
        home, own = (rank if same else src), (rank if rank < nfiles else None)
        if same:
            self._reader.check_committed(path, verify=verify, world_size=world)
        elif nfiles <= src:
            raise FileNotFoundError(f"checkpoint at {str(path)!r} has {nfiles} rank file(s); src={src} has none")
        whole = same and state_dict is None and (shared is None or mode == "local")
        index = self._open(path, home, verify, checked=same, tables=whole)
        if whole and readable(index):  # everything in its own file, nothing shared: no plan per entry
            return self._plan_whole(index, rp, mode)
        plain_note = ""
        if not same and read_manifest(path) is None:
            if not _check_saved_world(index, nfiles, world, target_given=state_dict is not None):
                plain_note = (" (no commit manifest: the files hold no DTensor, so each holds every tensor whole "
                              "and one is enough)")
        plan = plan_read(state_dict, *index.walkable)
        bad = first_out_of_bounds(plan.leaves)
        if bad:
            raise CorruptCheckpointError(bad[1], file=index.file, rank=home, key=bad[0].key)
        dtensor_keys = {lf.key for lf in plan.leaves if isinstance(lf.source, DTensorRef)}
        if not same:
            for lf in plan.leaves:
                if lf.key in dtensor_keys and not is_dtensor(lf.target) and (
                        lf.target is None or tuple(lf.target.shape) != tuple(lf.source.size)):
                    raise RuntimeError(
                        f"{index.file}: key {lf.key!r} is a DTensor saved by {nfiles} ranks; restoring it on "
                        f"{world} needs a target to reshard into: a DTensor, or a tensor of its global shape "
                        f"{tuple(lf.source.size)}")
        plain, reshard = split_leaves(plan.leaves)
        files_opened = {home}
        shards = None
        if reshard:
            try:
                shards = plan_shards(reshard, home=home, home_index=index, own=own, nfiles=nfiles,
                                     open_index=lambda f: self._open(path, f, verify, checked=False), spread=rank)
            except LayoutError as e:  # as CheckpointReader.plan_shards: the home file named
                raise StateDictMismatchError(str(e), file=index.file, rank=rank) from None
            files_opened |= set(shards.indexes)
        own_index, own_leaves, overrides, missing = None, [], {}, list(plan.missing)
        objects = list(plan.objects)
        if not same and per_rank is not None:
            pick = make_selector(per_rank)
            mine = self._per_rank(path, verify, state_dict, [lf for lf in plain if pick(lf.key)],
                                  [o for o in objects if pick(o[0])], home, own, index)
            own_index, own_leaves, overrides, lost = mine
            missing += lost
            plain = [lf for lf in plain if not pick(lf.key)]
            objects = [o for o in objects if not pick(o[0])]
            if own_index is not None:
                files_opened.add(own)
        eff_mode = mode if same else "broadcast"
        # in broadcast mode src owns every shared item: built so here, they are the canonical
        # list as they are whenever every rank's digest agrees (_canonical_shared)
        owner = src if eff_mode == "broadcast" else -1
        shared_items: list[SharedItem] = []
        digest = _NO_ITEMS
        shared_objects: dict[str, Any] = {}
        unmatched: list[str] = []
        if same and mode != "local" and shared is not None:
            picked = [lf for lf in plain if select(lf.key)]
            chosen = [lf.key for lf in picked]  # every selected key, to name the patterns that select nothing
            if index.native_order:
                shared_items, digest = shared_items_of(picked, owner, dtensor_keys)
            for key, _p, value in objects:
                if select(key):
                    chosen.append(key)
                    shared_objects[key] = value
            unmatched = unmatched_patterns(shared, chosen)
        elif not same and world > 1:  # every rank planned against src's file: src reads, all receive
            if index.native_order:
                shared_items, digest = shared_items_of(plain, owner)
        rp.index = index
        rp.plan = dataclasses.replace(plan, leaves=tuple(plain), missing=tuple(missing))
        rp.object_paths = {key: p for key, p, _v in objects}
        rp.shared = shared_items
        rp.shared_objects = shared_objects
        rp.mode = eff_mode
        rp.shards = shards
        rp.own = (own_index, own_leaves)
        rp.overrides = overrides
        rp.files_opened = len(files_opened)
        note = None
        if not same and rank == src:
            note = (f"resharded: checkpoint written by {nfiles} rank(s), restored on {world}; "
                    f"{len(plain)} non-DTensor tensor(s) and {len(objects)} other value(s) taken from rank {src}'s "
                    "file" + (" and broadcast" if world > 1 else "") + plain_note)
            if per_rank is not None:
                note += "; per-rank entries from each rank's own file"
        # a digest of the shared list: src's list itself travels only if some rank's differs, and
        # src's shared values only if it has any (_canonical_shared)
        return self._plan_payload(RankReport(pg.rank, tuple(missing), tuple(plan.unexpected), tuple(plan.mismatched),
                                             tuple(unmatched)),
                                  len(shared_items) + len(shared_objects), len(shared_objects), digest, note)

    def _plan_whole(self, index: Any, rp: RankPlan, mode: str) -> dict[str, Any]:
        """The plan of a rank that reads its whole own file and shares nothing
        (``state_dict=None``): the read phase's :func:`read_all` makes the result from the
        index's tables, without a planned leaf, reference or path per entry."""
        rp.index, rp.mode, rp.files_opened, rp.whole = index, mode, 1, True
        return self._plan_payload(RankReport(self._pg.rank, (), (), (), ()), 0, 0, _NO_ITEMS, None)

    def _plan_payload(self, report: RankReport, n_shared: int, n_objects: int, digest: Any,
                      note: str | None) -> dict[str, Any]:
        """What a rank tells the others after planning (gathered by :meth:`_agree`)."""
        return {"ok": True, "report": report, "n_shared": n_shared, "n_objects": n_objects, "digest": digest,
                "token": uuid.uuid4().hex if self._pg.rank == 0 else None,
                "host": _shm.host_id() if self._shm else None, "note": note}

    def _per_rank(self, path: Any, verify: bool, state_dict: STATE_DICT | None, leaves: list[PlannedLeaf],
                  objects: list[tuple[str, Any, Any]], home: int, own: int | None, index: Any
                  ) -> tuple[Any, list[PlannedLeaf], dict[Any, Any], list[str]]:
        """Per-rank entries when the world size changed: from this rank's own file, if it has
        one; else missing, their targets kept. Returns ``(own index or None, leaves to read
        from it, values replacing the home file's, keys missing)``."""
        wanted = {lf.key: lf.path for lf in leaves} | {k: p for k, p, _v in objects}
        if not wanted:
            return None, [], {}, []
        if own is None:
            return None, [], {lf.path: lf.target for lf in leaves} | {p: None for _k, p, _v in objects}, \
                sorted(wanted)
        own_index = index if own == home else self._open(path, own, verify, checked=False)
        own_plan = plan_read(state_dict, *own_index.walkable)
        got = [lf for lf in own_plan.leaves if lf.key in wanted]
        overrides = {p: v for k, p, v in own_plan.objects if k in wanted}
        found = {lf.key for lf in got} | {k for k, _p, _v in own_plan.objects}
        lost = sorted(k for k in wanted if k not in found)
        overrides |= {wanted[k]: None for k in lost}
        return own_index, got, overrides, lost

    def _open(self, path: Any, file_rank: int, verify: bool, *, checked: bool, tables: bool = False) -> Any:
        """Index rank file ``file_rank`` (checked against the manifest first, unless done);
        ``tables``: in columns, for :func:`read_all`, where the file allows."""
        if not checked:
            check_checkpoint(path, world_size=None, ranks=[file_rank], verify=verify)
        return self._reader._index(Path(path) / rank_file_name(file_rank), tables=tables)

    def _agree(self, phase: str, payload: dict[str, Any]) -> list[dict[str, Any]]:
        """(all ranks) Exchange status; raise the same RestoreError everywhere on any failure."""
        try:
            gathered = self._pg.all_gather_object(payload)
        except CollectiveError as e:
            mine = payload.get("error")
            failures = {self._pg.rank: f"{mine}; then {e}" if mine else str(e)}
            raise RestoreError(phase, failures) from e
        failures = {r: p["error"] for r, p in enumerate(gathered) if not p["ok"]}
        if failures:
            raise RestoreError(phase, failures)
        return gathered

    def _canonical_shared(self, gathered: list[dict[str, Any]], mode: str, src: int, mine: list[SharedItem],
                          my_objects: dict[str, Any]) -> tuple[list[SharedItem], dict[str, Any] | None]:
        """The shared list every rank follows: src's, checked against every rank's.

        (all ranks) When every digest agrees, every rank's list is src's: no list travels,
        only src's shared non-tensor values (one broadcast, if it has any). Otherwise src's
        list follows (one broadcast: it never rides in the padded all-gather), then every
        rank's full list (one all-gather) to compare them.
        """
        if mode == "local":
            return [], None
        pg = self._pg
        if pg.world_size == 1:
            return [], my_objects
        if len({p["digest"] for p in gathered}) == 1:  # the common case: one list everywhere
            objects = pg.broadcast_object(my_objects if pg.rank == src else None, src) \
                if gathered[src]["n_objects"] else {}
            if mode == "broadcast":  # mine were built owned by src (_plan)
                return mine, objects
            return assign_owners(mine, mode, pg.world_size, src), objects  # type: ignore[arg-type]
        if not gathered[src]["n_shared"]:
            src_list, objects = [], {}
        else:  # (src -> all) one broadcast: its list never rides in the padded all-gather
            mine_t = ([i[:4] for i in mine], my_objects) if pg.rank == src else None
            src_list, objects = pg.broadcast_object(mine_t, src)
        canon = [SharedItem(*t) for t in src_list]
        # (all ranks, since all see the digests differ) gather the full lists to compare them
        try:
            lists = self._pg.all_gather_object(mine)
        except CollectiveError as e:
            raise RestoreError("plan", {self._pg.rank: str(e)}) from e
        meta = [{i.key: (i.dtype, i.shape) for i in lst} for lst in lists]
        failures = {}
        for r, m in enumerate(meta):
            for key, dt_shape in m.items():
                other = meta[src].get(key)
                if other is not None and other != dt_shape:
                    failures[r] = (f"shared entry {key!r} is {dt_shape[0]} {tuple(dt_shape[1])} here, "
                                   f"{other[0]} {tuple(other[1])} on rank {src}")
                    break
        if failures:
            raise RestoreError("plan", failures,
                               detail="a shared entry must have one dtype and shape on every rank")
        if mode == "spread":  # every owner must hold a replica: entries all ranks have
            canon = [i for i in canon if all(i.key in m for m in meta)]
        items = assign_owners(canon, mode, self._pg.world_size, src)  # type: ignore[arg-type]
        return items, objects


def _judge(gathered: list[dict[str, Any]], world: int, src: int, strict: bool) -> RestoreReport:
    """The aggregated report of the plan agreement; the same :class:`RestoreError` on every rank
    for mismatched targets anywhere, or (``strict``) missing/unexpected keys anywhere."""
    report = RestoreReport.aggregate([p["report"] for p in gathered], world)
    if gathered[src].get("note"):
        report = dataclasses.replace(report, notes=(gathered[src]["note"],))
    if strict and (report.missing_keys or report.unexpected_keys or report.unmatched_shared):
        failures = {r: _strict_line(p["report"], report.unmatched_shared) for r, p in enumerate(gathered)
                    if p["report"].missing or p["report"].unexpected or report.unmatched_shared}
        raise RestoreError("strict", failures, detail=report.render())
    if report.mismatched_keys:
        raise RestoreError("plan", {r: "; ".join(f"{k}: {m}" for k, m in p["report"].mismatched)
                                    for r, p in enumerate(gathered) if p["report"].mismatched},
                           detail=report.render())
    return report


def _check_saved_world(index: Any, nfiles: int, world: int, *, target_given: bool = False) -> bool:
    """Without a manifest, a world-size change is believed where the files say how many ranks
    saved them: the DeviceMesh of a DTensor entry records its root's ranks (a lost last rank
    file must not look like a smaller world). Files with no DTensor entry (DDP-style: every
    tensor whole in every file) restore into a given target from one file whatever their
    number: a lost file changes no value there, and a per-rank entry it held is reported
    missing. Only a restore of everything (no target) is refused: per-rank data would come
    from one rank's file silently. Returns whether the files' meshes were checked."""
    sizes = {layout.mesh.root_size for layout in index.dtensor_layouts()} - {None}
    if not sizes and target_given:
        return False
    if not sizes:
        why = ("with no manifest and no DTensor entry (whose mesh records the ranks that saved it), a lost rank "
               "file cannot be told from a checkpoint of fewer ranks; pass a target (every entry then comes from "
               "one rank's file), or write checkpoints with CheckpointWriter, to restore them on another world "
               "size")
        if nfiles < world:
            missing = f"rank {nfiles} has no file" if world - nfiles == 1 else \
                f"ranks {format_ranks(range(nfiles, world))} have no file"
            raise IncompleteCheckpointError(f"incomplete checkpoint: no commit manifest; {missing} ({why})",
                                            file=index.file.parent)
        raise IncompleteCheckpointError(
            f"world size mismatch: checkpoint has {nfiles} rank file(s) and no commit manifest, this job has "
            f"{world}; {why}", file=index.file.parent)
    if max(sizes) != nfiles:
        raise IncompleteCheckpointError(
            f"the saved DeviceMesh spans {max(sizes)} ranks, but the checkpoint has {nfiles} rank file(s) and no "
            "commit manifest: rank files are missing", file=index.file.parent)
    return True


def _offer_tuple(file: _shm.OwnerFile | None) -> tuple[Any, ...] | None:
    """The offer as a plain tuple (no class to resolve when unpickled), or ``None``."""
    if file is None:
        return None
    o = file.offer
    return (o.pid, o.fd, o.nbytes, o.token, o.buckets)


def _memory_file_places(read_status: list[dict[str, Any]], ios: list[BucketIO]) -> dict[int, tuple[Any, int]]:
    """Bucket index -> (its owner's offer, the bucket's offset in the owner's file), for the
    buckets packed into memory files (the same on every rank: from the read agreement)."""
    places: dict[int, tuple[Any, int]] = {}
    for p in read_status:
        if p.get("offer"):
            offer = _shm.Offer(*p["offer"])
            offsets, _total = _shm.layout([ios[i].bucket.nbytes for i in offer.buckets])
            for i, off in zip(offer.buckets, offsets):
                places[i] = (offer, off)
    return places


_NO_ITEMS = shared_items_of([])[1]  # the digest of an empty shared list


def _describe(e: BaseException) -> str:
    """A plain, picklable one-paragraph description of an exception, with its origin."""
    tb = traceback.extract_tb(e.__traceback__)
    where = f" [at {os.path.basename(tb[-1].filename)}:{tb[-1].lineno}]" if tb else ""
    return f"{type(e).__name__}: {e}{where}"


def _strict_line(r: RankReport, unmatched_shared: tuple[str, ...] = ()) -> str:
    parts = []
    if r.missing:
        parts.append(f"{len(r.missing)} missing (e.g. {r.missing[0]!r})")
    if r.unexpected:
        parts.append(f"{len(r.unexpected)} unexpected (e.g. {r.unexpected[0]!r})")
    if unmatched_shared:
        parts.append(f"shared pattern(s) {', '.join(map(repr, unmatched_shared))} select nothing on any rank")
    return "strict: " + ", ".join(parts)


