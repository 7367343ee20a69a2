"""How one shared bucket's bytes get into and out of its flat buffer on this rank.

The coordinator broadcasts each bucket's flat buffer from its owner. This module decides,
per bucket and per rank, what that buffer is and how tensors are packed into it (owner) or
unpacked from it (receivers). All per-tensor work (addresses, views, allocations) happens in
:func:`prepare_buckets`, before the exchange, so that the exchange itself is the broadcast
plus a few system calls at most:

* ``direct``: a one-tensor bucket whose tensor here is contiguous on the collective's
  device, or a bucket whose tensors here lie back to back in one storage in bucket order
  (parameters that are views of one flat buffer), is broadcast in place: no copy.
* ``views`` (receivers): every entry this rank wants is allocated here (a ``None``
  target): a plain buffer receives the bytes and the entries are views of it.
* ``rows`` (CPU): the owner gathers its tensors into a plain buffer, receivers scatter it
  into theirs, one compiled numpy copy per tensor size (see :mod:`dist_restore._bytes.rows`).
* ``iovec`` (CPU, many tensors of sizes that occur once): the buffer is a memory file; the
  owner gathers its tensors into it with ``pwritev``, receivers scatter it into theirs with
  ``preadv`` (see :mod:`dist_restore._bytes.iovec`).
* ``copy``: anything else (CUDA targets, strided or conjugate tensors, no memory files):
  a fused flatten on the owner, split + ``_foreach_copy_`` on receivers.

When all ranks run on one host the bucket does not travel by broadcast: the owner packs it
into its memory file with :meth:`BucketIO.pack_into` and receivers copy it out of their
mapping of that file with :meth:`BucketIO.unpack_from`, in the same modes (see :mod:`dist_restore._bytes.shm`).

Nothing here calls a collective or modifies a target; :meth:`BucketIO.unpack` and
:meth:`BucketIO.unpack_from` are the only writes, and the coordinator calls them after the
read agreement.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from dist_restore._bytes import iovec as _iovec

from dist_restore._bytes import rows as _rows
from dist_restore._format.keypath import RawPath
from dist_restore._planning.plan import PlannedLeaf
from dist_restore._bytes.read import finish_tensor
from dist_restore._planning.shared import Bucket, SharedItem
from dist_restore._format.unpickle import TensorRef

Mode = Literal["direct", "views", "rows", "iovec", "copy"]
#: More tensors than this whose size occurs once in a bucket: vectored file I/O beats
#: one ``memmove`` call each (see :attr:`dist_restore._bytes.rows.RowPlan.odd`).
MAX_ODD = 256
#: The device an allocated (``None`` target) leaf goes to.
Placement = Callable[[PlannedLeaf], torch.device]

DTYPES: dict[str, torch.dtype] = {str(d): d for d in (getattr(torch, n) for n in dir(torch))
                                  if isinstance(d, torch.dtype)}


@dataclass
class BucketIO:
    """One bucket on this rank: its flat buffer, and how it is packed or unpacked.

    Attributes:
        bucket: The bucket (same on every rank).
        owner: Whether this rank sends it.
        mode: See the module docstring.
    """

    bucket: Bucket
    owner: bool
    mode: Mode
    device: torch.device
    _tensors: list[torch.Tensor | None] = field(default_factory=list)  # per item; None: not wanted
    _shapes: list[tuple[int, ...]] = field(default_factory=list)
    _iov: np.ndarray | None = None
    _plan: _rows.RowPlan | None = None
    _flat: torch.Tensor | None = None
    _mem: _iovec.MemBuffer | None = None
    _keep: bool = False  # _flat is the targets' own memory (direct, or views of allocated entries)

    def buffer(self) -> torch.Tensor:
        """(all ranks) The flat ``uint8`` tensor to broadcast; on the owner, packed."""
        if self._flat is not None:
            return self._flat
        n = self.bucket.nbytes
        if self.mode in ("rows", "iovec"):
            if self.mode == "iovec":
                self._mem = _iovec.MemBuffer(n)
                self._flat = self._mem.tensor
            else:
                self._flat = torch.empty(n, dtype=torch.uint8)
            if self.owner:
                self._gather_into(self._flat, self._mem, 0)
        elif self.owner:
            self._flat = _pack([t for t in self._tensors if t is not None]).to(self.device)
        else:
            self._flat = torch.empty(n, dtype=torch.uint8, device=self.device)
        return self._flat

    def stage(self) -> None:
        """Make the buffer now, before the exchange: packed on the owner, paged in elsewhere."""
        fresh = self._flat is None or self.mode == "views"
        flat = self.buffer()
        if not self.owner and fresh and self.mode != "direct" and flat.device.type == "cpu":
            flat.zero_()  # fault its pages in now rather than under the broadcast

    def unpack(self) -> None:
        """(receivers) Copy the received buffer into the wanted tensors that are not views of it."""
        if self.owner or self.mode in ("direct", "views"):
            return
        assert self._flat is not None
        self._scatter_from(self._flat, self._mem._fd if self._mem is not None else -1, 0)

    def _scatter_from(self, flat: torch.Tensor, fd: int, offset: int) -> None:
        """(receivers; rows, iovec, copy) The bucket's bytes ``flat`` (also at ``offset`` of
        the memory file ``fd``, for iovec) into the wanted tensors."""
        if self.mode == "rows":
            assert self._plan is not None
            self._plan.scatter(flat.numpy())
            return
        if self.mode == "iovec":
            assert self._iov is not None
            _iovec.vectored(fd, 0, self._iov, offset, offset + self.bucket.nbytes)
            return
        dtype = DTYPES[self.bucket.dtype]
        parts = flat.view(dtype).split([it.nbytes // dtype.itemsize for it in self.bucket.items])
        dst, src = [], []
        for t, part, shape in zip(self._tensors, parts, self._shapes):
            if t is not None:
                dst.append(t)
                src.append(part.view(shape))
        _copy_all(dst, src)

    def pack_into(self, file: _iovec.MemBuffer, offset: int) -> None:
        """(owner) Put the bucket's bytes into the memory ``file`` at ``offset`` (instead of a
        buffer to broadcast: ranks on this host copy them from there)."""
        assert self.owner
        dst = file.tensor[offset : offset + self.bucket.nbytes]
        if self.mode in ("rows", "iovec"):
            self._gather_into(dst, file, offset)
        else:
            dst.copy_(self.buffer())  # direct: the tensor itself; copy: packed

    def _gather_into(self, dst: torch.Tensor, file: _iovec.MemBuffer | None, offset: int) -> None:
        """(owner; rows, iovec) The tensors into ``dst``, which is ``file`` from ``offset`` on
        (iovec)."""
        if self.mode == "rows":
            assert self._plan is not None
            self._plan.gather(dst.numpy())
        else:
            assert self._iov is not None and file is not None
            file.gather(self._iov, offset)

    def unpack_from(self, src: torch.Tensor, fd: int, offset: int) -> None:
        """(receivers) Copy the bucket from ``src``, its bytes in another rank's memory file
        (open here as ``fd``, the bucket at ``offset``), instead of from a broadcast."""
        assert not self.owner and src.numel() == self.bucket.nbytes
        if self.mode in ("direct", "views"):
            if self._flat is not None:  # None: a bucket nobody here asked for
                self._flat.copy_(src)
        else:
            self._scatter_from(src, fd, offset)

    def close(self) -> None:
        """Drop the buffer, unless it is the targets' own memory: :meth:`buffer` makes it
        again if needed."""
        if not self._keep:
            self._flat = None
        if self._mem is not None:
            self._mem.close()
            self._mem = None


def prepare_buckets(buckets: Sequence[Bucket], items: Sequence[SharedItem], rank: int, device: torch.device,
                    by_key: Mapping[str, PlannedLeaf], values: dict[RawPath, Any],
                    place: Placement, stage_bytes: int = 0) -> list[BucketIO]:
    """(all ranks) Plan each bucket's buffer on this rank; allocate the received ``None`` targets.

    Allocated leaves (``None`` targets) this rank receives are stored in ``values`` here
    (filled by the exchange). ``values`` must hold what this rank read itself. The first
    buckets, up to ``stage_bytes`` in all (at least one; none if ``stage_bytes`` is negative),
    are staged (:meth:`BucketIO.stage`) now; the others when the exchange reaches them, so
    that buffers stay bounded.
    """
    ios = []
    for bucket in buckets:
        leaves = [by_key.get(it.key) for it in bucket.items]  # None: this rank did not ask
        if bucket.owner == rank:
            ios.append(_prepare_owner(bucket, leaves, values, device))
        else:
            ios.append(_prepare_receiver(bucket, leaves, values, device, place))
    for it in items:  # zero-byte shared tensors travel in no bucket
        lf = by_key.get(it.key)
        if it.nbytes == 0 and it.owner != rank and lf is not None and lf.target is None:
            ref: TensorRef = lf.source
            values[lf.path] = finish_tensor(torch.empty(ref.size, dtype=ref.dtype, device=place(lf)),
                                            _contiguous_ref(ref))
    staged = 0 if stage_bytes >= 0 else -1
    for io in ios:
        if staged < 0 or (staged and staged + io.bucket.nbytes > stage_bytes):
            break
        io.stage()
        staged += io.bucket.nbytes
    return ios


def _dense_on(t: torch.Tensor, device: torch.device, dtype: torch.dtype, nbytes: int) -> bool:
    """Whether ``t``'s bytes are exactly ``nbytes`` contiguous, plain bytes on ``device``."""
    return (t.device == device and t.dtype == dtype and t.is_contiguous() and not t.is_conj()
            and not t.is_neg() and t.numel() * t.element_size() == nbytes)


def _prepare_owner(bucket: Bucket, leaves: list[PlannedLeaf | None], values: Mapping[RawPath, Any],
                   device: torch.device) -> BucketIO:
    dtype = DTYPES[bucket.dtype]
    tensors = []
    for lf in leaves:
        if lf is None:  # the canonical list holds only entries the owner has
            raise RuntimeError(f"rank owns shared entry {bucket.items[len(tensors)].key!r} but did not plan it")
        tensors.append(lf.target if lf.target is not None else values.get(lf.path))
    ok = [t is not None and _dense_on(t, t.device, dtype, it.nbytes) for t, it in zip(tensors, bucket.items)]
    if len(tensors) == 1 and ok[0] and tensors[0].device == device:
        return BucketIO(bucket, True, "direct", device,
                        _flat=tensors[0].detach().view(-1).view(torch.uint8), _keep=True)
    run = _adjacent_run(tensors, bucket, dtype, device)
    if run is not None:
        return BucketIO(bucket, True, "direct", device, _flat=run, _keep=True)
    cpu = torch.device("cpu")
    if device == cpu and all(ok) and all(t.device == cpu for t in tensors):
        vec = _vectored(bucket, [t.data_ptr() for t in tensors], owner=True, device=device)
        if vec is not None:
            return vec
    return BucketIO(bucket, True, "copy", device, _tensors=list(tensors))


def _prepare_receiver(bucket: Bucket, leaves: list[PlannedLeaf | None], values: dict[RawPath, Any],
                      device: torch.device, place: Placement) -> BucketIO:
    dtype = DTYPES[bucket.dtype]
    wanted = [lf for lf in leaves if lf is not None]
    if not wanted:  # received (every rank takes part) and dropped
        return BucketIO(bucket, False, "views", device)
    shapes = [tuple(lf.source.size) if lf is not None else () for lf in leaves]
    targets = [lf.target for lf in wanted]
    if len(leaves) == 1 and wanted:
        lf = wanted[0]
        t = lf.target
        if t is None and place(lf) == device:
            t = _allocate(lf, values, device)
        if t is not None and _dense_on(t, device, dtype, bucket.nbytes):
            return BucketIO(bucket, False, "direct", device, _flat=t.detach().view(-1).view(torch.uint8),
                            _keep=True)
    if len(wanted) == len(leaves) and all(t is not None for t in targets):
        run = _adjacent_run(targets, bucket, dtype, device)
        if run is not None:  # e.g. parameters that are views of one flat buffer, in bucket order
            return BucketIO(bucket, False, "direct", device, _flat=run, _keep=True)
    if wanted and all(t is None for t in targets) and all(place(lf) == device for lf in wanted):
        flat = torch.empty(bucket.nbytes, dtype=torch.uint8, device=device)
        typed = flat.view(dtype)
        for lf, it, off in zip(leaves, bucket.items, bucket.offsets):
            if lf is not None:  # the bucket's memory backs the allocated entries
                n = it.nbytes // dtype.itemsize
                start = off // dtype.itemsize
                values[lf.path] = finish_tensor(typed[start : start + n].view(lf.source.size),
                                                _contiguous_ref(lf.source))
        return BucketIO(bucket, False, "views", device, _flat=flat, _keep=True)
    cpu = torch.device("cpu")
    # allocate the None targets; then every wanted tensor is a plain CPU buffer, or not
    tensors: list[torch.Tensor | None] = []
    for lf in leaves:
        if lf is None:
            tensors.append(None)
        elif lf.target is not None:
            tensors.append(lf.target)
        else:
            tensors.append(_allocate(lf, values, place(lf)))
    if device == cpu and all(t is None or _dense_on(t, cpu, dtype, it.nbytes)
                             for t, it in zip(tensors, bucket.items)):
        vec = _vectored(bucket, [-1 if t is None else t.data_ptr() for t in tensors], owner=False, device=device)
        if vec is not None:
            return vec
    return BucketIO(bucket, False, "copy", device, _tensors=tensors, _shapes=shapes)


def _vectored(bucket: Bucket, addresses: list[int], owner: bool, device: torch.device) -> BucketIO | None:
    """A ``rows`` (or, with many odd sizes, ``iovec``) plan for dense CPU tensors at
    ``addresses`` (``-1``: an entry this receiver did not ask for); ``None``: neither works."""
    sizes = [it.nbytes for it in bucket.items]
    rows = _rows.RowPlan(addresses, sizes, bucket.offsets)
    if rows.odd <= MAX_ODD:
        return BucketIO(bucket, owner, "rows", device, _plan=rows)
    if not _iovec.available():
        return None
    junk: list[torch.Tensor] = []
    if not owner and -1 in addresses:  # bytes of entries this rank did not ask for
        junk.append(torch.empty(max(n for a, n in zip(addresses, sizes) if a == -1), dtype=torch.uint8))
        addresses = [junk[0].data_ptr() if a == -1 else a for a in addresses]
    return BucketIO(bucket, owner, "iovec", device, _tensors=junk, _iov=_iovec.iovecs(addresses, sizes))


def _adjacent_run(tensors: Sequence[torch.Tensor | None], bucket: Bucket, dtype: torch.dtype,
                  device: torch.device) -> torch.Tensor | None:
    """The bytes of ``tensors`` as one ``uint8`` view, if they lie back to back in one storage
    in bucket order (then the bucket is sent or received in place); else ``None``."""
    if len(tensors) < 2:
        return None
    first = tensors[0]
    if first is None:
        return None
    storage = first.untyped_storage()
    base = storage.data_ptr()
    nxt = first.data_ptr()
    for t, it in zip(tensors, bucket.items):
        if t is None or not _dense_on(t, device, dtype, it.nbytes) or t.data_ptr() != nxt \
                or t.untyped_storage().data_ptr() != base:
            return None
        nxt += it.nbytes
    start = first.data_ptr() - base
    return torch.empty(0, dtype=torch.uint8, device=device).set_(storage, start, (bucket.nbytes,), (1,))


def _allocate(lf: PlannedLeaf, values: dict[RawPath, Any], device: torch.device) -> torch.Tensor:
    """A new contiguous tensor for a ``None`` target, recorded in ``values``; its plain data."""
    ref: TensorRef = lf.source
    t = torch.empty(ref.size, dtype=ref.dtype, device=device)
    values[lf.path] = finish_tensor(t, _contiguous_ref(ref))
    return t


def _contiguous_ref(ref: TensorRef) -> TensorRef:
    """``ref`` without conj/neg bits: received bytes are already resolved."""
    if not ref.metadata:
        return ref
    return TensorRef(ref.storage, ref.dtype, 0, ref.size, ref.stride, ref.requires_grad,
                     ref.is_parameter, None, ref.state)


def _pack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The elements of same-dtype tensors, back to back, as one flat uint8 tensor."""
    with torch.no_grad():
        try:  # one C++ loop (contiguous + view + cat): no per-tensor Python
            return torch._C._nn.flatten_dense_tensors(tensors).view(torch.uint8)
        except (RuntimeError, AttributeError):  # conj/neg views, or a dtype cat lacks: as bytes
            return torch.cat([t.resolve_conj().resolve_neg().reshape(-1).view(torch.uint8)
                              for t in tensors])


def _copy_all(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    """``d.copy_(s)`` for every pair, in one fused call where torch allows it."""
    if not dst:
        return
    try:
        with torch.no_grad():
            torch._foreach_copy_(dst, src)
    except (RuntimeError, AttributeError, TypeError):  # mixed devices/strides: one by one
        with torch.no_grad():
            for d, s in zip(dst, src):
                d.copy_(s)
