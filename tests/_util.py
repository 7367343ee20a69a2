"""Shared helpers for the reader tests: save a rank file, load the oracle, compare bit for bit.

The oracle is always ``torch.load(file, weights_only=True)`` of the very file the reader read.
Tensors are compared through their bytes (``uint8`` views), so NaN payloads, float8/bits
dtypes (which have no ``torch.equal`` kernel) and signed zeros are all compared exactly.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

#: Every dtype ``torch.save`` round-trips (probed on torch 2.13). The sub-byte integer
#: dtypes (``int1``..``int7``, ``uint1``..``uint7``) are left out because ``torch.save``
#: itself fails on them (``KeyError: 'dtype torch.int1 is not recognized'``); the quantized
#: dtypes (``qint8`` & co.) cannot make plain tensors and are covered by quantized tensors.
_DTYPE_NAMES = [
    "float16", "float32", "float64", "bfloat16",
    "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu",
    "float4_e2m1fn_x2",
    "complex32", "complex64", "complex128",
    "bool",
    "int8", "int16", "int32", "int64",
    "uint8", "uint16", "uint32", "uint64",
    "bits8", "bits16", "bits1x8", "bits2x4", "bits4x2",
]
ALL_DTYPES: list[torch.dtype] = [getattr(torch, n) for n in _DTYPE_NAMES if hasattr(torch, n)]

#: A representative subset for the property test.
SOME_DTYPES: list[torch.dtype] = [
    d for d in (torch.float32, torch.float16, torch.bfloat16, getattr(torch, "float8_e4m3fn", None),
                torch.complex64, torch.complex128, torch.bool, torch.uint16, torch.int64, torch.uint8)
    if d is not None
]


def value_types_sample() -> dict[str, Any]:
    """Values ``torch.load(weights_only=True)`` gives back as themselves: a restore must too,
    type for type (a ``torch.Size`` is not a tuple, an ``OrderedDict`` not a dict). One copy,
    in the multi-process workers, which spawned ranks can import."""
    from tests_multiprocess._workers import value_types

    return value_types()


def rank_file(directory: Path, rank: int = 0) -> Path:
    return Path(directory) / f"checkpoint_{rank}.pt"


def save(obj: Any, directory: Path, rank: int = 0, **kwargs: Any) -> Path:
    """``torch.save`` ``obj`` as ``directory/checkpoint_{rank}.pt``; returns the file."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = rank_file(directory, rank)
    torch.save(obj, path, **kwargs)
    return path


def oracle(path: Path) -> Any:
    return torch.load(path, weights_only=True)


def rand_tensor(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator | None = None) -> torch.Tensor:
    """A contiguous tensor of random *bytes* (any bit pattern: NaNs included); bools are 0/1."""
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, dtype=torch.uint8, generator=gen).bool()
    raw = torch.randint(0, 256, (*shape, dtype.itemsize), dtype=torch.uint8, generator=gen)
    return raw.view(dtype).reshape(shape)


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The logical values of ``t`` as bytes, in row-major order (conj/neg bits applied)."""
    t = t.detach()
    if t.numel() == 0:
        return b""
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    # a fresh tensor: .contiguous() may keep odd strides of size-1 dims, which view() rejects
    dense = torch.empty(t.shape, dtype=t.dtype).copy_(t)
    return dense.reshape(-1).view(torch.uint8).numpy().tobytes()


def fill_garbage(t: torch.Tensor, byte: int = 0xA5) -> torch.Tensor:
    """Overwrite ``t``'s elements with a byte pattern (so a fill is visible); returns ``t``."""
    if t.numel():
        with torch.no_grad():
            if t.dtype == torch.bool:
                t.fill_(True)
            else:
                src = torch.full((*t.shape, t.dtype.itemsize), byte, dtype=torch.uint8)
                t.copy_(src.view(t.dtype).reshape(t.shape))
    return t


def assert_tensor_same(actual: Any, expected: torch.Tensor, where: str = "") -> None:
    """``actual`` is what ``torch.load`` made: same type, dtype, shape, stride, bits."""
    assert isinstance(actual, torch.Tensor), f"{where}: {type(actual).__name__}, expected a tensor"
    assert type(actual) is type(expected), f"{where}: {type(actual).__name__} vs {type(expected).__name__}"
    assert actual.dtype == expected.dtype, f"{where}: dtype {actual.dtype} vs {expected.dtype}"
    assert actual.layout == expected.layout, f"{where}: layout {actual.layout} vs {expected.layout}"
    assert actual.device == expected.device, f"{where}: device {actual.device} vs {expected.device}"
    assert actual.is_nested == expected.is_nested, f"{where}: is_nested {actual.is_nested}"
    if not expected.is_nested:  # a nested tensor has no sizes; its components are compared below
        assert tuple(actual.shape) == tuple(expected.shape), f"{where}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    assert actual.requires_grad == expected.requires_grad, f"{where}: requires_grad {actual.requires_grad}"
    if expected.layout == torch.strided and not expected.is_quantized and not expected.is_nested:
        assert actual.stride() == expected.stride(), f"{where}: stride {actual.stride()} vs {expected.stride()}"
        assert actual.is_conj() == expected.is_conj(), f"{where}: conj bit {actual.is_conj()}"
        assert actual.is_neg() == expected.is_neg(), f"{where}: neg bit {actual.is_neg()}"
        assert tensor_bytes(actual) == tensor_bytes(expected), f"{where}: values differ"
    else:
        assert_exotic_same(actual, expected, where)


def assert_exotic_same(actual: torch.Tensor, expected: torch.Tensor, where: str = "") -> None:
    if expected.is_quantized:
        assert actual.is_quantized and actual.qscheme() == expected.qscheme(), where
        if expected.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
            assert actual.q_scale() == expected.q_scale() and actual.q_zero_point() == expected.q_zero_point(), where
        else:
            assert torch.equal(actual.q_per_channel_scales(), expected.q_per_channel_scales()), where
            assert torch.equal(actual.q_per_channel_zero_points(), expected.q_per_channel_zero_points()), where
            assert actual.q_per_channel_axis() == expected.q_per_channel_axis(), where
        assert tensor_bytes(actual.int_repr()) == tensor_bytes(expected.int_repr()), where
    elif expected.layout == torch.sparse_coo:
        assert actual.is_coalesced() == expected.is_coalesced(), where
        assert tensor_bytes(actual._indices()) == tensor_bytes(expected._indices()), where
        assert tensor_bytes(actual._values()) == tensor_bytes(expected._values()), where
    elif expected.layout in (torch.sparse_csr, torch.sparse_csc, torch.sparse_bsr, torch.sparse_bsc):
        for get in ("crow_indices", "col_indices", "values") if expected.layout in (torch.sparse_csr, torch.sparse_bsr) \
                else ("ccol_indices", "row_indices", "values"):
            assert tensor_bytes(getattr(actual, get)()) == tensor_bytes(getattr(expected, get)()), f"{where}.{get}"
    elif expected.is_nested:
        assert actual.is_nested, where
        a, e = actual.unbind(), expected.unbind()
        assert len(a) == len(e), where
        for i, (x, y) in enumerate(zip(a, e)):
            assert_tensor_same(x, y, f"{where}<{i}>")
    else:  # pragma: no cover - nothing else is produced in these tests
        raise AssertionError(f"{where}: cannot compare layout {expected.layout}")


def assert_same(actual: Any, expected: Any, where: str = "") -> None:
    """Structural equality with ``torch.load``'s result: container types, key order, leaves."""
    if isinstance(expected, torch.Tensor):
        assert_tensor_same(actual, expected, where)
        return
    assert type(actual) is type(expected), f"{where}: {type(actual).__name__} vs {type(expected).__name__}"
    if isinstance(expected, Mapping):
        assert list(actual.keys()) == list(expected.keys()), f"{where}: keys {list(actual)} vs {list(expected)}"
        for k in expected:
            assert_same(actual[k], expected[k], f"{where}.{k}" if where else str(k))
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), f"{where}: length {len(actual)} vs {len(expected)}"
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_same(a, e, f"{where}[{i}]")
    elif isinstance(expected, float) and expected != expected:
        assert actual != actual, where
    else:
        assert actual == expected, f"{where}: {actual!r} vs {expected!r}"


def tensor_leaves(tree: Any, where: str = "") -> list[tuple[str, torch.Tensor]]:
    """``(dotted key, tensor)`` of every tensor below ``tree``, in order."""
    out: list[tuple[str, torch.Tensor]] = []
    if isinstance(tree, torch.Tensor):
        out.append((where, tree))
    elif isinstance(tree, Mapping):
        for k, v in tree.items():
            out += tensor_leaves(v, f"{where}.{k}" if where else str(k))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            out += tensor_leaves(v, f"{where}[{i}]")
    return out


def _storage_id(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def assert_same_ties(actual: Any, expected: Any, only: set[str] | None = None) -> None:
    """Tensors share storage in ``actual`` exactly when they do in ``expected``, at the same
    relative element positions (``data_ptr`` differences). Zero-element tensors are skipped
    (they have no data to share). ``only`` restricts the check to these dotted keys."""
    a = dict(tensor_leaves(actual))
    e = dict(tensor_leaves(expected))
    keys = [k for k in e if e[k].layout == torch.strided and not e[k].is_nested and not e[k].is_quantized
            and e[k].numel() > 0 and (only is None or k in only)]
    for i, k1 in enumerate(keys):
        for k2 in keys[i + 1:]:
            tied_e = _storage_id(e[k1]) == _storage_id(e[k2])
            tied_a = _storage_id(a[k1]) == _storage_id(a[k2])
            assert tied_a == tied_e, f"{k1} / {k2}: shared storage {tied_a}, torch.load {tied_e}"
            if tied_e:
                assert a[k1].data_ptr() - a[k2].data_ptr() == e[k1].data_ptr() - e[k2].data_ptr(), \
                    f"{k1} / {k2}: relative position in the shared storage differs from torch.load"


def file_fingerprint(path: Path) -> tuple[str, int, int]:
    """``(sha256, mtime_ns, size)``: compared before/after a read to prove it wrote nothing."""
    st = os.stat(path)
    return hashlib.sha256(Path(path).read_bytes()).hexdigest(), st.st_mtime_ns, st.st_size


def rewrite_zip(path: Path, replace: dict[str, bytes]) -> None:
    """Rewrite a torch.save zip, replacing the named records' bytes (CRC32s recomputed).

    Keys of ``replace`` are record names without the ``archive/`` prefix (``data.pkl``).
    """
    with zipfile.ZipFile(path) as z:
        records = [(info.filename, z.read(info.filename)) for info in z.infolist()]
    prefix = records[0][0].split("/", 1)[0] + "/"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        for name, data in records:
            z.writestr(name, replace.get(name[len(prefix):], data))


def record_name(path: Path, suffix: str) -> str:
    with zipfile.ZipFile(path) as z:
        return next(n for n in z.namelist() if n.endswith(suffix))


def assert_same_index(ix: Any, ref: Any) -> None:
    """Two indexes of one file (say, from its index file or tables, and from its pickle) say
    the same: entries (dtype, shapes, strides, offsets, storage key, file offset, value),
    zip records and storages."""
    assert list(ix.entries) == list(ref.entries)
    for key, e in ref.entries.items():
        got = ix.entries[key]
        if e.kind == "object":
            assert_same(got.value, e.value, key)
        assert got == e, key
    assert dict(ix.records) == ref.records
    assert {k: (s.dtype, s.numel, s.location) for k, s in ix.storages.items()} == \
        {k: (s.dtype, s.numel, s.location) for k, s in ref.storages.items()}
