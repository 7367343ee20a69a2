"""``dist-restore verify``: completeness, sizes, checksums and that every rank file parses,
reporting every problem rather than the first."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, TextIO

from dist_restore._cli_util import (_human, _manifest_dict, _manifest_line, _msg, _name, _not_a_file,
                                    _scan, _table, _try_manifest)
from dist_restore._base.source import is_url, local_path, location, split
from dist_restore._format import hf
from dist_restore._format.dcp import check_item, is_dcp, load_object, locate_chunk, open_catalog
from dist_restore._format.hf import is_safetensors
from dist_restore._format.index import read_index
from dist_restore._format.manifest import MANIFEST_NAME, MAX_RANK_FILES, Manifest, RankFileInfo, _gaps, check_checkpoint
from dist_restore.errors import CheckpointError, UnsafeCheckpointError

#: A gap of this many missing rank files or more is reported as one problem, not one per rank.
_MISSING_LISTED = 16

_VERIFY_HELP = """\
Checks, reporting every problem (one line each, naming the rank and the file):
  1. completeness: the manifest (dist_restore_manifest.json), if there is one, gives the
     world size and the rank files; otherwise the world size is inferred from the rank
     files present (a rank number of 2^20 or more is a problem, not a rank). Missing rank
     files are problems (16 or more in a row: one problem for the run); so are leftover
     temporary files (.*.tmp) when there is no manifest (an interrupted save). With a
     manifest, temporary files and rank files beyond its world size are only noted.
  2. sizes and checksums (CRC32 of the whole file) against the manifest, rank by rank;
     skipped without a manifest.
  3. that every rank file parses: zip directory, CRC32 of data.pkl, restricted unpickle.

Step 3 does not read tensor data. The manifest checksum (step 2) is what catches damaged
tensor bytes: with --no-checksum, or without a manifest, a flipped bit inside a tensor
goes unnoticed here (restoring with the reader's CRC32 check still catches it).
The progress line on stderr (a terminal only) advances one rank file at a time."""


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



def _verify(args: argparse.Namespace) -> int:
    directory: Path = args.dir
    if is_dcp(directory):
        return _verify_dcp(args)
    if is_safetensors(directory):
        return _verify_safetensors(args)
    if is_url(directory):
        return _verify_rank_urls(args)
    checksum = not args.no_checksum
    problems: list[Problem] = []
    notes: list[Problem] = []  # worth saying, but restore would not fail over them
    manifest, manifest_error = _try_manifest(directory)
    if manifest_error:
        problems.append(Problem(None, MANIFEST_NAME, "manifest", manifest_error))
    found, temps = _scan(directory)

    long_gaps: list[tuple[int, Problem]] = []  # (first rank, problem), in rank order
    if manifest is not None:  # the commit record: it says which files make the checkpoint
        world = manifest.world_size
        infos: dict[int, RankFileInfo] = {i.rank: i for i in manifest.ranks}
        files = {r: directory / i.file for r, i in infos.items()}
        notes += [Problem(None, t, "temp", "leftover temporary file (ignored: the manifest "
                          "commits the checkpoint)") for t in temps]
        notes += [Problem(r, f.name, "extra", f"rank file not in the manifest (world size {world})")
                  for r, f in found.items() if r >= world]
    else:  # plain torch.save directory, or an interrupted write (see check_checkpoint)
        problems += [Problem(r, f.name, "extra", f"rank number beyond the {MAX_RANK_FILES} ranks accepted: not a "
                             "rank file of this checkpoint") for r, f in found.items() if r >= MAX_RANK_FILES]
        ranks = [r for r in found if r < MAX_RANK_FILES]
        world = ranks[-1] + 1 if ranks else 0
        # missing ranks from the gaps between the files present: a long gap is one problem
        for a, b in _gaps(ranks, world):
            if b - a + 1 >= _MISSING_LISTED:
                long_gaps.append((a, Problem(None, None, "missing", f"ranks {a}-{b} have no file ({_name(a)} to "
                                                                    f"{_name(b)}: {b - a + 1} files)")))
            else:
                ranks += range(a, b + 1)
        infos, files = {}, {r: directory / _name(r) for r in sorted(ranks)}
        problems += [Problem(None, t, "temp", "leftover temporary file: an interrupted save? "
                             "(no manifest commits this checkpoint)") for t in temps]
        if not found and not manifest_error:
            problems.append(Problem(None, None, "missing", "no rank files (checkpoint_<rank>.pt) "
                                    "and no manifest: not a checkpoint directory?"))

    statuses = {r: _RankStatus(r, f.name, f.is_file()) for r, f in files.items()}
    gap = 0
    for st in statuses.values():
        while gap < len(long_gaps) and long_gaps[gap][0] < st.rank:  # missing ranks told in rank order
            problems.append(long_gaps[gap][1])
            gap += 1
        if st.exists:
            try:
                st.size = files[st.rank].stat().st_size
            except OSError as e:  # gone or unreadable since the listing
                st.exists = False
                problems.append(Problem(st.rank, st.file, "missing", _msg(e)))
        else:
            problems.append(Problem(st.rank, st.file, "missing", _not_a_file(files[st.rank]) + (
                " (listed in the manifest)" if manifest else "")))
    problems += [p for _a, p in long_gaps[gap:]]
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


def _verify_dcp(args: argparse.Namespace) -> int:
    """``verify`` of a DCP directory: ``.metadata`` read safely and checked (item files present,
    ranges inside them), then every item's framing parsed and (unless ``--no-checksum``) every
    record's CRC32 checked, tensor chunks against the metadata; every problem reported."""
    directory: Path = args.dir
    checksum = not args.no_checksum
    problems: list[Problem] = []
    items: list[tuple[str, Any, Any]] = []
    try:
        cat, _order = open_catalog(directory)
        for e in cat.entries.values():
            items += [(e.key, c, e) for c in e.chunks]
        items += [(k, it, None) for k, it in cat.objects.items()]
    except (CheckpointError, OSError) as e:
        cat = None
        problems.append(Problem(None, getattr(e, "file", None) and Path(str(e.file)).name, "metadata", _msg(e)))
    checked = nbytes = 0
    if cat is not None:
        source = cat.source
        for key, where, entry in sorted(items, key=lambda x: (x[1].file, x[1].offset)):
            path = cat.path(where.file)
            try:
                fd = cat.open(where.file)
            except OSError as e:
                problems.append(Problem(None, where.file, "missing", _msg(e)))
                continue
            try:
                item = source.items[(where.file, where.offset)] if entry is not None else where
                if entry is not None:
                    locate_chunk(fd, path, item, key, entry.dtype, where)
                else:
                    load_object(fd, path, item, key)
                nbytes += check_item(fd, path, item, key, checksum=checksum)
                checked += 1
            except UnsafeCheckpointError as e:
                problems.append(Problem(None, where.file, "unsafe", f"key {key!r}: {_msg(e)}"))
            except (CheckpointError, OSError) as e:
                kind = "checksum" if "CRC32" in str(e) else "parse"
                problems.append(Problem(None, where.file, kind, f"key {key!r}: {_msg(e)}"))
            finally:
                fd.close()
    ok = not problems
    if args.json:
        print(json.dumps({"ok": ok, "dir": str(directory), "format": "dcp", "checksum": checksum,
                          "items": len(items), "items_ok": checked, "bytes_checked": nbytes,
                          "problems": [asdict(p) for p in problems]}, indent=2))
        return 0 if ok else 1
    print(f"dcp checkpoint {directory}")
    files = len(cat.file_sizes) if cat is not None else 0
    print(f"metadata: {'unreadable (see problems)' if cat is None else f'{len(items)} items in {files} file(s)'}")
    if not checksum:
        print("checksums: skipped (--no-checksum): damaged tensor bytes would go unnoticed")
    for p in problems:
        print(f"  {p.render()}")
    if problems:
        print(f"verify: FAILED, {len(problems)} problem{'s' * (len(problems) != 1)}")
    else:
        print(f"verify: OK, {checked} items, {_human(nbytes)} checked")
    return 0 if ok else 1


def _verify_rank_urls(args: argparse.Namespace) -> int:
    """``verify`` of our rank files at a URL: the commit state against one listing (manifest,
    every rank object, its size and, unless ``--no-checksum``, its CRC32, streamed), then every
    rank object's zip directory and ``data.pkl`` read and checked (through the allowlist)."""
    from dist_restore._format import rankfiles
    from dist_restore._format.manifest import check_checkpoint

    src = str(args.dir)
    checksum = not args.no_checksum
    problems: list[Problem] = []
    loc = location(src)
    files = rankfiles.rank_files(loc)
    manifest = None
    try:
        manifest = check_checkpoint(loc, world_size=None, verify=checksum)
    except (CheckpointError, OSError, ValueError) as e:
        f = getattr(e, "file", None)
        problems.append(Problem(None, f and str(f).rstrip("/").rsplit("/", 1)[-1], "manifest", _msg(e)))
    for r, f in files.items():
        try:
            rankfiles._index(loc, f)
        except (CheckpointError, OSError) as e:
            problems.append(Problem(r, f, "parse", _msg(e)))
    ok = not problems
    has = manifest is not None or loc.is_file(MANIFEST_NAME)
    checked = "sizes and CRC32s against the manifest" if has and checksum else \
        "sizes against the manifest" if has else "no manifest: files present, nothing to compare"
    if args.json:
        print(json.dumps({"ok": ok, "dir": src, "format": "rank files", "checksum": checksum and has,
                          "files": len(files), "problems": [asdict(p) for p in problems]}, indent=2))
        return 0 if ok else 1
    print(f"rank files {src}")
    print(f"files: {len(files)}; {checked}; every file's zip directory and data.pkl parsed")
    for p in problems:
        print(f"  {p.render()}")
    print(f"verify: FAILED, {len(problems)} problem{'s' * (len(problems) != 1)}" if problems else
          f"verify: OK, {len(files)} file{'s' * (len(files) != 1)}")
    return 0 if ok else 1


def _verify_safetensors(args: argparse.Namespace) -> int:
    """``verify`` of a Hugging Face safetensors file or directory (local, or a URL): every file's
    header parsed and checked on its own (dtypes, shapes, offsets filling the data section
    exactly), every problem reported; then the index, if any, against the headers. Safetensors
    records no checksum: the tensor bytes themselves are not checked."""
    src = args.dir
    problems: list[Problem] = []
    if (hf._remote_kind(src) == "file") if is_url(src) else local_path(src).is_file():
        loc, name = split(src)
        names = [name]
    else:
        loc = location(src)
        names = sorted(n for n in loc.files() if n.endswith(".safetensors"))
    tensors = 0
    for f in names:
        try:
            with loc.open(f) as fd:
                tensors += len(hf.parse_header(loc.join(f), fd, f)[0])
        except (CheckpointError, OSError) as e:
            problems.append(Problem(None, f, "parse", _msg(e)))
    if not problems:  # the index (weight map) against the headers: files it names, keys they hold
        try:
            tensors = len(hf.open_catalog(src)[0].entries)
        except (CheckpointError, OSError) as e:
            f = getattr(e, "file", None)
            key = getattr(e, "key", None)
            problems.append(Problem(None, f and str(f).rstrip("/").rsplit("/", 1)[-1], "index",
                                    ("" if key is None else f"key {key!r}: ") + _msg(e)))
    ok = not problems
    if args.json:
        print(json.dumps({"ok": ok, "dir": str(src), "format": "safetensors", "checksum": False,
                          "files": len(names), "tensors": tensors,
                          "problems": [asdict(p) for p in problems]}, indent=2))
        return 0 if ok else 1
    print(f"safetensors checkpoint {src}")
    print(f"files: {len(names)}, {tensors} tensors; checksums: none (safetensors records none): "
          "headers checked, tensor bytes not")
    for p in problems:
        print(f"  {p.render()}")
    if problems:
        print(f"verify: FAILED, {len(problems)} problem{'s' * (len(problems) != 1)}")
    else:
        print(f"verify: OK, {len(names)} file{'s' * (len(names) != 1)}, {tensors} tensors")
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


