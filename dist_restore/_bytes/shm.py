"""Shared entries between ranks on one host through the owner's memory file, not broadcasts.

When every rank of the group runs on one host (``torchrun --nproc_per_node=N`` on one
node), moving a bucket through gloo costs a TCP round trip over loopback per receiver:
the owner's bytes are copied into socket buffers and out again on every rank. Instead,
the owner packs its buckets into one anonymous memory file (``memfd``) during the
read phase (those it would pack for a broadcast anyway: a bucket its targets can send in
place, such as one large tensor, is broadcast as before) and publishes an :class:`Offer` (pid, descriptor number, size, a random
token) in the read agreement. Each receiver opens the same file through
``/proc/<pid>/fd/<n>``, checks its size and the token that ends it, and copies its
entries straight out of it: one copy, no collective. The owner keeps the file open until
every rank has agreed that its copies are done.

A receiver that cannot open the file (another user, another PID namespace, ``/proc``
hidden) says so in that agreement, and every rank then moves the affected buckets by
broadcast after all (see ``coordinator.py``).
"""

from __future__ import annotations

import fcntl
import functools
import logging
import mmap
import os
import socket
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from dist_restore._bytes import iovec as _iovec

logger = logging.getLogger(__name__)

TOKEN_BYTES = 16
#: Buckets start at multiples of this in the file, so that typed views of them are aligned.
ALIGN = 64


def layout(sizes: list[int]) -> tuple[list[int], int]:
    """Offsets of buckets of ``sizes`` bytes in a memory file, each :data:`ALIGN`-aligned,
    and the bytes they span."""
    offsets, end = [], 0
    for n in sizes:
        start = -(-end // ALIGN) * ALIGN
        offsets.append(start)
        end = start + n
    return offsets, end


@functools.lru_cache(maxsize=1)
def host_id() -> str | None:
    """This process's host and PID namespace, or ``None`` where memory files cannot be
    shared (not Linux). Ranks with equal ids can open each other's ``/proc/<pid>/fd``."""
    if not _iovec.available():
        return None
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        ns = os.stat("/proc/self/ns/pid")
    except OSError:
        return None
    return f"{socket.gethostname()}/{boot}/pidns:{ns.st_dev}:{ns.st_ino}"


@dataclass(frozen=True)
class Offer:
    """Where a rank's packed buckets can be opened by ranks on its host.

    Attributes:
        pid: The owner's process id.
        fd: The memory file's descriptor number in the owner.
        nbytes: Bytes of buckets (the file holds ``nbytes`` + :data:`TOKEN_BYTES`).
        token: The random bytes at the end of the file, as hex.
        buckets: Indices (in the bucket list every rank shares) of the buckets in the file,
            back to back in this order.
    """

    pid: int
    fd: int
    nbytes: int
    token: str
    buckets: tuple[int, ...]


def _region(tensor: torch.Tensor, size: int, offset: int, nbytes: int) -> torch.Tensor:
    if offset < 0 or offset + nbytes > size:
        raise ValueError(f"{nbytes} bytes at {offset} do not fit the {size}-byte file")
    return tensor[offset : offset + nbytes]


class OwnerFile:
    """(owner) The memory file its buckets are packed into (at the offsets of :func:`layout`).

    Args:
        nbytes: Bytes of the buckets packed into it (> 0).
        buckets: Their indices in the shared bucket list, in file order.
    """

    def __init__(self, nbytes: int, buckets: tuple[int, ...]) -> None:
        self.nbytes = nbytes
        self.mem = _iovec.MemBuffer(nbytes + TOKEN_BYTES, populate=True, seal=True)
        token = os.urandom(TOKEN_BYTES)
        self.mem.tensor[nbytes:].copy_(torch.frombuffer(bytearray(token), dtype=torch.uint8))
        self.offer = Offer(os.getpid(), self.mem._fd, nbytes, token.hex(), tuple(buckets))

    def region(self, offset: int, nbytes: int) -> torch.Tensor:
        """The ``uint8`` bytes ``[offset, offset + nbytes)`` of the file."""
        return _region(self.mem.tensor, self.nbytes, offset, nbytes)

    def close(self) -> None:
        self.mem.close()


class PeerFile:
    """(receiver) Another rank's :class:`OwnerFile`, opened and mapped here read-only (its
    pages mapped in bulk); :attr:`tensor` must only be read.

    Raises:
        OSError: The file cannot be opened, or is not the one offered (size, token).
    """

    def __init__(self, offer: Offer) -> None:
        path = f"/proc/{offer.pid}/fd/{offer.fd}"
        self.fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            size = os.fstat(self.fd).st_size
            if size != offer.nbytes + TOKEN_BYTES:
                raise OSError(f"{path}: {size} bytes, expected {offer.nbytes + TOKEN_BYTES}: not the offered file")
            if not fcntl.fcntl(self.fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK:  # else a SIGBUS could follow
                raise OSError(f"{path}: not sealed against shrinking: not the offered file")
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
            self._mm = mmap.mmap(self.fd, size, flags=flags, prot=mmap.PROT_READ)
            if self._mm[offer.nbytes :].hex() != offer.token:
                raise OSError(f"{path}: the token does not match: not the offered file")
        except BaseException:
            os.close(self.fd)
            raise
        self.nbytes = offer.nbytes
        with warnings.catch_warnings():  # read-only on purpose: only ever copied from
            warnings.simplefilter("ignore", UserWarning)
            self.tensor = torch.from_numpy(np.frombuffer(self._mm, dtype=np.uint8, count=offer.nbytes))

    def region(self, offset: int, nbytes: int) -> torch.Tensor:
        """The ``uint8`` bytes ``[offset, offset + nbytes)`` of the owner's file."""
        return _region(self.tensor, self.nbytes, offset, nbytes)

    def close(self) -> None:
        """Close the descriptor; the mapping goes with the last tensor over it."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.tensor = None  # type: ignore[assignment]
        self._mm = None  # type: ignore[assignment]
