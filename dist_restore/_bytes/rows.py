"""Copies between one flat byte buffer and many small tensors, one numpy call per size.

A bucket of shared entries is one flat buffer; on a receiver its items go to separately
allocated tensors (a model's parameters), and on the owner they come from them. One
``copy_`` per tensor costs about 1 us in the torch dispatcher, a ``preadv`` iovec about
0.1 us in the kernel; both are several times the copy of a few hundred bytes itself.

Here the items are grouped by size. For each size ``n`` a numpy array of ``void`` items
of ``n`` bytes *with a stride of one byte* is laid over the address range of that group's
tensors: its element ``i`` is the ``n`` bytes at address ``low + i``. Then one fancy-index
assignment, ``window[addresses - low] = buffer_rows``, copies every item of the group in
a compiled loop (~0.02 us per item plus the memory traffic). The window is never read or
written except at those indices, which come from the tensors' own ``data_ptr()``; every
tensor must be dense, on the CPU, and alive while the plan is used (the caller keeps
references).

Items larger than :data:`ROW_MAX` bytes, and sizes that occur once, are copied one by one
with ``ctypes.memmove``. :attr:`RowPlan.singles` counts them; a caller with thousands of
them is better served by vectored file I/O (:mod:`dist_restore._bytes.iovec`).
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: Largest item (bytes) copied as a row: a window's ``len * itemsize`` stays below 2**62
#: for any address range of a 47-bit user address space.
ROW_MAX = 16 << 10
#: No window spans a wider address range (same reason).
_SPAN_MAX = 1 << 47


class _Window:
    """``__array_interface__`` of ``count`` overlapping ``nbytes``-byte items from ``low``."""

    def __init__(self, low: int, count: int, nbytes: int) -> None:
        self.__array_interface__ = {"data": (low, False), "shape": (count,), "strides": (1,),
                                    "typestr": f"|V{nbytes}", "version": 3}


@dataclass(frozen=True)
class _Group:
    """Items of one size whose addresses lie in one window."""

    nbytes: int
    window: np.ndarray  # |V{nbytes}, stride 1, over [low, high + nbytes)
    index: np.ndarray  # int64: address - low, per item
    offsets: np.ndarray  # int64: byte offset in the flat buffer, per item
    step: int | None  # offsets are offsets[0] + step * i (None: not evenly spaced)


class RowPlan:
    """How to move bytes between a flat buffer and a list of dense CPU tensors.

    Args:
        addresses: ``data_ptr()`` of each item's tensor, or ``-1`` for an item whose
            bytes go nowhere (scatter only).
        sizes: Bytes of each item (> 0).
        offsets: Byte offset of each item in the flat buffer.
    """

    def __init__(self, addresses: Sequence[int] | np.ndarray, sizes: Sequence[int] | np.ndarray,
                 offsets: Sequence[int] | np.ndarray) -> None:
        addr = np.asarray(addresses, dtype=np.int64)
        size = np.asarray(sizes, dtype=np.int64)
        off = np.asarray(offsets, dtype=np.int64)
        if not addr.shape == size.shape == off.shape or addr.ndim != 1:
            raise ValueError("addresses, sizes and offsets must be 1-D and of one length")
        if (addr < 0).any():  # items whose bytes go nowhere
            keep = addr >= 0
            addr, size, off = addr[keep], size[keep], off[keep]
        if len(size) and int(size.min()) <= 0:
            raise ValueError("every item must have at least one byte")
        self.nbytes = int((off + size).max()) if len(off) else 0  # the buffer must hold this much
        self._groups: list[_Group] = []
        self._singles: list[tuple[int, int, int]] = []  # (address, offset, nbytes)
        order = np.argsort(size, kind="stable")  # stable: bucket order within a size
        sizes_sorted = size[order]
        values, starts, counts = np.unique(sizes_sorted, return_index=True, return_counts=True)
        for n, start, count in zip(values.tolist(), starts.tolist(), counts.tolist()):
            sel = order[start : start + count]
            if n > ROW_MAX or count < 2:
                self._singles.extend(zip(addr[sel].tolist(), off[sel].tolist(), [n] * count))
                continue
            self._add_groups(n, addr[sel], off[sel])

    @property
    def singles(self) -> int:
        """Items copied one call each (large, or the only one of their size)."""
        return len(self._singles)

    @property
    def odd(self) -> int:
        """Items of at most :data:`ROW_MAX` bytes copied one call each (the only one of
        their size): each costs ~0.5 us, where vectored file I/O takes ~0.1 us."""
        return sum(1 for _a, _o, n in self._singles if n <= ROW_MAX)

    @property
    def groups(self) -> int:
        """Compiled row copies per scatter or gather."""
        return len(self._groups)

    def _add_groups(self, n: int, addr: np.ndarray, off: np.ndarray) -> None:
        by_addr = np.argsort(addr, kind="stable")
        cuts: list[int] = []
        if int(addr[by_addr[-1]]) - int(addr[by_addr[0]]) > _SPAN_MAX:  # split: no window spans more
            a = addr[by_addr].tolist()
            start = a[0]
            for j, x in enumerate(a):
                if x - start > _SPAN_MAX:
                    cuts.append(j)
                    start = x
        for part in np.split(by_addr, cuts):
            part = np.sort(part)  # back in buffer order
            pa, po = addr[part], off[part]
            low = int(pa.min())
            window = np.asarray(_Window(low, int(pa.max()) - low + 1, n))
            d = np.diff(po)
            step: int | None = n if not len(d) else int(d[0])
            if len(d) and (step < n or not (d == step).all()):
                step = None
            self._groups.append(_Group(n, window, pa - low, po, step))

    def _rows(self, g: _Group, buf: np.ndarray) -> np.ndarray:
        """The buffer's bytes of ``g``'s items as ``V{n}`` rows: a view, or a gathered copy."""
        if g.step is not None:
            return np.ndarray((len(g.offsets),), dtype=g.window.dtype, buffer=buf, offset=int(g.offsets[0]),
                              strides=(g.step,))
        return self._every(g, buf)[g.offsets]

    @staticmethod
    def _every(g: _Group, buf: np.ndarray) -> np.ndarray:
        """``V{n}`` items at every byte offset of ``buf`` (indexed by buffer offset)."""
        return np.ndarray((len(buf) - g.nbytes + 1,), dtype=g.window.dtype, buffer=buf, strides=(1,))

    def _check(self, buf: np.ndarray) -> None:
        if buf.dtype != np.uint8 or buf.ndim != 1 or not buf.flags.c_contiguous:
            raise ValueError("the flat buffer must be a contiguous 1-D uint8 array")
        if len(buf) < self.nbytes:
            raise ValueError(f"the flat buffer holds {len(buf)} bytes, the items need {self.nbytes}")

    def scatter(self, buf: np.ndarray) -> None:
        """Copy each item's bytes from the flat buffer ``buf`` into its tensor."""
        self._check(buf)
        for g in self._groups:
            g.window[g.index] = self._rows(g, buf)
        base = buf.ctypes.data
        for address, offset, n in self._singles:
            ctypes.memmove(address, base + offset, n)

    def gather(self, buf: np.ndarray) -> None:
        """Copy each item's tensor into its place in the flat buffer ``buf``."""
        self._check(buf)
        if not buf.flags.writeable:
            raise ValueError("the flat buffer is read-only")
        for g in self._groups:
            if g.step is not None:
                self._rows(g, buf)[...] = g.window[g.index]
            else:
                self._every(g, buf)[g.offsets] = g.window[g.index]
        base = buf.ctypes.data
        for address, offset, n in self._singles:
            ctypes.memmove(base + offset, address, n)
