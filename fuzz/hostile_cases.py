"""Hostile checkpoint files: one builder per kind of breakage listed in issue #23.

Each ``case_*`` function takes an empty directory, writes a crafted checkpoint into it (a real
small checkpoint made with ``torch.save`` / :class:`dist_restore.CheckpointWriter` / a DTensor
state dict, then edited at the byte level: zip fields, pickle opcodes, index-file sections,
layout values, manifest JSON) and returns a :class:`Case`: what the file is and how to exercise
it (a list of :data:`Exercise` dicts that :mod:`fuzz.run_cases` runs, each in its own process).

An exercise is a plain dict (it crosses a process boundary as JSON)::

    {"api": "read",        "dir": D}                    CheckpointReader(RankInfo(0, 1)).read(D)
    {"api": "load",        "dir": D, "target": T}       CheckpointReader(RankInfo(0, 1)).load(D, T)
    {"api": "restore",     "dir": D, "target": T|None}  RestoreCoordinator().restore(D, T), one process
    {"api": "reshard",     "dir": D, "target": T}       the same under a 1-rank gloo group (DTensor targets)
    {"api": "read_index",  "file": F}                   dist_restore.read_index(F).entries
    {"api": "cli",         "args": [...]}               python -m dist_restore ARGS (cli.main, in process)
    {"api": "find_latest", "root": R}                   dist_restore.find_latest_checkpoint(R)

A target ``T`` is ``{key: ["zeros", shape, dtype]}`` or ``{key: ["dtensor", shape, dtype,
[["S", dim] | ["R"], ...]]}`` (a DTensor on a 1-D mesh of the 1-rank group). ``oracle`` names the
rank file whose ``torch.load(weights_only=True)`` the result is compared with (``None``: nothing
to compare, e.g. DTensor files or CLI calls).

Files stay small: a few hundred bytes to ~1 MB each.
"""

from __future__ import annotations

import collections
import io
import json
import pickle
import pickletools
import struct
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

Exercise = dict[str, Any]

MANIFEST = "dist_restore_manifest.json"


@dataclass
class Case:
    """A crafted checkpoint and how to run it."""

    name: str
    kind: str  # the words for this kind of breakage
    exercises: list[Exercise]
    oracle: str | None  # rank file for torch.load(weights_only=True), or None
    note: str = ""
    files: list[str] = field(default_factory=list)


CASES: dict[str, Callable[[Path], Case]] = {}


def case(fn: Callable[[Path], Case]) -> Callable[[Path], Case]:
    CASES[fn.__name__.removeprefix("case_")] = fn
    return fn


# ---------------------------------------------------------------------------------------------
# zip: read a torch.save archive's records, write them back as torch does (stored, data aligned
# to 64 bytes by an 'FB' extra field), with hooks on the central directory
# ---------------------------------------------------------------------------------------------

_LOCAL = struct.Struct("<4s5H3L2H")
_CDIR = struct.Struct("<4s6H3L5H2L")
_EOCD = struct.Struct("<4s4H2LH")
_EOCD64 = struct.Struct("<4sQ2H2L4Q")
_EOCD64_LOC = struct.Struct("<4sLQL")


def read_zip(path: Path) -> list[tuple[str, bytes]]:
    """Every record of a zip, in directory order."""
    with zipfile.ZipFile(path) as z:
        return [(i.filename, z.read(i)) for i in z.infolist()]


def local_record(out: bytearray, name: str, data: bytes, *, align: int = 64) -> dict[str, Any]:
    """Append one stored record (local header, name, padding extra, data) to ``out``; its
    central-directory entry (a dict :func:`finish_zip` writes)."""
    nb = name.encode("utf-8")
    hoff = len(out)
    pad = (-(hoff + _LOCAL.size + len(nb) + 4)) % align
    extra = struct.pack("<HH", 0x4246, pad) + b"Z" * pad
    crc = zlib.crc32(data)
    out += _LOCAL.pack(b"PK\x03\x04", 20, 0, 0, 0, 0, crc, len(data), len(data), len(nb), len(extra))
    out += nb + extra + data
    return {"name": nb, "hoff": hoff, "size": len(data), "csize": len(data), "crc": crc, "method": 0}


def finish_zip(out: bytearray, cd: list[dict[str, Any]], *, force_zip64: bool = False) -> bytes:
    """Append the central directory of ``cd`` (zip64 extra fields for values >= 2^32-1) and
    its end records."""
    cd_off = len(out)
    body = bytearray()
    for e in cd:
        usize, csize, hoff = e["size"], e["csize"], e["hoff"]
        z = []
        if usize >= 0xFFFFFFFF or e.get("zip64"):
            z.append(usize)
            usize = 0xFFFFFFFF
        if csize >= 0xFFFFFFFF or e.get("zip64"):
            z.append(csize)
            csize = 0xFFFFFFFF
        if hoff >= 0xFFFFFFFF or e.get("zip64"):
            z.append(hoff)
            hoff = 0xFFFFFFFF
        extra = (struct.pack("<HH", 1, 8 * len(z)) + b"".join(struct.pack("<Q", v) for v in z)) if z else b""
        if "extra" in e:  # a hand-made extra field (the 0xFFFFFFFF markers above stay)
            extra = e["extra"]
        body += _CDIR.pack(b"PK\x01\x02", 0x031E, 45 if z else 20, 0, e["method"], 0, 0, e["crc"], csize, usize,
                           len(e["name"]), len(extra), 0, 0, 0, 0, hoff) + e["name"] + extra
    out += body
    n = len(cd)
    if force_zip64 or n >= 0xFFFF:
        at = len(out)
        out += _EOCD64.pack(b"PK\x06\x06", 44, 45, 45, 0, 0, n, n, len(body), cd_off)
        out += _EOCD64_LOC.pack(b"PK\x06\x07", 0, at, 1)
        out += _EOCD.pack(b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    else:
        out += _EOCD.pack(b"PK\x05\x06", 0, 0, n, n, len(body), cd_off, 0)
    return bytes(out)


def write_zip(path: Path, records: list[tuple[str, bytes]],
              cd_hook: Callable[[list[dict[str, Any]], bytearray], list[dict[str, Any]]] | None = None,
              **kw: Any) -> None:
    out = bytearray()
    cd = [local_record(out, n, d) for n, d in records]
    if cd_hook is not None:
        cd = cd_hook(cd, out)
    path.write_bytes(finish_zip(out, cd, **kw))


def prefix_of(records: list[tuple[str, bytes]]) -> str:
    return next(n for n, _ in records if n.endswith("/data.pkl"))[: -len("data.pkl")]


def replace_record(records: list[tuple[str, bytes]], name: str, data: bytes) -> list[tuple[str, bytes]]:
    return [(n, data if n == name else d) for n, d in records]


# ---------------------------------------------------------------------------------------------
# pickle: opcode-level edits, and a pickler for tensor records with any field values
# ---------------------------------------------------------------------------------------------

def enc_int(v: int) -> bytes:
    """The shortest opcode that pushes the int ``v``."""
    if 0 <= v < 256:
        return b"K" + bytes([v])
    if 0 <= v < 65536:
        return b"M" + struct.pack("<H", v)
    if -(1 << 31) <= v < (1 << 31):
        return b"J" + struct.pack("<i", v)
    raw = pickle.encode_long(v)
    return b"\x8a" + bytes([len(raw)]) + raw


def enc_str(s: str) -> bytes:
    b = s.encode("utf-8")
    return b"X" + struct.pack("<I", len(b)) + b


def ops(data: bytes) -> list[tuple[str, Any, int]]:
    """``(opcode name, argument, byte position)`` of every opcode, STOP included."""
    return [(op.name, arg, pos) for op, arg, pos in pickletools.genops(data)]


def splice(data: bytes, edits: dict[int, bytes]) -> bytes:
    """``data`` with opcode number ``i`` replaced by ``edits[i]`` (an empty bytes deletes it;
    memo indices are by number, not position, so nothing else changes)."""
    lst = ops(data)
    bounds = [p for _, _, p in lst] + [len(data)]
    out = bytearray()
    for i in range(len(lst)):
        out += edits.get(i, data[bounds[i] : bounds[i + 1]])
    return bytes(out)


def insert_before(data: bytes, i: int, blob: bytes) -> bytes:
    pos = ops(data)[i][2]
    return data[:pos] + blob + data[pos:]


def value_after(lst: list[tuple[str, Any, int]], key: str, nth: int = 0) -> int:
    """The opcode number of the value that follows the string ``key`` (a dict item's value,
    skipping the memo put after the key)."""
    seen = 0
    for i, (name, arg, _p) in enumerate(lst):
        if name in ("BINUNICODE", "SHORT_BINUNICODE", "UNICODE") and arg == key:
            if seen == nth:
                j = i + 1
                while lst[j][0] in ("BINPUT", "LONG_BINPUT", "MEMOIZE"):
                    j += 1
                return j
            seen += 1
    raise KeyError(key)


def after_empty_dict(lst: list[tuple[str, Any, int]]) -> int:
    """The opcode number just after the top-level dict (and its memo put): items inserted there
    are set on it with SETITEM."""
    i = next(i for i, (n, _a, _p) in enumerate(lst) if n == "EMPTY_DICT")
    i += 1
    while lst[i][0] in ("BINPUT", "LONG_BINPUT", "MEMOIZE"):
        i += 1
    return i


class Sto:
    """A storage record as a ``torch.save`` pickle names it (persistent id), any field values."""

    def __init__(self, key: Any, stype: Any, location: Any, numel: Any) -> None:
        self.pid = ("storage", stype, key, location, numel)


class Ten:
    """``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, {})``,
    any argument values."""

    def __init__(self, storage: Sto, offset: Any, size: Any, stride: Any) -> None:
        self.args = (storage, offset, size, stride, False, collections.OrderedDict())

    def __reduce__(self) -> tuple[Any, ...]:
        return (torch._utils._rebuild_tensor_v2, self.args)


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj: Any) -> Any:
        return obj.pid if isinstance(obj, Sto) else None


def pickle_tree(tree: Any) -> bytes:
    """``tree`` pickled as ``torch.save`` pickles (protocol 2, storages as persistent ids)."""
    f = io.BytesIO()
    _Pickler(f, protocol=2).dump(tree)
    return f.getvalue()


def rank_file(d: Path, rank: int = 0) -> Path:
    return d / f"checkpoint_{rank}.pt"


def saved(d: Path, obj: Any) -> tuple[Path, list[tuple[str, bytes]]]:
    """``torch.save(obj)`` as ``d/checkpoint_0.pt``; its path and records."""
    d.mkdir(parents=True, exist_ok=True)
    f = rank_file(d)
    torch.save(obj, f)
    return f, read_zip(f)


def with_pickle(d: Path, base: Any, tree_or_pkl: Any) -> Path:
    """A ``torch.save`` file of ``base`` whose ``data.pkl`` is replaced by ``tree_or_pkl``
    (bytes, or a tree pickled by :func:`pickle_tree`); the zip rewritten around it."""
    f, recs = saved(d, base)
    pkl = tree_or_pkl if isinstance(tree_or_pkl, bytes) else pickle_tree(tree_or_pkl)
    write_zip(f, replace_record(recs, prefix_of(recs) + "data.pkl", pkl))
    return f


def read_ex(d: Path) -> Exercise:
    return {"api": "read", "dir": str(d)}


def load_ex(d: Path, target: dict[str, Any]) -> Exercise:
    return {"api": "load", "dir": str(d), "target": target}


def restore_ex(d: Path, target: dict[str, Any] | None = None) -> Exercise:
    return {"api": "restore", "dir": str(d), "target": target}


def cli_ex(*args: Any) -> Exercise:
    return {"api": "cli", "args": [str(a) for a in args]}


# ---------------------------------------------------------------------------------------------
# index files (checkpoint_{rank}.idx) and manifests
# ---------------------------------------------------------------------------------------------

_IDX_HEAD = struct.Struct("<6sHI")
IDX_ROW = np.dtype([("kind", "u1"), ("dtype", "u1"), ("ndim", "u1"), ("flags", "u1"), ("storage", "<i4"),
                    ("dims", "<i4"), ("offset", "<i8")])
IDX_STORAGE = np.dtype([("header", "<i8"), ("data", "<i8"), ("size", "<i8"), ("crc", "<u4"), ("dtype", "u1"),
                        ("loc", "u1"), ("numel", "<i8")])


def written(d: Path, sd: dict[str, Any]) -> Path:
    """``CheckpointWriter(RankInfo(0, 1)).write(d, sd)``: rank file, index file, manifest."""
    from dist_restore import CheckpointWriter, RankInfo

    CheckpointWriter(RankInfo(0, 1)).write(d, sd)
    return rank_file(d)


def parse_idx(data: bytes) -> tuple[dict[str, Any], dict[str, bytes]]:
    magic, version, hlen = _IDX_HEAD.unpack_from(data)
    assert magic == b"DRIDX\x00" and version == 1
    header = json.loads(data[_IDX_HEAD.size : _IDX_HEAD.size + hlen])
    sections = {k: data[o : o + n] for k, (o, n) in header["sections"].items()}
    return header, sections


def build_idx(header: dict[str, Any], sections: dict[str, bytes]) -> bytes:
    """An index file of these sections (offsets laid out again, CRC32 recomputed: what anyone
    who edits one does)."""
    header = dict(header, sections={})
    while True:
        head = json.dumps(header, separators=(",", ":")).encode("utf-8")
        pos = _IDX_HEAD.size + len(head)
        layout = {}
        for name, sec in sections.items():
            layout[name] = [pos, len(sec)]
            pos += len(sec)
        if layout == header["sections"]:
            break
        header["sections"] = layout
    body = b"".join([_IDX_HEAD.pack(b"DRIDX\x00", 1, len(head)), head, *sections.values()])
    return body + struct.pack("<I", zlib.crc32(body))


def edit_idx(d: Path, fn: Callable[[dict[str, Any], dict[str, bytes]], None], rank: int = 0) -> Path:
    """Edit ``checkpoint_{rank}.idx`` in place with ``fn(header, sections)``, recompute its
    CRC32 and update the manifest's size and checksum of it (the manifest has no checksum of
    its own: whoever can edit the index file can edit it too)."""
    p = d / f"checkpoint_{rank}.idx"
    header, sections = parse_idx(p.read_bytes())
    fn(header, sections)
    data = build_idx(header, sections)
    p.write_bytes(data)
    m = d / MANIFEST
    if m.exists():
        doc = json.loads(m.read_text())
        idx = doc["ranks"][rank]["index"]
        idx["size"] = len(data)
        idx["checksum"] = f"crc32:{zlib.crc32(data[:-4]):08x}"
        m.write_text(json.dumps(doc, indent=2))
    return p


def idx_tables(sections: dict[str, bytes]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Writable copies of the rows, dims and storages sections."""
    return (np.frombuffer(sections["rows"], dtype=IDX_ROW).copy(),
            np.frombuffer(sections["dims"], dtype="<i8").copy(),
            np.frombuffer(sections["storages"], dtype=IDX_STORAGE).copy())


# ---------------------------------------------------------------------------------------------
# DTensor files: saved under a 1-rank gloo group in this process
# ---------------------------------------------------------------------------------------------

def _mesh() -> Any:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():
        dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    return init_device_mesh("cpu", (1,))


def dtensor_file(d: Path, placement: Any, n: int = 8) -> tuple[Path, list[tuple[str, bytes]], bytes]:
    """``torch.save({"w": DTensor(arange(n), mesh (1,), [placement])})``: the file, its
    records and its ``data.pkl``."""
    from torch.distributed.tensor import DTensor

    t = DTensor.from_local(torch.arange(n, dtype=torch.float32), _mesh(), [placement])
    f, recs = saved(d, {"w": t})
    return f, recs, dict(recs)[prefix_of(recs) + "data.pkl"]


def dtensor_edit(d: Path, placement: Any, edit: Callable[[bytes, list[tuple[str, Any, int]]], bytes]) -> Path:
    f, recs, pkl = dtensor_file(d, placement)
    write_zip(f, replace_record(recs, prefix_of(recs) + "data.pkl", edit(pkl, ops(pkl))))
    return f


def _layout_exercises(d: Path) -> list[Exercise]:
    return [read_ex(d), load_ex(d, {"w": ["zeros", [8], "float32"]}), cli_ex("inspect", d),
            {"api": "reshard", "dir": str(d), "target": {"w": ["dtensor", [8], "float32", [["S", 0]]]}}]


# =============================================================================================
# the cases
# =============================================================================================

# -- crashes ------------------------------------------------------------------------------------

@case
def case_rank_numel_wrap(d: Path) -> Case:
    """A storage of numel 2^62+1 float32: numel * 4 wraps to the record's 4 bytes in an int64
    check, and a view of 60,000 elements then reads far past the end of a ~600-byte file."""
    sto = Sto("0", torch.FloatStorage, "cpu", (1 << 62) + 1)
    f = with_pickle(d, {"w": torch.ones(1)}, {"w": Ten(sto, 0, (60000,), (1,))})
    return Case("rank_numel_wrap", "crash: numel*itemsize int64 wrap (rank file)",
                [read_ex(d), restore_ex(d), load_ex(d, {"w": ["zeros", [60000], "float32"]})], str(f),
                note=f"{f.stat().st_size} bytes")


@case
def case_idx_data_size_wrap(d: Path) -> Case:
    """Index file: a storage's size 2^63-64 (uint8, numel the same) so ``data + size`` wraps
    negative and passes ``<= file size``; its tensor's row says 200,000 elements."""
    written(d, {"w": torch.arange(16, dtype=torch.uint8)})

    def fn(h: dict[str, Any], s: dict[str, bytes]) -> None:
        rows, dims, sto = idx_tables(s)
        sto["size"][0] = sto["numel"][0] = (1 << 63) - 64
        dims[rows["dims"][0]] = 200_000
        s["dims"], s["storages"] = dims.tobytes(), sto.tobytes()

    edit_idx(d, fn)
    return Case("idx_data_size_wrap", "crash: index file data+size int64 wrap",
                [read_ex(d), restore_ex(d), load_ex(d, {"w": ["zeros", [200_000], "uint8"]})], None,
                note="index file CRC32 and manifest entry recomputed")


@case
def case_idx_numel_wrap(d: Path) -> Case:
    """Index file: a float32 storage's numel 2^62+4 (x4 wraps to its real 16 bytes); its
    tensor's row says 60,000 elements."""
    written(d, {"w": torch.arange(4, dtype=torch.float32)})

    def fn(h: dict[str, Any], s: dict[str, bytes]) -> None:
        rows, dims, sto = idx_tables(s)
        sto["numel"][0] = (1 << 62) + 4
        dims[rows["dims"][0]] = 60_000
        s["dims"], s["storages"] = dims.tobytes(), sto.tobytes()

    edit_idx(d, fn)
    return Case("idx_numel_wrap", "crash: index file numel*itemsize int64 wrap",
                [read_ex(d), restore_ex(d), load_ex(d, {"w": ["zeros", [60_000], "float32"]})], None)


@case
def case_deep_tuple_key(d: Path) -> Case:
    """A dict key nested 200,000 tuples deep (TUPLE1 x 200,000): hashing it recurses in C."""
    sto = Sto("0", torch.FloatStorage, "cpu", 1)
    pkl = pickle_tree({"w": Ten(sto, 0, (1,), (1,))})
    pkl = insert_before(pkl, after_empty_dict(ops(pkl)), b"K\x00" + b"\x85" * 200_000 + b"K\x01s")
    f = with_pickle(d, {"w": torch.ones(1)}, pkl)
    return Case("deep_tuple_key", "crash: key nested 200k tuples (C recursion)", [read_ex(d), restore_ex(d)],
                str(f), note="plain pickle.loads and torch.load crash on it too")


# -- hangs --------------------------------------------------------------------------------------

@case
def case_deep_list_value(d: Path) -> Case:
    """A value nested 100,000 lists deep (EMPTY_LIST x N, APPEND x N-1): every leaf walk that
    extends a key path per level is quadratic."""
    sto = Sto("0", torch.FloatStorage, "cpu", 1)
    pkl = pickle_tree({"w": Ten(sto, 0, (1,), (1,))})
    n = 100_000
    pkl = insert_before(pkl, after_empty_dict(ops(pkl)), enc_str("v") + b"]" * n + b"a" * (n - 1) + b"s")
    f = with_pickle(d, {"w": torch.ones(1)}, pkl)
    return Case("deep_list_value", "hang: value nested 100k lists (quadratic key paths)",
                [read_ex(d), restore_ex(d), load_ex(d, {"w": ["zeros", [1], "float32"]}),
                 {"api": "read_index", "file": str(f)}], str(f))


@case
def case_strided_split_factor(d: Path) -> Case:
    """A ``_StridedShard`` whose split_factor is 10^12."""
    from torch.distributed.tensor.placement_types import _StridedShard

    dtensor_edit(d, _StridedShard(0, split_factor=3),
                 lambda pkl, lst: splice(pkl, {value_after(lst, "split_factor"): enc_int(10**12)}))
    return Case("strided_split_factor", "hang: _StridedShard split factor 10^12", _layout_exercises(d), None)


# -- memory -------------------------------------------------------------------------------------

@case
def case_mesh_layout_1e9(d: Path) -> Case:
    """A 1-D mesh whose ``_FlatLayout`` is shape (10^9,), stride (1,) over a rank map of 1."""
    from torch.distributed.tensor import Shard

    def edit(pkl: bytes, lst: list[tuple[str, Any, int]]) -> bytes:
        return splice(pkl, {value_after(lst, "shape"): enc_int(10**9) + b"\x85",
                            value_after(lst, "stride"): b"K\x01\x85"})

    dtensor_edit(d, Shard(0), edit)
    return Case("mesh_layout_1e9", "memory: 1-D mesh layout of size 10^9", _layout_exercises(d), None)


@case
def case_zip_many_entries_long_name(d: Path) -> Case:
    """5,000 extra directory entries (each a copy of the storage's entry under a new name) plus
    one whose name is 65,000 bytes: the directory as a matrix of entries x longest name."""
    f, recs = saved(d, {"w": torch.arange(4, dtype=torch.float32)})
    pre = prefix_of(recs)

    def hook(cd: list[dict[str, Any]], out: bytearray) -> list[dict[str, Any]]:
        st = next(e for e in cd if e["name"] == (pre + "data/0").encode())
        extra = [dict(st, name=f"{pre}junk/{i}".encode()) for i in range(5000)]
        extra.append(dict(st, name=(pre + "x" * 65000).encode()))
        return cd + extra

    write_zip(f, recs, hook)
    return Case("zip_many_entries_long_name", "memory: 5,000 zip entries + one long name",
                [read_ex(d), restore_ex(d), cli_ex("verify", d)], str(f), note=f"{f.stat().st_size} bytes")


@case
def case_zip_entries_same_record(d: Path) -> Case:
    """5,000 storage entries ``data/0..4999`` all pointing at one 400 KB record; the pickle has a
    tensor of each (torch.load, too, makes 5,000 tensors of it: ~2 GB from a 0.7 MB file)."""
    n, numel = 5000, 100_000
    f, recs = saved(d, {"w": torch.arange(numel, dtype=torch.float32)})
    pre = prefix_of(recs)
    tree = {f"w{i}": Ten(Sto(str(i), torch.FloatStorage, "cpu", numel), 0, (numel,), (1,)) for i in range(n)}
    recs = replace_record(recs, pre + "data.pkl", pickle_tree(tree))

    def hook(cd: list[dict[str, Any]], out: bytearray) -> list[dict[str, Any]]:
        st = next(e for e in cd if e["name"] == (pre + "data/0").encode())
        return cd + [dict(st, name=f"{pre}data/{i}".encode()) for i in range(1, n)]

    write_zip(f, recs, hook)
    return Case("zip_entries_same_record", "memory: 5,000 zip entries -> one record",
                [read_ex(d), restore_ex(d), cli_ex("verify", d)], str(f), note=f"{f.stat().st_size} bytes")


@case
def case_memo_huge(d: Path) -> Case:
    """``LONG_BINPUT 120,000,000`` in data.pkl: the C unpickler grows its memo table to twice
    that (8 bytes an entry) and clears it."""
    sto = Sto("0", torch.FloatStorage, "cpu", 1)
    pkl = pickle_tree({"w": Ten(sto, 0, (1,), (1,))})
    pkl = insert_before(pkl, after_empty_dict(ops(pkl)), b"r" + struct.pack("<I", 120_000_000))
    f = with_pickle(d, {"w": torch.ones(1)}, pkl)
    return Case("memo_huge", "memory: huge pickle memo index (LONG_BINPUT)", [read_ex(d), restore_ex(d)], str(f))


@case
def case_bytearray_2e9(d: Path) -> Case:
    """``bytearray(2_000_000_000)`` through the allowlist: 2 GB from a 600-byte file."""
    sto = Sto("0", torch.FloatStorage, "cpu", 1)
    pkl = pickle_tree({"w": Ten(sto, 0, (1,), (1,))})
    blob = enc_str("b") + b"c__builtin__\nbytearray\n" + enc_int(2_000_000_000) + b"\x85Rs"
    pkl = insert_before(pkl, after_empty_dict(ops(pkl)), blob)
    f = with_pickle(d, {"w": torch.ones(1)}, pkl)
    return Case("bytearray_2e9", "memory: bytearray(2e9) via allowlist", [read_ex(d), restore_ex(d)], str(f))


@case
def case_stray_huge_rank(d: Path) -> Case:
    """An empty ``checkpoint_99999999999999999.pt`` beside a real rank file, no manifest."""
    f, _ = saved(d / "step_1", {"w": torch.arange(4.0)})
    (d / "step_1" / "checkpoint_99999999999999999.pt").write_bytes(b"")
    s = d / "step_1"
    return Case("stray_huge_rank", "memory: empty checkpoint_99999999999999999.pt",
                [read_ex(s), restore_ex(s), cli_ex("verify", s), cli_ex("inspect", s),
                 {"api": "find_latest", "root": str(d)}], str(f))


# -- wrong values -------------------------------------------------------------------------------

@case
def case_dup_cd_name(d: Path) -> Case:
    """A second record named ``data/0`` (other bytes, valid CRC32) listed after the first."""
    f, recs = saved(d, {"w": torch.arange(4, dtype=torch.float32)})
    pre = prefix_of(recs)

    def hook(cd: list[dict[str, Any]], out: bytearray) -> list[dict[str, Any]]:
        e = local_record(out, pre + "data/0", (torch.arange(4, dtype=torch.float32) + 100).numpy().tobytes())
        return cd + [e]

    write_zip(f, recs, hook)
    return Case("dup_cd_name", "wrong values: duplicate central-directory name",
                [read_ex(d), restore_ex(d), load_ex(d, {"w": ["zeros", [4], "float32"]}),
                 cli_ex("verify", d)], str(f))


@case
def case_idx_other_record(d: Path) -> Case:
    """Index file: storage 0's header/data offsets and CRC32 replaced by storage 1's (same
    size); the index file's CRC32 and the manifest's entry recomputed."""
    f = written(d, {"a": torch.full((4,), 1.0), "b": torch.full((4,), 2.0)})

    def fn(h: dict[str, Any], s: dict[str, bytes]) -> None:
        _rows, _dims, sto = idx_tables(s)
        for col in ("header", "data", "crc"):
            sto[col][0] = sto[col][1]
        s["storages"] = sto.tobytes()

    edit_idx(d, fn)
    return Case("idx_other_record", "wrong values: index row -> another record, CRC recomputed",
                [read_ex(d), restore_ex(d), load_ex(d, {"a": ["zeros", [4], "float32"]})], str(f))


# -- bare errors naming no file --------------------------------------------------------------------

def _field_case(d: Path, name: str, ten: Ten, extra: list[Exercise] | None = None,
                base: Any = None) -> Case:
    f = with_pickle(d, {"w": torch.arange(4.0)} if base is None else base, {"w": ten})
    return Case(name, "bare error: " + name.replace("_", " "),
                [read_ex(d), restore_ex(d)] + (extra or []), str(f))


def _s4(key: Any = "0", location: Any = "cpu", numel: Any = 4) -> Sto:
    return Sto(key, torch.FloatStorage, location, numel)


@case
def case_negative_size(d: Path) -> Case:
    return _field_case(d, "negative_size", Ten(_s4(), 0, (-1,), (1,)))


@case
def case_noninteger_size(d: Path) -> Case:
    return _field_case(d, "noninteger_size", Ten(_s4(), 0, (2.5,), (1,)))


@case
def case_negative_stride(d: Path) -> Case:
    return _field_case(d, "negative_stride", Ten(_s4(), 3, (4,), (-1,)),
                       [load_ex(d, {"w": ["zeros", [4], "float32"]})])


@case
def case_size_stride_lengths(d: Path) -> Case:
    return _field_case(d, "size_stride_lengths", Ten(_s4(), 0, (2, 2), (1,)),
                       [load_ex(d, {"w": ["zeros", [2, 2], "float32"]})])


@case
def case_unknown_device(d: Path) -> Case:
    return _field_case(d, "unknown_device", Ten(_s4(location="nosuchdevice:0"), 0, (4,), (1,)))


@case
def case_int_storage_key(d: Path) -> Case:
    return _field_case(d, "int_storage_key", Ten(_s4(key=0), 0, (4,), (1,)),
                       [load_ex(d, {"w": ["zeros", [4], "float32"]})])


@case
def case_zip64_near_2p63(d: Path) -> Case:
    """The storage's directory entry in zip64 form, its header offset 2^63 - 8 (well past the
    end of the file)."""
    f, recs = saved(d, {"w": torch.arange(4, dtype=torch.float32)})
    pre = prefix_of(recs)

    def hook(cd: list[dict[str, Any]], out: bytearray) -> list[dict[str, Any]]:
        for e in cd:
            if e["name"] == (pre + "data/0").encode():
                e["hoff"], e["zip64"] = (1 << 63) - 8, True
        return cd

    write_zip(f, recs, hook)
    return Case("zip64_near_2p63", "bare error: zip64 fields near 2^63",
                [read_ex(d), restore_ex(d), {"api": "read_index", "file": str(f)}, cli_ex("inspect", d),
                 cli_ex("verify", d)], str(f))


@case
def case_zip64_size_near_2p63(d: Path) -> Case:
    """The storage's directory entry in zip64 form, its sizes 2^63 - 8."""
    f, recs = saved(d, {"w": torch.arange(4, dtype=torch.float32)})
    pre = prefix_of(recs)

    def hook(cd: list[dict[str, Any]], out: bytearray) -> list[dict[str, Any]]:
        for e in cd:
            if e["name"] == (pre + "data/0").encode():
                e["size"] = e["csize"] = (1 << 63) - 8
        return cd

    write_zip(f, recs, hook)
    return Case("zip64_size_near_2p63", "bare error: zip64 fields near 2^63 (sizes)",
                [read_ex(d), restore_ex(d), {"api": "read_index", "file": str(f)}, cli_ex("verify", d)], str(f))


@case
def case_zip64_extra_truncated(d: Path) -> Case:
    """The storage's directory entry in zip64 form (all three fields 0xFFFFFFFF), its zip64 extra
    field saying 24 bytes of values but holding one, 2^63 - 8."""
    f, recs = saved(d, {"w": torch.arange(4, dtype=torch.float32)})
    pre = prefix_of(recs)

    def hook(cd: list[dict[str, Any]], out: bytearray) -> list[dict[str, Any]]:
        for e in cd:
            if e["name"] == (pre + "data/0").encode():
                e["zip64"] = True
                e["extra"] = struct.pack("<HHQ", 1, 24, (1 << 63) - 8)
        return cd

    write_zip(f, recs, hook)
    return Case("zip64_extra_truncated", "bare error: zip64 fields near 2^63 (extra field short)",
                [read_ex(d), restore_ex(d), {"api": "read_index", "file": str(f)}, cli_ex("inspect", d),
                 cli_ex("verify", d)], str(f))


@case
def case_mesh_zero_size(d: Path) -> Case:
    """A 1-D mesh whose ``_FlatLayout`` is shape (0,), stride (1,)."""
    from torch.distributed.tensor import Shard

    def edit(pkl: bytes, lst: list[tuple[str, Any, int]]) -> bytes:
        return splice(pkl, {value_after(lst, "shape"): b"K\x00\x85", value_after(lst, "stride"): b"K\x01\x85"})

    dtensor_edit(d, Shard(0), edit)
    return Case("mesh_zero_size", "bare error: zero-size mesh layout", _layout_exercises(d), None)


@case
def case_layout_shard_dim(d: Path) -> Case:
    """``Shard(dim=5)`` of a 1-d DTensor: a layout error met on the resharding path."""
    from torch.distributed.tensor import Shard

    dtensor_edit(d, Shard(0), lambda pkl, lst: splice(pkl, {value_after(lst, "dim"): b"K\x05"}))
    return Case("layout_shard_dim", "bare error: layout error on the resharding path", _layout_exercises(d)
                + [restore_ex(d, {"w": ["zeros", [8], "float32"]})], None)


@case
def case_idx_bad_tree_row(d: Path) -> Case:
    """Index file: the tree section's skeleton names row 99 of a file with 2 rows."""
    f = written(d, {"w": torch.arange(4.0), "step": 3})

    def fn(h: dict[str, Any], s: dict[str, bytes]) -> None:
        skel, objects, dtensors = pickle.loads(s["tree"])
        skel["w"] = 99
        s["tree"] = pickle.dumps((skel, objects, dtensors), protocol=4)

    edit_idx(d, fn)
    return Case("idx_bad_tree_row", "bare error: malformed tree row in index file",
                [read_ex(d), restore_ex(d), load_ex(d, {"w": ["zeros", [4], "float32"]}),
                 {"api": "read_index", "file": str(f)}, cli_ex("inspect", d)], str(f))


@case
def case_manifest_deep(d: Path) -> Case:
    """A manifest whose metadata holds a list nested 100,000 deep."""
    f = written(d / "step_1", {"w": torch.arange(4.0)})
    m = d / "step_1" / MANIFEST
    text = m.read_text()
    n = 100_000
    m.write_text(text.replace('"metadata": {}', '"metadata": {"x": ' + "[" * n + "]" * n + "}", 1))
    assert "[[[" in m.read_text()
    s = d / "step_1"
    return Case("manifest_deep", "bare error: manifest nested 100k deep",
                [read_ex(s), restore_ex(s), cli_ex("verify", s), {"api": "find_latest", "root": str(d)}], str(f))
