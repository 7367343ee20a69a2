"""Hugging Face safetensors checkpoints as a :class:`~dist_restore._format.catalog.Catalog`.

Accepted: one ``.safetensors`` file, or a directory of ``*.safetensors`` files with or
without ``model.safetensors.index.json`` (``{"weight_map": {key: file}}``). With the index,
only the headers of the files holding the wanted keys are read. Each file is an 8-byte
little-endian header length, a JSON header ``{key: {"dtype", "shape", "data_offsets":
[begin, end]}, "__metadata__": {str: str}}`` and the data section, offsets relative to it.

Everything a header says is checked before it is used, with Python integers (no wrap):
the header's length against the file and safetensors' 100 MB cap, the JSON, each dtype,
shape and offset pair, ``shape x dtype`` against the byte length, ranges inside the data
section, not overlapping and filling it back to back (as ``safetensors`` requires), and one
key in one file. A failure raises
:class:`CorruptCheckpointError` naming the file (and the key). No tensor data is read here.
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from dist_restore._base.source import ByteSource, Location, is_url, local_path, location, split
from dist_restore._format.catalog import Catalog, CatalogEntry, Chunk
from dist_restore._format.safetensors import DTYPES
from dist_restore.errors import CorruptCheckpointError

logger = logging.getLogger(__name__)

#: safetensors' own cap on the JSON header (``MAX_HEADER_SIZE`` in its Rust source).
MAX_HEADER = 100_000_000
#: Largest ``model.safetensors.index.json`` read (a 1 TB model's index is a few MB).
MAX_INDEX_JSON = 256 << 20
INDEX_SUFFIX = ".safetensors.index.json"

#: safetensors dtype name -> torch dtype (the names ``safetensors.torch`` reads).
NAMES: dict[str, torch.dtype] = {v: k for k, v in DTYPES.items()} | {
    "F8_E4M3FNUZ": torch.float8_e4m3fnuz, "F8_E5M2FNUZ": torch.float8_e5m2fnuz, "C64": torch.complex64,
}
if hasattr(torch, "float8_e8m0fnu"):
    NAMES["F8_E8M0"] = torch.float8_e8m0fnu


def is_safetensors(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a safetensors checkpoint: a ``.safetensors`` file, or a directory with
    ``*.safetensors`` files (or an index JSON) and no rank files of ours (local, or a URL)."""
    if is_url(path):
        return _remote_kind(str(path)) is not None
    p = local_path(path)
    if p.is_file():
        return p.name.endswith(".safetensors")
    if not p.is_dir():
        return False
    try:
        names = os.listdir(p)
    except OSError:
        return False
    return _holds_safetensors(names)


def _holds_safetensors(names: Iterable[str]) -> bool:
    names = list(names)
    if any(n.startswith("checkpoint_") and n.endswith(".pt") for n in names):
        return False
    return any(n.endswith(".safetensors") or n.endswith(INDEX_SUFFIX) for n in names)


def _remote_kind(url: str) -> str | None:
    """``"file"`` for a URL naming a ``.safetensors`` object, ``"dir"`` for a prefix holding
    them, else ``None``."""
    url = url.rstrip("/")
    if url.endswith(".safetensors"):
        loc, name = split(url)
        if loc.is_file(name):
            return "file"
    loc = location(url)
    return "dir" if _holds_safetensors(loc.files()) else None


def _no_duplicates(file: Path, what: str):  # type: ignore[no-untyped-def]
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in pairs:
            if k in out:
                raise CorruptCheckpointError(f"{what} names key {k!r} twice", file=file, key=k)
            out[k] = v
        return out
    return hook


def _is_int(x: Any) -> bool:
    return type(x) is int  # bool is not a size


def parse_header(file: Any, src: ByteSource, fname: str | None = None,
                 ) -> tuple[dict[str, CatalogEntry], dict[str, str], int]:
    """``({key: entry}, __metadata__, header bytes)`` of one safetensors file (open as ``src``;
    ``file`` names it in errors, ``fname`` in its chunks: default, the last part of ``file``),
    every field checked.

    Raises:
        CorruptCheckpointError: anything malformed, naming the file (and the key).
    """
    size = src.size
    if fname is None:
        fname = str(file).rstrip("/").rsplit("/", 1)[-1]
    if size < 8:
        raise CorruptCheckpointError(f"{size}-byte file is too short for a safetensors header", file=file)
    (n,) = struct.unpack("<Q", src.pread(8, 0))
    if n > MAX_HEADER:
        raise CorruptCheckpointError(f"header length {n} is above safetensors' {MAX_HEADER}-byte cap", file=file)
    if 8 + n > size:
        raise CorruptCheckpointError(f"header length {n} goes beyond the file's {size} bytes", file=file)
    raw = src.pread(n, 8)
    try:
        doc = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates(file, "the header"))
    except CorruptCheckpointError:
        raise
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CorruptCheckpointError(f"header is not valid JSON: {str(e)[:200]}", file=file) from None
    if not isinstance(doc, dict):
        raise CorruptCheckpointError(f"header is a JSON {type(doc).__name__}, not an object", file=file)
    data_start = 8 + n
    data_len = size - data_start
    meta = doc.pop("__metadata__", None)
    if meta is None:
        meta = {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CorruptCheckpointError("__metadata__ must map strings to strings", file=file)
    entries: dict[str, CatalogEntry] = {}
    spans: list[tuple[int, int, str]] = []
    for key, info in doc.items():
        if not isinstance(info, dict):
            raise CorruptCheckpointError(f"header entry is a JSON {type(info).__name__}, not an object",
                                         file=file, key=key)
        name, shape, offs = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        dtype = NAMES.get(name) if isinstance(name, str) else None
        if dtype is None:
            raise CorruptCheckpointError(f"unknown dtype {name!r} (known: {', '.join(sorted(NAMES))})",
                                         file=file, key=key)
        if not isinstance(shape, list) or not all(_is_int(s) and s >= 0 for s in shape):
            raise CorruptCheckpointError(f"shape {shape!r} is not a list of non-negative integers",
                                         file=file, key=key)
        if not (isinstance(offs, list) and len(offs) == 2 and all(_is_int(o) for o in offs)
                and 0 <= offs[0] <= offs[1]):
            raise CorruptCheckpointError(f"data_offsets {offs!r} is not [begin, end] with 0 <= begin <= end",
                                         file=file, key=key)
        begin, end = offs
        if end > data_len:
            raise CorruptCheckpointError(f"data_offsets [{begin}, {end}] lie outside the {data_len}-byte data "
                                         "section", file=file, key=key)
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes != end - begin:
            raise CorruptCheckpointError(f"shape {tuple(shape)} of {name} is {nbytes} bytes, data_offsets "
                                         f"[{begin}, {end}] hold {end - begin}", file=file, key=key)
        shp = tuple(shape)
        entries[key] = CatalogEntry(key, dtype, shp, (Chunk(fname, data_start + begin, (0,) * len(shp), shp),))
        spans.append((begin, end, key))
    spans.sort()
    for (_b0, e0, k0), (b1, _e1, k1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise CorruptCheckpointError(f"data of {k1!r} (from byte {b1}) overlaps {k0!r} (to byte {e0})",
                                         file=file, key=k1)
    # as safetensors itself: the tensors' data lie back to back and fill the data section exactly
    pos = 0
    for b, e, k in spans:
        if b != pos:
            raise CorruptCheckpointError(f"data of {k!r} starts at byte {b} of the data section, where the "
                                         f"previous tensor's ends at {pos}: bytes unclaimed", file=file, key=k)
        pos = e
    if pos != data_len:
        raise CorruptCheckpointError(f"the tensors' data end at byte {pos} of the {data_len}-byte data section",
                                     file=file)
    return entries, meta, data_start


def _read_file_header(loc: Location, f: str) -> tuple[dict[str, CatalogEntry], dict[str, str], int, int]:
    with loc.open(f) as src:
        entries, meta, hdr = parse_header(loc.join(f), src, f)
        return entries, meta, src.size, hdr


def _index_json(loc: Location, names: Iterable[str]) -> str | None:
    names = sorted(n for n in names if n.endswith(INDEX_SUFFIX))
    if not names:
        return None
    if "model" + INDEX_SUFFIX in names:
        return "model" + INDEX_SUFFIX
    if len(names) > 1:
        raise CorruptCheckpointError(f"{len(names)} index files ({', '.join(names)}) and none is "
                                     f"'model{INDEX_SUFFIX}': which one describes the checkpoint?", file=loc.name)
    return names[0]


def read_weight_map(index_file: str | os.PathLike[str], loc: Location | None = None) -> dict[str, str]:
    """``{key: file name}`` of a ``*.safetensors.index.json``, checked.

    Raises:
        CorruptCheckpointError: invalid JSON, no ``weight_map``, a key named twice, or a file
            name that is absolute or leaves the directory.
    """
    if loc is None:
        loc, fname = split(index_file)
    else:
        fname, index_file = str(index_file), loc.join(str(index_file))
    raw = loc.read_bytes(fname, MAX_INDEX_JSON)
    try:
        doc = json.loads(raw.decode("utf-8"),
                         object_pairs_hook=_no_duplicates(index_file, "the weight map"))
    except CorruptCheckpointError as e:
        raise CorruptCheckpointError(f"{e.reason}: the key is in two files", file=index_file, key=e.key) from None
    except (ValueError, RecursionError) as e:
        raise CorruptCheckpointError(f"index is not valid JSON: {str(e)[:200]}", file=index_file) from None
    wm = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(wm, dict):
        raise CorruptCheckpointError("index has no 'weight_map' object", file=index_file)
    for key, name in wm.items():
        if not isinstance(name, str) or not name or name.startswith("/") or ".." in Path(name).parts \
                or "\\" in name:
            raise CorruptCheckpointError(f"weight_map names file {name!r}: not a plain file name in the "
                                         "directory", file=index_file, key=key)
    return wm


def open_catalog(path: str | os.PathLike[str], want: Iterable[str] | None = None) -> tuple[Catalog, tuple[str, ...]]:
    """The catalogue of a safetensors checkpoint and every key it holds.

    Args:
        path: A ``.safetensors`` file or a directory of them.
        want: The keys needed (``None``: all). With an index JSON, only the files holding
            them are opened; their entries are in the catalogue, the others' keys only in
            the returned key list.

    Returns:
        ``(catalogue, every key of the checkpoint in file order)``.

    Raises:
        FileNotFoundError: no such path, or no safetensors file in it.
        CorruptCheckpointError: a malformed header or index, an index naming a missing file
            or a key its file lacks, or one key in two files.
    """
    kind = _remote_kind(str(path)) if is_url(path) else None
    p = local_path(path) if not is_url(path) else None
    if kind == "file" or (p is not None and p.is_file()):
        loc, name = split(path)
        files, wm, index_name = [name], None, None
    elif kind == "dir" or (p is not None and p.is_dir()) or (is_url(path) and location(path).exists()):
        loc = location(path)
        names = loc.files()
        index_name = _index_json(loc, names)
        if index_name is not None:
            wm = read_weight_map(index_name, loc)
            files = list(dict.fromkeys(wm.values()))
        else:
            wm = None
            files = sorted(n for n in names if n.endswith(".safetensors"))
        if not files and index_name is None:
            raise FileNotFoundError(f"no .safetensors file in {loc.name!r}")
    else:
        raise FileNotFoundError(f"checkpoint not found: {str(path)!r}")
    index_file = None if index_name is None else loc.join(index_name)
    if wm is not None:
        wanted = None if want is None else set(want)
        opened = files if wanted is None else list(dict.fromkeys(f for k, f in wm.items() if k in wanted))
        for f in files:
            if not loc.is_file(f):
                raise CorruptCheckpointError(f"the index names file {f!r}, which does not exist", file=index_file,
                                             key=next(k for k, v in wm.items() if v == f))
        all_keys = tuple(wm)
    else:
        opened = files
        all_keys = ()
    entries: dict[str, CatalogEntry] = {}
    where: dict[str, str] = {}
    sizes: dict[str, int] = {}
    metadata: dict[str, dict[str, str]] = {}
    hbytes = 0
    for f in opened:
        got, meta, size, hdr = _read_file_header(loc, f)
        sizes[f], metadata[f] = size, meta
        hbytes += hdr
        for key, entry in got.items():
            if key in where:
                raise CorruptCheckpointError(f"key {key!r} is in two files: {where[key]!r} and {f!r}",
                                             file=loc.join(f), key=key)
            if wm is not None and wm.get(key, f) != f:
                raise CorruptCheckpointError(f"key {key!r} is in two files: {f!r} (its header) and {wm[key]!r} "
                                             "(the index)", file=loc.join(f), key=key)
            if wm is not None and key not in wm:
                logger.debug("%s: key %r is not in the index's weight map; ignored", loc.join(f), key)
                continue
            where[key] = f
            entries[key] = entry
    if wm is not None:
        for key, f in wm.items():
            if f in sizes and key not in where:
                raise CorruptCheckpointError(f"the index puts key {key!r} in {f!r}, whose header lacks it",
                                             file=loc.join(f), key=key)
    else:
        all_keys = tuple(entries)
    return Catalog(loc.root, "safetensors", entries, sizes, metadata, hbytes,
                   location=loc), all_keys


__all__ = ["MAX_HEADER", "NAMES", "is_safetensors", "open_catalog", "parse_header", "read_weight_map"]
