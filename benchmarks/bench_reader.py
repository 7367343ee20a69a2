"""Benchmark ``dist_restore.CheckpointReader`` against torch's reference reader and ``torch.load``.

Run: ``python benchmarks/bench_reader.py [--quick] [--size-gib 1.0] [--repeats 5] [--markdown]``,
or ``python benchmarks/bench_reader.py --cold [--size-gib 1.0] [--repeats 3]`` for scenario D only.

Every file is written to a temporary directory (removed at the end) and read once before timing
so that all readers start from a warm page cache. Each number is the MEDIAN of ``--repeats``
rounds; within a round every alternative runs once, in an order rotated from round to round, so
that machine noise hits the alternatives alike. One untimed warm-up call precedes the rounds
(except for the slow reference metadata cases, which run ``--ref-repeats`` rounds only).

A. 10,000 small tensors (float32, 64 elements, keys ``layers.{i}.w``):
   * indexing: ``read_index(file).entries`` (ours) vs the reference reader's metadata step
     ``with FakeTensorMode(): torch.load(file)`` vs a full ``torch.load(weights_only=True)`` and
     ``torch.load(mmap=True, weights_only=True)``. Target: reference / ours >= 20x.
   * restoring 1% of the keys (every 100th key) into a target dict of preallocated tensors, and
     into one of ``None`` values (allocate mode): ours vs the reference reader vs a full
     ``torch.load``. Target: ours / full torch.load <= 10%.
B. One large file (16 float32 tensors, ``--size-gib`` in all) restored into preallocated targets:
   ours with ``verify="crc32"`` and ``verify="none"``, the reference reader, ``torch.load`` +
   ``copy_``, ``torch.load(mmap=True)`` + ``copy_``, against a plain memcpy of the same bytes between
   two preallocated buffers (``dst.copy_(src)`` in torch, ``np.copyto`` in numpy): GB/s (1 GB = 1e9
   bytes) and the ratio to each memcpy. Target: ours / the faster memcpy <= 1.5x. Allocate mode
   (``None`` targets) for ours, the reference and ``torch.load``.
C. Peak memory of B's restores, one fresh SUBPROCESS per variant: targets are allocated and
   touched first, then a thread samples ``/proc/self/statm`` every 0.5 ms during the read.
   Anonymous memory (resident - shared) is reported apart from file/shmem-backed pages (the
   mmap'd file is page cache, not an allocation). The kernel's exact peak of the total RSS (file
   pages included) is shown too: ``VmHWM`` after resetting it through ``/proc/self/clear_refs``.
   (``ru_maxrss`` is useless here: Linux carries the parent's peak over fork+exec into the child.)
   Target: ours' anonymous peak beyond the targets (allocate mode: beyond the result) <= 64 MiB.
D. ``--cold`` (run instead of A-C): a restore after a failure reads files that are not in the page
   cache. One file of ``--size-gib`` (default 1.0) in 200 float32 tensors, restored into
   preallocated targets, once COLD (the file's pages dropped from the page cache with
   ``posix_fadvise(POSIX_FADV_DONTNEED)`` right before every timed run: no root needed) and once
   WARM (the same call again right after). Cases: ours (CRC32 on), ``torch.load(mmap=True)`` +
   ``copy_``, a plain ``read()`` of the whole file in 64 MiB blocks into one reused buffer (the
   file-system limit), the same with CRC32 of every block, a 10% partial restore (every 10th key)
   by ours and by ``torch.load(mmap=True)`` + ``copy_``, and a memcpy of the file's size (the
   memory limit). Medians of ``--repeats`` rounds (default 3) in rotated order. Targets: cold full
   <= 1.0x torch.load(mmap) + copy_ and <= 1.0x the plain read(); cold 10% <= 0.8x
   torch.load(mmap) + copy_ of the same 10%; warm full <= 1.5x the plain read() with CRC32.
   Cold numbers on a shared VM disk are noisy: read the spread column.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

import numpy as np
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed.checkpoint._experimental.checkpoint_reader import CheckpointReader as RefReader
from torch.distributed.checkpoint._experimental.types import RankInfo as RefRankInfo

from dist_restore import CheckpointReader, RankInfo, read_index
from dist_restore._base.crc import crc32

MIB, GIB, N_BIG = 1 << 20, 1 << 30, 16  # N_BIG: tensors in scenario B's file
MEM_VARIANTS = ("ours crc32", "ours none", "ours alloc", "reference", "torch.load(mmap)+copy_",
                "torch.load+copy_")
warnings.filterwarnings("ignore", message="The given buffer is not writable")


@dataclass(frozen=True)
class Timing:
    median: float
    runs: int
    spread: float  # (max - min) / median


@dataclass
class Table:
    title: str
    headers: list[str]
    rows: list[list[str]] = field(default_factory=list)

    def render(self, markdown: bool) -> str:
        if markdown:
            align = "|" + "|".join(":---" if i == 0 else "---:" for i in range(len(self.headers))) + "|"
            body = ["| " + " | ".join(r) + " |" for r in [self.headers, *self.rows]]
            return "\n".join([f"### {self.title}", "", body[0], align, *body[1:], ""])
        widths = [max(len(r[i]) for r in [self.headers, *self.rows]) for i in range(len(self.headers))]
        fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        rule = "-" * len(fmt(self.headers))
        return "\n".join([self.title, rule, fmt(self.headers), rule, *map(fmt, self.rows), ""])


def machine_info() -> list[str]:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor() or "unknown")
    mem = next(int(ln.split()[1]) * 1024 for ln in Path("/proc/meminfo").read_text().splitlines()
               if ln.startswith("MemTotal"))
    return [f"CPU: {cpu}; cores: {os.cpu_count()} (usable {len(os.sched_getaffinity(0))}); "
            f"RAM: {mem / GIB:.1f} GiB",
            f"python {platform.python_version()}, torch {torch.__version__} "
            f"({torch.get_num_threads()} intra-op threads), numpy {np.__version__}",
            f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}"]


def warm(path: Path) -> None:
    """Read the file once so every reader starts from the page cache."""
    buf = bytearray(64 * MIB)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass


def bench(cases: dict[str, Callable[[], Any]], repeats: int, limits: dict[str, int]) -> dict[str, Timing]:
    """Median wall time per case; each round runs every case once, in a rotated order."""
    for name, fn in cases.items():
        if name not in limits:
            fn()  # warm-up: lazy imports, first-touch of buffers, allocator caches
    times: dict[str, list[float]] = {name: [] for name in cases}
    names = list(cases)
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            if len(times[name]) >= limits.get(name, repeats):
                continue
            gc.collect()
            t0 = time.perf_counter()
            out = cases[name]()
            times[name].append(time.perf_counter() - t0)
            del out
    return {n: Timing(statistics.median(t), len(t), (max(t) - min(t)) / statistics.median(t))
            for n, t in times.items()}


def fmt_s(s: float) -> str:
    return f"{s * 1e3:.1f} ms" if s < 10 else f"{s:.2f} s"


def row(name: str, t: Timing, *extra: str) -> list[str]:
    return [name, fmt_s(t.median), *extra, str(t.runs), f"{t.spread:.0%}"]


def fake_load(file: Path) -> Any:
    with FakeTensorMode():
        return torch.load(file)


def scenario_a(tmp: Path, n: int, repeats: int, ref_repeats: int) -> tuple[list[Table], dict[str, float]]:
    (d := tmp / "small").mkdir()
    file = d / "checkpoint_0.pt"
    torch.save({f"layers.{i}.w": torch.randn(64) for i in range(n)}, file)
    warm(file)
    ours, ref = CheckpointReader(RankInfo(0, 1)), RefReader(RefRankInfo(0, 1))
    keys = [f"layers.{i}.w" for i in range(0, n, 100)]
    targets = {k: torch.zeros(64) for k in keys}
    slow = {"ref meta": ref_repeats, "ref pre": ref_repeats, "ref none": ref_repeats}
    t = bench({
        "ours index": lambda: read_index(file).entries,
        "ref meta": lambda: fake_load(file),
        "load": lambda: torch.load(file, weights_only=True),
        "load mmap": lambda: torch.load(file, weights_only=True, mmap=True),
        "ours pre": lambda: ours.read(d, targets),
        "ref pre": lambda: ref.read(str(d), targets),
        "ours none": lambda: ours.read(d, dict.fromkeys(keys)),
        "ref none": lambda: ref.read(str(d), dict.fromkeys(keys)),
    }, repeats, slow)
    x = lambda a, b: f"{t[a].median / t[b].median:.1f}x"
    idx = Table(f"A1. Index {n:,} small tensors ({file.stat().st_size / MIB:.1f} MiB file)",
                ["method", "median", "vs ours", "runs", "spread"])
    for name, key in [("ours: read_index(file).entries", "ours index"),
                      ("reference metadata: FakeTensorMode torch.load", "ref meta"),
                      ("torch.load(weights_only=True)", "load"),
                      ("torch.load(mmap=True, weights_only=True)", "load mmap")]:
        idx.rows.append(row(name, t[key], x(key, "ours index")))
    part = Table(f"A2. Restore 1% ({len(keys)} of {n:,} keys)",
                 ["method", "median", "vs full torch.load", "runs", "spread"])
    pct = lambda k: f"{t[k].median / t['load'].median:.1%}"
    for name, key in [("ours, preallocated targets", "ours pre"), ("reference, preallocated targets", "ref pre"),
                      ("ours, None values", "ours none"), ("reference, None values", "ref none"),
                      ("full torch.load(weights_only=True)", "load")]:
        part.rows.append(row(name, t[key], pct(key)))
    ratios = {"index": t["ref meta"].median / t["ours index"].median,
              "pre": t["ours pre"].median / t["load"].median,
              "none": t["ours none"].median / t["load"].median}
    return [idx, part], ratios


def big_keys() -> list[str]:
    return [f"t{i}" for i in range(N_BIG)]


def build_big(tmp: Path, size_gib: float) -> tuple[Path, int]:
    (d := tmp / "big").mkdir()
    numel = int(size_gib * GIB) // N_BIG // 4
    torch.save({k: torch.empty(numel).uniform_() for k in big_keys()}, d / "checkpoint_0.pt")
    warm(d / "checkpoint_0.pt")
    return d, numel


def scenario_b(d: Path, numel: int, repeats: int) -> tuple[list[Table], dict[str, float]]:
    file, keys, nbytes = d / "checkpoint_0.pt", big_keys(), N_BIG * numel * 4
    targets = {k: torch.zeros(numel) for k in keys}
    src, dst = torch.ones(nbytes, dtype=torch.uint8), torch.zeros(nbytes, dtype=torch.uint8)
    src_np, dst_np = src.numpy(), dst.numpy()
    ours_crc, ours_none = CheckpointReader(RankInfo(0, 1)), CheckpointReader(RankInfo(0, 1), verify="none")
    ref = RefReader(RefRankInfo(0, 1))

    def load_copy(mmap: bool) -> None:
        sd = torch.load(file, weights_only=True, mmap=mmap)
        for k in keys:
            targets[k].copy_(sd[k])

    t = bench({
        "ours crc32": lambda: ours_crc.read(d, targets),
        "ours none": lambda: ours_none.read(d, targets),
        "ref": lambda: ref.read(str(d), targets),
        "load+copy": lambda: load_copy(False),
        "mmap+copy": lambda: load_copy(True),
        "memcpy torch": lambda: dst.copy_(src),
        "memcpy numpy": lambda: np.copyto(dst_np, src_np),
        "ours alloc": lambda: ours_crc.read(d, dict.fromkeys(keys)),
        "ref alloc": lambda: ref.read(str(d), dict.fromkeys(keys)),
        "load": lambda: torch.load(file, weights_only=True),
    }, repeats, {})
    base = min(t["memcpy torch"].median, t["memcpy numpy"].median)
    cols = ["method", "median", "GB/s", "vs torch copy_", "vs np.copyto", "runs", "spread"]
    gbs = lambda k: f"{nbytes / t[k].median / 1e9:.2f}"
    vs = lambda k: [f"{t[k].median / t[m].median:.2f}x" for m in ("memcpy torch", "memcpy numpy")]
    size = f"{nbytes / GIB:.2f} GiB, {N_BIG} x {numel * 4 / MIB:.0f} MiB float32"
    pre = Table(f"B1. Restore into preallocated targets ({size})", cols)
    for name, key in [("ours, verify=crc32", "ours crc32"), ("ours, verify=none", "ours none"),
                      ("reference reader", "ref"), ("torch.load + copy_", "load+copy"),
                      ("torch.load(mmap=True) + copy_", "mmap+copy"),
                      ("memcpy: torch dst.copy_(src)", "memcpy torch"), ("memcpy: np.copyto", "memcpy numpy")]:
        pre.rows.append(row(name, t[key], gbs(key), *vs(key)))
    alloc = Table(f"B2. Allocate mode: None targets ({size})", cols)
    for name, key in [("ours, verify=crc32", "ours alloc"), ("reference reader", "ref alloc"),
                      ("torch.load(weights_only=True)", "load")]:
        alloc.rows.append(row(name, t[key], gbs(key), *vs(key)))
    del targets, src, dst, src_np, dst_np
    return [pre, alloc], {"crc32": t["ours crc32"].median / base, "none": t["ours none"].median / base}


N_COLD = 200  # tensors in scenario D's file


def drop_cache(path: Path) -> None:
    """Evict the file's pages from the page cache (clean pages only: the file was fsync'd)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def plain_read(path: Path, buf: memoryview, crc: bool) -> int:
    """The whole file by read() in ``len(buf)`` blocks into one reused buffer."""
    running = 0
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            if crc:
                running = crc32(buf[:n], running)
    return running


def scenario_d(tmp: Path, size_gib: float, repeats: int) -> tuple[list[Table], dict[str, float]]:
    (d := tmp / "cold").mkdir()
    file = d / "checkpoint_0.pt"
    numel = int(size_gib * GIB) // N_COLD // 4
    keys = [f"t{i}" for i in range(N_COLD)]
    torch.save({k: torch.empty(numel).uniform_() for k in keys}, file)
    fd = os.open(file, os.O_RDONLY)
    os.fsync(fd)  # DONTNEED keeps dirty pages
    os.close(fd)
    nbytes, fsize = N_COLD * numel * 4, file.stat().st_size
    targets = {k: torch.ones(numel) for k in keys}
    part_keys = keys[::10]
    part = {k: targets[k] for k in part_keys}
    ours = CheckpointReader(RankInfo(0, 1))
    buf = memoryview(bytearray(64 * MIB))
    src, dst = torch.ones(nbytes, dtype=torch.uint8), torch.zeros(nbytes, dtype=torch.uint8)

    def load_copy(ks: list[str]) -> None:
        sd = torch.load(file, weights_only=True, mmap=True)
        for k in ks:
            targets[k].copy_(sd[k])

    cases: dict[str, Callable[[], Any]] = {
        "ours": lambda: ours.read(d, targets),
        "mmap+copy": lambda: load_copy(keys),
        "read64": lambda: plain_read(file, buf, False),
        "read64 crc": lambda: plain_read(file, buf, True),
        "ours 10%": lambda: ours.read(d, part),
        "mmap+copy 10%": lambda: load_copy(part_keys),
    }
    for fn in cases.values():
        fn()  # warm-up (lazy imports, first touch)
    cold: dict[str, list[float]] = {n: [] for n in cases}
    hot: dict[str, list[float]] = {n: [] for n in cases}
    names = list(cases)
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            for times, dropping in ((cold, True), (hot, False)):
                if dropping:
                    drop_cache(file)
                gc.collect()
                t0 = time.perf_counter()
                cases[name]()
                times[name].append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    dst.copy_(src)
    memcpy = time.perf_counter() - t0
    tc = {n: Timing(statistics.median(v), len(v), (max(v) - min(v)) / statistics.median(v)) for n, v in cold.items()}
    tw = {n: Timing(statistics.median(v), len(v), (max(v) - min(v)) / statistics.median(v)) for n, v in hot.items()}
    tab = Table(f"D. Cold vs warm ({fsize / GIB:.2f} GiB file, {N_COLD} x {numel * 4 / MIB:.1f} MiB float32; "
                f"memcpy of {nbytes / GIB:.2f} GiB: {fmt_s(memcpy)})",
                ["method", "cold", "cold GB/s", "cold vs mmap+copy_", "cold spread", "warm", "warm GB/s",
                 "warm spread"])
    for label, key, size in [("ours, verify=crc32, full", "ours", nbytes),
                             ("torch.load(mmap=True) + copy_, full", "mmap+copy", nbytes),
                             ("plain read(), 64 MiB blocks", "read64", fsize),
                             ("plain read(), 64 MiB blocks + CRC32", "read64 crc", fsize),
                             ("ours, verify=crc32, 10% of keys", "ours 10%", nbytes // 10),
                             ("torch.load(mmap=True) + copy_, same 10%", "mmap+copy 10%", nbytes // 10)]:
        ref = "mmap+copy 10%" if "10%" in key else "mmap+copy"
        tab.rows.append([label, fmt_s(tc[key].median), f"{size / tc[key].median / 1e9:.2f}",
                         f"{tc[key].median / tc[ref].median:.2f}x", f"{tc[key].spread:.0%}",
                         fmt_s(tw[key].median), f"{size / tw[key].median / 1e9:.2f}", f"{tw[key].spread:.0%}"])
    ratios = {"cold/mmap": tc["ours"].median / tc["mmap+copy"].median,
              "cold/read": tc["ours"].median / tc["read64"].median,
              "cold10/mmap": tc["ours 10%"].median / tc["mmap+copy 10%"].median,
              "warm/readcrc": tw["ours"].median / tw["read64 crc"].median}
    return [tab], ratios


def cold_targets(r: dict[str, float]) -> Table:
    rows = [("D: cold full / torch.load(mmap) + copy_ <= 1.0x", r["cold/mmap"], 1.0),
            ("D: cold full / plain 64 MiB read() <= 1.0x", r["cold/read"], 1.0),
            ("D: cold 10% / torch.load(mmap) + copy_ of it <= 0.8x", r["cold10/mmap"], 0.8),
            ("D: warm full / plain read() + CRC32 <= 1.5x", r["warm/readcrc"], 1.5)]
    return Table("Targets", ["target", "measured", "result"],
                 [[name, f"{v:.2f}x", "PASS" if v <= lim else "FAIL"] for name, v, lim in rows])


def mem_child(variant: str, d: Path, numel: int) -> None:
    """Subprocess body of scenario C: print one JSON line of peak-memory figures."""
    keys, file = big_keys(), d / "checkpoint_0.pt"
    alloc = variant == "ours alloc"
    targets: dict[str, Any] = dict.fromkeys(keys) if alloc else {k: torch.ones(numel) for k in keys}
    page, fd = os.sysconf("SC_PAGE_SIZE"), os.open("/proc/self/statm", os.O_RDONLY)

    def sample() -> tuple[int, int]:  # (anonymous, file + shmem) resident bytes
        _, resident, shared = map(int, os.pread(fd, 256, 0).split()[:3])
        return (resident - shared) * page, shared * page

    base_anon, base_file = sample()
    peak = [base_anon, base_file, 0]
    stop = threading.Event()

    def sampler() -> None:
        while not stop.is_set():
            a, f = sample()
            peak[0], peak[1], peak[2] = max(peak[0], a), max(peak[1], f), peak[2] + 1
            time.sleep(0.0005)

    def hwm() -> int:  # peak total RSS (VmHWM) in bytes
        return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024

    try:  # reset VmHWM to the current RSS
        hwm0 = Path("/proc/self/clear_refs").write_text("5") and hwm()
    except OSError:
        hwm0 = -1
    th = threading.Thread(target=sampler, daemon=True)
    th.start()
    t0 = time.perf_counter()
    if variant.startswith("ours"):
        CheckpointReader(RankInfo(0, 1), verify="none" if variant == "ours none" else "crc32").read(d, targets)
    elif variant == "reference":
        RefReader(RefRankInfo(0, 1)).read(str(d), targets)
    else:
        sd = torch.load(file, weights_only=True, mmap="mmap" in variant)
        for k in keys:
            targets[k].copy_(sd[k])
    seconds = time.perf_counter() - t0
    stop.set()
    th.join()
    result = N_BIG * numel * 4 if alloc else 0
    print(json.dumps({"anon": peak[0] - base_anon - result, "file": peak[1] - base_file, "samples": peak[2],
                      "hwm": hwm() - hwm0 if hwm0 >= 0 else None, "seconds": seconds}))


def scenario_c(d: Path, numel: int, anon: dict[str, float], extra: list[str]) -> Table:
    """Fill ``anon`` with each variant's anonymous peak (MiB) beyond targets; return the table."""
    warm(d / "checkpoint_0.pt")
    tab = Table("C. Peak memory during B's restore, one subprocess per variant (targets allocated and "
                "touched before the baseline)",
                ["variant", "anon peak beyond targets", "file/shmem peak", "VmHWM growth", "samples", "time"])
    for v in MEM_VARIANTS:
        out = subprocess.run([sys.executable, __file__, "--mem-child", v, "--mem-dir", str(d),
                              "--mem-numel", str(numel), *extra], capture_output=True, text=True, check=True)
        m = json.loads(out.stdout.strip().splitlines()[-1])
        anon[v] = m["anon"] / MIB
        name = v + (" (beyond the result)" if v == "ours alloc" else "")
        tab.rows.append([name, f"{anon[v]:.1f} MiB", f"{m['file'] / MIB:.1f} MiB",
                         "n/a" if m["hwm"] is None else f"{m['hwm'] / MIB:.1f} MiB", str(m["samples"]),
                         fmt_s(m["seconds"])])
    return tab


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 256 MiB, 2,000 small tensors, 3 repeats")
    p.add_argument("--size-gib", type=float, default=None, help="size of scenario B's file (default 1.0)")
    p.add_argument("--repeats", type=int, default=None, help="rounds per measurement (default 5)")
    p.add_argument("--ref-repeats", type=int, default=None, help="rounds of scenario A's slow reference cases (3)")
    p.add_argument("--small-count", type=int, default=None, help="tensors in scenario A (default 10,000)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--markdown", action="store_true", help="print GitHub markdown tables")
    p.add_argument("--cold", action="store_true",
                   help="scenario D only: cold (page cache dropped per file) vs warm restores")
    p.add_argument("--mem-child", choices=MEM_VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--mem-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--mem-numel", type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.mem_child:
        return mem_child(a.mem_child, a.mem_dir, a.mem_numel)
    child_args = ["--threads", str(a.threads)] if a.threads else []
    size = a.size_gib or (0.25 if a.quick else 1.0)
    repeats = a.repeats or (3 if a.quick or a.cold else 5)
    ref_repeats = min(repeats, a.ref_repeats or (1 if a.quick else 3))
    n_small = a.small_count or (2_000 if a.quick else 10_000)
    md = a.markdown
    say = lambda s: print(s, flush=True)
    say(("## dist_restore reader benchmark\n\n" if md else "dist_restore reader benchmark\n")
        + "\n".join(("- " if md else "") + ln for ln in machine_info())
        + f"\n{'- ' if md else ''}repeats: {repeats} (reference metadata cases: {ref_repeats}); "
        + "times are medians; spread = (max - min) / median\n")
    tmp, rc = Path(tempfile.mkdtemp(prefix="bench_reader_")), dict[str, float]()
    if a.cold:
        try:
            tables, rd = scenario_d(tmp, size, repeats)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        say("\n".join(tab.render(md) for tab in tables))
        say(cold_targets(rd).render(md))
        say(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        return
    try:
        tables, ra = scenario_a(tmp, n_small, repeats, ref_repeats)
        say("\n".join(tab.render(md) for tab in tables))
        d, numel = build_big(tmp, size)
        tables, rb = scenario_b(d, numel, repeats)
        say("\n".join(tab.render(md) for tab in tables))
        gc.collect()
        say(scenario_c(d, numel, rc, child_args).render(md))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    targets = [("A: reference metadata / ours index >= 20x", f"{ra['index']:.1f}x", ra["index"] >= 20),
               ("A: ours 1% restore (preallocated) / full torch.load <= 10%", f"{ra['pre']:.1%}", ra["pre"] <= 0.10),
               ("A: ours 1% restore (None values) / full torch.load <= 10%", f"{ra['none']:.1%}", ra["none"] <= 0.10)]
    for k in ("crc32", "none"):
        targets.append((f"B: ours verify={k} / faster memcpy <= 1.5x", f"{rb[k]:.2f}x", rb[k] <= 1.5))
    for k in ("ours crc32", "ours none", "ours alloc"):
        targets.append((f"C: {k} anonymous peak beyond targets <= 64 MiB", f"{rc[k]:.1f} MiB", rc[k] <= 64))
    say(Table("Targets", ["target", "measured", "result"],
              [[name, val, "PASS" if ok else "FAIL"] for name, val, ok in targets]).render(md))
    say(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
