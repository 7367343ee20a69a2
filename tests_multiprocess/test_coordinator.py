"""RestoreCoordinator on real processes: gloo on 127.0.0.1, 2/3/4/8 ranks.

Starting ranks is what costs here, not the restores, so every restore of the module runs in
one spawn per world size (``jobs``: a :class:`Batch` each, started by the first test that needs
it), each on a checkpoint written for it beforehand (cases that only read share one); each test
checks its own job's per-rank results. A test that kills a rank has a spawn of its own.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from tests_multiprocess import _workers as w
from tests_multiprocess._batch import Batch
from tests_multiprocess.harness import RanksFailed, run_ranks

pytestmark = pytest.mark.multiprocess

#: Seconds for a test that may start a spawn: writing every checkpoint, then its world's batch.
_SPAWNS_TIMEOUT = 600

_MODES = ["broadcast", "spread", "local"]
_PREALLOCATE = [True, False]
_SHM = {"shm": True, "collectives": False}
_DAMAGES = ["missing", "corrupt", "truncated", "shape"]
_EXCHANGE_FAILURES = [(1, "unpack", False, "exchange"), (0, "buffer", False, "exchange"),
                      (1, "unpack_from", True, "exchange"), (0, "pack_into", True, "read")]
_TYPE_TARGETS = {"no-target": None, "target": {"shared": {"meta": None, "w": None}, "own": None}}
_PATTERNS = ["shared.", "only_on_1", "nowhere."]
_WHOLE = [(None, "broadcast"), ("shared", "local")]


def _gather_sizes() -> list[list[int]]:
    """Payload sizes per round (row) and rank (column) for ``w.gather_payloads``."""
    from dist_restore._protocol.pg import SLOT

    return [[0, 0, 0], [1, 0, 700], [SLOT, SLOT, SLOT], [SLOT + 1, 3, 0], [5, 40_000, SLOT]]


class _Jobs:
    """The checkpoints (``dirs``, by name) and one :class:`Batch` per world size (``batch``)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.dirs: dict[str, Path] = {}
        self.batch = {world: Batch(world, timeout=420, pg_timeout=60) for world in (2, 3, 4, 8)}

    def ckpt(self, name: str, write: Callable[[Path], None]) -> Path:
        self.dirs[name] = self.root / name
        write(self.dirs[name])
        return self.dirs[name]

    def add(self, world: int, name: str, fn: Callable[..., Any], *args: Any) -> None:
        self.batch[world].add(name, fn, *args)

    def results(self, world: int, name: str) -> list[Any]:
        return self.batch[world].results(name)


@pytest.fixture(scope="module")
def jobs(tmp_path_factory: pytest.TempPathFactory) -> _Jobs:
    """Every checkpoint of the module, written here, and every restore, queued (see each test)."""
    j = _Jobs(tmp_path_factory.mktemp("coordinator"))
    for world in (2, 4, 8):
        path = str(j.ckpt(f"plain{world}", lambda p, world=world: w.write_checkpoint(p, world)))
        j.add(world, "per_rank", w.restore_and_compare, path, "local", True, None)
    # shared modes on 4 ranks
    path = str(j.ckpt("modes4", lambda p: w.write_checkpoint(p, 4, n_shared=8, shared_elems=4096)))
    for mode in _MODES:
        for pre in _PREALLOCATE:
            for shm_id, shm in _SHM.items():
                j.add(4, f"modes[{shm_id}-{pre}-{mode}]", w.restore_and_compare, path, mode, pre, "shared", shm)
    j.add(8, "broadcast", w.restore_and_compare, str(j.dirs["plain8"]), "broadcast", False)
    path = str(j.ckpt("small2", lambda p: w.write_checkpoint(p, 2, small_shared=10_000)))
    for shm_id, shm in _SHM.items():
        j.add(2, f"small[{shm_id}]", w.restore_and_compare, path, "broadcast", True, "shared", shm)
    path = str(j.ckpt("small200", lambda p: w.write_checkpoint(p, 2, small_shared=200)))
    # at most 1000 bytes per memory file
    j.add(2, "over_limit", w.restore_and_compare, path, "broadcast", True, "shared", True, -1, 1000)
    path = str(j.ckpt("no_peer3", lambda p: w.write_checkpoint(p, 3, n_shared=6, shared_elems=3000, small_shared=300)))
    for mode in ("broadcast", "spread"):
        j.add(3, f"no_peer_file[{mode}]", w.restore_and_compare, path, mode, True, "shared", True, 2)
    j.add(4, "report", w.restore_for_report, str(j.dirs["plain4"]))
    j.add(4, "strict", w.restore_expect_failure, str(j.dirs["plain4"]), {"shared": "shared", "strict": True}, 3)
    for damage in _DAMAGES:
        path = str(j.ckpt(f"bad4_{damage}", lambda p, damage=damage: _damaged(p, damage)))
        j.add(4, f"bad[{damage}]", w.restore_expect_failure, path, {"shared": "shared"})
    j.add(2, "predicate", w.restore_with_failing_predicate, str(j.dirs["plain2"]))
    path = str(j.ckpt("diverging3", lambda p: w.write_diverging_values(p, 3)))
    for mode in ("broadcast", "local"):
        j.add(3, f"non_tensor[{mode}]", w.restore_shared_values, path, mode)
    path = str(j.ckpt("exchange3", lambda p: w.write_checkpoint(p, 3, small_shared=50)))
    for victim, what, shm, _phase in _EXCHANGE_FAILURES:
        j.add(3, f"exchange[{victim}-{what}-{shm}]", w.restore_with_failing_exchange, path, victim, what, shm)
    path = str(j.ckpt("types2", lambda p: w.write_value_types(p, 2)))
    for target_id, target in _TYPE_TARGETS.items():
        j.add(2, f"types[{target_id}]", w.restore_value_types, path, "broadcast", target)
    path = str(j.ckpt("patterns2", _only_on_1))
    j.add(2, "patterns", w.restore_with_patterns, path, _PATTERNS, False)
    j.add(2, "patterns_strict", w.restore_with_patterns, path, _PATTERNS, True)
    (j.root / "timedeltas").mkdir()
    j.add(2, "timedeltas", w.write_and_restore_with_timedeltas, str(j.root / "timedeltas"))
    path = str(j.ckpt("dtype3", lambda p: _edited(p, 3, 2, "dtype")))
    for mode in ("broadcast", "spread"):
        j.add(3, f"dtype[{mode}]", w.restore_whole_and_compare, path, mode)
    path = str(j.ckpt("missing3", lambda p: _edited(p, 3, 1, "missing")))
    for mode in ("spread", "local"):
        j.add(3, f"missing[{mode}]", w.restore_whole_and_compare, path, mode)
    for shared, mode in _WHOLE:
        j.add(2, f"whole[{shared}-{mode}]", w.restore_everything, str(j.dirs["types2"]), shared, mode)
    j.add(3, "gather", w.gather_payloads, _gather_sizes())
    return j


def _damaged(path: Path, damage: str) -> None:
    """A 4-rank checkpoint whose rank file 2 is ``missing``, ``corrupt`` (the zip directory's
    tail zeroed), ``truncated`` (to half) or of another ``shape`` (``model.w0``: 7 elements)."""
    w.write_checkpoint(path, 4)
    bad = path / "checkpoint_2.pt"
    if damage == "missing":
        bad.unlink()
    elif damage == "corrupt":
        data = bytearray(bad.read_bytes())
        data[-30:] = b"\0" * 30  # the zip directory's tail
        bad.write_bytes(bytes(data))
    elif damage == "truncated":
        bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    else:
        sd = torch.load(bad, weights_only=True)
        sd["model"]["w0"] = torch.zeros(7)
        torch.save(sd, bad)


def _only_on_1(path: Path) -> None:
    """A 2-rank checkpoint whose rank file 1 also holds ``only_on_1``."""
    w.write_checkpoint(path, 2)
    sd1 = torch.load(path / "checkpoint_1.pt", weights_only=True)
    sd1["only_on_1"] = torch.ones(3)
    torch.save(sd1, path / "checkpoint_1.pt")


def _edited(path: Path, world: int, rank: int, edit: str) -> None:
    w.write_checkpoint(path, world)
    w.edit_rank_file(path, rank, edit)



def _shared_bytes(path: Path) -> int:
    sd = torch.load(path / "checkpoint_0.pt", weights_only=True)["shared"]
    from dist_restore._format.index import iter_leaves

    return sum(v.numel() * v.element_size() for _k, _p, v in iter_leaves(sd) if isinstance(v, torch.Tensor))


@pytest.mark.timeout(_SPAWNS_TIMEOUT)
@pytest.mark.parametrize("world", [2, 4, 8])
def test_per_rank_restore_bit_exact(jobs: _Jobs, world: int) -> None:
    out = jobs.results(world, "per_rank")
    for r, o in enumerate(out):
        assert o["bad"] == [], f"rank {r}: {o['bad']}"
        assert o["in_place"]
        assert o["missing"] == []
    assert out[0]["report"] is not None and out[0]["report"]["issues"] == []
    assert all(o["report"] is None for o in out[1:])


@pytest.mark.timeout(_SPAWNS_TIMEOUT)
@pytest.mark.parametrize("mode", _MODES)
@pytest.mark.parametrize("preallocate", _PREALLOCATE)
@pytest.mark.parametrize("shm", list(_SHM.values()), ids=list(_SHM))
def test_shared_modes_bit_exact_and_bytes(jobs: _Jobs, mode: str, preallocate: bool, shm: bool) -> None:
    """Every mode, with the shared buckets through memory files (one host) or broadcasts."""
    world = 4
    path = jobs.dirs["modes4"]  # write_checkpoint(world, n_shared=8, shared_elems=4096)
    shared_total = _shared_bytes(path)
    own = [sum(v.numel() * v.element_size() for v in torch.load(
        path / f"checkpoint_{r}.pt", weights_only=True)["model"].values()) for r in range(world)]
    out = jobs.results(world, f"modes[{'shm' if shm else 'collectives'}-{preallocate}-{mode}]")
    for r, o in enumerate(out):
        assert o["bad"] == [], f"rank {r}: {o['bad']}"
        assert o["in_place"]
    shared_read = [o["bytes_read"] - own[r] for r, o in enumerate(out)]
    # shared tensor bytes arriving from other ranks, by memory file (all but lone tensors, which
    # their owner broadcasts in place) or by collective
    moved = [o["bytes_shm"] + o["bytes_received"] for o in out]
    if mode != "local":
        assert all(o["bytes_shm"] > 0 for o in out[1:]) if shm else all(o["bytes_shm"] == 0 for o in out)
    if mode == "broadcast":
        assert shared_read == [shared_total] + [0] * (world - 1)
        assert all(m >= shared_total for m in moved[1:])
        assert out[0]["bytes_shm"] == 0
    elif mode == "spread":
        assert sum(shared_read) == shared_total
        assert max(shared_read) <= shared_total / world * 1.5, shared_read
        assert min(shared_read) > 0
        assert all(m >= shared_total - x for m, x in zip(moved, shared_read))  # what the others read
    else:
        assert shared_read == [shared_total] * world


@pytest.mark.timeout(_SPAWNS_TIMEOUT)
def test_shared_values_travel_and_8_ranks_broadcast(jobs: _Jobs) -> None:
    out = jobs.results(8, "broadcast")  # write_checkpoint(8), restored with preallocate=False
    assert all(o["bad"] == [] for o in out)
    assert all(o["bytes_read"] > 0 for o in out)


@pytest.mark.timeout(_SPAWNS_TIMEOUT)
@pytest.mark.parametrize("shm", list(_SHM.values()), ids=list(_SHM))
def test_10000_small_shared_tensors(jobs: _Jobs, shm: bool) -> None:
    out = jobs.results(2, f"small[{'shm' if shm else 'collectives'}]")  # write_checkpoint(2, small_shared=10_000)
    assert all(o["bad"] == [] for o in out)
    # bucketed: a handful of collectives, not one per tensor
    assert out[1]["collectives"] < 50, out[1]["collectives"]
    assert (out[1]["bytes_shm"] > 10_000 * 4) == shm


@pytest.mark.timeout(_SPAWNS_TIMEOUT)
def test_owner_over_the_memory_file_limit_broadcasts(jobs: _Jobs) -> None:
    out = jobs.results(2, "over_limit")  # at most 1000 bytes per memory file
    assert all(o["bad"] == [] for o in out)
    assert out[1]["bytes_shm"] == 0 and out[1]["bytes_received"] >= _shared_bytes(jobs.dirs["small200"])


@pytest.mark.timeout(_SPAWNS_TIMEOUT)
@pytest.mark.parametrize("mode", ["broadcast", "spread"])
def test_rank_that_cannot_open_memory_files_gets_them_by_broadcast(jobs: _Jobs, mode: str) -> None:
    """Rank 2 cannot open the others' memory files: every rank then broadcasts those buckets,
    and every rank still ends bit-exact."""
    world = 3
    path = jobs.dirs["no_peer3"]  # write_checkpoint(world, n_shared=6, shared_elems=3000, small_shared=300)
    shared_total = _shared_bytes(path)
    out = jobs.results(world, f"no_peer_file[{mode}]")
    for r, o in enumerate(out):
        assert o["bad"] == [], f"rank {r}: {o['bad']}"
    own = [sum(v.numel() * v.element_size() for v in torch.load(
        path / f"checkpoint_{r}.pt", weights_only=True)["model"].values()) for r in range(world)]
    shared_read = [o["bytes_read"] - own[r] for r, o in enumerate(out)]
    assert sum(shared_read) == shared_total and out[2]["bytes_shm"] == 0
    assert out[2]["bytes_received"] >= shared_total - shared_read[2]  # the others' shares, by broadcast
    assert out[1]["bytes_shm"] > 0  # rank 1 had copied from the others' files


@pytest.mark.timeout(_SPAWNS_TIMEOUT)
def test_report_aggregated_on_rank_0(jobs: _Jobs) -> None:
    out = jobs.results(4, "report")  # write_checkpoint(4)
    assert out[2]["missing"] == ["model.not_in_file", "extra"]
    assert out[1]["unexpected"] == ["model.ids"] and out[0]["unexpected"] == []
    assert all(o["report"] is None for o in out[1:])
    from dist_restore import RestoreReport

    rep = RestoreReport.from_dict(out[0]["report"])
    assert rep.missing_keys == ("extra", "model.not_in_file")
    assert [(i.key, i.ranks) for i in rep.on_all_ranks("missing")] == [("extra", (0, 1, 2, 3))]
    assert [(i.key, i.ranks) for i in rep.on_some_ranks("missing")] == [("model.not_in_file", (2,))]
    assert [(i.key, i.ranks) for i in rep.on_some_ranks("unexpected")] == [("model.ids", (1, 3))]
    text = out[0]["text"]
    assert "model.not_in_file  missing on rank 2" in text
    assert "model.ids  unexpected on ranks 1,3" in text


@pytest.mark.timeout(_SPAWNS_TIMEOUT)
def test_strict_raises_on_every_rank(jobs: _Jobs) -> None:
    out = jobs.results(4, "strict")  # write_checkpoint(4); rank 3 asks for a key no file has
    for o in out:
        assert o["error"]["type"] == "RestoreError"
        assert o["error"]["phase"] == "strict"
        assert o["error"]["ranks"] == [3]
        assert "model.not_in_file" in o["error"]["text"]
        assert o["untouched"]
    assert len({o["error"]["text"] for o in out}) == 1


@pytest.mark.timeout(_SPAWNS_TIMEOUT)
@pytest.mark.parametrize("damage", _DAMAGES)
def test_one_bad_rank_fails_every_rank_untouched(jobs: _Jobs, damage: str) -> None:
    world = 4
    out = jobs.results(world, f"bad[{damage}]")  # rank file 2 damaged: see _damaged
    texts = set()
    for o in out:
        assert o["error"] is not None and o["error"]["type"] == "RestoreError", o["error"]
        assert o["error"]["phase"] == "plan"
        if damage == "missing":  # every rank sees the directory is incomplete
            assert o["error"]["ranks"] == list(range(world))
            assert "incomplete checkpoint: no commit manifest; rank 2 has no file" in o["error"]["text"]
        else:
            assert o["error"]["ranks"] == [2]
            assert "checkpoint_2.pt" in o["error"]["text"] or damage == "shape"
        assert o["untouched"], "a target was modified although the plan failed"
        texts.add(o["error"]["text"])
    assert len(texts) == 1  # the same error on every rank
    if damage == "shape":
        assert "model.w0" in texts.pop()


@pytest.mark.timeout(120)
def test_killed_rank_fails_others_within_timeout(tmp_path: Path) -> None:
    world = 4
    w.write_checkpoint(tmp_path, world)
    with pytest.raises(RanksFailed) as info:
        run_ranks(w.restore_with_killed_rank, world, args=(str(tmp_path), 1), timeout=90)
    outcomes = {o.rank: o for o in info.value.outcomes}
    assert outcomes[1].exitcode == -9
    for r in (0, 2, 3):
        res = outcomes[r].result
        assert res is not None, outcomes[r]
        assert res["error"]["type"] == "RestoreError", res["error"]
        assert res["untouched"]
        assert res["seconds"] < 60


@pytest.mark.timeout(_SPAWNS_TIMEOUT)
def test_failing_user_predicate_fails_every_rank(jobs: _Jobs) -> None:
    out = jobs.results(2, "predicate")  # write_checkpoint(2)
    for o in out:
        assert o["error"]["type"] == "RestoreError" and o["error"]["phase"] == "plan"
        assert o["error"]["ranks"] == [1]
        assert "user predicate exploded on shared.s1" in o["error"]["text"]
        assert o["untouched"]


@pytest.mark.timeout(_SPAWNS_TIMEOUT)
@pytest.mark.parametrize("mode", ["broadcast", "local"])
def test_shared_non_tensor_values_come_from_src(jobs: _Jobs, mode: str) -> None:
    world = 3
    out = jobs.results(world, f"non_tensor[{mode}]")  # write_diverging_values(world)
    steps = [o["meta"]["step"] for o in out]
    if mode == "broadcast":  # travelled from rank 0's file, as did the tensors
        assert steps == [1234] * world
        assert [o["bytes_read"] > 0 for o in out] == [True, False, False]
    else:  # each rank its own copy
        assert steps == [1234, -1, -2]
    assert all(o["meta"]["betas"] == (0.9, 0.999) and o["meta"]["milestones"] == [10, 20] for o in out)
    assert all(torch.equal(o["s0"], out[0]["s0"]) for o in out)


@pytest.mark.timeout(_SPAWNS_TIMEOUT)
@pytest.mark.parametrize(("victim", "what", "shm", "phase"), _EXCHANGE_FAILURES)
def test_local_exchange_failure_fails_every_rank_promptly(jobs: _Jobs, victim: int, what: str, shm: bool,
                                                          phase: str) -> None:
    """A rank whose own copy fails: the collectives go on, then every rank raises. (With memory
    files the owner packs during the read phase: its failure is a read failure.)"""
    out = jobs.results(3, f"exchange[{victim}-{what}-{shm}]")  # write_checkpoint(3, small_shared=50)
    for o in out:
        assert o["error"]["type"] == "RestoreError", o["error"]
        assert o["error"]["phase"] == phase and o["error"]["ranks"] == [victim], o["error"]
        assert f"injected {what} failure" in o["error"]["text"]
        assert o["seconds"] < 30  # agreed on, not a 60 s collective timeout


def _assert_same_types(got: object, want: object, where: str = "") -> None:
    assert type(got) is type(want), f"{where}: {type(got).__name__} vs {type(want).__name__}"
    if isinstance(want, dict):
        assert list(got) == list(want), where
        for k in want:
            _assert_same_types(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), where
        for i, (g, x) in enumerate(zip(got, want)):
            _assert_same_types(g, x, f"{where}[{i}]")
    elif isinstance(want, torch.Tensor):
        assert torch.equal(got, want), where
    else:
        assert got == want, f"{where}: {got!r} vs {want!r}"


@pytest.mark.timeout(_SPAWNS_TIMEOUT)
@pytest.mark.parametrize("target_id", list(_TYPE_TARGETS), ids=list(_TYPE_TARGETS))
def test_shared_values_keep_their_types(jobs: _Jobs, target_id: str) -> None:
    """torch.Size, OrderedDict, dtype, device, complex, bytes and nested tuples among the shared
    values travel from src with their types (a torch.Size came back a tuple)."""
    path = jobs.dirs["types2"]  # write_value_types(2)
    out = jobs.results(2, f"types[{target_id}]")  # target: _TYPE_TARGETS[target_id]
    src = torch.load(path / "checkpoint_0.pt", weights_only=True)
    for r, o in enumerate(out):
        _assert_same_types(o["sd"]["shared"], src["shared"], f"rank {r}: shared")
        own = torch.load(path / f"checkpoint_{r}.pt", weights_only=True)["own"]
        assert torch.equal(o["sd"]["own"], own)


@pytest.mark.timeout(_SPAWNS_TIMEOUT)
def test_prefix_with_separator_shares_and_unmatched_patterns_named(jobs: _Jobs) -> None:
    """shared="shared." reads the shared entries once (it selected nothing, so every rank read
    them itself); a pattern that selects nothing on every rank is named in rank 0's report and
    fails strict on every rank; one that selects something on some rank is not named."""
    world = 2
    path = jobs.dirs["patterns2"]  # write_checkpoint(world), and rank file 1 holds "only_on_1" (3 floats)
    own = [sum(v.numel() * v.element_size() for v in torch.load(
        path / f"checkpoint_{r}.pt", weights_only=True)["model"].values()) for r in range(world)]
    out = jobs.results(world, "patterns")  # shared=_PATTERNS
    assert [o["error"] for o in out] == [None, None]
    assert out[0]["bytes_read"] == own[0] + _shared_bytes(path) and out[1]["bytes_read"] == own[1] + 12
    assert out[0]["report"]["unmatched_shared"] == ["nowhere."] and out[1]["report"] is None

    out = jobs.results(world, "patterns_strict")  # the same, strict
    for o in out:
        assert o["error"]["phase"] == "strict" and o["error"]["ranks"] == [0, 1]
        assert "'nowhere.'" in o["error"]["text"] and "only_on_1" not in o["error"]["text"]


@pytest.mark.timeout(_SPAWNS_TIMEOUT)
def test_timedelta_timeouts_on_real_ranks(jobs: _Jobs) -> None:
    """timeout=timedelta(...) as torch takes it: writer, coordinator with a store barrier, and
    restore's per-call override (each raised TypeError before)."""
    out = jobs.results(2, "timedeltas")
    assert [o["own"] for o in out] == [[0.0] * 4, [1.0] * 4]
    assert all(o["shared"] == list(map(float, range(6))) and o["timeout"] == 30.0 for o in out)
    assert out[0]["bytes_read"] == 16 + 24 and out[1]["bytes_read"] == 16


@pytest.mark.timeout(_SPAWNS_TIMEOUT)
@pytest.mark.parametrize("mode", ["broadcast", "spread"])
def test_shared_entry_of_another_dtype_on_one_rank_fails_every_rank(jobs: _Jobs, mode: str) -> None:
    """The ranks' shared lists differ (their digests do): they compare them and name the entry."""
    out = jobs.results(3, f"dtype[{mode}]")  # write_checkpoint(3); edit_rank_file(2, "dtype")
    for o in out:
        assert o["error"] is not None and o["error"]["phase"] == "plan" and o["error"]["ranks"] == [2], o
        assert ("shared entry 'shared.s0' is torch.float64 (1024,) here, torch.float32 (1024,) on rank 0"
                in o["error"]["text"])
        assert "a shared entry must have one dtype and shape on every rank" in o["error"]["text"]
    assert len({o["error"]["text"] for o in out}) == 1


@pytest.mark.timeout(_SPAWNS_TIMEOUT)
@pytest.mark.parametrize("mode", ["spread", "local"])
def test_shared_entry_missing_on_one_rank(jobs: _Jobs, mode: str) -> None:
    """Rank 1's file lacks one shared entry: the others still restore theirs bit-exact (spread:
    from the ranks that have it), and so does rank 1 the rest."""
    out = jobs.results(3, f"missing[{mode}]")  # write_checkpoint(3); edit_rank_file(1, "missing")
    for r, o in enumerate(out):
        assert o["error"] is None and o["bad"] == [], f"rank {r}: {o}"


@pytest.mark.timeout(_SPAWNS_TIMEOUT)
@pytest.mark.parametrize("shared,mode", _WHOLE)
def test_whole_files_without_a_target(jobs: _Jobs, shared: object, mode: str) -> None:
    """No target, nothing shared (or shared read locally): each rank gets its whole file as
    torch.load gives it, types included, through the read that makes no object per entry."""
    path = jobs.dirs["types2"]  # write_value_types(2)
    out = jobs.results(2, f"whole[{shared}-{mode}]")
    for r, o in enumerate(out):
        want = torch.load(path / f"checkpoint_{r}.pt", weights_only=True)
        _assert_same_types(o["sd"], want, f"rank {r}")
        assert o["missing"] == [] and o["bytes_read"] == 6 * 4 + 2 * 4 + 3 * 8  # w, own, od["a"]


@pytest.mark.timeout(_SPAWNS_TIMEOUT)
def test_all_gather_bytes_one_collective_when_payloads_fit(jobs: _Jobs) -> None:
    """The protocol's all-gather: every rank gets every payload, byte for byte, in rank order;
    one collective when all fit the slot (empty, tiny, exactly the slot), two when one rank's
    is larger (then every rank takes the second, with its own payload of any size)."""
    sizes = _gather_sizes()
    out = jobs.results(3, "gather")
    for o in out:
        assert o["collectives"] == [1, 1, 1, 2, 2]
        for i, row in enumerate(sizes):
            assert o["got"][i] == [bytes((r * 31 + i + j) % 256 for j in range(row[r])) for r in range(3)]
