"""The restricted unpickler's input stream: prefetched (``peek``) against a bare ``BytesIO``.

Oracle: the same unpickler reading a plain ``io.BytesIO`` (one ``read`` per opcode, as
before). Every truncation and many flipped bytes of a ``data.pkl`` must give the same
tree, or the same error, either way.
"""

from __future__ import annotations

import io
import pickle
import random
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch

from dist_restore._format import unpickle as _unpickle
from dist_restore._format.unpickle import StorageRef, TensorRef, unpickle_refs
from dist_restore.errors import CheckpointError


def _pickle_bytes(tmp_path: Path) -> bytes:
    x = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    sd = {"w": x, "wt": x.t(), "p": torch.nn.Parameter(torch.ones(2)), "b": torch.tensor([1, 2], dtype=torch.int16),
          "n": 3, "s": "text", "l": [1.5, (2, b"\x00\xff")], "big": list(range(300))}
    path = tmp_path / "f.pt"
    torch.save(sd, path)
    with zipfile.ZipFile(path) as z:
        return z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))


def _outcome(data: bytes) -> str:
    try:
        tree, storages = unpickle_refs(data, "f")
    except CheckpointError as e:
        return f"{type(e).__name__}: {e}"
    return repr((tree, storages))


def _both(data: bytes, monkeypatch: pytest.MonkeyPatch) -> tuple[str, str]:
    got = _outcome(data)
    with monkeypatch.context() as m:
        m.setattr(_unpickle, "_stream", io.BytesIO)
        want = _outcome(data)
    return got, want


def test_truncated_and_flipped_pickles_read_alike(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = _pickle_bytes(tmp_path)
    variants = [data[:cut] for cut in range(len(data) + 1)]
    rng = random.Random(0)
    for _ in range(1500):
        bad = bytearray(data)
        bad[rng.randrange(len(bad))] = rng.randrange(256)
        variants.append(bytes(bad))
    variants += [data + b"trailing bytes", b"", b"\x80"]
    for v in variants:
        got, want = _both(v, monkeypatch)
        assert got == want, (v, got, want)


def test_refs_as_before(tmp_path: Path) -> None:
    tree, storages = unpickle_refs(_pickle_bytes(tmp_path), "f")
    w, wt, p = tree["w"], tree["wt"], tree["p"]
    assert all(type(r) is TensorRef for r in (w, wt, p)) and type(w.storage) is StorageRef
    assert w.storage is wt.storage and storages[w.storage.key] is w.storage
    assert (w.size, w.stride, wt.size, wt.stride, w.storage_offset) == ((3, 4), (4, 1), (4, 3), (1, 4), 0)
    assert (w.requires_grad, w.is_parameter, w.metadata, w.state) == (False, False, None, None)
    assert p.is_parameter and p.requires_grad
    assert w.storage.numel == 12 and w.storage.dtype is torch.float32 and w.storage.location == "cpu"
    assert repr(w).startswith("TensorRef(storage=StorageRef(")
    again: Any = pickle.loads(pickle.dumps(w))  # plans travel between ranks
    assert (again.size, again.stride, again.storage.key, again.dtype) == (w.size, w.stride, w.storage.key, w.dtype)
