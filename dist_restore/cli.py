"""The ``dist-restore`` command line: ``inspect``, ``verify`` and ``consolidate`` a checkpoint directory.

``inspect`` lists every rank file's entries from its index (no tensor data is read), with
each DTensor's layout, and the entries that look replicated across ranks. ``verify`` checks
completeness, sizes and checksums against the manifest, and that every rank file parses,
reporting every problem rather than the first. ``consolidate`` writes the full state dict
as one file (see :mod:`dist_restore.consolidate`). Safetensors and DCP checkpoints may also be
object-store URLs (``s3://bucket/prefix``); ``consolidate`` writes its output locally. Exit
status: 0 fine, 1 a problem found, 2 usage error.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from dist_restore import _cli_consolidate
from dist_restore._cli_util import (_dtype, _fail, _human, _manifest_dict, _manifest_line, _msg, _name,
                                    _scan, _shape, _short_repr, _table, _try_manifest)
from dist_restore._cli_verify import _VERIFY_HELP, Problem, _verify
from dist_restore._format.index import CheckpointIndex, IndexEntry, read_index
from dist_restore._base.ranks import format_ranks
from dist_restore._base.source import is_url
from dist_restore._sources import read_catalog, source_format
from dist_restore._planning.shared import make_selector
from dist_restore.errors import CheckpointError

__all__ = ["Problem", "main"]

_EPILOG = "exit status: 0 when everything is fine, 1 when a problem is found, 2 on a usage error"

_INSPECT_HELP = """\
Lists each rank file's entries (dtype, shape and bytes of tensors; Python type and a
short repr of other values) and totals, read from the index only: no tensor data is
read (legacy non-zip files are the exception: they can only be read whole). A DTensor
entry (FSDP2, tensor parallel) shows its global shape and its layout: this file's local
shape and region, the placements and the mesh (dim names and sizes, this file's
coordinate). Then lists the plain tensors that look replicated: same key, dtype and shape
in every rank file (values are not compared). Their bytes are what restore(..., shared=...) would read once
instead of on every rank."""


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``dist-restore``; returns the exit status (0 fine, 1 problem, 2 usage error)."""
    logging.basicConfig(level=logging.WARNING, handlers=[_StderrHandler()],
                        format="dist-restore: %(levelname)s: %(message)s")
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # return the status instead of exiting: main() is testable
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    try:
        bad = _check_source(args.dir)
        if bad is not None:
            print(f"dist-restore: error: {bad}", file=sys.stderr)
            return 2
        return args.func(args)
    except BrokenPipeError:  # `dist-restore inspect ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as e:  # an unreadable directory or file: the message names it; no traceback
        print(f"dist-restore: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    except ImportError as e:  # a URL without the object-store extra: the message names it
        print(f"dist-restore: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


def _check_source(src: str | Path) -> str | None:
    """Why ``src`` is no checkpoint the commands read (``None``: it is one). Local: a directory,
    or a ``.safetensors`` file. A URL (``s3://``, ``gs://``, ``az://``): a safetensors or DCP
    checkpoint (the object store is asked; an unreachable store or bucket raises ``OSError``)."""
    if is_url(src):
        try:
            fmt = source_format(src)
        except FileNotFoundError as e:  # no bucket, nothing under the prefix (other OSErrors: exit 1)
            return str(e)
        return None if fmt is not None else f"no checkpoint at {str(src)!r}"
    if src.is_dir() or (src.is_file() and src.name.endswith(".safetensors")):
        return None
    return f"not a directory: {str(src)!r}"


def _source_arg(text: str) -> str | Path:
    """A checkpoint argument: a URL kept as it is (a ``Path`` would fold ``s3://`` into
    ``s3:/``), anything else a local path."""
    return text if is_url(text) else Path(text)


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is when a record is emitted, not when configured
    (``main()`` may be called again with another ``sys.stderr``, as in tests)."""

    @property  # type: ignore[override]
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass


def _parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(
        prog="dist-restore", formatter_class=fmt, epilog=_EPILOG,
        description="Inspect, verify and consolidate dist_restore / torch.save checkpoint directories "
                    "(one checkpoint_<rank>.pt per rank), Hugging Face safetensors and DCP checkpoints. "
                    "Safetensors and DCP checkpoints may be s3://, gs:// or az:// URLs (endpoint and "
                    "credentials from the environment: AWS_ENDPOINT_URL, AWS_REGION, ...).")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    pi = sub.add_parser("inspect", help="list each rank file's entries and the replicated ones",
                        description=_INSPECT_HELP, formatter_class=fmt, epilog=_EPILOG)
    pi.add_argument("dir", metavar="DIR", type=_source_arg,
                    help="the checkpoint directory (or a .safetensors file; or an s3://, gs://, az:// URL of a "
                         "safetensors or DCP checkpoint)")
    pi.add_argument("--rank", metavar="R", type=_rank_arg, help="only this rank's file "
                    "(skips the replicated section, which needs every rank file)")
    pi.add_argument("--keys", metavar="PATTERN", type=_keys_arg, help="only keys matching this glob "
                    "(fnmatch, on dotted keys like model.layers[0].w; write a literal [ as [[]); "
                    "without *?[ a key prefix, as in shared= ('model.' is 'model')")
    pi.add_argument("--json", action="store_true", help="print one JSON document instead")
    pi.set_defaults(func=_inspect)
    pv = sub.add_parser("verify", help="check completeness, sizes, checksums and that files parse",
                        description=_VERIFY_HELP, formatter_class=fmt, epilog=_EPILOG)
    pv.add_argument("dir", metavar="DIR", type=_source_arg,
                    help="the checkpoint directory (or an s3://, gs://, az:// URL of a safetensors or DCP checkpoint)")
    pv.add_argument("--json", action="store_true",
                    help='print {"ok": ..., "problems": [...], "ranks": [...]} instead')
    pv.add_argument("--no-checksum", action="store_true", help="skip the whole-file checksums "
                    "(fast; then damaged tensor bytes go unnoticed)")
    pv.set_defaults(func=_verify)
    _cli_consolidate.add_parser(sub, _EPILOG, _keys_arg, _source_arg)
    return p


def _keys_arg(text: str) -> str:
    if text:
        try:
            make_selector(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _rank_arg(text: str) -> int:
    try:
        r = int(text)
    except ValueError:
        r = -1
    if r < 0:
        raise argparse.ArgumentTypeError(f"expected a rank >= 0, got {text!r}")
    return r


# ---------------------------------------------------------------------------------- inspect


def _inspect(args: argparse.Namespace) -> int:
    directory: Path = args.dir
    fmt = source_format(directory)
    if fmt is not None:
        return _inspect_catalog(args, fmt)
    files, _temps = _scan(directory)
    if not files:
        return _fail(f"no rank files (checkpoint_<rank>.pt) in {str(directory)!r}")
    if args.rank is not None:
        if args.rank not in files:
            return _fail(f"no file {_name(args.rank)} in {str(directory)!r} "
                         f"(rank files present: {format_ranks(files)})")
        files = {args.rank: files[args.rank]}
    select: Callable[[str], bool] = make_selector(args.keys) if args.keys else (lambda k: True)
    manifest, manifest_error = _try_manifest(directory)

    status = 0
    indexes: dict[int, CheckpointIndex] = {}
    rank_docs: list[dict[str, Any]] = []
    for r, f in files.items():
        try:
            idx = read_index(f)
            idx.entries  # noqa: B018 - builds the entries now, so a damaged file fails here
            rank_docs.append(_rank_dict(r, idx, select))  # a layout's regions: a bad one fails here
            indexes[r] = idx
        except Exception as e:  # noqa: BLE001 - report it and list the other ranks
            key = e.key if isinstance(e, CheckpointError) else None
            print(f"dist-restore: error: rank {r}: {f.name}: {'' if key is None else f'key {key!r}: '}{_msg(e)}",
                  file=sys.stderr)
            status = 1
    replicated: list[IndexEntry] | None = None
    suggested: list[str] = []
    if args.rank is None and len(indexes) >= 2 and len(indexes) == len(files):
        all_replicated = _replicated(list(indexes.values()))
        if not args.keys:  # a hint about whole top-level names; confusing next to a filter
            suggested = _suggest_shared(next(iter(indexes.values())), {e.key for e in all_replicated})
        replicated = [e for e in all_replicated if select(e.key)]

    doc = {
        "dir": str(directory),
        "manifest": _manifest_dict(manifest, manifest_error),
        "ranks": rank_docs,
        "replicated": None if replicated is None else [_entry_dict(e) for e in replicated],
        "replicated_nbytes": None if replicated is None else sum(e.nbytes for e in replicated),
        "suggested_shared": suggested,
    }
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        _print_inspect(doc, len(indexes), args.rank is not None)
    return status


def _inspect_catalog(args: argparse.Namespace, fmt: str | None) -> int:
    """``inspect`` of a Hugging Face safetensors file or directory, or of a DCP directory: every
    key with its dtype, shape, bytes and file(s) (DCP: its chunks; its non-tensor values too);
    each file's size (safetensors: and ``__metadata__``). Reads headers and metadata only."""
    if args.rank is not None and fmt != "rank files":
        return _fail(f"--rank applies to rank files; a {fmt} checkpoint has none")
    try:
        if fmt == "rank files":  # at a URL: the entries rank --rank sees (plain ones from its own file)
            from dist_restore._base.source import location
            from dist_restore._format.rankfiles import rank_files

            n = len(rank_files(location(args.dir)))
            cat = read_catalog(args.dir, rank=args.rank or 0, world=n)
        else:
            cat = read_catalog(args.dir)
    except Exception as e:  # noqa: BLE001 - one line, exit 1
        return _fail(_msg(e))
    select: Callable[[str], bool] = make_selector(args.keys) if args.keys else (lambda k: True)
    entries = [e for e in cat.entries.values() if select(e.key)]
    counts: dict[str, int] = {}
    for e in cat.entries.values():
        for c in e.chunks:
            counts[c.file] = counts.get(c.file, 0) + 1
    doc: dict[str, Any] = {
        "path": str(args.dir),
        "format": fmt,
        "files": [{"file": f, "file_size": n, "metadata": dict(cat.metadata.get(f, {})),
                   "num_tensors" if fmt == "safetensors" else "num_chunks": counts.get(f, 0)}
                  for f, n in cat.file_sizes.items()],
        "entries": [{"key": e.key, "dtype": _dtype(e.dtype), "shape": list(e.shape), "nbytes": e.nbytes,
                     "file": e.chunks[0].file if e.chunks else None,
                     **({"offset": e.chunks[0].offset} if fmt == "safetensors" else
                        {"chunks": [{"file": c.file, "offsets": list(c.start), "sizes": list(c.size)}
                                    for c in e.chunks]})} for e in entries],
        "tensor_nbytes": sum(e.nbytes for e in entries),
    }
    if fmt in ("dcp", "rank files"):
        doc["values"] = [{"key": k, "file": it.file, "nbytes": it.length} for k, it in cat.objects.items()
                         if select(k)]
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    what = "tensors" if fmt == "safetensors" else f"tensors, {len(cat.objects)} values"
    print(f"{fmt} checkpoint {doc['path']}: {len(doc['files'])} file(s), {len(cat.entries)} {what}")
    for f in doc["files"]:
        meta = f" metadata {json.dumps(f['metadata'])}" if f["metadata"] else ""
        n = f.get("num_tensors", f.get("num_chunks"))
        print(f"  {f['file']} ({_human(f['file_size'])}, {n} {'tensors' if fmt == 'safetensors' else 'chunks'})"
              f"{meta}")
    print()
    if fmt == "safetensors":
        rows = [(d["key"], d["dtype"], _shape(d["shape"]), str(d["nbytes"]), d["file"]) for d in doc["entries"]]
        header = ("key", "dtype", "shape", "bytes", "file")
    else:
        rows = [(d["key"], d["dtype"], _shape(d["shape"]), str(d["nbytes"]), str(len(d["chunks"])))
                for d in doc["entries"]]
        rows += [(v["key"], "value", "-", str(v["nbytes"]), "1") for v in doc["values"]]
        header = ("key", "dtype", "shape", "bytes", "chunks")
    if rows:
        _table([header] + rows, indent=2, right={3})
    n = doc["tensor_nbytes"]
    ntensors = len(doc["entries"])
    print(f"  total: {ntensors} tensor{'s' * (ntensors != 1)}, {n} bytes ({_human(n)})")
    return 0


def _replicated(indexes: list[CheckpointIndex]) -> list[IndexEntry]:
    """Tensors with the same key, kind, dtype and shape in every index, in the first's order."""
    first, *rest = indexes
    out = []
    for e in first:
        if e.kind in ("object", "dtensor") or e.dtype is None or e.shape is None:
            continue  # a DTensor's global shape is the same in every file, its shard is not
        if all((o := idx.entries.get(e.key)) is not None and (o.kind, o.dtype, o.shape)
               == (e.kind, e.dtype, e.shape) for idx in rest):
            out.append(e)
    return out


def _prefixes(key: str) -> list[str]:
    """``model``, ``model.layers``, ``model.layers[0]``, ``model.layers[0].w`` for the last."""
    return [key[:m.start()] for m in re.finditer(r"(?=[.\[])", key) if m.start()] + [key]


def _suggest_shared(index: CheckpointIndex, replicated: set[str]) -> list[str]:
    """The shortest key prefixes all of whose tensors are replicated: a ready ``shared=``."""
    all_rep: dict[str, bool] = {}  # prefix -> every tensor below it is replicated
    for e in index:
        if e.kind != "object":
            for p in _prefixes(e.key):
                all_rep[p] = all_rep.get(p, True) and e.key in replicated
    out: dict[str, None] = {}  # ordered set
    for e in index:
        if e.key in replicated:
            out.setdefault(next(p for p in _prefixes(e.key) if all_rep[p]))
    return list(out)


def _rank_dict(rank: int, idx: CheckpointIndex, select: Callable[[str], bool]) -> dict[str, Any]:
    entries = [e for e in idx if select(e.key)]
    return {
        "rank": rank,
        "file": idx.file.name,
        "file_size": idx.file_size,
        "format": idx.format,
        "index_source": idx.source,
        "num_entries": len(idx),
        "storage_nbytes": sum(rec.size for rec in idx.records.values()),
        "entries": [_entry_dict(e) for e in entries],
        "tensor_nbytes": sum(e.nbytes for e in entries if e.kind != "object"),
    }


def _entry_dict(e: IndexEntry) -> dict[str, Any]:
    d: dict[str, Any] = {
        "key": e.key,
        "kind": e.kind,
        "dtype": None if e.dtype is None else _dtype(e.dtype),
        "shape": None if e.shape is None else list(e.shape),
        "nbytes": e.nbytes,
    }
    if e.kind == "object":
        d["type"] = type(e.value).__name__
        d["repr"] = _short_repr(e.value)
    if e.kind == "dtensor" and e.layout is not None:
        mesh = e.layout.mesh
        region = e.region
        d["dtensor"] = {
            "global_shape": list(e.layout.shape),
            "local_shape": None if e.local_shape is None else list(e.local_shape),
            "placements": [str(p) for p in e.layout.placements],
            "mesh": {"shape": list(mesh.shape), "dim_names": None if mesh.dim_names is None else list(mesh.dim_names),
                     "coordinate": None if mesh.coordinate is None else list(mesh.coordinate),
                     "rank": mesh.rank, "ranks": mesh.root_size},
            "region": None if region is None else [list(r) for r in region],
        }
    return d


def _layout_text(d: dict[str, Any]) -> str:
    """``local [4, 10] at [4:8, 0:10] of [Shard(dim=0)] on mesh (dp=4) @ (1,)``."""
    t = d["dtensor"]
    mesh = t["mesh"]
    names = mesh["dim_names"] or [f"d{i}" for i in range(len(mesh["shape"]))]
    at = "" if t["region"] is None else " at [" + ", ".join(f"{o}:{o + n}" for o, n in t["region"]) + "]"
    coord = "" if mesh["coordinate"] is None else f" @ ({', '.join(map(str, mesh['coordinate']))})"
    return (f"local {_shape(t['local_shape'] or [])}{at} of [{', '.join(t['placements'])}] on mesh "
            f"({', '.join(f'{n}={s}' for n, s in zip(names, mesh['shape']))}){coord}")


def _print_inspect(doc: dict[str, Any], n_files: int, one_rank: bool) -> None:
    print(f"checkpoint {doc['dir']}")
    print(f"manifest: {_manifest_line(doc['manifest'])}")
    for rd in doc["ranks"]:
        print()
        filt = "" if len(rd["entries"]) == rd["num_entries"] else f", {len(rd['entries'])} shown"
        via = ", indexed by its index file" if rd["index_source"] == "index file" else ""
        print(f"rank {rd['rank']}: {rd['file']} ({rd['format']}, {_human(rd['file_size'])}, "
              f"{rd['num_entries']} entries{filt}{via})")
        rows = [(d["key"], d["type"] if d["kind"] == "object" else d["dtype"] or "?",
                 "" if d["shape"] is None else _shape(d["shape"]),
                 "" if d["kind"] == "object" else str(d["nbytes"]),
                 d["repr"] if d["kind"] == "object" else "exotic" if d["kind"] == "exotic"
                 else _layout_text(d) if "dtensor" in d else "")
                for d in rd["entries"]]
        if rows:
            _table([("key", "dtype/type", "shape", "bytes", "value")] + rows, indent=2,
                   right={3})
        if any("dtensor" in d for d in rd["entries"]):
            print("  (DTensor entries: shape is the global shape; bytes and 'local ... at' are this file's shard)")
        n_t = sum(d["kind"] != "object" for d in rd["entries"])
        print(f"  total: {n_t} tensor{'s' * (n_t != 1)}, {rd['tensor_nbytes']} bytes "
              f"({_human(rd['tensor_nbytes'])}); {len(rd['entries']) - n_t} other entries")
    print()
    rep = doc["replicated"]
    if rep is None:
        why = ("--rank given; it needs every rank file" if one_rank else
               "needs at least two readable rank files" if n_files < 2 else "a rank file is unreadable")
        print(f"replicated: not computed ({why})")
        return
    nbytes = doc["replicated_nbytes"]
    print(f"replicated across all {n_files} rank files (same key, dtype and shape; values not "
          f"compared): {len(rep)} entr{'ies' if len(rep) != 1 else 'y'}, {nbytes} bytes "
          f"({_human(nbytes)}) per rank")
    if rep:
        _table([(d["key"], d["dtype"], _shape(d["shape"]), str(d["nbytes"])) for d in rep],
               indent=2, right={3})
        print(f"  restore(..., shared=...) would read them once instead of on every rank: "
              f"{(n_files - 1) * nbytes} bytes ({_human((n_files - 1) * nbytes)}) fewer reads")
    if hint := doc["suggested_shared"]:
        more = f" (and {len(hint) - 8} more)" if len(hint) > 8 else ""
        print(f"  hint: shared={hint[:8]!r}{more}")


