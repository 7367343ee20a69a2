"""A thin wrapper over a torch.distributed process group, with a timeout on every call.

Degrades to a single process (rank 0 of 1, every collective a no-op) when no process
group is initialised, so the coordinator's logic runs and is tested without processes.
Every collective is issued with ``async_op=True`` and waited on with the wrapper's
timeout: a dead or stuck peer turns into an exception, never a hang.
"""

from __future__ import annotations

import logging
import pickle
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist

from dist_restore._timeout import Timeout, to_seconds

#: Payload bytes that travel in an all-gather's first (and usually only) collective; a rank
#: sends this much whatever its payload (1,024 ranks: 1 MiB received per all-gather).
SLOT = 1024

logger = logging.getLogger(__name__)

BarrierKind = Literal["process_group", "store", "none"]


class CollectiveError(RuntimeError):
    """A collective failed or timed out (a peer died, hung, or the group is broken)."""


@dataclass
class CollectiveStats:
    """Counters of the collectives one wrapper issued."""

    collectives: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0


class ProcessGroupWrapper:
    """Collectives for the coordinator, on ``group`` (default group) or a single process.

    Args:
        group: The process group; ``None`` means the default group when one is
            initialised, else a single process.
        timeout: How long any one collective (or store barrier) may take: seconds or a
            ``datetime.timedelta``.
        barrier: ``"process_group"`` (``dist.barrier`` style, via a tiny all_reduce),
            ``"store"`` (a counter in the group's TCPStore, like torch's experimental
            ``TCPStoreBarrier``), or ``"none"``.
        store: The store for ``barrier="store"``; default: the default group's store.
    """

    def __init__(self, group: Any = None, *, timeout: Timeout = 300.0, barrier: BarrierKind = "process_group",
                 store: Any = None) -> None:
        #: Seconds; assign seconds only (the coordinator's per-call override checks its own).
        self.timeout = to_seconds(timeout)
        self.stats = CollectiveStats()
        self._barrier_kind = barrier
        self._barrier_gen = 0
        #: Namespace of store-barrier keys; set to a token all ranks agreed on per restore.
        self.barrier_token = "default"
        if dist.is_available() and dist.is_initialized():
            self.group = group if group is not None else dist.group.WORLD
            self.rank = dist.get_rank(self.group)
            self.world_size = dist.get_world_size(self.group)
            backend = str(dist.get_backend(self.group)).lower()
            self.device = (torch.device("cuda", torch.cuda.current_device())
                           if "nccl" in backend else torch.device("cpu"))
        else:
            if group is not None:
                raise ValueError("a process group was given but torch.distributed is not initialised")
            self.group = None
            self.rank, self.world_size, self.device = 0, 1, torch.device("cpu")
        self._store = store
        if barrier == "store" and store is None and self.group is not None:
            self._store = dist.distributed_c10d._get_default_store()

    @property
    def distributed(self) -> bool:
        return self.group is not None and self.world_size > 1

    def _wait(self, work: Any, what: str) -> None:
        try:
            ok = work.wait(timeout=timedelta(seconds=self.timeout))
        except Exception as e:  # noqa: BLE001 - gloo/NCCL raise RuntimeError & co.
            raise CollectiveError(
                f"{what} failed on rank {self.rank}: {type(e).__name__}: {e} "
                "(a peer rank may have died, hung, or hit an error outside the restore)") from e
        if ok is False:
            raise CollectiveError(f"{what} timed out after {self.timeout:.0f}s on rank {self.rank}")

    def all_gather_bytes(self, payload: bytes) -> list[bytes]:
        """Every rank's ``payload``, in rank order.

        One collective when every payload fits :data:`SLOT` bytes (a status, a digest, a
        report: the protocol's usual messages): each rank sends its length and payload in a
        fixed slot. When some payload is larger, every rank sees that in the gathered lengths
        and all take a second collective, of the largest payload's width."""
        if not self.distributed:
            return [payload]
        n = len(payload)
        slot = torch.zeros(8 + SLOT, dtype=torch.uint8)
        slot[:8] = torch.from_numpy(np.array([n], dtype="<i8").view(np.uint8))
        if 0 < n <= SLOT:
            slot[8:8 + n] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        slot = slot.to(self.device)
        outs = [torch.empty(8 + SLOT, dtype=torch.uint8, device=self.device) for _ in range(self.world_size)]
        self._wait(dist.all_gather(outs, slot, group=self.group, async_op=True), "all_gather(payload)")
        self.stats.collectives += 1
        got = torch.stack(outs).cpu().numpy()
        lens = got[:, :8].copy().view("<i8").ravel().tolist()
        in_slot = [8 + (x if x <= SLOT else 0) for x in lens]  # the bytes that carried something
        self.stats.bytes_sent += in_slot[self.rank]
        self.stats.bytes_received += sum(in_slot) - in_slot[self.rank]
        width = max(lens)
        if width <= SLOT:
            return [got[r, 8:8 + lens[r]].tobytes() for r in range(self.world_size)]
        buf = torch.zeros(width, dtype=torch.uint8)  # some payload is larger: all send theirs whole
        if payload:
            buf[:n] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        buf = buf.to(self.device)
        outs = [torch.empty(width, dtype=torch.uint8, device=self.device) for _ in range(self.world_size)]
        self._wait(dist.all_gather(outs, buf, group=self.group, async_op=True), "all_gather(large payload)")
        self.stats.collectives += 1
        self.stats.bytes_sent += n
        self.stats.bytes_received += sum(lens) - n
        return [outs[r][: lens[r]].cpu().numpy().tobytes() for r in range(self.world_size)]

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's picklable ``obj``, in rank order."""
        return [pickle.loads(b) for b in self.all_gather_bytes(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))]

    def broadcast_object(self, obj: Any, src: int) -> Any:
        """``obj`` of group rank ``src`` on every rank (two broadcasts: size, then bytes). Unlike
        a gather, the others' padding does not grow with the world size."""
        if not self.distributed:
            return obj
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL) if self.rank == src else b""
        n = torch.tensor([len(data)], dtype=torch.int64, device=self.device)
        self.broadcast_(n, src)
        buf = torch.empty(int(n.item()), dtype=torch.uint8)
        if self.rank == src:
            buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        buf = buf.to(self.device)
        self.broadcast_(buf, src)
        return obj if self.rank == src else pickle.loads(buf.cpu().numpy().tobytes())

    def broadcast_(self, tensor: torch.Tensor, src: int) -> None:
        """Broadcast ``tensor`` (contiguous, on :attr:`device`) in place from group rank ``src``."""
        if not self.distributed:
            return
        nbytes = tensor.numel() * tensor.element_size()
        work = dist.broadcast(tensor, group=self.group, group_src=src, async_op=True)
        self._wait(work, f"broadcast(from rank {src}, {nbytes} bytes)")
        self.stats.collectives += 1
        if self.rank == src:
            self.stats.bytes_sent += nbytes
        else:
            self.stats.bytes_received += nbytes

    def barrier(self) -> None:
        """Wait for every rank, as chosen at construction (or not at all)."""
        if not self.distributed or self._barrier_kind == "none":
            return
        if self._barrier_kind == "store":
            self._store_barrier()
            return
        flag = torch.ones(1, dtype=torch.int32, device=self.device)
        self._wait(dist.all_reduce(flag, group=self.group, async_op=True), "barrier")
        self.stats.collectives += 1

    def _store_barrier(self) -> None:
        self._barrier_gen += 1
        prefix = f"dist_restore/barrier/{self.barrier_token}/{self._barrier_gen}"
        arrived = self._store.add(f"{prefix}/count", 1)
        if arrived == self.world_size:
            self._store.set(f"{prefix}/done", b"1")
        t0 = time.monotonic()
        try:
            self._store.wait([f"{prefix}/done"], timedelta(seconds=self.timeout))
        except Exception as e:  # noqa: BLE001
            raise CollectiveError(
                f"store barrier {self._barrier_gen} timed out after {time.monotonic() - t0:.0f}s on "
                f"rank {self.rank}: {e}") from e
