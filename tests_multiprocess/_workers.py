"""Checkpoint builders and module-level rank workers for the multi-process tests.

Workers run in spawned processes (see ``harness.run_ranks``) with the default process
group already initialised (gloo on 127.0.0.1); they return plain picklable results.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import torch

from dist_restore import RestoreCoordinator, RestoreError
from dist_restore._format.index import iter_leaves

SENTINEL = 7.0


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().resolve_conj().resolve_neg().contiguous().reshape(-1).view(torch.uint8)


def write_checkpoint(path: Path, world: int, *, n_own: int = 4, own_elems: int = 256,
                     n_shared: int = 3, shared_elems: int = 1024, small_shared: int = 0) -> None:
    """Rank files with different per-rank data and identical replicated ``shared`` entries."""
    path.mkdir(parents=True, exist_ok=True)
    sg = torch.Generator().manual_seed(42)
    shared: dict[str, Any] = {f"s{i}": torch.randn(shared_elems, generator=sg) for i in range(n_shared)}
    shared["t"] = torch.randn(8, 6, generator=sg).t()  # non-contiguous
    shared["half"] = torch.randn(10, generator=sg).to(torch.bfloat16)
    shared["flags"] = torch.tensor([True, False, True])
    shared["empty"] = torch.zeros(0)
    shared["meta"] = {"step": 1234, "name": "run-7", "betas": (0.9, 0.999), "milestones": [10, 20]}
    if small_shared:
        shared["small"] = {f"p{i}": torch.randn(16, generator=sg) for i in range(small_shared)}
    for r in range(world):
        g = torch.Generator().manual_seed(1000 + r)
        own = {f"w{i}": torch.randn(own_elems, generator=g) * (r + 1) for i in range(n_own)}
        own["ids"] = torch.arange(r, r + 5)
        torch.save({"model": own, "shared": shared, "rank": r}, path / f"checkpoint_{r}.pt")


def targets_like(file: Path, *, preallocate: bool, fill: float = SENTINEL) -> dict[str, Any]:
    """A target of the same structure as ``file``: preallocated tensors (filled) or ``None``."""
    ref = torch.load(file, weights_only=True)

    def build(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: build(x) for k, x in v.items()}
        if isinstance(v, torch.Tensor):
            return torch.full_like(v.contiguous(), fill if v.dtype != torch.bool else True) if preallocate else None
        if isinstance(v, (list, tuple)):
            return None
        return None

    return build(ref)


def compare(result: Any, file: Path) -> list[str]:
    """Keys whose restored value differs from ``torch.load`` of the same file (bit for bit)."""
    ref = torch.load(file, weights_only=True)
    got = dict((k, v) for k, _p, v in iter_leaves(result))
    bad = []
    for k, _p, v in iter_leaves(ref):
        if k not in got:
            bad.append(f"{k}: absent")
            continue
        g = got[k]
        if isinstance(v, torch.Tensor):
            if not isinstance(g, torch.Tensor) or g.dtype != v.dtype or g.shape != v.shape \
                    or not torch.equal(bits(g), bits(v)):
                bad.append(f"{k}: differs")
        elif g != v:
            bad.append(f"{k}: {g!r} != {v!r}")
    return bad


def restore_and_compare(rank: int, world: int, path: str, mode: str, preallocate: bool,
                        shared: Any = "shared", shared_memory: bool = True,
                        no_peer_file_on: int = -1, shared_memory_bytes: int = 1 << 30) -> dict[str, Any]:
    """Restore and compare with ``torch.load``; ``no_peer_file_on``: that rank cannot open
    other ranks' memory files (as if in another PID namespace; undone after the restore, for
    the next job of a batch)."""
    file = Path(path) / f"checkpoint_{rank}.pt"
    target = targets_like(file, preallocate=preallocate)
    keep = {k: v for k, _p, v in iter_leaves(target) if isinstance(v, torch.Tensor)}
    from dist_restore._bytes import shm as _shm

    peer_file_init = _shm.PeerFile.__init__
    if rank == no_peer_file_on:
        def refuse(self: Any, offer: Any) -> None:
            raise PermissionError(13, "Permission denied", f"/proc/{offer.pid}/fd/{offer.fd}")

        _shm.PeerFile.__init__ = refuse  # type: ignore[method-assign]
    try:
        res = RestoreCoordinator(timeout=60, shared_memory=shared_memory, shared_memory_bytes=shared_memory_bytes
                                 ).restore(path, target, shared=shared, shared_mode=mode)
    finally:
        _shm.PeerFile.__init__ = peer_file_init  # type: ignore[method-assign]
    got = {k: x for k, _p, x in iter_leaves(res.state_dict)}
    in_place = all(v is got[k] for k, v in keep.items())
    return {"bad": compare(res.state_dict, file), "in_place": in_place,
            "bytes_read": res.stats.bytes_read, "bytes_received": res.stats.bytes_received,
            "bytes_shm": res.stats.bytes_shm,
            "collectives": res.stats.collectives, "report": None if res.report is None else res.report.to_dict(),
            "missing": res.missing_keys, "seconds": res.stats.seconds}


def restore_expect_failure(rank: int, world: int, path: str, kwargs: dict[str, Any],
                           extra_key_on: int = -1) -> dict[str, Any]:
    """Restore into sentinel-filled targets; report the error and whether targets stayed untouched."""
    file = Path(path) / f"checkpoint_{rank}.pt"
    good = Path(path) / "checkpoint_0.pt"  # same structure on all ranks
    target = targets_like(good, preallocate=True)
    if rank == extra_key_on:
        target["model"]["not_in_file"] = torch.zeros(3)
    before = {k: bits(v).clone() for k, _p, v in iter_leaves(target) if isinstance(v, torch.Tensor)}
    t0 = time.monotonic()
    try:
        RestoreCoordinator(timeout=kwargs.pop("timeout", 30),
                           shared_memory=kwargs.pop("shared_memory", True)).restore(path, target, **kwargs)
        err: dict[str, Any] | None = None
    except RestoreError as e:
        err = {"type": "RestoreError", "phase": e.phase, "ranks": sorted(e.failures), "text": str(e)}
    except Exception as e:  # noqa: BLE001 - the test asserts there is none
        err = {"type": type(e).__name__, "text": str(e)}
    after = {k: v for k, _p, v in iter_leaves(target) if isinstance(v, torch.Tensor)}
    untouched = all(torch.equal(bits(after[k]), b) for k, b in before.items())
    del file
    return {"error": err, "untouched": untouched, "seconds": time.monotonic() - t0}


def restore_with_killed_rank(rank: int, world: int, path: str, victim: int) -> dict[str, Any]:
    if rank == victim:
        os.kill(os.getpid(), signal.SIGKILL)
    return restore_expect_failure(rank, world, path, {"shared": "shared", "timeout": 10})


def restore_for_report(rank: int, world: int, path: str) -> dict[str, Any]:
    """Rank 2 asks for a key no file has; odd ranks do not ask for ``model.ids``; all miss ``extra``."""
    file = Path(path) / f"checkpoint_{rank}.pt"
    target = targets_like(file, preallocate=True)
    target["extra"] = None
    if rank == 2:
        target["model"]["not_in_file"] = torch.zeros(3)
    if rank % 2:
        del target["model"]["ids"]
    res = RestoreCoordinator(timeout=60).restore(path, target, shared="shared")
    return {"report": None if res.report is None else res.report.to_dict(),
            "text": None if res.report is None else res.report.render(),
            "missing": res.missing_keys, "unexpected": res.unexpected_keys}


def predicate_failing_on_rank_1(key: str) -> bool:
    if os.environ.get("RANK") == "1" and key.startswith("shared.s1"):
        raise KeyError(f"user predicate exploded on {key}")
    return key.startswith("shared.")


def restore_with_failing_predicate(rank: int, world: int, path: str) -> dict[str, Any]:
    return restore_expect_failure(rank, world, path, {"shared": predicate_failing_on_rank_1})


def restore_shared_values(rank: int, world: int, path: str, mode: str) -> dict[str, Any]:
    res = RestoreCoordinator(timeout=60).restore(path, {"shared": {"meta": None, "s0": None}},
                                                 shared="shared", shared_mode=mode)
    return {"meta": res.state_dict["shared"]["meta"], "s0": res.state_dict["shared"]["s0"],
            "bytes_read": res.stats.bytes_read}


def write_diverging_values(path: Path, world: int) -> None:
    """Like write_checkpoint, but each rank's file holds its own value of shared.meta.step."""
    write_checkpoint(path, world)
    for r in range(1, world):
        sd = torch.load(path / f"checkpoint_{r}.pt", weights_only=True)
        sd["shared"]["meta"]["step"] = -r
        torch.save(sd, path / f"checkpoint_{r}.pt")


def restore_with_failing_exchange(rank: int, world: int, path: str, victim: int, what: str,
                                  shm: bool = False) -> dict[str, Any]:
    """``victim`` fails locally while packing (``buffer``, ``pack_into``) or unpacking
    (``unpack``, ``unpack_from``) a shared bucket (undone after the restore, for the next job
    of a batch)."""
    from dist_restore._protocol import exchange as _exchange

    saved = {name: _exchange.BucketIO.__dict__[name] for name in (what, "stage") if name in _exchange.BucketIO.__dict__}
    if rank == victim:
        def boom(self: Any, *a: Any) -> Any:
            raise OSError(f"injected {what} failure")

        setattr(_exchange.BucketIO, what, boom)
        _exchange.BucketIO.stage = lambda self: None  # so that the first buffer() is in the exchange
    try:
        return restore_expect_failure(rank, world, path, {"shared": "shared", "timeout": 60, "shared_memory": shm})
    finally:
        for name in (what, "stage"):
            if name in saved:
                setattr(_exchange.BucketIO, name, saved[name])
            elif name in _exchange.BucketIO.__dict__:
                delattr(_exchange.BucketIO, name)


def value_types() -> dict[str, Any]:
    """Values ``torch.load(weights_only=True)`` gives back as themselves (also
    ``tests/_util.value_types_sample``): a restore must too, type for type."""
    import collections

    return {
        "shape": torch.Size([3, 4]), "scalar_shape": torch.Size([]),
        "od": collections.OrderedDict([("b", 1), ("a", torch.arange(3))]), "plain": {"x": 1.5},
        "dtype": torch.bfloat16, "device": torch.device("cuda", 1), "cpu": torch.device("cpu"),
        "z": 1 - 2j, "raw": b"\x00\xff",
        "nested": (1, [torch.Size([2]), (torch.float16, [b"x", 2j])], ()), "lists": [[1, (2,)], []],
    }


def write_value_types(path: Path, world: int) -> None:
    """Rank files whose shared values are value_types(); rank r > 0 holds other values of the
    same types, so that values from src are told apart from each rank's own."""
    path.mkdir(parents=True, exist_ok=True)
    for r in range(world):
        meta = value_types()
        if r:
            meta["shape"] = torch.Size([r])
            meta["nested"] = (r, [torch.Size([r, r]), (torch.int8, [b"y", 3j])], ())
        torch.save({"shared": {"meta": meta, "w": torch.arange(6.0)}, "own": torch.full((2,), float(r))},
                   path / f"checkpoint_{r}.pt")


def restore_value_types(rank: int, world: int, path: str, mode: str, target: Any) -> dict[str, Any]:
    res = RestoreCoordinator(timeout=60).restore(path, target, shared="shared", shared_mode=mode)
    return {"sd": res.state_dict}


def restore_with_patterns(rank: int, world: int, path: str, shared: Any, strict: bool) -> dict[str, Any]:
    """Restore everything with ``shared`` patterns; the report (rank 0) or the error."""
    try:
        res = RestoreCoordinator(timeout=60).restore(path, None, shared=shared, strict=strict)
    except RestoreError as e:
        return {"error": {"phase": e.phase, "ranks": sorted(e.failures), "text": str(e)}}
    return {"error": None, "report": None if res.report is None else res.report.to_dict(),
            "bytes_read": res.stats.bytes_read}


def write_and_restore_with_timedeltas(rank: int, world: int, path: str) -> dict[str, Any]:
    """Writer, coordinator (store barrier) and a per-call override, all given timedeltas."""
    from datetime import timedelta

    from dist_restore import CheckpointWriter

    sd = {"own": torch.full((4,), float(rank)), "shared": torch.arange(6.0)}
    CheckpointWriter(timeout=timedelta(seconds=30)).write(path, sd, metadata={"step": 1})
    coord = RestoreCoordinator(timeout=timedelta(seconds=30), barrier="store")
    res = coord.restore(path, None, shared="shared", timeout=timedelta(seconds=20))
    return {"own": res.state_dict["own"].tolist(), "shared": res.state_dict["shared"].tolist(),
            "bytes_read": res.stats.bytes_read, "timeout": coord._pg.timeout}


def edit_rank_file(path: Path, rank: int, edit: str) -> None:
    """Make rank ``rank``'s shared entries differ from the others': ``dtype`` (``shared.s0``
    as float64) or ``missing`` (no ``shared.s2``)."""
    file = path / f"checkpoint_{rank}.pt"
    sd = torch.load(file, weights_only=True)
    if edit == "dtype":
        sd["shared"]["s0"] = sd["shared"]["s0"].double()
    else:
        del sd["shared"]["s2"]
    torch.save(sd, file)


def restore_whole_and_compare(rank: int, world: int, path: str, mode: str, shared_memory: bool = True
                              ) -> dict[str, Any]:
    """Restore everything in this rank's file (no target); the error, or the keys that differ."""
    try:
        res = RestoreCoordinator(timeout=60, shared_memory=shared_memory).restore(
            path, None, shared="shared", shared_mode=mode)
    except RestoreError as e:
        return {"error": {"phase": e.phase, "ranks": sorted(e.failures), "text": str(e)}}
    return {"error": None, "bad": compare(res.state_dict, Path(path) / f"checkpoint_{rank}.pt"),
            "bytes_read": res.stats.bytes_read}


def restore_everything(rank: int, world: int, path: str, shared: Any, mode: str) -> dict[str, Any]:
    """``restore(path)``: each rank's whole own file (no target)."""
    res = RestoreCoordinator(timeout=60).restore(path, None, shared=shared, shared_mode=mode)
    return {"sd": res.state_dict, "bytes_read": res.stats.bytes_read, "missing": res.missing_keys}


def gather_payloads(rank: int, world: int, sizes: list[list[int]]) -> dict[str, Any]:
    """``ProcessGroupWrapper.all_gather_bytes`` of rounds of payloads (round i: this rank sends
    ``sizes[i][rank]`` bytes of a rank- and round-specific pattern); what arrived, and the
    collectives each round took."""
    from dist_restore._protocol.pg import ProcessGroupWrapper

    pg = ProcessGroupWrapper(timeout=60)
    got, counts = [], []
    for i, row in enumerate(sizes):
        before = pg.stats.collectives
        got.append(pg.all_gather_bytes(bytes((rank * 31 + i + j) % 256 for j in range(row[rank]))))
        counts.append(pg.stats.collectives - before)
    return {"got": got, "collectives": counts}
