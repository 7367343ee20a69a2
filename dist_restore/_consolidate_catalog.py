"""``consolidate`` of a catalogue source (a DCP directory; safetensors too): the full state dict as
one ``torch.save`` file (as DCP's ``dcp_to_torch_save`` writes it, but streaming, with nothing in
the checkpoint run) or as safetensors.

One tensor at a time: allocated whole, filled from the byte ranges of its chunks (each chunk is
then read whole, so each record's CRC32 is checked), written, freed. The memory it needs is about
the largest tensor. Non-tensor values (DCP's ``BytesStorageMetadata`` entries) are unpickled with
the weights-only allowlist and go into ``data.pkl``; safetensors holds tensors only, so they are
listed as skipped there.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dist_restore._bytes.consolidate_io import ConsolidateProgress
from dist_restore._bytes.ranges import read_catalog_jobs
from dist_restore._format.catalog import Catalog
from dist_restore._format.safetensors import TensorSpec
from dist_restore._format.torchzip import StorageOut, TensorOut
from dist_restore._planning.catalog import plan_catalog

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Unit:
    """One tensor of the output: its key in the checkpoint and its record (or header entry)."""

    key: str
    out: StorageOut | TensorSpec
    value: torch.Tensor | None = None  # a tensor inside a non-tensor value: already in memory

    @property
    def nbytes(self) -> int:
        return self.out.nbytes


def _contiguous(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, acc = [], 1
    for n in reversed(shape):
        stride.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(stride))


def plan_units(catalog: Catalog, order: tuple[str, ...], select: Callable[[str], bool],
               fmt: str) -> tuple[Any, list[Unit], list[str], int]:
    """``(data.pkl's tree or None, units in order, skipped keys, tensors)`` for the selected keys."""
    units: list[Unit] = []
    values: dict[str, Any] = {}
    skipped: list[str] = []
    for key in order:
        if not select(key):
            continue
        e = catalog.entries.get(key)
        if e is None:
            if key not in catalog.objects:
                continue
            if fmt == "torch":  # its tensors become records of the output, as torch.save writes them
                values[key] = _described(catalog.source.load_object(catalog, key), key, units)
            else:
                skipped.append(key)
            continue
        if fmt == "torch":
            numel = 1
            for n in e.shape:
                numel *= n
            st = StorageOut(str(len(units)), e.dtype, numel)
            grad = catalog.source.parameter(key)
            values[key] = TensorOut(st, 0, e.shape, _contiguous(e.shape), bool(grad), grad is not None)
            units.append(Unit(key, st))
        else:
            units.append(Unit(key, TensorSpec(key, e.dtype, e.shape)))
    tree = catalog.source.nest(values) if fmt == "torch" else None
    return tree, units, skipped, len(units)


def _described(value: Any, key: str, units: list[Unit]) -> Any:
    """``value`` with every dense tensor in its containers replaced by a :class:`TensorOut` of a
    new record (a unit that holds the tensor), so that ``data.pkl`` rebuilds it as ``torch.save``
    does, loadable with ``weights_only=True`` (the tensor itself would pickle through
    ``torch.storage._load_from_bytes``)."""
    if isinstance(value, torch.Tensor):
        t = value.detach().contiguous()
        st = StorageOut(str(len(units)), t.dtype, t.numel())
        units.append(Unit(key, st, t))
        return TensorOut(st, 0, tuple(t.shape), _contiguous(tuple(t.shape)), bool(value.requires_grad),
                         isinstance(value, torch.nn.Parameter))
    if isinstance(value, dict):
        out = type(value)() if type(value) in (dict, collections.OrderedDict) else {}
        for k, v in value.items():
            out[k] = _described(v, key, units)
        return out
    if type(value) in (list, tuple):
        return type(value)(_described(v, key, units) for v in value)
    return value


def stream(catalog: Catalog, units: list[Unit], writer: Any, *, verify: bool,
           progress: Callable[[ConsolidateProgress], None] | None, counters: dict[str, int]) -> int:
    """Make each unit's tensor and write it; returns bytes copied file to file (none: every
    tensor passes through memory, so that its records' CRC32s are checked)."""
    total = sum(u.nbytes for u in units)
    done = 0
    for i, u in enumerate(units):
        if u.value is not None:  # (read and checked with its value)
            t = u.value
        else:
            e = catalog.entries[u.key]
            t = torch.empty(e.shape, dtype=e.dtype)
            plan = plan_catalog(catalog, (u.key,), {u.key: t})
            with torch.no_grad():
                nbytes, _files, _verified = read_catalog_jobs(catalog, plan.jobs, verify=verify)
            counters["bytes_read"] += nbytes
        writer.begin(u.out)
        if t.numel():
            writer.write(t.reshape(-1).view(torch.uint8).numpy())
        writer.end()
        done += u.nbytes
        if progress is not None:
            progress(ConsolidateProgress(i + 1, len(units), done, total, u.key))
    return 0


def consolidate_catalog(src: Path, dst: Path, *, fmt: str, select: Callable[[str], bool], verify: bool,
                        progress: Callable[[ConsolidateProgress], None] | None,
                        write_one: Callable[..., tuple[int, int]],
                        write_shards: Callable[..., tuple[int, int]] | None,
                        strip: Callable[[list[Unit]], list[Unit]] | None) -> dict[str, Any]:
    """The catalogue path of :func:`dist_restore.consolidate.consolidate` (which owns the output
    checks and the atomic writes: ``write_one(target, make_writer, fill)``)."""
    from dist_restore._format.safetensors import SafetensorsWriter
    from dist_restore._format.torchzip import TorchZipWriter
    from dist_restore._sources import _open

    t0 = time.perf_counter()
    catalog, order = _open(src, None)
    tree, units, skipped, n = plan_units(catalog, order, select, fmt)
    if n == 0 and not (fmt == "torch" and tree):
        raise ValueError(f"{src}: the keys selected hold no {'entry' if fmt == 'torch' else 'tensor'} to write")
    if strip is not None:
        units = strip(units)
    counters = {"bytes_read": 0}

    def write(target: Path, part: list[Unit]) -> tuple[int, int]:
        def make(fd: int) -> Any:
            if fmt == "torch":
                return TorchZipWriter(fd, tree)
            return SafetensorsWriter(fd, [u.out for u in part], {"format": "pt"})
        return write_one(target, make, lambda w, fd: stream(catalog, part, w, verify=verify, progress=progress,
                                                            counters=counters))

    if write_shards is None:
        file_bytes, copied = write(dst, units)
    else:
        file_bytes, copied = write_shards(dst, units, write)
    files = len({c.file for u in units if u.value is None for c in catalog.entries[u.key].chunks})
    return {"tensors": n, "tensor_bytes": sum(u.nbytes for u in units), "file_bytes": file_bytes,
            "rank_files": len(catalog.file_sizes), "files_read": files, "bytes_read": counters["bytes_read"],
            "bytes_copied": copied, "skipped": tuple(skipped), "seconds": time.perf_counter() - t0}


__all__ = ["Unit", "consolidate_catalog", "plan_units", "stream"]
