"""Restore into CUDA tensors: ours against torch.load, safetensors and the limits (needs a GPU).

Run: ``python benchmarks/bench_cuda.py [--size-gib 2] [--tensors 32] [--repeats 3] [--cold]``.

Writes one rank file of ``--tensors`` float32 tensors (``--size-gib`` in all) with ``torch.save``
and the same tensors as a safetensors file, then restores them onto ``cuda:0``. Into
preallocated CUDA targets:
  * ours, ``verify="crc32"`` and ``"none"``: large records are read into pinned host buffers on
    the I/O pool and copied to the device asynchronously while the next ones are read;
  * ours with that path switched off (the generic ``copy_`` from the mapped file; what the
    reader did before);
  * ``torch.load(mmap=True)`` + ``copy_`` into the targets;
  * safetensors ``safe_open`` + ``copy_`` into the targets.
Allocating (no targets): ours ``read(map_location="cuda:0")``, ``torch.load(map_location=...)``,
safetensors ``load_file(device=...)``. Limits: one pinned host buffer of the file's tensor bytes
copied to the device (the bus), and a plain ``read()`` of the file in 64 MiB blocks (the disk or
page cache). ``--cold``: the file's pages are dropped (``posix_fadvise(DONTNEED)``) before every
timed run. Medians of ``--repeats`` rotated rounds; the ratio column is against
``torch.load(mmap=True) + copy_``. A small-tensor case (``--small`` tensors of 64 KiB) is timed
into preallocated targets too.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from dist_restore import CheckpointReader, RankInfo
from dist_restore._bytes import read as _read

DEV = torch.device("cuda", 0)


def drop(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def timed(fn: Callable[[], object], files: list[Path], cold: bool) -> float:
    if cold:
        for f in files:
            drop(f)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--size-gib", type=float, default=2.0)
    ap.add_argument("--tensors", type=int, default=32)
    ap.add_argument("--small", type=int, default=4000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cold", action="store_true")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_cuda needs a CUDA device")
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    numel = int(a.size_gib * (1 << 30)) // 4 // a.tensors
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        d = Path(tmp)
        g = torch.Generator().manual_seed(0)
        sd = {f"layers.{i}.w": torch.randn(numel, generator=g) for i in range(a.tensors)}
        torch.save(sd, d / "checkpoint_0.pt")
        save_file(sd, d / "model.safetensors")
        small = {f"s.{i}": torch.randn(16 << 10, generator=g) for i in range(a.small)}
        (d / "small").mkdir()
        torch.save(small, d / "small" / "checkpoint_0.pt")
        nbytes = sum(t.nbytes for t in sd.values())
        pinned = torch.cat([t for t in sd.values()]).view(torch.uint8).pin_memory()
        del sd
        files = [d / "checkpoint_0.pt"]
        sfiles = [d / "model.safetensors"]
        tgt = {k: torch.zeros(numel, device=DEV) for k in (f"layers.{i}.w" for i in range(a.tensors))}
        stgt = {k: torch.zeros(16 << 10, device=DEV) for k in small}
        dev_buf = torch.empty(nbytes, dtype=torch.uint8, device=DEV)
        direct = _read._RankFile._direct_target

        def cpu_only(self, lf, span, kind="cpu"):  # the staged path off: what the reader did before
            return None if kind == "cuda" else direct(self, lf, span, kind)

        def ours(verify: str, on: bool = True) -> Callable[[], object]:
            def run() -> object:
                _read._RankFile._direct_target = direct if on else cpu_only
                try:
                    return CheckpointReader(RankInfo(0, 1), verify=verify).load(d, tgt)
                finally:
                    _read._RankFile._direct_target = direct
            return run

        def mmap_copy() -> None:
            src = torch.load(files[0], mmap=True, weights_only=True)
            for k, t in tgt.items():
                t.copy_(src[k])

        def st_copy() -> None:
            with safe_open(sfiles[0], framework="pt", device="cpu") as f:
                for k, t in tgt.items():
                    t.copy_(f.get_tensor(k))

        def plain_read() -> None:
            buf = bytearray(64 << 20)
            with open(files[0], "rb", buffering=0) as f:
                while f.readinto(buf):
                    pass

        def small_ours() -> None:
            CheckpointReader(RankInfo(0, 1)).load(d / "small", stgt)

        def small_mmap() -> None:
            src = torch.load(d / "small" / "checkpoint_0.pt", mmap=True, weights_only=True)
            for k, t in stgt.items():
                t.copy_(src[k])

        cases: list[tuple[str, Callable[[], object], list[Path]]] = [
            ("ours, crc32, into targets", ours("crc32"), files),
            ("ours, no CRC, into targets", ours("none"), files),
            ("ours, crc32, generic copy_ (before)", ours("crc32", on=False), files),
            ("torch.load(mmap=True) + copy_", mmap_copy, files),
            ("safetensors safe_open + copy_", st_copy, sfiles),
            ("ours, crc32, allocating", lambda: CheckpointReader(RankInfo(0, 1)).read(d, map_location=str(DEV)), files),
            ("torch.load(map_location=cuda)", lambda: torch.load(files[0], map_location=DEV, weights_only=True), files),
            ("safetensors load_file(device=cuda)", lambda: load_file(sfiles[0], device="cuda:0"), sfiles),
            ("limit: pinned -> device copy", lambda: dev_buf.copy_(pinned, non_blocking=True), []),
            ("limit: plain read(), 64 MiB blocks", plain_read, files),
            (f"small: ours, {a.small} x 64 KiB into targets", small_ours, [d / "small" / "checkpoint_0.pt"]),
            (f"small: torch.load(mmap) + copy_, {a.small} x 64 KiB", small_mmap, [d / "small" / "checkpoint_0.pt"]),
        ]
        for _, fn, _f in cases:  # warm-up (and the page cache, for warm runs)
            fn()
        times: dict[str, list[float]] = {n: [] for n, _, _ in cases}
        for r in range(a.repeats):
            rot = cases[r % len(cases):] + cases[: r % len(cases)]
            for name, fn, fs in rot:
                times[name].append(timed(fn, fs, a.cold))
        ref = statistics.median(times["torch.load(mmap=True) + copy_"])
        mode = "cold" if a.cold else "warm"
        print(f"\n{mode}; {platform.node()}, {os.cpu_count()} cpus, {torch.cuda.get_device_name(0)}, "
              f"torch {torch.__version__}, threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.2f}; "
              f"{a.tensors} x {numel * 4 / 2**20:.0f} MiB ({nbytes / 1e9:.2f} GB)")
        print("| case | median s | GB/s | x mmap+copy_ | min-max s |")
        print("|:---|---:|---:|---:|---:|")
        for name, _, _ in cases:
            m = statistics.median(times[name])
            size = a.small * (64 << 10) if name.startswith("small") else nbytes
            print(f"| {name} | {m:.3f} | {size / m / 1e9:.2f} | {m / ref:.2f}x | "
                  f"{min(times[name]):.3f}-{max(times[name]):.3f} |")
        # the restored values are the file's
        res = CheckpointReader(RankInfo(0, 1)).load(d, tgt)
        src = torch.load(files[0], mmap=True, weights_only=True)
        assert all(torch.equal(tgt[k].cpu(), src[k]) for k in tgt), "restored values differ"
        print(f"values checked: {len(tgt)} tensors equal to torch.load; bytes_verified {res.bytes_verified}")


if __name__ == "__main__":
    main()
