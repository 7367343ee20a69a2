"""A structure-aware mutation fuzzer of rank files and index files (issue 23).

    python fuzz/mutate.py [--n 5000] [--seed 0] [--per-child 500] [--save DIR]

Seeds: a ``torch.save`` file of a varied state dict (every common dtype, views, offsets,
nested containers, a Parameter, non-tensor values) and a file written by ``CheckpointWriter``
(with its index file). Each mutant edits one of them where the parser looks: a field of the zip's
central directory, local headers or end records, a byte or integer of ``data.pkl``, a section of
the index file, or anywhere; as flipped bits, boundary integers (0, -1, 2^31-1, 2^32-1, 2^63-1),
truncations and spliced runs. Every mutant is read by ``CheckpointReader.read`` (and, for the
writer's seed, with and without its index file) and, in the same child, by
``torch.load(weights_only=True)``; children run ``--per-child`` mutants each under a 4 GiB
address-space limit and a timeout. Outcomes:

* ``same``: our result equals torch.load's (type, dtype, shape, stride, bits of every leaf);
* ``ours``: our own error (a ``CheckpointError``) naming the file;
* ``torch-only-fails``: we read values where torch.load fails (a record it needs and we do not,
  such as ``version``, damaged): counted, not a failure;
* failures: ``builtin`` (another exception), ``wrong`` (values differ), ``unnamed`` (our error
  without the file), ``slow`` (> 5 s), and a child that died (a signal) or hung.

A failing mutant is written to ``--save`` (``tests/hostile/`` is where regressions are kept).
Exit status 1 when anything failed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BOUNDARY = [0, 1, 0x7F, 0xFF, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, (1 << 63) - 1, (1 << 64) - 1]


def _seed_state() -> dict[str, Any]:
    import collections

    import torch

    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 8, generator=g)
    return {
        "w": base,
        "view": base[1:4, 2:7],
        "t": base.t(),
        "bf": torch.randn(5, generator=g).to(torch.bfloat16),
        "i": torch.randint(0, 100, (3, 4), generator=g, dtype=torch.int64),
        "b": torch.tensor([True, False, True]),
        "scalar": torch.tensor(1.5),
        "empty": torch.empty(0, 3),
        "p": torch.nn.Parameter(torch.randn(4, generator=g)),
        "nested": {"a": [torch.arange(3), (torch.ones(2), 7)], "od": collections.OrderedDict(x=1.5)},
        "meta": {"step": 10, "name": "run", "sizes": torch.Size([2, 3])},
    }


def seeds(work: Path) -> dict[str, bytes]:
    """``{name: file bytes}``: ``torch_save`` (checkpoint_0.pt) and ``writer`` / ``writer_idx``
    (a CheckpointWriter rank file and its index file)."""
    import torch

    from dist_restore import CheckpointWriter, RankInfo

    out: dict[str, bytes] = {}
    d = work / "seed_torch"
    d.mkdir(parents=True, exist_ok=True)
    torch.save(_seed_state(), d / "checkpoint_0.pt")
    out["torch_save"] = (d / "checkpoint_0.pt").read_bytes()
    d = work / "seed_writer"
    if d.exists():
        shutil.rmtree(d)
    CheckpointWriter(RankInfo(0, 1)).write(d, _seed_state())
    out["writer"] = (d / "checkpoint_0.pt").read_bytes()
    idx = d / "checkpoint_0.idx"
    if idx.exists():
        out["writer_idx"] = idx.read_bytes()
    return out


def _regions(data: bytes) -> list[tuple[int, int]]:
    """Byte ranges the parser reads: the end records, the central directory, local headers and
    data.pkl (found by their signatures), and the whole file."""
    out = [(0, len(data))]
    cd = data.rfind(b"PK\x01\x02")
    eocd = data.rfind(b"PK\x05\x06")
    if eocd >= 0:
        out.append((max(0, eocd - 100), len(data)))
    first_cd = data.find(b"PK\x01\x02")
    if first_cd >= 0 and cd >= 0:
        out.append((first_cd, len(data)))
    pos = data.find(b"PK\x03\x04")
    while pos >= 0:
        out.append((pos, min(len(data), pos + 96)))
        pos = data.find(b"PK\x03\x04", pos + 4)
    pkl = data.find(b"data.pkl")
    if pkl >= 0:
        out.append((pkl, min(len(data), pkl + 2000)))
    return out


def mutate(data: bytes, rnd: random.Random) -> bytes:
    b = bytearray(data)
    lo, hi = rnd.choice(_regions(data))
    if hi <= lo:
        return bytes(b)
    for _ in range(rnd.choice([1, 1, 1, 2, 3])):
        op = rnd.random()
        at = rnd.randrange(lo, hi)
        if op < 0.35:
            b[at] ^= 1 << rnd.randrange(8)
        elif op < 0.55:
            b[at] = rnd.choice([0, 0xFF, 0x7F, 0x80, rnd.randrange(256)])
        elif op < 0.8:
            width = rnd.choice([2, 4, 8])
            v = rnd.choice(BOUNDARY) & ((1 << (8 * width)) - 1)
            if rnd.random() < 0.3:
                v = max(0, struct.unpack_from("<" + {2: "H", 4: "L", 8: "Q"}[width], b.ljust(at + width, b"\0"),
                                              at)[0] + rnd.choice([-1, 1, 64, -64, 1 << 20]))
            b[at:at + width] = v.to_bytes(8, "little")[:width]
        elif op < 0.9:
            del b[rnd.randrange(max(1, len(b) // 2), len(b)):]
            break
        else:
            n = rnd.randrange(1, 64)
            src = rnd.randrange(0, max(1, len(b) - n))
            b[at:at] = b[src:src + n]
    return bytes(b)


def child(work: Path, start: int, count: int, seed: int, result: Path) -> None:
    lim = 4 << 30
    resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
    sys.path.insert(0, str(ROOT))
    import torch

    from dist_restore import CheckpointReader, RankInfo
    from dist_restore.errors import CheckpointError
    from fuzz.run_cases import _compare, _digest

    base = seeds(work)
    reader = CheckpointReader(RankInfo(0, 1))
    progress = open(str(result) + ".progress", "w", buffering=1)  # noqa: SIM115
    rows = []
    for i in range(start, start + count):
        rnd = random.Random(seed * 1_000_003 + i)
        which = rnd.choice(["torch_save", "writer", "writer_idx"] if "writer_idx" in base else ["torch_save",
                                                                                                "writer"])
        d = work / f"m{i}"
        d.mkdir(exist_ok=True)
        pt, idx = base["writer" if which.startswith("writer") else "torch_save"], base.get("writer_idx")
        if which == "writer_idx":
            idx = mutate(idx, rnd)
        else:
            pt = mutate(pt, rnd)
        (d / "checkpoint_0.pt").write_bytes(pt)
        if which.startswith("writer") and idx is not None:
            (d / "checkpoint_0.idx").write_bytes(idx)
        progress.write(f"START {i} {which}\n")
        t0 = time.perf_counter()
        row: dict[str, Any] = {"i": i, "seed": which}
        try:
            got: Any = _digest(reader.read(d)[0])
        except CheckpointError as e:
            got = ("ours", str(d) in str(e), str(e)[:200])
        except BaseException as e:  # noqa: BLE001
            got = ("builtin", f"{type(e).__name__}: {str(e)[:200]}")
        row["seconds"] = time.perf_counter() - t0
        try:
            want: Any = _digest(torch.load(d / "checkpoint_0.pt", weights_only=True))
        except BaseException as e:  # noqa: BLE001
            want = f"{type(e).__name__}: {str(e)[:100]}"
        if isinstance(got, tuple):
            row["outcome"] = "builtin" if got[0] == "builtin" else ("ours" if got[1] else "unnamed")
            row["detail"] = got[-1]
        elif isinstance(want, str):
            row["outcome"], row["detail"] = "torch-only-fails", want
        else:
            diff = _compare(got, want, partial=False)
            row["outcome"], row["detail"] = ("wrong", diff) if diff else ("same", "")
        if row["seconds"] > 5:
            row["outcome"] = "slow"
        rows.append(row)
        shutil.rmtree(d, ignore_errors=True)
    result.write_text(json.dumps(rows))
    progress.write("DONE\n")
    os._exit(0)


def run(n: int, seed: int, per_child: int, timeout: float, save: Path | None) -> tuple[dict[str, int], list[str]]:
    """Run ``n`` mutants; ``({outcome: count}, failure lines)``."""
    counts: dict[str, int] = {}
    failures: list[str] = []
    work = Path(tempfile.mkdtemp(prefix="mutate_"))
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1")
    try:
        i = 0
        while i < n:
            count = min(per_child, n - i)
            res = work / f"res{i}.json"
            try:
                p = subprocess.run([sys.executable, str(HERE / "mutate.py"), "--child", str(work), str(i), str(count),
                                    str(seed), str(res)], capture_output=True, text=True, timeout=timeout,
                                   cwd=str(ROOT), env=env)
                died = None if res.exists() else f"exit {p.returncode}: {p.stderr[-400:]}"
            except subprocess.TimeoutExpired:
                died = f"hung for {timeout:.0f} s"
            if died is None:
                for row in json.loads(res.read_text()):
                    counts[row["outcome"]] = counts.get(row["outcome"], 0) + 1
                    if row["outcome"] not in ("same", "ours", "torch-only-fails"):
                        failures.append(f"mutant {row['i']} ({row['seed']}): {row['outcome']}: {row['detail']}")
                i += count
                continue
            prog = Path(str(res) + ".progress").read_text().splitlines() if Path(str(res) + ".progress").exists() \
                else []
            started = [ln.split() for ln in prog if ln.startswith("START")]
            bad = int(started[-1][1]) if started else i
            counts["died"] = counts.get("died", 0) + 1
            failures.append(f"mutant {bad}: the child died ({died})")
            if save is not None and (work / f"m{bad}").exists():
                save.mkdir(parents=True, exist_ok=True)
                shutil.copytree(work / f"m{bad}", save / f"mutant_{seed}_{bad}", dirs_exist_ok=True)
            i = bad + 1  # the mutants before it ran; go on after it
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return counts, failures


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--per-child", type=int, default=500)
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per child")
    ap.add_argument("--save", type=Path, default=None)
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        w, s, c, sd, r = args.child
        child(Path(w), int(s), int(c), int(sd), Path(r))
        return 0
    t0 = time.perf_counter()
    counts, failures = run(args.n, args.seed, args.per_child, args.timeout, args.save)
    for line in failures[:50]:
        print(line)
    print(f"{args.n} mutants in {time.perf_counter() - t0:.0f} s: "
          + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
