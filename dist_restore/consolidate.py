"""Consolidate a sharded checkpoint directory into one ``torch.save`` or safetensors file.

:func:`consolidate` writes the full (unsharded) state dict of ``DIR/checkpoint_{rank}.pt``:
every DTensor entry becomes a plain tensor of its global shape, assembled from the byte
ranges of the rank files that hold it (the resharding plan of :mod:`dist_restore._planning.reshard`, the byte
mover of :mod:`dist_restore._bytes.slices`); every other entry comes from rank 0's file. It streams: tensors
are made in pickle order, a batch of at most ``batch_bytes`` (or one larger tensor) at a
time, written out and freed, so the memory it needs is about the largest tensor plus one
batch, however large the checkpoint. Nothing else is loaded: rank 0's file is indexed, the
others only as a tensor needs them.

Steps, in order:

1. Check the checkpoint is committed (manifest sizes, or every rank file present and no
   temp file), index rank 0's file, and check its DeviceMeshes span as many ranks as there
   are rank files. Plan the output from the index alone (``torch``: the nested tree and its
   storage records; ``safetensors``: the header). Nothing is written before this succeeds.
2. Write to a temp file next to the output: ``data.pkl`` (or the header) first, then every
   tensor's bytes as they are made.
3. ``fsync`` the temp file, rename it over the output, ``fsync`` the directory. On any
   failure the temp file is removed: no partial output is ever left under the output name.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from dist_restore._base.source import UrlPath, is_url
from dist_restore._bytes.consolidate_io import ConsolidateProgress, open_index, stream
from dist_restore._consolidate_catalog import consolidate_catalog
from dist_restore._planning.consolidate_plan import plan_safetensors, plan_torch
from dist_restore._gc import paused
from dist_restore._format.index import CheckpointIndex
from dist_restore._format.manifest import (MANIFEST_NAME, IncompleteCheckpointError, check_checkpoint, fsync_dir,
                                    rank_file_count, temp_path, _unlink_quietly)
from dist_restore._paths import raise_with_path
from dist_restore._bytes.read import ReadStats
from dist_restore._format.safetensors import SafetensorsWriter
from dist_restore._planning.shared import SharedSpec, make_selector
from dist_restore._format.torchzip import TorchZipWriter
from dist_restore._sources import source_format

logger = logging.getLogger(__name__)

__all__ = ["ConsolidateProgress", "ConsolidateResult", "Format", "consolidate"]

Format = Literal["torch", "safetensors"]
_FORMATS = ("torch", "safetensors")
_BATCH = 32 << 20  # small tensors are made and written in batches of about this many bytes


@dataclass(frozen=True)
class ConsolidateResult:
    """What :func:`consolidate` wrote.

    Attributes:
        out: The output file.
        format: ``"torch"`` or ``"safetensors"``.
        tensors: Tensor entries written.
        tensor_bytes: Bytes of tensor data written (storage records or tensors).
        file_bytes: Size of the output file.
        rank_files: Rank files in the checkpoint.
        files_read: Rank files opened (indexed or read).
        bytes_read: Bytes of tensor data read from the rank files.
        bytes_copied: Part of them copied file to file by the kernel (whole rows of shards,
            whole records), never held in this process's memory; the rest was assembled
            in memory.
        skipped: Keys of non-tensor values not written (``safetensors`` holds tensors only).
        seconds: Wall time of the whole call.
    """

    out: Path
    format: Format
    tensors: int
    tensor_bytes: int
    file_bytes: int
    rank_files: int
    files_read: int
    bytes_read: int
    bytes_copied: int
    skipped: tuple[str, ...]
    seconds: float


def consolidate(
    directory: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    format: Format = "torch",
    keys: SharedSpec = None,
    force: bool = False,
    verify: bool = True,
    batch_bytes: int = _BATCH,
    progress: Callable[[ConsolidateProgress], None] | None = None,
    max_shard_size: int | str | None = None,
    strip_prefix: str | None = None,
) -> ConsolidateResult:
    """Write the full state dict of a sharded checkpoint directory as one file (or, with
    ``max_shard_size``, a Hugging Face directory of safetensors shards).

    Args:
        directory: The checkpoint directory (``checkpoint_{rank}.pt`` per rank), or a safetensors
            or DCP checkpoint: local, or an object-store URL (``s3://bucket/prefix``).
        out: The file to write.
        format: ``"torch"``: a ``torch.save`` file with the checkpoint's nesting, every
            DTensor a plain tensor of its global shape, loadable by
            ``torch.load(weights_only=True)`` (views of one storage in rank 0's file stay
            views of one storage; every tensor is saved as a CPU tensor).
            ``"safetensors"``: one tensor per dotted key (``model.up.weight``,
            ``optim.state.0.exp_avg``); non-tensor values are left out (see ``skipped``).
        keys: Only the entries these patterns select (key prefixes or globs, as the
            ``shared=`` of a restore; or a predicate on dotted keys). Containers with no
            selected entry are left out, and so are unselected list items.
        force: Replace ``out`` if it exists.
        verify: Check every storage record a tensor is taken from against its zip CRC32
            (the whole record, once, whatever part of it the tensor needs).
        batch_bytes: Tensors smaller than this are made and written in batches of about
            this many bytes; peak memory is about ``max(largest tensor, batch_bytes)``.
        progress: Called after every record written.
        max_shard_size: ``format="safetensors"`` only: ``out`` is a directory (made if
            missing) that receives ``model-0000k-of-0000n.safetensors`` files of at most this
            many bytes each (an int, or ``"5GB"``, ``"500MiB"``; a larger tensor gets a file
            of its own) and ``model.safetensors.index.json``, written last, as
            ``save_pretrained`` lays them out (``from_pretrained`` loads the directory).
        strip_prefix: ``format="safetensors"`` only: remove this prefix from the keys that
            start with it (``"model."``: the names of ``model.state_dict()`` in a checkpoint
            saved as ``{"model": ..., "optim": ...}``).

    Returns:
        What was written.

    Raises:
        ValueError: a bad argument, a pattern that selects nothing, or a dtype the format
            cannot hold.
        FileExistsError: ``out`` exists and ``force`` is false.
        FileNotFoundError: no checkpoint directory, no rank file, or no directory for ``out``.
        IncompleteCheckpointError: uncommitted checkpoint, or rank files missing.
        CorruptCheckpointError: a truncated or corrupt rank file, a CRC32 mismatch, or rank
            files whose layouts do not fit together.
        CheckpointError: a layout consolidate cannot map, or an entry it cannot write
            (quantized, sparse, nested tensors); the message names the key.
    """
    t0 = time.perf_counter()
    if format not in _FORMATS:
        raise ValueError(f"format must be one of {_FORMATS}, got {format!r}")
    if batch_bytes < 0:
        raise ValueError(f"batch_bytes must be >= 0, got {batch_bytes}")
    # a URL (a safetensors or DCP checkpoint in an object store) stays a URL: Path folds s3:// into s3:/
    d, dst = (UrlPath(str(directory).rstrip("/")) if is_url(directory) else Path(directory)), Path(out)
    if (max_shard_size is not None or strip_prefix) and format != "safetensors":
        raise ValueError("max_shard_size and strip_prefix apply to format='safetensors' only")
    shard_limit = parse_size(max_shard_size) if max_shard_size is not None else None
    if shard_limit is None:
        _check_out(d, dst, force)
    else:
        _check_out_dir(d, dst, force)
    fmt = source_format(d)
    if fmt in ("safetensors", "dcp", "rank files"):  # a catalogue (rank files: at a URL), tensor by tensor
        select = make_selector(keys) if keys is not None else (lambda k: True)
        with paused():
            got = consolidate_catalog(
                d, dst, fmt=format, select=select, verify=verify, progress=progress, write_one=_write_file,
                write_shards=None if shard_limit is None else (
                    lambda out, units, write: _write_shards(out, units, shard_limit, write)),
                strip=(lambda units: _strip(units, strip_prefix, d)) if strip_prefix else None)
        got["seconds"] = time.perf_counter() - t0
        return ConsolidateResult(dst, format, **got)
    with paused():
        check_checkpoint(d, world_size=None)
        nfiles = rank_file_count(d)
        if nfiles == 0:
            raise FileNotFoundError(f"no rank files (checkpoint_<rank>.pt) in {str(d)!r}")
        indexes: dict[int, CheckpointIndex] = {0: open_index(d, 0)}
        index0 = indexes[0]
        _check_index(index0, nfiles)
        select = make_selector(keys) if keys is not None else (lambda k: True)
        if format == "torch":
            tree, units, skipped = plan_torch(index0, select)
        else:
            tree, units, skipped = None, *plan_safetensors(index0, select)
            if strip_prefix:
                units = _strip(units, strip_prefix, index0.file)
        n_tensors = sum(1 for e in index0 if e.kind in ("tensor", "dtensor") and select(e.key))
        if n_tensors == 0 and not (format == "torch" and _has_values(index0, select)):
            if keys is None:
                raise ValueError(f"{index0.file} holds no tensor to write")
            shown = "a predicate" if callable(keys) else repr(keys)
            what = "no entry" if format == "torch" else "no tensor"
            raise ValueError(f"keys {shown} select {what} of {index0.file}")
        stats = ReadStats()

        def write(target: Path, part: list[Any]) -> tuple[int, int]:
            def make(fd: int) -> Any:
                if format == "torch":
                    return TorchZipWriter(fd, tree)
                return SafetensorsWriter(fd, [u.out for u in part], {"format": "pt"})
            return _write_file(target, make, lambda w, fd: stream(d, part, indexes, nfiles, w, stats, verify=verify,
                                                                  batch_bytes=batch_bytes, progress=progress, fd=fd))

        if shard_limit is None:
            file_bytes, copied = write(dst, units)
        else:
            file_bytes, copied = _write_shards(dst, units, shard_limit, write)
    result = ConsolidateResult(dst, format, n_tensors, sum(u.nbytes for u in units), file_bytes, nfiles,
                               len(indexes), stats.bytes_read, copied, tuple(skipped), time.perf_counter() - t0)
    logger.info("consolidated %s (%d rank files) into %s: %d tensors, %d bytes in %.2fs", d, nfiles, dst,
                result.tensors, result.tensor_bytes, result.seconds)
    return result


def _write_file(dst: Path, make: Callable[[int], Any], fill: Callable[[Any, int], int]) -> tuple[int, int]:
    """One output file under a temp name, synced and renamed into place; ``(its size, bytes
    copied file to file)``. On failure the temp file is removed."""
    tmp = temp_path(dst)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        try:
            writer = make(fd)
            copied = fill(writer, fd)
            file_bytes = writer.finish()
            os.fsync(fd)
        except OSError as e:  # write, fsync: errors that name no file (a full disk)
            raise_with_path(e, tmp)
        finally:
            os.close(fd)
        os.replace(tmp, dst)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    fsync_dir(dst.parent)
    return file_bytes, copied


def _write_shards(out: Path, units: list[Any], limit: int,
                  write: Callable[[Path, list[Any]], tuple[int, int]]) -> tuple[int, int]:
    """``out/model-0000k-of-0000n.safetensors`` of at most ``limit`` bytes of tensors each,
    then ``model.safetensors.index.json`` (last: a directory without it is unfinished). On
    failure every file written is removed again."""
    groups: list[list[Any]] = []
    size = 0
    for u in units:
        if not groups or (size + u.nbytes > limit and groups[-1]):
            groups.append([])
            size = 0
        groups[-1].append(u)
        size += u.nbytes
    n = len(groups)
    names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)] if n > 1 else ["model.safetensors"]
    out.mkdir(parents=True, exist_ok=True)
    done: list[Path] = []
    total = copied = 0
    try:
        for name, part in zip(names, groups):
            fb, c = write(out / name, part)
            done.append(out / name)
            total, copied = total + fb, copied + c
        index = out / "model.safetensors.index.json"
        doc = {"metadata": {"total_size": sum(u.nbytes for u in units)},
               "weight_map": {u.out.name: name for name, part in zip(names, groups) for u in part}}
        tmp = temp_path(index)
        tmp.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, index)
        fsync_dir(out)
        for stale in os.listdir(out):  # shards of an earlier run (force): not in the index
            if re.fullmatch(r"model(-\d+-of-\d+)?\.safetensors", stale) and stale not in names:
                _unlink_quietly(out / stale)
    except BaseException:
        for f in done:
            _unlink_quietly(f)
        raise
    return total, copied


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """``5GB`` (10^9, as transformers' ``max_shard_size``), ``500MiB``, or an int, in bytes.

    Raises:
        ValueError: not a positive size.
    """
    if isinstance(size, int) and not isinstance(size, bool):
        n = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(size), flags=re.IGNORECASE)
        if not m:
            raise ValueError(f"max_shard_size {size!r} is not a size like 5GB, 500MiB or 1000000")
        n = int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])
    if n < 1:
        raise ValueError(f"max_shard_size must be at least 1 byte, got {size!r}")
    return n


def _strip(units: list[Any], prefix: str, file: Path) -> list[Any]:
    out, seen = [], set()
    for u in units:
        name = u.out.name[len(prefix):] if u.out.name.startswith(prefix) else u.out.name
        if not name or name in seen:
            raise ValueError(f"{file}: stripping {prefix!r} from {u.out.name!r} leaves "
                             f"{'nothing' if not name else 'a name another key has'}")
        seen.add(name)
        out.append(dataclasses.replace(u, out=dataclasses.replace(u.out, name=name)))
    return out


# -- checks ----------------------------------------------------------------------------------


def _check_out_dir(d: Path, dst: Path, force: bool) -> None:
    if dst.exists() and not dst.is_dir():
        raise NotADirectoryError(f"with max_shard_size the output is a directory; {str(dst)!r} is a file")
    if dst.is_dir() and any(n.endswith(".safetensors") or n.endswith(".safetensors.index.json")
                            for n in os.listdir(dst)) and not force:
        raise FileExistsError(f"output directory {str(dst)!r} already holds safetensors files "
                              "(use --force / force=True to replace them)")
    if isinstance(d, Path) and d.is_dir() and dst.resolve() == d.resolve():
        raise ValueError(f"output directory {str(dst)!r} is the checkpoint itself")



def _check_out(d: Path, dst: Path, force: bool) -> None:
    if dst.is_dir():
        raise IsADirectoryError(f"output path is a directory: {str(dst)!r}")
    if (dst.exists() or dst.is_symlink()) and not force:
        raise FileExistsError(f"output file exists: {str(dst)!r} (use --force / force=True to replace it)")
    if not dst.parent.is_dir():
        raise FileNotFoundError(f"output directory does not exist: {str(dst.parent)!r}")
    if isinstance(d, Path) and d.is_dir() and dst.parent.resolve() == d.resolve() and (
            dst.name in (MANIFEST_NAME, ".metadata") or dst.name.endswith(".distcp")
            or (dst.name.startswith("checkpoint_") and dst.name.endswith(".pt"))):
        raise ValueError(f"output {str(dst)!r} would replace a file of the checkpoint itself")


def _check_index(index: CheckpointIndex, nfiles: int) -> None:
    if index.format != "zip" or not index.native_order:
        why = "a legacy (non-zip) torch.save file" if index.format != "zip" else "of the other byte order"
        raise ValueError(f"{index.file} is {why}; consolidate reads zip-format files of this machine's byte "
                         "order: re-save it with torch.save's defaults")
    sizes = {layout.mesh.root_size for layout in index.dtensor_layouts()} - {None}
    if sizes and max(sizes) != nfiles:
        raise IncompleteCheckpointError(
            f"the saved DeviceMesh spans {max(sizes)} ranks, but the checkpoint has {nfiles} rank file(s)"
            + (": rank files are missing" if max(sizes) > nfiles else ""), file=index.file.parent)


def _has_values(index: CheckpointIndex, select: Callable[[str], bool]) -> bool:
    return any(select(e.key) for e in index)


