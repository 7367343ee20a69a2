"""Writing a safetensors file one tensor at a time, without the ``safetensors`` package.

The format: an 8-byte little-endian header length, a JSON header ``{name: {"dtype",
"shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}`` (padded with spaces
to a multiple of 8 bytes), then the tensors' bytes, row-major, back to back in header order.
The header comes first, so every offset is computed from dtypes and shapes before any data
is written. Nothing here reads a checkpoint.
"""

from __future__ import annotations

import json
import struct
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from dist_restore._base.fcopy import copy_range, pwrite_all

#: torch dtype -> safetensors dtype name (the names ``safetensors.torch`` uses).
DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint64: "U64", torch.uint32: "U32", torch.uint16: "U16", torch.uint8: "U8", torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One tensor of the output, in header order."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for s in self.shape:
            n *= s
        return n


def unsupported(dtype: torch.dtype) -> str | None:
    """Why safetensors cannot hold ``dtype``, or ``None`` if it can."""
    if dtype in DTYPES:
        return None
    return f"safetensors has no dtype for {dtype} (supported: {', '.join(sorted(set(DTYPES.values())))})"


def header(specs: Sequence[TensorSpec], metadata: Mapping[str, str] | None = None) -> bytes:
    """The 8-byte length and the padded JSON header for ``specs``, in order."""
    doc: dict[str, object] = {}
    if metadata:
        doc["__metadata__"] = dict(metadata)
    offset = 0
    for s in specs:
        if s.name in doc:
            raise ValueError(f"duplicate tensor name {s.name!r}")
        doc[s.name] = {"dtype": DTYPES[s.dtype], "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    text = json.dumps(doc, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


class SafetensorsWriter:
    """Writes one safetensors file to an open file descriptor: the header at once; then for
    every spec, in header order, :meth:`begin`, its bytes by :meth:`write` (from memory) and
    :meth:`copy` (from files, by the kernel), :meth:`end`; then :meth:`finish`."""

    needs_crc = False

    def __init__(self, fd: int, specs: Sequence[TensorSpec], metadata: Mapping[str, str] | None = None) -> None:
        if sys.byteorder != "little":  # pragma: no cover - no big-endian test machine
            raise ValueError("safetensors stores little-endian data; this machine is big-endian")
        self._fd = fd
        self._specs = list(specs)
        self._next = 0
        self._open: TensorSpec | None = None
        self._got = 0
        self.pos = pwrite_all(fd, header(self._specs, metadata), 0)

    def begin(self, spec: TensorSpec) -> None:
        expected = self._specs[self._next] if self._next < len(self._specs) else None
        if self._open is not None or expected is None or spec != expected:
            raise ValueError(f"tensor {spec.name!r} written out of header order (expected "
                             f"{expected.name if expected else 'nothing'!r})")
        self._open, self._got = spec, 0

    def _advance(self, n: int) -> None:
        if self._open is None:
            raise ValueError("no open tensor")
        self.pos += n
        self._got += n
        if self._got > self._open.nbytes:
            raise ValueError(f"tensor {self._open.name!r}: {self._got} bytes written, header says "
                             f"{self._open.nbytes}")

    def write(self, data: object) -> None:
        self._advance(pwrite_all(self._fd, data, self.pos))

    def copy(self, src_fd: int, src_offset: int, nbytes: int, crc: int | None = None) -> None:
        if self._open is None:
            raise ValueError("no open tensor")
        copy_range(src_fd, src_offset, self._fd, self.pos, nbytes)
        self._advance(nbytes)

    def end(self) -> None:
        if self._open is None or self._got != self._open.nbytes:
            raise ValueError(f"tensor {self._open.name if self._open else None!r}: {self._got} bytes written")
        self._open = None
        self._next += 1

    def finish(self) -> int:
        """Check every tensor was written; returns the file size."""
        if self._next != len(self._specs):
            raise ValueError(f"{len(self._specs) - self._next} tensor(s) of the header were not written")
        return self.pos
