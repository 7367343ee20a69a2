"""Helpers the benchmarks share: a table as text or Markdown, the page cache dropped, peak RSS."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path


def print_table(head: Sequence[str], rows: Sequence[Sequence[str]], markdown: bool) -> None:
    """Rows of strings under ``head``: a Markdown table, or aligned columns."""
    if markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for r in rows:
            print("| " + " | ".join(r) + " |")
        return
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    print("  ".join(h.ljust(w) for h, w in zip(head, widths)))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))


def drop_cache(files: Iterable[Path]) -> None:
    """Drop the files' pages from the page cache (``posix_fadvise(DONTNEED)``, no root needed)."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def status(field: str) -> int:
    """A ``/proc/self/status`` size field (``VmRSS``, ``VmHWM``), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def reset_peak() -> int:
    """Reset the peak RSS (``VmHWM``) to the current RSS; return the current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status("VmRSS")


def timed_rounds(runs: dict[str, Callable[[], int]], methods: Sequence[str], repeats: int, out: dict[str, list],
                 before: Callable[[], None] | None = None) -> None:
    """``repeats`` rounds of every method, in an order rotated each round; each run after
    ``before()`` (e.g. dropping the page cache on one rank) and a barrier: ``out[name]`` gets
    ``(seconds, what the run returned)``."""
    import time

    import torch.distributed as dist

    for r in range(repeats):
        order = list(methods[r % len(methods):]) + list(methods[:r % len(methods)])
        for name in order:
            if before is not None:
                before()
            dist.barrier()
            t0 = time.perf_counter()
            got = runs[name]()
            out[name].append((time.perf_counter() - t0, got))
