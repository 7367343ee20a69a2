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

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from dist_restore._bytes.consolidate_io import ConsolidateProgress, open_index, stream
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
) -> ConsolidateResult:
    """Write the full state dict of a sharded checkpoint directory as one file.

    Args:
        directory: The checkpoint directory (``checkpoint_{rank}.pt`` per rank).
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
    d, dst = Path(directory), Path(out)
    _check_out(d, dst, force)
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
        n_tensors = sum(1 for e in index0 if e.kind in ("tensor", "dtensor") and select(e.key))
        if n_tensors == 0 and not (format == "torch" and _has_values(index0, select)):
            if keys is None:
                raise ValueError(f"{index0.file} holds no tensor to write")
            shown = "a predicate" if callable(keys) else repr(keys)
            what = "no entry" if format == "torch" else "no tensor"
            raise ValueError(f"keys {shown} select {what} of {index0.file}")
        stats = ReadStats()
        tmp = temp_path(dst)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            try:
                if format == "torch":
                    writer: Any = TorchZipWriter(fd, tree)
                else:
                    writer = SafetensorsWriter(fd, [u.out for u in units], {"format": "pt"})
                copied = stream(d, units, indexes, nfiles, writer, stats, verify=verify,
                                 batch_bytes=batch_bytes, progress=progress, fd=fd)
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
    result = ConsolidateResult(dst, format, n_tensors, sum(u.nbytes for u in units), file_bytes, nfiles,
                               len(indexes), stats.bytes_read, copied, tuple(skipped), time.perf_counter() - t0)
    logger.info("consolidated %s (%d rank files) into %s: %d tensors, %d bytes in %.2fs", d, nfiles, dst,
                result.tensors, result.tensor_bytes, result.seconds)
    return result


# -- checks ----------------------------------------------------------------------------------


def _check_out(d: Path, dst: Path, force: bool) -> None:
    if dst.is_dir():
        raise IsADirectoryError(f"output path is a directory: {str(dst)!r}")
    if (dst.exists() or dst.is_symlink()) and not force:
        raise FileExistsError(f"output file exists: {str(dst)!r} (use --force / force=True to replace it)")
    if not dst.parent.is_dir():
        raise FileNotFoundError(f"output directory does not exist: {str(dst.parent)!r}")
    if d.is_dir() and dst.parent.resolve() == d.resolve() and (
            dst.name == MANIFEST_NAME or (dst.name.startswith("checkpoint_") and dst.name.endswith(".pt"))):
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


