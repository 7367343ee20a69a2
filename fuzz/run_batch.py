"""Every hostile case of :mod:`fuzz.hostile_cases`, all in ONE child process (the regression run of
``tests/test_hostile.py``: one interpreter start instead of one per exercise).

    python fuzz/run_batch.py OUT_DIR RESULT_JSON [--only NAME ...]

The child builds the cases into ``OUT_DIR``, runs every exercise under a 4 GiB address-space
limit, writing ``START case api`` to ``RESULT_JSON.progress`` before each (so that a crash names
the exercise that caused it), and, after all of ours, ``torch.load(weights_only=True)`` of each
case's oracle file (skipped where torch itself is known to crash) to compare our successes with.
``RESULT_JSON`` gets one row per exercise: ``outcome`` is ``OK-same-as-torch``, ``OK`` (nothing to
compare with), ``OUR-ERROR``, ``OUR-ERROR-NO-FILE``, ``BUILTIN-EXCEPTION`` or ``WRONG-VALUES``,
with the call's seconds. A signal or a hang shows as a missing result file; the parent (the test)
reads the progress file.
"""

from __future__ import annotations

import faulthandler
import json
import resource
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

#: Cases whose oracle file crashes ``torch.load`` itself (a 200,000-deep tuple key: C recursion).
TORCH_CRASHES = {"deep_tuple_key"}


def main(argv: list[str]) -> int:
    out, result = Path(argv[0]), Path(argv[1])
    only = argv[3:] if len(argv) > 2 and argv[2] == "--only" else None
    sys.path.insert(0, str(ROOT))
    lim = 4 << 30
    resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
    faulthandler.enable(all_threads=True)
    progress = open(str(result) + ".progress", "w", buffering=1)  # noqa: SIM115 - written as we go

    import torch

    from dist_restore.errors import CheckpointError
    from fuzz.hostile_cases import CASES
    from fuzz.run_cases import _digest, _ex_label, _run_api, classify

    raw: list[tuple[dict[str, Any], dict[str, Any], dict[str, Any]]] = []
    cases = []
    for name in only or list(CASES):
        d = out / name
        d.mkdir(parents=True, exist_ok=True)
        cases.append(asdict(CASES[name](d)))
    for c in cases:
        for ex in c["exercises"]:
            progress.write(f"START {c['name']} {_ex_label(ex)}\n")
            t0 = time.perf_counter()
            r: dict[str, Any] = {"wall": 0.0, "peak_rss": 0}
            try:
                kind, value = _run_api(ex)
                r.update(ok=True, kind=kind)
                if kind == "tree":
                    r["digest"] = _digest(value)
                elif kind == "cli":
                    r["cli"] = value
                del value
            except BaseException as e:  # noqa: BLE001 - an outcome
                r.update(ok=False, type=f"{type(e).__module__}.{type(e).__qualname__}".removeprefix("builtins."),
                         ours=isinstance(e, CheckpointError), msg=str(e)[:3000], file=getattr(e, "file", None))
            r["call_s"] = r["wall"] = time.perf_counter() - t0
            raw.append((c, ex, r))
    progress.write("ORACLES\n")
    oracles: dict[str, Any] = {}
    for c in cases:
        if not c["oracle"] or c["name"] in TORCH_CRASHES:
            continue
        try:
            oracles[c["name"]] = {"ok": True, "digest": _digest(torch.load(c["oracle"], weights_only=True))}
        except Exception as e:  # noqa: BLE001
            oracles[c["name"]] = {"ok": False, "type": type(e).__name__, "msg": str(e)[:300]}
    rows = []
    for c, ex, r in raw:
        outcome, detail = classify(ex, r, oracles.get(c["name"]) if c["oracle"] else None)
        rows.append({"case": c["name"], "api": _ex_label(ex), "outcome": outcome, "detail": detail[:400],
                     "seconds": r["call_s"]})
    result.write_text(json.dumps(rows, indent=1))
    progress.write("DONE\n")
    progress.close()
    import os

    os._exit(0)  # no interpreter teardown (gloo, thread pools)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
