"""Writing a ``torch.save`` file one storage at a time.

``torch.save`` pickles the whole object first and holds every tensor while it writes. Here
the pickle is made from *descriptions* of the tensors (:class:`TensorOut`: dtype, shape,
stride and the key of a storage record yet to be written), so ``data.pkl`` goes first,
exactly as ``torch.save`` writes it, and each storage record follows as its bytes become
available. The records are what ``torch.save`` writes (``data.pkl``, ``.format_version``,
``.storage_alignment``, ``byteorder``, ``data/{key}``, ``version``,
``.data/serialization_id``), aligned for ``torch.load(mmap=True)``, so
``torch.load(weights_only=True)`` reads the file. The zip is written here rather than by
torch's ``PyTorchFileWriter``, which takes each record whole from memory: a record can then
be copied from the rank files by the kernel, never passing through this process. Nothing here
reads a checkpoint.
"""

from __future__ import annotations

import collections
import io
import pickle
import secrets
import struct
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from dist_restore._base.crc import crc32_buf
from dist_restore._base.crc import crc32_combine
from dist_restore._base.fcopy import copy_range, pwrite_all

_PROTOCOL = 2  # torch.save's DEFAULT_PROTOCOL
_ALIGNMENT = 64  # torch.serialization's default storage alignment
_STORAGE_TYPES = torch.storage._dtype_to_storage_type_map()  # dtype -> "FloatStorage", ...
_U32 = 0xFFFFFFFF
_ZIP64_AT = _U32  # sizes and offsets from here on go in zip64 fields (tests lower it)
_LOCAL = struct.Struct("<4sHHHHHLLLHH")
_CENTRAL = struct.Struct("<4sHHHHHHLLLHHHHHLL")


@dataclass(frozen=True, slots=True)
class StorageOut:
    """A storage record of the output: ``data/{key}``, ``numel`` elements of ``dtype``."""

    key: str
    dtype: torch.dtype
    numel: int

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


@dataclass(frozen=True, slots=True)
class TensorOut:
    """A dense tensor of the output: a view of a :class:`StorageOut`, pickled as
    ``torch.save`` pickles a CPU tensor (``_rebuild_tensor_v2``, or ``_v3`` for dtypes
    without a typed storage class; ``_rebuild_parameter`` around it for a Parameter)."""

    storage: StorageOut
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    requires_grad: bool = False
    is_parameter: bool = False
    metadata: Mapping[str, bool] | None = None

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        hooks: collections.OrderedDict[Any, Any] = collections.OrderedDict()
        if self.is_parameter:
            inner = TensorOut(self.storage, self.offset, self.size, self.stride, False, False, self.metadata)
            return torch._utils._rebuild_parameter, (inner, self.requires_grad, hooks)
        size, stride = torch.Size(self.size), tuple(self.stride)
        if self.storage.dtype in _STORAGE_TYPES:
            args: tuple[Any, ...] = (self.storage, self.offset, size, stride, self.requires_grad, hooks)
            if self.metadata:
                args += (dict(self.metadata),)
            return torch._utils._rebuild_tensor_v2, args
        args = (self.storage, self.offset, size, stride, self.requires_grad, hooks, self.storage.dtype)
        if self.metadata:
            args += (dict(self.metadata),)
        return torch._utils._rebuild_tensor_v3, args


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, StorageOut):
            name = _STORAGE_TYPES.get(obj.dtype)
            if name is None:  # torch.save: an untyped storage of bytes, the dtype in the rebuild call
                return ("storage", torch.UntypedStorage, obj.key, "cpu", obj.nbytes)
            return ("storage", getattr(torch, name), obj.key, "cpu", obj.numel)
        return None


def pickle_tree(tree: Any) -> bytes:
    """``data.pkl`` for ``tree`` (containers, plain values and :class:`TensorOut` leaves)."""
    buf = io.BytesIO()
    _Pickler(buf, protocol=_PROTOCOL).dump(tree)
    return buf.getvalue()


class ZipWriter:
    """A stored (uncompressed) zip written to a file descriptor, as torch's writer lays it out:
    every record's data aligned to 64 bytes by an ``FB`` padding extra field, zip64 fields
    where sizes or offsets need them, a zip64 end record always. Times are zero, so the
    same input gives the same bytes.

    A record's bytes come from memory (:meth:`write`, CRC32 computed here) or from another
    file (:meth:`copy`: ``copy_file_range``, in the kernel, reflinked where the filesystem
    can; the caller gives the CRC32 of the bytes). The local header is written first with the
    sizes and patched with the CRC32 when the record ends; no data descriptors.
    """

    def __init__(self, fd: int, archive: str = "archive", alignment: int = _ALIGNMENT) -> None:
        self.fd = fd
        self.pos = 0
        self._prefix = archive + "/"
        self._align = alignment
        self._central: list[tuple[bytes, int, int, int]] = []  # name, header offset, size, crc
        self._open: tuple[bytes, int, int] | None = None  # name, header offset, size
        self._crc = 0
        self._got = 0

    def _pwrite(self, data: Any, pos: int) -> None:
        pwrite_all(self.fd, data, pos)

    def add(self, name: str, data: bytes) -> None:
        """A whole small record from memory."""
        self.begin(name, len(data))
        self.write(data)
        self.end()

    def begin(self, name: str, nbytes: int) -> None:
        """Start a record of exactly ``nbytes`` bytes."""
        if self._open is not None:
            raise ValueError(f"record {self._open[0]!r} is still open")
        raw = (self._prefix + name).encode("utf-8")
        big = nbytes >= _ZIP64_AT
        extra = struct.pack("<HHQQ", 1, 16, nbytes, nbytes) if big else b""
        used = self.pos + _LOCAL.size + len(raw) + len(extra)
        pad = -(used + 4) % self._align
        extra += struct.pack("<HH", 0x4246, pad) + b"Z" * pad  # "FB": torch's padding field
        size32 = _U32 if big else nbytes
        header = _LOCAL.pack(b"PK\x03\x04", 45 if big else 20, 0x0800, 0, 0, 0, 0, size32, size32,
                             len(raw), len(extra))
        self._pwrite(header + raw + extra, self.pos)
        self._open = (raw, self.pos, nbytes)
        self.pos += len(header) + len(raw) + len(extra)
        self._crc = self._got = 0

    def write(self, data: Any) -> None:
        """Append bytes of the open record from memory."""
        view = memoryview(data).cast("B")
        self._pwrite(view, self.pos)
        self._crc = crc32_buf(view, self._crc)
        self._advance(len(view))

    def copy(self, src_fd: int, src_offset: int, nbytes: int, crc: int) -> None:
        """Append ``nbytes`` of ``src_fd`` at ``src_offset`` (whose CRC32 is ``crc``), copied
        by the kernel."""
        if self._open is None:
            raise ValueError("no open record")
        copy_range(src_fd, src_offset, self.fd, self.pos, nbytes)
        self._crc = crc32_combine(self._crc, crc, nbytes)
        self._advance(nbytes)

    def _advance(self, n: int) -> None:
        if self._open is None:
            raise ValueError("no open record")
        self.pos += n
        self._got += n
        if self._got > self._open[2]:
            raise ValueError(f"record {self._open[0].decode()!r}: {self._got} bytes written, {self._open[2]} planned")

    def end(self) -> None:
        """Close the open record: check its size, write its CRC32 into its local header."""
        if self._open is None:
            raise ValueError("no open record")
        raw, offset, nbytes = self._open
        if self._got != nbytes:
            raise ValueError(f"record {raw.decode()!r}: {self._got} bytes written, {nbytes} planned")
        self._pwrite(struct.pack("<L", self._crc & _U32), offset + 14)
        self._central.append((raw, offset, nbytes, self._crc & _U32))
        self._open = None

    def finish(self) -> int:
        """Write the central directory and end records; returns the file size."""
        if self._open is not None:
            raise ValueError(f"record {self._open[0].decode()!r} is still open")
        parts = []
        for raw, offset, nbytes, crc in self._central:
            big, far = nbytes >= _ZIP64_AT, offset >= _ZIP64_AT
            z64 = (struct.pack("<Q", nbytes) * 2 if big else b"") + (struct.pack("<Q", offset) if far else b"")
            extra = struct.pack("<HH", 1, len(z64)) + z64 if z64 else b""
            size32 = _U32 if big else nbytes
            parts.append(_CENTRAL.pack(b"PK\x01\x02", 45, 45 if z64 else 20, 0x0800, 0, 0, 0, crc, size32, size32,
                                       len(raw), len(extra), 0, 0, 0, 0, _U32 if far else offset) + raw + extra)
        central = b"".join(parts)
        cd_offset, n = self.pos, len(self._central)
        eocd64_at = cd_offset + len(central)
        tail = struct.pack("<4sQHHLLQQQQ", b"PK\x06\x06", 44, 45, 45, 0, 0, n, n, len(central), cd_offset)
        tail += struct.pack("<4sLQL", b"PK\x06\x07", 0, eocd64_at, 1)
        tail += struct.pack("<4sHHHHLLH", b"PK\x05\x06", 0, 0, min(n, 0xFFFF), min(n, 0xFFFF),
                            min(len(central), _U32), min(cd_offset, _U32), 0)
        self._pwrite(central + tail, self.pos)
        self.pos += len(central) + len(tail)
        return self.pos


class TorchZipWriter:
    """Writes one ``torch.save`` file to an open file descriptor, record by record.

    ``w = TorchZipWriter(fd, tree)`` writes ``data.pkl`` and the small records; then, for
    every :class:`StorageOut` in ``tree`` (any order): :meth:`begin`, its bytes by
    :meth:`write` (from memory) and :meth:`copy` (from files), :meth:`end`; then :meth:`finish`.
    """

    needs_crc = True  # copy() must be given the CRC32 of the bytes it copies

    def __init__(self, fd: int, tree: Any) -> None:
        self.zip = ZipWriter(fd)
        self.zip.add("data.pkl", pickle_tree(tree))
        self.zip.add(".format_version", b"1")
        self.zip.add(".storage_alignment", str(_ALIGNMENT).encode())
        self.zip.add("byteorder", sys.byteorder.encode())

    @property
    def pos(self) -> int:
        """Bytes written so far."""
        return self.zip.pos

    def begin(self, storage: StorageOut) -> None:
        self.zip.begin(f"data/{storage.key}", storage.nbytes)

    def write(self, data: Any) -> None:
        self.zip.write(data)

    def copy(self, src_fd: int, src_offset: int, nbytes: int, crc: int | None) -> None:
        if crc is None:
            raise ValueError("a torch.save record needs the CRC32 of what is copied into it")
        self.zip.copy(src_fd, src_offset, nbytes, crc)

    def end(self) -> None:
        self.zip.end()

    def finish(self) -> int:
        """Write the small trailing records torch writes and the zip directory; returns the file size."""
        self.zip.add("version", b"3\n")
        self.zip.add(".data/serialization_id", str(secrets.randbits(128)).zfill(40).encode())
        return self.zip.finish()
