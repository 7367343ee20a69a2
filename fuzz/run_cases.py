"""Run every hostile case of :mod:`fuzz.hostile_cases`, each exercise in its own process under a
memory limit and a timeout, and classify what happened.

    python fuzz/run_cases.py [--only NAME ...] [--timeout 30] [--mem-gib 4] [--out DIR] [--json FILE]

Outcomes:

* ``OK-same-as-torch``  the result equals ``torch.load(weights_only=True)`` of the rank file
  (every leaf: type, dtype, shape, stride, bits; with a target, the leaves it names);
* ``OK``                 no error and nothing to compare with (CLI exit 0, DTensor files, ...);
* ``OUR-ERROR``          a :class:`dist_restore.errors.CheckpointError` whose message names the
  file (``OUR-ERROR-NO-FILE`` when it names none);
* ``BUILTIN-EXCEPTION``  any other exception (type and message), or a CLI that printed one;
* ``SIGNAL``             the process died of a signal (which one);
* ``TIMEOUT``            still running after ``--timeout`` seconds (the child dumps its stacks first);
* ``MEMORY``             ``MemoryError``, or killed, or a success whose peak RSS passed 1 GiB;
* ``WRONG-VALUES``       a result that differs from torch.load's, or a result where torch.load fails.

A success slower than 5 s gets ``+SLOW``. Peak RSS is the child's own (``os.wait4``'s rusage,
the per-child ``ru_maxrss``); wall time is the child's, interpreter start included. The place
each failure happened (the innermost ``dist_restore`` frame: from the traceback, or from
``faulthandler``'s dump on a signal or a timeout) is printed after the table.

Runs one child at a time (the machine is shared).
"""

from __future__ import annotations

import argparse
import faulthandler
import hashlib
import io
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Mapping
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MEM_FLAG = 1 << 30  # a success above this peak RSS counts as MEMORY
SLOW_FLAG = 5.0
OUR_NAMES = {"CheckpointError", "CorruptCheckpointError", "UnsafeCheckpointError", "StateDictMismatchError",
             "RestoreError", "IncompleteCheckpointError"}
BUILTIN_NAMES = re.compile(r"\b(ZeroDivisionError|TypeError|IndexError|KeyError|ValueError|RuntimeError|"
                           r"RecursionError|OverflowError|MemoryError|struct\.error|AttributeError|"
                           r"UnicodeDecodeError|AssertionError|NotImplementedError)\b")


# =============================================================================================
# the child
# =============================================================================================

def _digest(tree: Any) -> dict[str, list[str]]:
    """``{path token: [display key, leaf or container hash]}`` of every node, walked without
    recursion (trees 100,000 deep), path tokens hashed so that deep paths stay short."""
    import torch

    out: dict[str, list[str]] = {}
    stack: list[tuple[str, str, int, Any]] = [("root", "", 0, tree)]
    while stack:
        tok, key, depth, v = stack.pop()
        show = key if depth <= 16 else "<deep>"
        if isinstance(v, Mapping) or type(v) in (list, tuple):
            items = list(v.items()) if isinstance(v, Mapping) else list(enumerate(v))
            out[tok] = [show, f"C:{type(v).__name__}:{len(items)}"]
            for k, c in items:
                ctok = hashlib.sha1(f"{tok}/{k!r:.200}".encode()).hexdigest()
                stack.append((ctok, f"{key}.{k}" if key and depth <= 16 else str(k), depth + 1, c))
            continue
        if isinstance(v, torch.Tensor):
            t = v.detach()
            if getattr(t, "_local_tensor", None) is not None:  # a DTensor: its local shard
                t = t._local_tensor
            h = hashlib.sha1()
            if t.layout == torch.strided and not t.is_quantized:
                if t.is_conj():
                    t = t.resolve_conj()
                if t.is_neg():
                    t = t.resolve_neg()
                h.update(memoryview(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
                desc = f"T:{type(v).__name__}:{t.dtype}:{tuple(t.shape)}:{v.stride()}:{v.requires_grad}"
                if t.numel() and t.dtype.is_floating_point:
                    desc = f"{t.reshape(-1)[:4].tolist()}:" + desc
            else:
                desc = f"T:{type(v).__name__}:{t.layout}:{t.dtype}:{tuple(t.shape)}"
                h.update(repr(t).encode())
            out[tok] = [show, desc + ":" + h.hexdigest()]
        elif isinstance(v, (bytes, bytearray)):
            out[tok] = [show, f"B:{type(v).__name__}:{len(v)}:{hashlib.sha1(v).hexdigest()}"]
        else:
            r = repr(sorted(v, key=repr)) if isinstance(v, (set, frozenset)) else repr(v)
            out[tok] = [show, f"V:{type(v).__name__}:{hashlib.sha1(r.encode()).hexdigest()}:{r[:60]}"]
    return out


def _target(spec: dict[str, Any] | None) -> Any:
    import torch

    if spec is None:
        return None
    out = {}
    for k, v in spec.items():
        if v[0] == "zeros":
            out[k] = torch.zeros(v[1], dtype=getattr(torch, v[2]))
        else:  # ["dtensor", shape, dtype, placements]
            from torch.distributed.tensor import Replicate, Shard, distribute_tensor

            ps = [Shard(p[1]) if p[0] == "S" else Replicate() for p in v[3]]
            out[k] = distribute_tensor(torch.zeros(v[1], dtype=getattr(torch, v[2])), _mesh(), ps)
    return out


def _mesh() -> Any:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():
        dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    return init_device_mesh("cpu", (1,))


def _run_api(ex: dict[str, Any]) -> tuple[str, Any]:
    """``(kind of result, result)`` of one exercise."""
    import torch

    import dist_restore
    from dist_restore import CheckpointReader, RankInfo, RestoreCoordinator

    api = ex["api"]
    if api == "oracle":
        return "tree", torch.load(ex["file"], weights_only=True)
    if api == "read":
        return "tree", CheckpointReader(RankInfo(0, 1)).read(ex["dir"])[0]
    if api == "load":
        return "tree", CheckpointReader(RankInfo(0, 1)).load(ex["dir"], _target(ex["target"])).state_dict
    if api == "restore":
        return "tree", RestoreCoordinator().restore(ex["dir"], _target(ex["target"])).state_dict
    if api == "reshard":
        target = _target(ex["target"])
        return "tree", RestoreCoordinator().restore(ex["dir"], target).state_dict
    if api == "read_index":
        ix = dist_restore.read_index(ex["file"])
        return "none", len(ix.entries)
    if api == "find_latest":
        return "none", str(dist_restore.find_latest_checkpoint(ex["root"]))
    if api == "cli":
        from dist_restore.cli import main

        o, e = io.StringIO(), io.StringIO()
        with redirect_stdout(o), redirect_stderr(e):
            rc = main(ex["args"])
        return "cli", {"rc": rc, "out": o.getvalue()[-3000:], "err": e.getvalue()[-3000:]}
    raise ValueError(api)


def _frames(tb: Any) -> list[str]:
    return [f"{Path(f.filename).relative_to(ROOT) if f.filename.startswith(str(ROOT)) else f.filename}:"
            f"{f.name}:{f.lineno}" for f in traceback.extract_tb(tb)]


def child(spec_json: str, result: str) -> None:
    ex = json.loads(spec_json)
    lim = int(ex["_mem"])
    resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
    faulthandler.enable(all_threads=True)
    faulthandler.dump_traceback_later(max(1.0, ex["_timeout"] - 2.5), exit=False)
    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    try:
        import torch  # noqa: F401  (imported before the clock that matters)

        t0 = time.perf_counter()
        kind, value = _run_api(ex)
        out["call_s"] = time.perf_counter() - t0
        out["call_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        out["ok"] = True
        out["kind"] = kind
        if kind == "tree":
            out["digest"] = _digest(value)
        elif kind == "cli":
            out["cli"] = value
        del value
    except BaseException as e:  # noqa: BLE001 - everything is an outcome here
        out["call_s"] = time.perf_counter() - t0
        out["call_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        try:
            from dist_restore.errors import CheckpointError

            ours = isinstance(e, CheckpointError)
        except Exception:  # noqa: BLE001
            ours = False
        out.update(ok=False, type=f"{type(e).__module__}.{type(e).__qualname__}".removeprefix("builtins."),
                   ours=ours, msg=str(e)[:3000], frames=_frames(e.__traceback__),
                   file=getattr(e, "file", None))
        cause = e.__cause__ or e.__context__
        if cause is not None:
            out["cause"] = f"{type(cause).__name__}: {str(cause)[:300]}"
            out["cause_frames"] = _frames(cause.__traceback__)
    faulthandler.cancel_dump_traceback_later()
    Path(result).write_text(json.dumps(out))
    sys.stdout.flush()
    os._exit(0)  # no interpreter teardown (gloo, thread pools): the outcome is written


# =============================================================================================
# the parent
# =============================================================================================

def run_child(ex: dict[str, Any], timeout: float, mem: int, work: Path) -> dict[str, Any]:
    spec = dict(ex, _mem=mem, _timeout=timeout)
    res = work / "result.json"
    err = work / "stderr.txt"
    res.unlink(missing_ok=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1")
    t0 = time.monotonic()
    with open(err, "wb") as ferr:
        p = subprocess.Popen([sys.executable, str(HERE / "run_cases.py"), "--child", json.dumps(spec), str(res)],
                             stdout=subprocess.DEVNULL, stderr=ferr, cwd=str(ROOT), env=env,
                             start_new_session=True)
        timed_out = False
        status = rusage = None
        while True:
            pid, status, rusage = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() - t0 > timeout:
                timed_out = True
                os.killpg(p.pid, signal.SIGKILL)
                pid, status, rusage = os.wait4(p.pid, 0)
                break
            time.sleep(0.05)
        p.returncode = 0  # reaped by wait4: keep Popen from waiting again
    wall = time.monotonic() - t0
    out: dict[str, Any] = {"wall": wall, "peak_rss": rusage.ru_maxrss * 1024 if rusage else 0,
                           "stderr": err.read_text(errors="replace")[-20000:]}
    if timed_out:
        out["timeout"] = True
    elif os.WIFSIGNALED(status):
        out["signal"] = signal.Signals(os.WTERMSIG(status)).name
    elif res.exists():
        out.update(json.loads(res.read_text()))
    else:
        out["no_result"] = f"exit status {os.WEXITSTATUS(status)}"
    return out


def _names_file(msg: str, ex: dict[str, Any]) -> bool:
    places = [ex.get("dir"), ex.get("file"), ex.get("root")]
    return any(p and p in msg for p in places) or "checkpoint_" in msg or ".idx" in msg \
        or "dist_restore_manifest.json" in msg


def _compare(ours: dict[str, list[str]], oracle: dict[str, list[str]], partial: bool) -> str | None:
    """``None`` when equal, else the first difference."""
    if not partial:
        for tok in sorted(set(ours) | set(oracle)):
            a, b = ours.get(tok), oracle.get(tok)
            if a != b:
                return f"{(a or b)[0]!r}: ours {a[1][:70] if a else None} vs torch.load {b[1][:70] if b else None}"
        return None
    for tok, (key, h) in ours.items():
        if tok == "root":
            continue
        b = oracle.get(tok)
        if b is None or (b[1] != h and not h.startswith("C:")):
            return f"{key!r}: ours {h[:70]} vs torch.load {b[1][:70] if b else None}"
    return None


def classify(ex: dict[str, Any], r: dict[str, Any], oracle: dict[str, Any] | None) -> tuple[str, str]:
    """``(outcome, detail)``."""
    flags = ""
    if r.get("timeout"):
        return "TIMEOUT", f"killed after {r['wall']:.0f} s"
    if "signal" in r:
        if r["signal"] == "SIGKILL":
            return "MEMORY", "killed (SIGKILL)"
        return "SIGNAL", r["signal"]
    if "no_result" in r:
        return "BUILTIN-EXCEPTION", f"child died: {r['no_result']}: {r['stderr'][-300:]}"
    if r.get("call_s", 0) > SLOW_FLAG:
        flags += " +SLOW"
    big = r["peak_rss"] > MEM_FLAG
    if not r["ok"]:
        msg = f"{r['type']}: {r['msg']}"
        if r["type"] == "MemoryError" or "MemoryError" in r.get("msg", "") and not r["ours"]:
            return "MEMORY", msg
        if r["ours"]:
            wrapped = re.search(r"\] (?:[\w.]+\.)?(\w+Error|struct\.error|error): ", r["msg"])
            if r["type"].endswith("RestoreError") and wrapped and wrapped.group(1) not in OUR_NAMES:
                kind = "BUILTIN-EXCEPTION (in RestoreError)"
            else:
                kind = "OUR-ERROR" if (r.get("file") or _names_file(r["msg"], ex)) else "OUR-ERROR-NO-FILE"
            if "MemoryError" in r["msg"]:
                kind += " (wraps MemoryError)"
            return kind + (" +MEM" if big else "") + flags, msg
        return "BUILTIN-EXCEPTION" + (" +MEM" if big else "") + flags, msg
    if r["kind"] == "cli":
        c = r["cli"]
        text = c["out"] + c["err"]
        if big:
            return "MEMORY" + flags, f"exit {c['rc']}; peak {r['peak_rss'] >> 20} MiB"
        m = BUILTIN_NAMES.search(text) or re.search(r"\.pt: (?:\w+: )?error: ", text)
        if m and c["rc"] != 0:
            line = next((ln for ln in text.splitlines() if m.group(0) in ln), "")
            return "BUILTIN-EXCEPTION (CLI)" + flags, f"exit {c['rc']}: {line.strip()[:300]}"
        if c["rc"] == 0:
            return ("SLOW" if flags else "OK"), f"exit 0 after {r['call_s']:.1f} s"
        return ("OUR-ERROR" if _names_file(text, ex) or "checkpoint_" in text else "OUR-ERROR-NO-FILE") + flags, \
            f"exit {c['rc']}: {' | '.join(ln.strip() for ln in text.strip().splitlines()[-3:])[:300]}"
    if big:
        return "MEMORY" + flags, f"succeeded, peak {r['peak_rss'] >> 20} MiB"
    if r["kind"] != "tree" or oracle is None:
        return ("SLOW" if flags else "OK"), f"no oracle; the call took {r['call_s']:.1f} s"
    if not oracle.get("ok"):
        why = oracle.get("signal") or ("timeout" if oracle.get("timeout") else
                                       f"{oracle.get('type')}: {oracle.get('msg', '')[:150]}")
        return "WRONG-VALUES" + flags, f"we return values; torch.load fails ({why})"
    diff = _compare(r["digest"], oracle["digest"], partial=ex.get("target") is not None)
    if diff:
        return "WRONG-VALUES" + flags, diff
    return ("SLOW (same as torch)" if flags else "OK-same-as-torch"), f"the call took {r['call_s']:.1f} s"


def where(r: dict[str, Any]) -> str:
    """The innermost dist_restore frame of the failure."""
    at = re.search(r"\[at ([\w.]+:\d+)\]", r.get("msg", ""))
    if at and (r.get("type") or "").endswith("RestoreError"):
        return f"{at.group(1)} (as RestoreError reports it)"
    frames = r.get("frames") or []
    mine = [f for f in frames if f.startswith("dist_restore/")]
    if mine:
        s = mine[-1]
        if r.get("cause_frames"):
            inner = [f for f in r["cause_frames"] if f.startswith("dist_restore/")]
            if inner:
                s += f"  (cause at {inner[-1]})"
        return s
    # faulthandler: "File "...", line N in func", most recent call first, current thread first
    text = r.get("stderr", "")
    blocks = re.split(r"\n(?=(?:Current thread|Thread) 0x)", text)
    for b in blocks:
        if "Current thread" in b or "Fatal Python error" in b:
            for m in re.finditer(r'File "([^"]+)", line (\d+) in (\S+)', b):
                fn = m.group(1)
                if "/dist_restore/" in fn:
                    rel = fn[fn.index("dist_restore/"):]
                    return f"{rel}:{m.group(3)}:{m.group(2)}"
    for m in re.finditer(r'File "([^"]+)", line (\d+) in (\S+)', text):
        fn = m.group(1)
        if "/dist_restore/" in fn:
            return f"{fn[fn.index('dist_restore/'):]}:{m.group(3)}:{m.group(2)}"
    return ""


def _ex_label(ex: dict[str, Any]) -> str:
    api = ex["api"]
    if api == "cli":
        return "cli " + ex["args"][0]
    if ex.get("target"):
        return f"{api}(target)"
    return api


def build(out: Path, names: list[str], result: Path) -> None:
    """Build the cases (in a process of its own: the runner that forks the children stays small,
    so that each child's peak RSS, which Linux carries over from the forked image, is its own)."""
    sys.path.insert(0, str(ROOT))
    from dataclasses import asdict

    from fuzz.hostile_cases import CASES

    built = []
    for name in names or list(CASES):
        d = out / name
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        try:
            c = asdict(CASES[name](d))
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            c = {"name": name, "error": f"{type(e).__name__}: {e}"}
        c["bytes"] = sum(p.stat().st_size for p in d.rglob("*") if p.is_file())
        built.append(c)
    result.write_text(json.dumps(built))
    os._exit(0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="*", help="case names (default: all)")
    ap.add_argument("--timeout", type=float, default=30.0)
    ap.add_argument("--mem-gib", type=float, default=4.0)
    ap.add_argument("--out", type=Path, default=None, help="where the crafted files go (default: a temp dir)")
    ap.add_argument("--json", type=Path, default=None, help="write every outcome here")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--build", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(*args.child)
        return 0
    if args.build:
        build(args.build[0], args.only or [], args.build[1])
        return 0

    out = args.out or Path(tempfile.mkdtemp(prefix="hostile_"))
    out.mkdir(parents=True, exist_ok=True)
    work = out / "_work"
    work.mkdir(exist_ok=True)
    cases_json = work / "cases.json"
    subprocess.run([sys.executable, str(HERE / "run_cases.py"), "--build", str(out), str(cases_json),
                    *(["--only", *args.only] if args.only else [])], check=True, cwd=str(ROOT))
    mem = int(args.mem_gib * (1 << 30))
    rows: list[dict[str, Any]] = []
    for c in json.loads(cases_json.read_text()):
        name = c["name"]
        if "error" in c:
            rows.append({"case": name, "api": "-", "outcome": "BUILD-FAILED", "detail": c["error"],
                         "where": "", "wall": 0, "rss": 0})
            continue
        oracle = None
        if c["oracle"]:
            oracle = run_child({"api": "oracle", "file": c["oracle"]}, args.timeout, mem, work)
            oracle.setdefault("ok", False)
        for ex in c["exercises"]:
            r = run_child(ex, args.timeout, mem, work)
            outcome, detail = classify(ex, r, oracle)
            row = {"case": name, "kind": c["kind"], "api": _ex_label(ex), "outcome": outcome, "detail": detail,
                   "where": where(r) if not outcome.startswith("OK") else "",
                   "wall": r["wall"], "call_s": r.get("call_s"), "rss": r["peak_rss"], "bytes": c["bytes"],
                   "torch_load": _oracle_line(oracle)}
            rows.append(row)
            print(f"{name:28} {row['api']:16} {outcome:24} {r['wall']:6.1f}s {r['peak_rss'] >> 20:6d}MiB  "
                  f"{detail[:110]}", flush=True)
    _table(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


def _oracle_line(o: dict[str, Any] | None) -> str:
    if o is None:
        return "-"
    if o.get("ok"):
        return "ok"
    if o.get("timeout"):
        return "TIMEOUT"
    if "signal" in o:
        return o["signal"]
    return f"{o.get('type', '?')}"


def _table(rows: list[dict[str, Any]]) -> None:
    print()
    hdr = f"{'case':28} {'exercise':16} {'outcome':30} {'wall':>6} {'peakRSS':>8} {'files':>8} {'torch.load':>12}"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(f"{r['case']:28} {r['api']:16} {r['outcome']:30} {r['wall']:5.1f}s {r['rss'] >> 20:6d}M "
              f"{r.get('bytes', 0) >> 10:6d}K {r.get('torch_load', '-'):>12}")
    print()
    for r in rows:
        if not r["outcome"].startswith("OK"):
            print(f"- {r['case']} / {r['api']}: {r['outcome']}: {r['detail'][:400]}")
            if r["where"]:
                print(f"    at {r['where']}")


if __name__ == "__main__":
    sys.exit(main())
