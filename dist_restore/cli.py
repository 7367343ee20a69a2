"""The ``dist-restore`` command line: ``inspect`` and ``verify`` a checkpoint directory.

``inspect`` lists every rank file's entries from its index (no tensor data is read) and
the entries that look replicated across ranks. ``verify`` checks completeness, sizes and
checksums against the manifest, and that every rank file parses, reporting every problem
rather than the first. Exit status: 0 fine, 1 a problem found, 2 usage error.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, TextIO

from dist_restore._index import CheckpointIndex, IndexEntry, read_index
from dist_restore._manifest import (MANIFEST_NAME, Manifest, RankFileInfo, check_checkpoint,
                                    is_temp_file, read_manifest)
from dist_restore._report import format_ranks
from dist_restore._shared import make_selector
from dist_restore.errors import CheckpointError

_RANK_FILE = re.compile(r"checkpoint_(0|[1-9][0-9]*)\.pt")

_EPILOG = "exit status: 0 when everything is fine, 1 when a problem is found, 2 on a usage error"

_VERIFY_HELP = """\
Checks, reporting every problem (one line each, naming the rank and the file):
  1. completeness: the manifest (dist_restore_manifest.json), if there is one, gives the
     world size and the rank files; otherwise the world size is inferred from the rank
     files present. Missing rank files are problems; so are leftover temporary files
     (.*.tmp) when there is no manifest (an interrupted save). With a manifest, temporary
     files and rank files beyond its world size are only noted.
  2. sizes and checksums (CRC32 of the whole file) against the manifest, rank by rank;
     skipped without a manifest.
  3. that every rank file parses: zip directory, CRC32 of data.pkl, restricted unpickle.

Step 3 does not read tensor data. The manifest checksum (step 2) is what catches damaged
tensor bytes: with --no-checksum, or without a manifest, a flipped bit inside a tensor
goes unnoticed here (restoring with the reader's CRC32 check still catches it).
The progress line on stderr (a terminal only) advances one rank file at a time."""

_INSPECT_HELP = """\
Lists each rank file's entries (dtype, shape and bytes of tensors; Python type and a
short repr of other values) and totals, read from the index only: no tensor data is
read (legacy non-zip files are the exception: they can only be read whole). Then lists
the tensors that look replicated: same key, dtype and shape in every rank file (values
are not compared). Their bytes are what restore(..., shared=...) would read once
instead of on every rank."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a checkpoint directory.

    Attributes:
        rank: The rank concerned, if any.
        file: The file name (in the checkpoint directory) concerned, if any.
        check: Which check failed: ``manifest``, ``missing``, ``extra``, ``temp``,
            ``size``, ``checksum`` or ``parse``.
        message: What is wrong.
    """

    rank: int | None
    file: str | None
    check: str
    message: str

    def render(self) -> str:
        where = f"rank {self.rank}" if self.rank is not None else "-"
        return f"{where}: {self.file or '-'}: {self.check}: {self.message}"


_Status = Literal["ok", "fail", "skipped", "n/a"]


@dataclass
class _RankStatus:
    rank: int
    file: str
    exists: bool
    size: int | None = None
    expected_size: int | None = None
    size_check: _Status = "n/a"
    checksum: _Status = "n/a"
    parse: _Status = "n/a"
    entries: int | None = None


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``dist-restore``; returns the exit status (0 fine, 1 problem, 2 usage error)."""
    logging.basicConfig(level=logging.WARNING, handlers=[_StderrHandler()],
                        format="dist-restore: %(levelname)s: %(message)s")
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # return the status instead of exiting: main() is testable
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    if not args.dir.is_dir():
        print(f"dist-restore: error: not a directory: {str(args.dir)!r}", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except BrokenPipeError:  # `dist-restore inspect ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


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
        description="Inspect and verify dist_restore / torch.save checkpoint directories "
                    "(one checkpoint_<rank>.pt per rank).")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    pi = sub.add_parser("inspect", help="list each rank file's entries and the replicated ones",
                        description=_INSPECT_HELP, formatter_class=fmt, epilog=_EPILOG)
    pi.add_argument("dir", metavar="DIR", type=Path, help="the checkpoint directory")
    pi.add_argument("--rank", metavar="R", type=_rank_arg, help="only this rank's file "
                    "(skips the replicated section, which needs every rank file)")
    pi.add_argument("--keys", metavar="PATTERN", help="only keys matching this glob (fnmatch, "
                    "on dotted keys like model.layers[0].w; write a literal [ as [[]); "
                    "without *?[ a key prefix, as in shared=")
    pi.add_argument("--json", action="store_true", help="print one JSON document instead")
    pi.set_defaults(func=_inspect)
    pv = sub.add_parser("verify", help="check completeness, sizes, checksums and that files parse",
                        description=_VERIFY_HELP, formatter_class=fmt, epilog=_EPILOG)
    pv.add_argument("dir", metavar="DIR", type=Path, help="the checkpoint directory")
    pv.add_argument("--json", action="store_true",
                    help='print {"ok": ..., "problems": [...], "ranks": [...]} instead')
    pv.add_argument("--no-checksum", action="store_true", help="skip the whole-file checksums "
                    "(fast; then damaged tensor bytes go unnoticed)")
    pv.set_defaults(func=_verify)
    return p


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
    for r, f in files.items():
        try:
            idx = read_index(f)
            idx.entries  # noqa: B018 - builds the entries now, so a damaged file fails here
            indexes[r] = idx
        except Exception as e:  # noqa: BLE001 - report it and list the other ranks
            print(f"dist-restore: error: rank {r}: {f.name}: {_msg(e)}", file=sys.stderr)
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
        "ranks": [_rank_dict(r, idx, select) for r, idx in indexes.items()],
        "replicated": None if replicated is None else [_entry_dict(e) for e in replicated],
        "replicated_nbytes": None if replicated is None else sum(e.nbytes for e in replicated),
        "suggested_shared": suggested,
    }
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        _print_inspect(doc, len(indexes), args.rank is not None)
    return status


def _replicated(indexes: list[CheckpointIndex]) -> list[IndexEntry]:
    """Tensors with the same key, kind, dtype and shape in every index, in the first's order."""
    first, *rest = indexes
    out = []
    for e in first:
        if e.kind == "object" or e.dtype is None or e.shape is None:
            continue
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
    return d


def _print_inspect(doc: dict[str, Any], n_files: int, one_rank: bool) -> None:
    print(f"checkpoint {doc['dir']}")
    print(f"manifest: {_manifest_line(doc['manifest'])}")
    for rd in doc["ranks"]:
        print()
        filt = "" if len(rd["entries"]) == rd["num_entries"] else f", {len(rd['entries'])} shown"
        print(f"rank {rd['rank']}: {rd['file']} ({rd['format']}, {_human(rd['file_size'])}, "
              f"{rd['num_entries']} entries{filt})")
        rows = [(d["key"], d["type"] if d["kind"] == "object" else d["dtype"] or "?",
                 "" if d["shape"] is None else _shape(d["shape"]),
                 "" if d["kind"] == "object" else str(d["nbytes"]),
                 d["repr"] if d["kind"] == "object" else ("exotic" if d["kind"] == "exotic" else ""))
                for d in rd["entries"]]
        if rows:
            _table([("key", "dtype/type", "shape", "bytes", "value")] + rows, indent=2,
                   right={3})
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


# ----------------------------------------------------------------------------------- verify


def _verify(args: argparse.Namespace) -> int:
    directory: Path = args.dir
    checksum = not args.no_checksum
    problems: list[Problem] = []
    notes: list[Problem] = []  # worth saying, but restore would not fail over them
    manifest, manifest_error = _try_manifest(directory)
    if manifest_error:
        problems.append(Problem(None, MANIFEST_NAME, "manifest", manifest_error))
    found, temps = _scan(directory)

    if manifest is not None:  # the commit record: it says which files make the checkpoint
        world = manifest.world_size
        infos: dict[int, RankFileInfo] = {i.rank: i for i in manifest.ranks}
        files = {r: directory / i.file for r, i in infos.items()}
        notes += [Problem(None, t, "temp", "leftover temporary file (ignored: the manifest "
                          "commits the checkpoint)") for t in temps]
        notes += [Problem(r, f.name, "extra", f"rank file not in the manifest (world size {world})")
                  for r, f in found.items() if r >= world]
    else:  # plain torch.save directory, or an interrupted write (see check_checkpoint)
        world = max(found) + 1 if found else 0
        infos, files = {}, {r: directory / _name(r) for r in range(world)}
        problems += [Problem(None, t, "temp", "leftover temporary file: an interrupted save? "
                             "(no manifest commits this checkpoint)") for t in temps]
        if not found and not manifest_error:
            problems.append(Problem(None, None, "missing", "no rank files (checkpoint_<rank>.pt) "
                                    "and no manifest: not a checkpoint directory?"))

    statuses = {r: _RankStatus(r, f.name, f.is_file()) for r, f in files.items()}
    for st in statuses.values():
        if st.exists:
            st.size = files[st.rank].stat().st_size
        else:
            problems.append(Problem(st.rank, st.file, "missing", "rank file not found" + (
                " (listed in the manifest)" if manifest else "")))
    present = [st for st in statuses.values() if st.exists]
    progress = _Progress(sys.stderr, sum(st.size or 0 for st in present), len(present))
    try:
        for st in present:
            _verify_rank(directory, files[st.rank], st, infos.get(st.rank), checksum,
                         problems, progress)
    finally:
        progress.close()

    ok = not problems
    if args.json:
        print(json.dumps({
            "ok": ok,
            "dir": str(directory),
            "manifest": _manifest_dict(manifest, manifest_error),
            "world_size": world,
            "checksum": checksum,
            "problems": [asdict(p) for p in problems],
            "notes": [asdict(p) for p in notes],
            "ranks": [asdict(st) for st in statuses.values()],
        }, indent=2))
    else:
        _print_verify(directory, manifest, manifest_error, world, statuses, problems, notes, checksum)
    return 0 if ok else 1


def _verify_rank(directory: Path, file: Path, st: _RankStatus, info: RankFileInfo | None,
                 checksum: bool, problems: list[Problem], progress: _Progress) -> None:
    """Size and checksum against the manifest entry ``info`` (if any), then parse ``file``."""
    if info is not None:
        st.expected_size = info.size
        if st.size != info.size:  # the checksum cannot match either: skip the long read
            st.size_check, st.checksum = "fail", "skipped"
            problems.append(Problem(st.rank, st.file, "size", f"{st.size} bytes, the manifest "
                                    f"says {info.size} (truncated or overwritten after the commit?)"))
        elif not checksum:
            st.size_check, st.checksum = "ok", "skipped"
        else:
            st.size_check = "ok"
            progress.update(f"checksum rank {st.rank}")
            try:  # one rank at a time, so that every bad file is reported, not just the first
                check_checkpoint(directory, world_size=None, ranks=[st.rank], verify=True)
                st.checksum = "ok"
            except (CheckpointError, OSError) as e:
                st.checksum = "fail"
                problems.append(Problem(st.rank, st.file, "checksum", _msg(e)))
    progress.update(f"parse rank {st.rank}")
    try:
        st.entries = len(read_index(file).entries)
        st.parse = "ok"
    except Exception as e:  # noqa: BLE001 - any failure to parse is a finding, not a crash
        st.parse = "fail"
        problems.append(Problem(st.rank, st.file, "parse", _msg(e)))
    progress.advance(st.size or 0)


def _print_verify(directory: Path, manifest: Manifest | None, manifest_error: str | None,
                  world: int, statuses: dict[int, _RankStatus], problems: list[Problem],
                  notes: list[Problem], checksum: bool) -> None:
    print(f"checkpoint {directory}")
    if manifest is not None:
        print(f"manifest: {_manifest_line(_manifest_dict(manifest, None))}")
        if not checksum:
            print("checksums: skipped (--no-checksum): damaged tensor bytes would go unnoticed")
    else:
        what = "unreadable (see problems)" if manifest_error else f"none ({MANIFEST_NAME} not found)"
        print(f"manifest: {what}: world size inferred from the rank files ({world}); "
              "sizes and checksums not checked")
    if statuses:
        rows = [("rank", "file", "bytes", "size", "checksum", "parse")]
        for st in statuses.values():
            rows.append((str(st.rank), st.file, "-" if st.size is None else str(st.size),
                         st.size_check, st.checksum,
                         st.parse + ("" if st.entries is None else
                                     f" ({st.entries} entr{'y' if st.entries == 1 else 'ies'})")))
        _table(rows, indent=0, right={0, 2})
    for title, items in (("notes", notes), ("problems", problems)):
        if items:
            print(f"{title} ({len(items)}):")
            for p in items:
                print(f"  {p.render()}")
    if problems:
        print(f"verify: FAILED, {len(problems)} problem{'s' * (len(problems) != 1)}")
    else:
        print(f"verify: OK, {world} rank file{'s' * (world != 1)}")


class _Progress:
    """A one-line ``\\r`` progress bar on a terminal; silent when ``stream`` is not a tty.

    Shown only once a verify has run for ``DELAY`` seconds, so quick runs do not flicker.
    """

    DELAY = 0.5

    def __init__(self, stream: TextIO, total_bytes: int, total_files: int) -> None:
        self._stream = stream
        self._on = bool(getattr(stream, "isatty", lambda: False)())
        self._total, self._n = total_bytes, total_files
        self._done = self._files = self._width = 0
        self._t0 = time.monotonic()

    def update(self, label: str) -> None:
        if not self._on or time.monotonic() - self._t0 < self.DELAY:
            return
        frac = self._done / self._total if self._total else self._files / max(self._n, 1)
        bar = "#" * int(20 * frac)
        line = (f"verify [{bar:<20}] {self._files}/{self._n}  {_human(self._done)}/"
                f"{_human(self._total)}  {time.monotonic() - self._t0:.0f}s  {label}")
        line = line[: shutil.get_terminal_size((80, 24)).columns - 1]
        self._stream.write("\r" + line.ljust(self._width))
        self._stream.flush()
        self._width = len(line)

    def advance(self, nbytes: int) -> None:
        self._done += nbytes
        self._files += 1
        self.update("")

    def close(self) -> None:
        if self._width:
            self._stream.write("\r" + " " * self._width + "\r")
            self._stream.flush()


# ---------------------------------------------------------------------------------- helpers


def _scan(directory: Path) -> tuple[dict[int, Path], list[str]]:
    """The rank files ``{rank: path}`` (sorted) and the leftover temp file names in ``directory``."""
    ranks: dict[int, Path] = {}
    temps: list[str] = []
    for name in sorted(os.listdir(directory)):
        if m := _RANK_FILE.fullmatch(name):
            ranks[int(m.group(1))] = directory / name
        elif is_temp_file(name):
            temps.append(name)
    return dict(sorted(ranks.items())), temps


def _try_manifest(directory: Path) -> tuple[Manifest | None, str | None]:
    try:
        return read_manifest(directory), None
    except (CheckpointError, OSError, ValueError) as e:
        return None, _msg(e)


def _manifest_dict(manifest: Manifest | None, error: str | None) -> dict[str, Any] | None:
    if error is not None:
        return {"error": error}
    return None if manifest is None else json.loads(manifest.to_json())


def _manifest_line(m: dict[str, Any] | None) -> str:
    if m is None:
        return f"none ({MANIFEST_NAME} not found)"
    if "error" in m:
        return f"unreadable: {m['error']}"
    return (f"{MANIFEST_NAME} (format {m.get('format_version')}, world size {m.get('world_size')}, "
            f"created {m.get('created')}, checksums {m.get('checksum_algorithm')})")


def _name(rank: int) -> str:
    return f"checkpoint_{rank}.pt"


def _msg(e: BaseException) -> str:
    """The message of ``e`` without the file path our errors append (the line names the file)."""
    if isinstance(e, CheckpointError):
        return e.reason
    return f"{type(e).__name__}: {e}"


def _fail(message: str) -> int:
    print(f"dist-restore: error: {message}", file=sys.stderr)
    return 1


def _dtype(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def _shape(shape: Sequence[int]) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def _short_repr(value: Any, limit: int = 40) -> str:
    r = repr(value)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover - unreachable


def _table(rows: list[tuple[str, ...]], *, indent: int, right: Collection[int] = ()) -> None:
    """Prints ``rows`` as aligned columns (columns in ``right`` right-aligned)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        print((" " * indent + "  ".join(cells)).rstrip())
