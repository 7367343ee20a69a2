"""A checkpoint as a catalogue: for each key, its global shape and dtype and the chunks that hold it.

This is the seam between source formats and the engine that reads them. A *format* (a
safetensors directory today) answers one question from its headers and metadata alone,
never reading tensor data and running no code from the file: which chunks of which files
hold each key. The planner (:mod:`dist_restore._planning.catalog`) maps target regions onto
chunks, and the byte mover (:mod:`dist_restore._bytes.ranges`) reads the byte ranges it is
given. Our own per-rank ``torch.save`` files keep their own, faster path
(:mod:`dist_restore._format.index`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass(frozen=True, slots=True)
class Chunk:
    """One stored piece of a tensor: a row-major block of a global region, back to back in a file.

    Attributes:
        file: The file's name, relative to the catalogue's root.
        offset: Byte offset of the region's first element in the file.
        start: Global offsets of the region, per dimension.
        size: The region's size, per dimension (row-major in the file).
        crc32: CRC32 of the chunk's bytes, where the format records one.
    """

    file: str
    offset: int
    start: tuple[int, ...]
    size: tuple[int, ...]
    crc32: int | None = None

    def nbytes(self, dtype: torch.dtype) -> int:
        return math.prod(self.size) * dtype.itemsize


@dataclass(frozen=True, slots=True)
class CatalogEntry:
    """One key of the checkpoint.

    Attributes:
        key: The tensor's name in the files.
        dtype: Its dtype.
        shape: Its global shape.
        chunks: The chunks that hold it (together: every element once).
    """

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    chunks: tuple[Chunk, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class Catalog:
    """Every key of a checkpoint in a non-native format.

    Attributes:
        root: The directory the files lie in.
        format: The format's name (``"safetensors"``).
        entries: ``{key: entry}`` in the files' order.
        file_sizes: ``{file name: size in bytes}`` of every file the entries name, as seen
            when the catalogue was read (a file of another size at read time is an error).
        metadata: Per file, the format's free-form metadata (safetensors' ``__metadata__``).
        header_bytes: Bytes of headers and metadata read to build the catalogue.
    """

    root: Path
    format: str
    entries: Mapping[str, CatalogEntry]
    file_sizes: Mapping[str, int]
    metadata: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    header_bytes: int = 0

    def path(self, file: str) -> Path:
        return self.root / file


__all__ = ["Catalog", "CatalogEntry", "Chunk"]
