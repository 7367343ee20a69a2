"""Two torchrun agents (``--nnodes=2``, c10d rendezvous on 127.0.0.1) restore one checkpoint.

Each agent plays a node with 2 ranks (world size 4). The checkpoint lives either on a shared
filesystem (one directory) or on node-local storage: each node's directory holds only its
own ranks' files plus the commit manifest, so the ``shared`` entries can reach ranks 1-3
only by broadcast from rank 0. See ``_multinode.py`` for the agents and the rank entry point.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from pathlib import Path

import pytest

from tests_multiprocess import _multinode as mn
from tests_multiprocess.harness import free_port

pytestmark = pytest.mark.multiprocess

NNODES, NPROC = 2, 2
WORLD = NNODES * NPROC
AGENT_TIMEOUT = 75.0  # one deadline for both agents; a case takes ~15 s on 2 slow cores
LAUNCH = str(mn.ROOT / "launch" / "restore.py")


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    """World size 4: per-rank ``model`` entries, identical ``shared`` ones (~770 KiB), a manifest."""
    ck = tmp_path / "ck"
    mn.write_committed_checkpoint(ck, WORLD, shared_elems=1 << 16)
    return ck


def _outputs(results: list[mn.AgentResult]) -> str:
    return "\n".join(f"--- agent {r.node_rank} (exit {r.returncode}) ---\n{r.output}" for r in results)


def _run(tmp_path: Path, entries: list[list[str]]) -> list[mn.AgentResult]:
    t0 = time.monotonic()
    results, left = mn.run_agents(entries, nproc=NPROC, port=free_port(), run_id=uuid.uuid4().hex,
                                  logs=tmp_path / "logs", timeout=AGENT_TIMEOUT)
    assert left == [], f"processes outlived their agents: {left}\n{_outputs(results)}"
    hung = [r.node_rank for r in results if r.returncode is None]
    assert not hung, f"agents {hung} still ran after {AGENT_TIMEOUT:.0f}s\n{_outputs(results)}"
    print(f"agents finished in {time.monotonic() - t0:.1f}s")
    return results


def _launch(checkpoint: Path, *args: str) -> list[str]:
    return [LAUNCH, "--checkpoint", str(checkpoint), "--shared", "shared", "--mode", "broadcast",
            "--timeout", "30", *args]


def _all_ok(results: list[mn.AgentResult]) -> None:
    for r in results:
        assert r.returncode == 0, f"agent {r.node_rank} exited {r.returncode}:\n{r.output}"


@pytest.mark.timeout(150)
def test_shared_filesystem(tmp_path: Path, checkpoint: Path) -> None:
    report = tmp_path / "report.json"
    results = _run(tmp_path, [_launch(checkpoint, "--report-json", str(report))] * NNODES)
    _all_ok(results)
    assert json.loads(report.read_text()) == {"world_size": WORLD, "issues": []}
    assert "[rank 0] restored" in results[0].output


@pytest.mark.timeout(150)
def test_node_local_storage_launch_script(tmp_path: Path, checkpoint: Path) -> None:
    dirs = mn.node_local_dirs(checkpoint, tmp_path / "nodes", NNODES, NPROC)
    report = tmp_path / "report.json"
    results = _run(tmp_path, [_launch(d, "--report-json", str(report)) for d in dirs])
    _all_ok(results)
    assert json.loads(report.read_text()) == {"world_size": WORLD, "issues": []}


@pytest.mark.timeout(150)
def test_node_local_storage_shared_entries_arrive_by_broadcast(tmp_path: Path, checkpoint: Path) -> None:
    dirs = mn.node_local_dirs(checkpoint, tmp_path / "nodes", NNODES, NPROC)
    out = tmp_path / "out"
    out.mkdir()
    entry = ["--module", "tests_multiprocess._multinode", "--out", str(out), "--timeout", "30"]
    results = _run(tmp_path, [[*entry, "--checkpoint", str(d)] for d in dirs])
    _all_ok(results)
    docs = {r: json.loads((out / f"rank_{r}.json").read_text()) for r in range(WORLD)}
    for r, d in docs.items():
        assert "error" not in d, d
        assert d["world_size"] == WORLD and d["group_rank"] == r // NPROC, d  # node i runs its own ranks
        assert d["bad"] == [], f"rank {r} differs from torch.load of its file: {d['bad']}"
    shared = docs[0]["shared_bytes"]
    assert shared > 500_000 and all(d["shared_bytes"] == shared for d in docs.values())
    # rank 0 reads its own entries and the shared ones; the others read only their own
    assert docs[0]["bytes_read"] == docs[0]["own_bytes"] + shared
    for r in range(1, WORLD):
        assert docs[r]["bytes_read"] == docs[r]["own_bytes"], docs[r]
        assert docs[r]["bytes_received"] >= shared, docs[r]
    assert docs[0]["bytes_received"] < shared // 10  # control messages only
    assert docs[0]["report"] == {"world_size": WORLD, "issues": []}


@pytest.mark.timeout(150)
def test_node_local_storage_missing_rank_file_fails_on_both_nodes(tmp_path: Path, checkpoint: Path) -> None:
    dirs = mn.node_local_dirs(checkpoint, tmp_path / "nodes", NNODES, NPROC)
    (dirs[1] / "checkpoint_3.pt").unlink()
    results = _run(tmp_path, [_launch(d, "--timeout", "20") for d in dirs])
    for r in results:
        assert r.returncode not in (0, None), f"agent {r.node_rank} exited {r.returncode}:\n{r.output}"
    # every rank raises the same error; the agent may stop a node's second rank with SIGTERM
    # once the first one exits, so require one "restore failed" line per node
    assert re.search(r"\[rank [01]\] restore failed", results[0].output), results[0].output
    assert re.search(r"\[rank [23]\] restore failed", results[1].output), results[1].output
    assert "checkpoint_3.pt" in results[0].output + results[1].output


@pytest.mark.timeout(120)
def test_agents_and_workers_are_killed_at_the_deadline(tmp_path: Path) -> None:
    """The harness itself: hanging workers on both nodes are gone after the deadline."""
    out = tmp_path / "out"
    out.mkdir()
    entry = ["--module", "tests_multiprocess._multinode", "--out", str(out), "--checkpoint", "-", "--hang"]
    deadline = time.monotonic() + 60
    results, left = mn.run_agents([entry] * NNODES, nproc=NPROC, port=free_port(), run_id=uuid.uuid4().hex,
                                  logs=tmp_path / "logs", timeout=40,
                                  # kill once every worker is up (each wrote its pid)
                                  until=lambda: len(list(out.glob("*.pid"))) == WORLD or time.monotonic() > deadline)
    assert left == [], _outputs(results)
    assert len(list(out.glob("*.pid"))) == WORLD, _outputs(results)
    assert all(r.returncode is None for r in results), _outputs(results)
    for f in out.glob("*.pid"):
        assert not Path(f"/proc/{f.read_text()}").exists() or \
            Path(f"/proc/{f.read_text()}/stat").read_text().split(") ")[1].startswith("Z"), f
