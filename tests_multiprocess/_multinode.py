"""Two torchrun agents on one machine, playing two nodes, for ``test_multinode.py``.

Helpers (used by the test process):

- :func:`write_committed_checkpoint`: rank files with per-rank data and identical ``shared``
  entries, committed with a manifest (as :class:`dist_restore.CheckpointWriter` would).
- :func:`node_local_dirs`: one directory per node holding only that node's rank files plus
  the manifest (the restore checks only its own rank file against the manifest).
- :func:`run_agents`: start one ``torchrun --nnodes=N --node_rank=i`` agent per node
  (c10d rendezvous on 127.0.0.1), each in its own session, wait for all of them with one
  deadline, and kill every agent and every worker seen under it on timeout or failure.

Entry point (run by torchrun on every rank, ``--module tests_multiprocess._multinode``):
restores the checkpoint through :class:`dist_restore.RestoreCoordinator` and writes
``rank_{r}.json`` with the rank's stats, the bytes of its own and shared entries, and a
bit-exact comparison against ``torch.load`` of its own rank file.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Sequence

ROOT = Path(__file__).resolve().parents[1]


# -- checkpoints ------------------------------------------------------------------------

def write_committed_checkpoint(path: Path, world: int, **kwargs: Any) -> None:
    """``_workers.write_checkpoint`` rank files plus a commit manifest over all of them."""
    from dist_restore._format.manifest import Manifest, RankFileInfo, file_checksum, write_manifest
    from tests_multiprocess._workers import write_checkpoint

    write_checkpoint(path, world, **kwargs)
    infos = []
    for r in range(world):
        f = path / f"checkpoint_{r}.pt"
        infos.append(RankFileInfo(r, f.name, f.stat().st_size, file_checksum(f)))
    write_manifest(path, Manifest.create(infos, {"step": 1}))


def node_local_dirs(src: Path, dst: Path, nnodes: int, nproc: int) -> list[Path]:
    """Copy ``src`` into ``dst/node{i}``: node ``i`` gets the manifest and ranks ``i*nproc..``."""
    from dist_restore._format.manifest import MANIFEST_NAME

    dirs = []
    for node in range(nnodes):
        d = dst / f"node{node}"
        d.mkdir(parents=True)
        shutil.copy2(src / MANIFEST_NAME, d / MANIFEST_NAME)
        for r in range(node * nproc, (node + 1) * nproc):
            shutil.copy2(src / f"checkpoint_{r}.pt", d / f"checkpoint_{r}.pt")
        dirs.append(d)
    return dirs


# -- agents ---------------------------------------------------------------------------

@dataclass(frozen=True)
class AgentResult:
    """One torchrun agent's outcome: exit code (``None``: killed at the deadline) and output."""

    node_rank: int
    returncode: int | None
    output: str


def _proc_starttime(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]  # field 22: start time
    except (OSError, IndexError):
        return None


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(entry))
    return kids


def descendants(pids: Sequence[int]) -> set[tuple[int, str]]:
    """``(pid, start time)`` of every live descendant of ``pids`` (torchrun's workers run in
    sessions of their own, so the agent's process group does not cover them)."""
    kids = _children_map()
    seen: set[tuple[int, str]] = set()
    todo = list(pids)
    while todo:
        for c in kids.get(todo.pop(), []):
            st = _proc_starttime(c)
            if st is not None and (c, st) not in seen:
                seen.add((c, st))
                todo.append(c)
    return seen


def alive(procs: set[tuple[int, str]]) -> list[int]:
    """The pids in ``procs`` that still run (same pid and start time; zombies count as gone)."""
    out = []
    for pid, st in procs:
        if _proc_starttime(pid) != st:
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            out.append(pid)
    return out


def _signal(pid: int, sig: int, *, group: bool) -> None:
    try:
        os.killpg(pid, sig) if group else os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def agent_command(node_rank: int, *, nnodes: int, nproc: int, port: int, run_id: str,
                  entry: Sequence[str]) -> list[str]:
    """``torchrun`` for node ``node_rank`` of a c10d rendezvous on 127.0.0.1:``port``.

    ``--local-addr`` 127.0.0.{node_rank+1} makes the rendezvous assign node ranks in
    ``node_rank`` order (it sorts nodes by address, then pid), so node ``i`` runs global
    ranks ``i*nproc..`` and its node-local directory matches; node 0 hosts the store.
    """
    return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}",
            f"--nproc_per_node={nproc}", f"--node_rank={node_rank}", "--rdzv_backend=c10d",
            f"--rdzv_endpoint=127.0.0.1:{port}", f"--rdzv_id={run_id}",
            f"--rdzv_conf=is_host={int(node_rank == 0)},join_timeout=60",
            f"--local_addr=127.0.0.{node_rank + 1}", "--max_restarts=0",
            "--monitor_interval=0.2", *entry]


def run_agents(entries: Sequence[Sequence[str]], *, nproc: int, port: int, run_id: str,
               logs: Path, timeout: float, nnodes: int | None = None,
               until: Callable[[], bool] | None = None) -> tuple[list[AgentResult], list[int]]:
    """Run one agent per entry (node ``i`` runs ``entries[i]``) concurrently.

    ``nnodes`` (default: one node per entry) larger than ``len(entries)`` leaves the
    rendezvous waiting for nodes that never come. ``until``, polled while waiting, ends the
    wait early when it returns true (then the agents are stopped as at the deadline).

    Returns each agent's result and the pids of any of their processes still alive at the
    end (after everything was killed; should be empty). On the deadline every agent gets
    SIGTERM (torchrun passes it to its workers), then SIGKILL for the agents' process groups
    and every worker process seen under them.
    """
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", PYTHONUNBUFFERED="1")
    logs.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen[bytes]] = []
    files = []
    seen: set[tuple[int, str]] = set()
    deadline = time.monotonic() + timeout
    try:
        for i, entry in enumerate(entries):
            f = open(logs / f"agent{i}.log", "wb")
            files.append(f)
            cmd = agent_command(i, nnodes=nnodes or len(entries), nproc=nproc, port=port, run_id=run_id, entry=entry)
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, start_new_session=True))
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline \
                and not (until is not None and until()):
            seen |= descendants([p.pid for p in procs if p.poll() is None])
            time.sleep(0.2)
    finally:
        running = [p for p in procs if p.poll() is None]
        seen |= descendants([p.pid for p in running])
        for p in running:  # graceful first: torchrun stops its workers on SIGTERM
            _signal(p.pid, signal.SIGTERM, group=True)
        grace = time.monotonic() + 10
        while any(p.poll() is None for p in running) and time.monotonic() < grace:
            time.sleep(0.1)
        for p in procs:
            _signal(p.pid, signal.SIGKILL, group=True)
        for pid in alive(seen):
            _signal(pid, signal.SIGKILL, group=False)
        for p in procs:
            p.wait()
        for f in files:
            f.close()
    left: list[int] = []
    end = time.monotonic() + 5
    while True:  # a SIGKILLed orphan takes a moment to be reaped by init
        left = alive(seen)
        if not left or time.monotonic() > end:
            break
        time.sleep(0.1)
    results = [AgentResult(i, None if p in running else p.returncode,
                           (logs / f"agent{i}.log").read_text(errors="replace"))
               for i, p in enumerate(procs)]
    return results, left


# -- the rank entry point ---------------------------------------------------------------

def _tensor_bytes(tree: Any) -> int:
    import torch

    from dist_restore._format.index import iter_leaves

    return sum(v.nbytes for _k, _p, v in iter_leaves(tree) if isinstance(v, torch.Tensor))


def main(argv: Sequence[str] | None = None) -> int:
    """(every rank) Restore ``--checkpoint`` and write ``--out/rank_{r}.json``."""
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--mode", default="broadcast")
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("--hang", action="store_true", help="sleep instead of restoring (to test the kill path)")
    args = p.parse_args(argv)
    if args.hang:
        Path(args.out, f"rank_{os.environ['RANK']}.pid").write_text(str(os.getpid()))
        time.sleep(3600)

    import torch
    import torch.distributed as dist

    from dist_restore import RestoreCoordinator
    from tests_multiprocess._workers import compare

    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    doc: dict[str, Any] = {"rank": rank, "group_rank": int(os.environ["GROUP_RANK"]),
                           "local_rank": int(os.environ["LOCAL_RANK"]), "pid": os.getpid()}
    code = 1
    try:
        dist.init_process_group("gloo", timeout=timedelta(seconds=args.timeout))
        from dist_restore._bytes import shm as _shm

        node = os.environ["GROUP_RANK"]  # each agent plays a host of its own: no memory files across
        _shm.host_id = lambda: f"simulated-node-{node}"
        doc["world_size"] = dist.get_world_size()
        res = RestoreCoordinator(timeout=args.timeout).restore(
            args.checkpoint, None, shared="shared", shared_mode=args.mode)
        file = Path(args.checkpoint) / f"checkpoint_{rank}.pt"
        ref = torch.load(file, weights_only=True)
        doc.update(bad=compare(res.state_dict, file), bytes_read=res.stats.bytes_read,
                   bytes_received=res.stats.bytes_received, bytes_sent=res.stats.bytes_sent,
                   own_bytes=_tensor_bytes(ref["model"]), shared_bytes=_tensor_bytes(ref["shared"]),
                   report=None if res.report is None else json.loads(res.report.to_json()))
        code = 0
    except Exception as e:  # noqa: BLE001 - the test reads the error from the JSON
        doc["error"] = f"{type(e).__name__}: {e}"
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    Path(args.out, f"rank_{rank}.json").write_text(json.dumps(doc))
    return code


if __name__ == "__main__":
    sys.exit(main())
