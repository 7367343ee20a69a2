"""The bucket pack/unpack of the exchange, without processes: the owner's buffer is handed
to a receiver as a broadcast would, for every way a rank can pack or unpack a bucket.

Oracle: ``torch.load`` of the same file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from _util import tensor_bytes
from dist_restore._protocol import exchange as _exchange
from dist_restore._bytes import iovec as _iovec
from dist_restore._protocol.exchange import BucketIO, prepare_buckets
from dist_restore._format.index import read_index
from dist_restore._planning.plan import plan_read
from dist_restore._bytes.read import produce
from dist_restore._planning.shared import SharedItem, assign_owners, make_buckets

pytestmark = pytest.mark.timeout(60)

CPU = torch.device("cpu")


def _file(tmp_path: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    sd = {f"s{i}": torch.randn(3 + i % 5, generator=g) for i in range(300)}
    sd["h"] = torch.randn(4, 3, generator=g).half()
    sd["h3"] = torch.randn(3, generator=g).half()  # 6 bytes: what follows in a file is unaligned unless padded
    sd["m"] = torch.randn(5, 6, generator=g)
    sd["c"] = torch.randn(4, dtype=torch.complex64, generator=g)
    sd["z"] = torch.empty(0, 3)
    path = tmp_path / "checkpoint_0.pt"
    torch.save(sd, path)
    return path


def _items(index: Any) -> list[SharedItem]:
    plan = plan_read(None, index.tree)
    items = [SharedItem(lf.key, str(lf.source.dtype), tuple(lf.source.size), lf.source.nbytes) for lf in plan.leaves]
    return assign_owners(items, "broadcast", 2, 0)


def _roundtrip(path: Path, owner_target: Any, receiver_target: Any, bucket_bytes: int = 1 << 20
               ) -> tuple[list[BucketIO], list[BucketIO], dict, Any]:
    """(owner = rank 0) read + pack; (rank 1) prepare + receive the owner's bytes + unpack."""
    index = read_index(path)
    items = _items(index)
    buckets = make_buckets(items, bucket_bytes)

    def place(lf: Any) -> torch.device:
        return CPU

    plan0 = plan_read(owner_target, index.tree)
    values0 = produce(index, plan0.leaves)
    ios0 = prepare_buckets(buckets, items, 0, CPU, {lf.key: lf for lf in plan0.leaves}, values0, place)
    plan1 = plan_read(receiver_target, index.tree)
    values1: dict = {}
    ios1 = prepare_buckets(buckets, items, 1, CPU, {lf.key: lf for lf in plan1.leaves}, values1, place)
    for io0, io1 in zip(ios0, ios1, strict=True):
        sent = io0.buffer().clone()  # what the broadcast carries
        assert sent.numel() == io0.bucket.nbytes
        recv = io1.buffer()
        recv.copy_(sent)
        io1.unpack()
        io0.close()
        io1.close()
    return ios0, ios1, values1, plan1


def _value(plan: Any, values: dict, key: str) -> torch.Tensor:
    lf = next(lf for lf in plan.leaves if lf.key == key)
    return lf.target if lf.target is not None else values[lf.path]


@pytest.mark.parametrize("vectored", ["rows", "iovec", "copy"])
def test_preallocated_targets_use_vectored_copies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  vectored: str) -> None:
    """Many sizes that occur once: vectored file I/O, or (without memory files) one copy each."""
    if vectored == "iovec" and not _iovec.available():
        pytest.skip("no memory files here")
    if vectored != "rows":
        monkeypatch.setattr(_exchange, "MAX_ODD", -1)  # as if every size occurred once
    if vectored == "copy":
        monkeypatch.setattr(_iovec, "available", lambda: False)
    path = _file(tmp_path)
    ref = torch.load(path, weights_only=True)
    owner_t = {k: torch.zeros_like(v) for k, v in ref.items()}
    recv_t = {k: torch.full_like(v, 7) for k, v in ref.items()}
    ios0, ios1, values1, plan1 = _roundtrip(path, owner_t, recv_t)
    modes0 = {io.bucket.dtype: io.mode for io in ios0 if len(io.bucket.items) > 1}
    modes1 = {io.bucket.dtype: io.mode for io in ios1 if len(io.bucket.items) > 1}
    assert modes0["torch.float32"] == modes1["torch.float32"] == vectored
    for k, v in ref.items():
        assert tensor_bytes(recv_t[k]) == tensor_bytes(v), k
        assert tensor_bytes(owner_t[k]) == tensor_bytes(v), k


def test_allocated_targets_are_views_of_the_received_bucket(tmp_path: Path) -> None:
    path = _file(tmp_path)
    ref = torch.load(path, weights_only=True)
    ios0, ios1, values1, plan1 = _roundtrip(path, None, None)
    assert all(io.mode in ("views", "direct") for io in ios1)
    for k, v in ref.items():
        got = _value(plan1, values1, k)
        assert got.shape == v.shape and got.dtype == v.dtype and tensor_bytes(got) == tensor_bytes(v), k


@pytest.mark.parametrize("vectored", ["rows", "iovec"])
def test_mixed_strided_partial_targets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, vectored: str) -> None:
    """Receiver: some keys not asked for, some None, some strided or conjugate targets."""
    if vectored == "iovec":
        if not _iovec.available():
            pytest.skip("no memory files here")
        monkeypatch.setattr(_exchange, "MAX_ODD", -1)
    path = _file(tmp_path)
    ref = torch.load(path, weights_only=True)
    recv_t: dict[str, Any] = {k: torch.zeros_like(v) for k, v in ref.items() if k.startswith("s")}
    for i in range(0, 300, 3):
        del recv_t[f"s{i}"]  # not asked for: its bytes go nowhere
    for i in range(1, 300, 7):
        recv_t[f"s{i}"] = None  # allocated
    recv_t["m"] = torch.zeros(6, 5).t()  # strided target
    recv_t["c"] = None
    recv_t["h"] = torch.zeros(4, 3, dtype=torch.half)
    owner_t = {k: v for k, v in ref.items()}
    owner_t["c"] = torch.zeros(4, dtype=torch.complex64).conj()  # owner packs a conjugate view
    ios0, ios1, values1, plan1 = _roundtrip(path, owner_t, recv_t, bucket_bytes=600)
    assert len(ios1) > 3  # several buckets
    modes = {io.mode for io in ios1}
    assert vectored in modes and "copy" in modes
    assert any(io.mode == "copy" for io in ios0)  # the conjugate source
    for k, v in recv_t.items():
        got = _value(plan1, values1, k)
        assert torch.equal(got.resolve_conj(), ref[k]), k
    assert set(plan1.unexpected) == set(ref) - set(recv_t)


def test_owner_without_a_planned_shared_entry_is_an_error(tmp_path: Path) -> None:
    path = _file(tmp_path)
    index = read_index(path)
    items = _items(index)
    plan0 = plan_read({"s0": None}, index.tree)
    with pytest.raises(RuntimeError, match="did not plan it"):
        prepare_buckets(make_buckets(items, 1 << 20), items, 0, CPU, {lf.key: lf for lf in plan0.leaves},
                        produce(index, plan0.leaves), lambda lf: CPU)


def test_dtype_table_covers_saved_dtypes() -> None:
    for d in (torch.float32, torch.bfloat16, torch.complex64, torch.bool, torch.uint16):
        assert _exchange.DTYPES[str(d)] is d


@pytest.mark.skipif(not _iovec.available(), reason="no memory files here")
def test_vectored_copies_resume_after_partial_transfers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Linux moves at most ~2 GiB per preadv/pwritev: a short transfer resumes mid-iovec."""
    import ctypes

    import numpy as np

    real = _iovec._FNS
    assert real is not None
    calls = {"n": 0}

    def at_most(fn: Any, limit: int) -> Any:
        def call(fd: int, addr: int, count: int, offset: int) -> int:
            arr = np.ctypeslib.as_array((ctypes.c_uint64 * (count * 2)).from_address(addr)).reshape(count, 2)
            keep, total = [], 0
            for base, n in arr.tolist():
                if total >= limit:
                    break
                take = min(n, limit - total)
                keep.append((base, take))
                total += take
            sub = np.array(keep, dtype=np.uint64).reshape(-1, 2)
            calls["n"] += 1
            return fn(fd, sub.ctypes.data, len(sub), offset)
        return call

    monkeypatch.setattr(_iovec, "_FNS", (at_most(real[0], 997), at_most(real[1], 997)))
    g = torch.Generator().manual_seed(3)
    dst = [torch.zeros(i % 50 + 1, dtype=torch.uint8) for i in range(300)]
    n = sum(t.numel() for t in dst)
    src = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)
    iov = _iovec.iovecs([t.data_ptr() for t in dst], [t.numel() for t in dst])
    with _iovec.MemBuffer(n) as buf:
        buf.tensor.copy_(src)
        buf.scatter(iov)
        assert torch.equal(torch.cat(dst), src)
        buf.tensor.zero_()
        buf.gather(iov)
        assert torch.equal(buf.tensor, src)
    assert calls["n"] >= 2 * (n // 997)


@pytest.mark.skipif(not _iovec.available(), reason="no memory files here")
def test_memory_file_closed_when_dropped_unclosed() -> None:
    import os

    def fds() -> set[str]:
        return {os.readlink(f"/proc/self/fd/{f}") for f in os.listdir("/proc/self/fd")
                if os.path.exists(f"/proc/self/fd/{f}")}

    before = sum("dist_restore_bucket" in f for f in fds())
    for _ in range(3):
        buf = _iovec.MemBuffer(4096)
        assert sum("dist_restore_bucket" in f for f in fds()) == before + 1
        del buf
    assert sum("dist_restore_bucket" in f for f in fds()) == before


def test_bucket_nobody_here_asked_for_is_received_and_dropped(tmp_path: Path) -> None:
    path = _file(tmp_path)
    ref = torch.load(path, weights_only=True)
    ios0, ios1, values1, plan1 = _roundtrip(path, None, {"m": torch.zeros(5, 6)}, bucket_bytes=600)
    by_keys = [(io, {it.key for it in io.bucket.items}) for io in ios1]
    assert any("m" not in keys and io.mode == "views" and io._iov is None for io, keys in by_keys)
    assert torch.equal(plan1.leaves[0].target, ref["m"]) and not values1


def _flat_views(ref: dict, keys: list[str], fill: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Targets for ``keys`` that are views of one flat buffer, back to back in ``keys`` order."""
    sizes = [ref[k].numel() for k in keys]
    flat = torch.full((sum(sizes),), fill)
    views = dict(zip(keys, (v.view(ref[k].shape) for k, v in zip(keys, flat.split(sizes)))))
    return flat, views


def test_targets_back_to_back_in_one_buffer_are_sent_and_received_in_place(tmp_path: Path) -> None:
    path = _file(tmp_path)
    ref = torch.load(path, weights_only=True)
    keys = [f"s{i}" for i in range(300)] + ["m"]  # the float32 bucket, in file order
    owner_flat, owner_t = _flat_views(ref, keys, 0.0)
    recv_flat, recv_t = _flat_views(ref, keys, 7.0)
    owner_t.update({k: torch.zeros_like(v) for k, v in ref.items() if k not in owner_t})
    recv_t.update({k: torch.zeros_like(v) for k, v in ref.items() if k not in recv_t})
    ios0, ios1, values1, plan1 = _roundtrip(path, owner_t, recv_t)
    f32 = [(a, b) for a, b in zip(ios0, ios1) if a.bucket.dtype == "torch.float32"]
    assert len(f32) == 1 and f32[0][0].mode == f32[0][1].mode == "direct"
    assert torch.equal(recv_flat, torch.cat([ref[k].reshape(-1) for k in keys]))
    for k in keys:
        assert recv_t[k].data_ptr() >= recv_flat.data_ptr()  # still views of the buffer
    # out of order, or with a gap: not in place, still exact
    _, recv_t2 = _flat_views(ref, keys[::-1], 7.0)
    recv_t2.update({k: torch.zeros_like(v) for k, v in ref.items() if k not in recv_t2})
    _, ios1b, _, _ = _roundtrip(path, owner_t, recv_t2)
    assert [io.mode for io in ios1b if io.bucket.dtype == "torch.float32"] != ["direct"]
    for k in keys:
        assert torch.equal(recv_t2[k], ref[k]), k


def _packed(sizes: list[int]) -> tuple[list[int], int]:
    """Buckets back to back, unpadded (what the file layout must not be)."""
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    return offsets, sum(sizes)


def _roundtrip_shm(path: Path, owner_target: Any, receiver_target: Any, bucket_bytes: int = 1 << 20,
                   aligned: bool = True) -> tuple[list[BucketIO], list[BucketIO], dict, Any]:
    """As :func:`_roundtrip`, through the owner's memory file (ranks on one host)."""
    from dist_restore._bytes import shm as _shm

    index = read_index(path)
    items = _items(index)
    buckets = make_buckets(items, bucket_bytes)
    plan0 = plan_read(owner_target, index.tree)
    values0 = produce(index, plan0.leaves)
    ios0 = prepare_buckets(buckets, items, 0, CPU, {lf.key: lf for lf in plan0.leaves}, values0, lambda lf: CPU,
                           stage_bytes=-1)
    plan1 = plan_read(receiver_target, index.tree)
    values1: dict = {}
    ios1 = prepare_buckets(buckets, items, 1, CPU, {lf.key: lf for lf in plan1.leaves}, values1, lambda lf: CPU,
                           stage_bytes=-1)
    assert all(io._flat is None or io._keep for io in ios0 + ios1)  # nothing staged
    offsets, total = (_shm.layout if aligned else _packed)([b.nbytes for b in buckets])
    owner = _shm.OwnerFile(total, tuple(range(len(buckets))))
    for io, off in zip(ios0, offsets):
        io.pack_into(owner.mem, off)
    peer = _shm.PeerFile(owner.offer)  # this process opens its own file through /proc
    for io, off in zip(ios1, offsets):
        io.unpack_from(peer.region(off, io.bucket.nbytes), peer.fd, off)
    peer.close()
    owner.close()
    return ios0, ios1, values1, plan1


@pytest.mark.skipif(not _iovec.available(), reason="no memory files here")
@pytest.mark.parametrize("vectored", ["rows", "iovec"])
def test_every_mode_through_a_memory_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, vectored: str) -> None:
    if vectored == "iovec":
        monkeypatch.setattr(_exchange, "MAX_ODD", -1)
    path = _file(tmp_path)
    ref = torch.load(path, weights_only=True)
    recv_t: dict[str, Any] = {k: torch.zeros_like(v) for k, v in ref.items() if k.startswith("s")}
    for i in range(0, 300, 3):
        del recv_t[f"s{i}"]  # not asked for
    for i in range(1, 300, 7):
        recv_t[f"s{i}"] = None  # allocated
    recv_t["m"] = torch.zeros(6, 5).t()  # strided: copy mode
    recv_t["c"] = None
    recv_t["h"] = torch.zeros(4, 3, dtype=torch.half)  # a lone tensor: direct
    owner_t = {k: torch.zeros_like(v) for k, v in ref.items()}
    owner_t["c"] = torch.zeros(4, dtype=torch.complex64).conj()  # the owner packs a conjugate view
    with pytest.raises(RuntimeError, match="divisible"):  # why the file layout pads buckets
        _roundtrip_shm(path, owner_t, recv_t, bucket_bytes=600, aligned=False)
    for t in recv_t.values():
        if t is not None:
            t.zero_()
    ios0, ios1, values1, plan1 = _roundtrip_shm(path, owner_t, recv_t, bucket_bytes=600)
    modes = {io.mode for io in ios1}
    assert {vectored, "copy", "direct"} <= modes, modes
    for k, v in recv_t.items():
        got = _value(plan1, values1, k)
        assert torch.equal(got.resolve_conj(), ref[k]), k
    # allocated entries, all of a bucket: views of one buffer filled from the file
    _, ios1b, values1b, plan1b = _roundtrip_shm(path, owner_t, None)
    assert "views" in {io.mode for io in ios1b} and {io.mode for io in ios1b} <= {"views", "direct"}
    for k, v in ref.items():
        assert torch.equal(_value(plan1b, values1b, k).resolve_conj(), v), k
