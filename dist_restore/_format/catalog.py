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
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dist_restore._base.source import ByteSource, Location, UrlPath, location


@dataclass(frozen=True, slots=True)
class Chunk:
    """One stored piece of a tensor: a row-major block of a global region, back to back in a file.

    Attributes:
        file: The file's name, relative to the catalogue's root.
        offset: Byte offset of the region's first element in the file.
        start: Global offsets of the region, per dimension.
        size: The region's size, per dimension (row-major in the file, unless ``strides``).
        crc32: CRC32 of the chunk's bytes, where the format records one (for a strided chunk:
            of its element span, ``[offset, offset + span bytes)``).
        strides: Element strides in the file, where they are not row-major (``None``: row-major).
    """

    file: str
    offset: int
    start: tuple[int, ...]
    size: tuple[int, ...]
    crc32: int | None = None
    strides: tuple[int, ...] | None = None

    def nbytes(self, dtype: torch.dtype) -> int:
        return math.prod(self.size) * dtype.itemsize

    def span(self, dtype: torch.dtype) -> int:
        """Bytes from the first element to the end of the last, in the file."""
        if self.strides is None or not math.prod(self.size):
            return self.nbytes(dtype)
        return (1 + sum((n - 1) * st for n, st in zip(self.size, self.strides))) * dtype.itemsize


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


def flatten(state_dict: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any, Any, Any]]:
    """``(dotted key, parent container, its key, value)`` of every leaf of nested dicts."""
    for k, v in state_dict.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            yield from flatten(v, key + ".")
        else:
            yield key, state_dict, k, v


class CatalogSource:
    """What a format adds to its catalogue beyond headers: how a target nests into keys, where a
    chunk's bytes start once its file's own framing is read, and its non-tensor values. The
    defaults suit a format of plain tensors at known offsets (safetensors)."""

    def flatten(self, state_dict: Mapping[str, Any]) -> Iterator[tuple[str, Any, Any, Any]]:
        """``(key, parent, its key in the parent, value)`` of each target leaf, keyed as the files key it."""
        return flatten(state_dict)

    def locate(self, catalog: "Catalog", needed: Sequence[tuple["CatalogEntry", Chunk]]) -> dict[Chunk, Chunk]:
        """The chunks ``needed`` with their exact byte offsets, strides and CRC32s (read from the
        files' own framing where the catalogue did not hold them). Default: as they are."""
        return {c: c for _e, c in needed}

    def load_object(self, catalog: "Catalog", key: str) -> Any:
        """The non-tensor value stored under ``key`` (one of ``catalog.objects``)."""
        raise KeyError(key)

    def nest(self, values: dict[str, Any]) -> dict[str, Any]:
        """The result of a restore with no target: ``{key: value}`` as the checkpoint nested it."""
        return values

    def parameter(self, key: str) -> bool | None:
        """Whether the tensor ``key`` was saved as an ``nn.Parameter`` with ``requires_grad``
        (``None``: not a Parameter)."""
        return None


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
        objects: Keys of non-tensor values, with where they lie (format-specific).
        source: The format's hooks (:class:`CatalogSource`).
        location: Where the files are read from (a local directory or an object-store prefix;
            default: ``root``).
    """

    root: Path | str
    format: str
    entries: Mapping[str, CatalogEntry]
    file_sizes: Mapping[str, int]
    metadata: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    header_bytes: int = 0
    objects: Mapping[str, Any] = field(default_factory=dict)
    source: CatalogSource = field(default_factory=CatalogSource)
    location: Location | None = None

    def __post_init__(self) -> None:
        if self.location is None:
            object.__setattr__(self, "location", location(self.root))

    def path(self, file: str) -> Path | str:
        """The file's path (a URL in an object store), as errors name it."""
        if isinstance(self.root, Path):
            return self.root / file
        return UrlPath(self.root) / file

    def open(self, file: str) -> ByteSource:
        """``file`` open for range reads."""
        return self.location.open(file)  # type: ignore[union-attr]


__all__ = ["Catalog", "CatalogEntry", "CatalogSource", "Chunk", "flatten"]
