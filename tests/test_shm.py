"""``_shm``: a rank's memory file opened by another process through ``/proc`` (here: this one)."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from dist_restore._bytes import iovec as _iovec

from dist_restore._bytes import shm as _shm

pytestmark = [pytest.mark.timeout(60),
              pytest.mark.skipif(_shm.host_id() is None, reason="no shareable memory files here")]


def test_offered_file_is_read_back_through_proc() -> None:
    owner = _shm.OwnerFile(1000, (0,))
    data = torch.randint(0, 256, (1000,), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    owner.region(0, 1000).copy_(data)
    assert owner.offer.pid == os.getpid() and owner.offer.nbytes == 1000
    peer = _shm.PeerFile(owner.offer)
    assert torch.equal(peer.region(0, 1000), data)
    assert torch.equal(peer.region(100, 7), data[100:107])
    with pytest.raises(ValueError, match="do not fit"):
        peer.region(995, 6)
    view = peer.region(0, 10)
    peer.close()
    owner.close()
    assert torch.equal(view, data[:10])  # the mapping outlives both descriptors


def test_wrong_size_or_token_is_not_the_offered_file() -> None:
    owner = _shm.OwnerFile(64, (0,))
    with pytest.raises(OSError, match="not the offered file"):
        _shm.PeerFile(dataclasses.replace(owner.offer, nbytes=65))
    with pytest.raises(OSError, match="token"):
        _shm.PeerFile(dataclasses.replace(owner.offer, token="00" * _shm.TOKEN_BYTES))
    other = _iovec.MemBuffer(64 + _shm.TOKEN_BYTES, seal=True)  # same size, another file
    with pytest.raises(OSError, match="token"):
        _shm.PeerFile(dataclasses.replace(owner.offer, fd=other._fd))
    unsealed = _iovec.MemBuffer(64 + _shm.TOKEN_BYTES)  # a file that could shrink under the mapping
    with pytest.raises(OSError, match="not sealed"):
        _shm.PeerFile(dataclasses.replace(owner.offer, fd=unsealed._fd))
    unsealed.close()
    with pytest.raises(OSError):
        _shm.PeerFile(dataclasses.replace(owner.offer, fd=123456))  # no such descriptor
    other.close()
    owner.close()


def test_descriptors_are_not_leaked() -> None:
    before = len(os.listdir("/proc/self/fd"))
    owner = _shm.OwnerFile(64, (0,))
    for _ in range(5):
        _shm.PeerFile(owner.offer).close()
        with pytest.raises(OSError):
            _shm.PeerFile(dataclasses.replace(owner.offer, nbytes=1))
    owner.close()
    assert len(os.listdir("/proc/self/fd")) == before


def test_host_id_is_stable() -> None:
    assert _shm.host_id() == _shm.host_id()


def test_owner_file_is_sealed_against_resizing() -> None:
    owner = _shm.OwnerFile(64, (0,))
    with pytest.raises(OSError):
        os.ftruncate(owner.mem._fd, 32)
    with pytest.raises(OSError):
        os.ftruncate(owner.mem._fd, 1 << 20)
    owner.close()


def test_bucket_layout_is_aligned() -> None:
    offsets, end = _shm.layout([10, 64, 3, 1])
    assert offsets == [0, 64, 128, 192] and end == 193
    assert _shm.layout([]) == ([], 0)
