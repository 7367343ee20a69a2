"""Which byte ranges of the rank files make up a whole tensor, in order: pure arithmetic.

A consolidated tensor is written row-major. Where every box of its resharding plan is
contiguous in the target and in its source record (FSDP's ``Shard(0)``: each rank file's
local shard is a run of whole rows), the tensor's bytes are just ranges of the rank files
laid end to end, and can be copied file to file without ever being held in memory. These
functions find those ranges, or say there are none (``None``: strided or interleaved shards,
conj/neg views), from the plan and the records' offsets alone. No I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from dist_restore._base.regions import Box
from dist_restore._format.unpickle import TensorRef


@dataclass(frozen=True, slots=True)
class Segment:
    """``nbytes`` of rank file ``file`` at byte ``offset``, in storage record ``record``.

    Attributes:
        whole: Whether the range is that whole record (its zip CRC32 then covers exactly
            these bytes).
    """

    file: int
    offset: int
    nbytes: int
    record: str
    whole: bool = False


def contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
    """Row-major strides of ``shape``, in elements."""
    out, acc = [], 1
    for s in reversed(shape):
        out.append(acc)
        acc *= max(s, 1)
    return tuple(reversed(out))


def _is_contiguous(size: Sequence[int], stride: Sequence[int]) -> bool:
    """Whether a view of ``size`` with ``stride`` covers one gapless run, in row-major order
    (torch's rule: the stride of a dimension of size 1 does not matter)."""
    expected = 1
    for n, st in zip(reversed(size), reversed(stride)):
        if n != 1 and st != expected:
            return False
        expected *= n
    return True


def _numel(size: Sequence[int]) -> int:
    n = 1
    for s in size:
        n *= s
    return n


def tensor_segments(file: int, ref: TensorRef, data_offset: int, record_size: int) -> list[Segment] | None:
    """The bytes of a whole dense tensor record view ``ref`` (at ``data_offset`` in its file)."""
    if ref.metadata or not _is_contiguous(ref.size, ref.stride):
        return None
    nbytes = ref.nbytes
    if nbytes == 0:
        return []
    start = ref.storage_offset * ref.dtype.itemsize
    whole = start == 0 and nbytes == record_size
    return [Segment(file, data_offset + start, nbytes, ref.storage.key, whole)]


def box_segments(shape: Sequence[int], itemsize: int, pieces: Sequence[tuple[int, TensorRef, Sequence[Box]]],
                 data_offset: Callable[[int, str], int], record_size: Callable[[int, str], int]) -> list[Segment] | None:
    """The bytes of a whole row-major tensor of ``shape`` filled by ``pieces``, in order.

    Args:
        shape: The tensor's (global) shape; ``itemsize`` its element size.
        pieces: ``(file, local tensor reference, boxes copied from it into the tensor)``.
        data_offset: ``(file, storage key) -> byte offset of the record's data in the file``.
        record_size: ``(file, storage key) -> the record's bytes``.

    Returns:
        Ranges whose concatenation is the tensor, or ``None`` when some box is not one
        gapless run on both sides or the boxes do not tile the tensor exactly once.
    """
    dst_strides = contiguous_strides(shape)
    placed: list[tuple[int, Segment]] = []  # (byte offset in the tensor, range)
    for file, ref, boxes in pieces:
        if ref.metadata:
            return None
        isz = ref.dtype.itemsize
        base = data_offset(file, ref.storage.key)
        rsize = record_size(file, ref.storage.key)
        for b in boxes:
            n = _numel(b.size)
            if n == 0:
                continue
            if not _is_contiguous(b.size, dst_strides) or not _is_contiguous(b.size, ref.stride):
                return None
            dst = sum(s * st for s, st in zip(b.dst_start, dst_strides))
            src = ref.storage_offset + sum(s * st for s, st in zip(b.src_start, ref.stride))
            whole = src == 0 and n * isz == rsize
            placed.append((dst * isz, Segment(file, base + src * isz, n * isz, ref.storage.key, whole)))
    placed.sort(key=lambda p: p[0])
    out: list[Segment] = []
    at = 0
    for dst, seg in placed:
        if dst != at:
            return None  # a gap or an overlap: not a plain concatenation
        out.append(seg)  # kept apart even where adjacent: a whole record's CRC32 checks it
        at += seg.nbytes
    if at != _numel(shape) * itemsize:
        return None
    return out
