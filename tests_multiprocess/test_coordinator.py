"""RestoreCoordinator on real processes: gloo on 127.0.0.1, 2/4/8 ranks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests_multiprocess import _workers as w
from tests_multiprocess.harness import RanksFailed, run_ranks

pytestmark = pytest.mark.multiprocess


def _shared_bytes(path: Path) -> int:
    sd = torch.load(path / "checkpoint_0.pt", weights_only=True)["shared"]
    from dist_restore._format.index import iter_leaves

    return sum(v.numel() * v.element_size() for _k, _p, v in iter_leaves(sd) if isinstance(v, torch.Tensor))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world", [2, 4, 8])
def test_per_rank_restore_bit_exact(tmp_path: Path, world: int) -> None:
    w.write_checkpoint(tmp_path, world)
    out = run_ranks(w.restore_and_compare, world, args=(str(tmp_path), "local", True, None), timeout=90)
    for r, o in enumerate(out):
        assert o["bad"] == [], f"rank {r}: {o['bad']}"
        assert o["in_place"]
        assert o["missing"] == []
    assert out[0]["report"] is not None and out[0]["report"]["issues"] == []
    assert all(o["report"] is None for o in out[1:])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["broadcast", "spread", "local"])
@pytest.mark.parametrize("preallocate", [True, False])
@pytest.mark.parametrize("shm", [True, False], ids=["shm", "collectives"])
def test_shared_modes_bit_exact_and_bytes(tmp_path: Path, mode: str, preallocate: bool, shm: bool) -> None:
    """Every mode, with the shared buckets through memory files (one host) or broadcasts."""
    world = 4
    w.write_checkpoint(tmp_path, world, n_shared=8, shared_elems=4096)
    shared_total = _shared_bytes(tmp_path)
    own = [sum(v.numel() * v.element_size() for v in torch.load(
        tmp_path / f"checkpoint_{r}.pt", weights_only=True)["model"].values()) for r in range(world)]
    out = run_ranks(w.restore_and_compare, world, args=(str(tmp_path), mode, preallocate, "shared", shm),
                    timeout=90)
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


@pytest.mark.timeout(120)
def test_shared_values_travel_and_8_ranks_broadcast(tmp_path: Path) -> None:
    w.write_checkpoint(tmp_path, 8)
    out = run_ranks(w.restore_and_compare, 8, args=(str(tmp_path), "broadcast", False), timeout=100)
    assert all(o["bad"] == [] for o in out)
    assert all(o["bytes_read"] > 0 for o in out)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("shm", [True, False], ids=["shm", "collectives"])
def test_10000_small_shared_tensors(tmp_path: Path, shm: bool) -> None:
    w.write_checkpoint(tmp_path, 2, small_shared=10_000)
    out = run_ranks(w.restore_and_compare, 2, args=(str(tmp_path), "broadcast", True, "shared", shm), timeout=150)
    assert all(o["bad"] == [] for o in out)
    # bucketed: a handful of collectives, not one per tensor
    assert out[1]["collectives"] < 50, out[1]["collectives"]
    assert (out[1]["bytes_shm"] > 10_000 * 4) == shm


@pytest.mark.timeout(120)
def test_owner_over_the_memory_file_limit_broadcasts(tmp_path: Path) -> None:
    w.write_checkpoint(tmp_path, 2, small_shared=200)
    args = (str(tmp_path), "broadcast", True, "shared", True, -1, 1000)  # at most 1000 bytes per file
    out = run_ranks(w.restore_and_compare, 2, args=args, timeout=90)
    assert all(o["bad"] == [] for o in out)
    assert out[1]["bytes_shm"] == 0 and out[1]["bytes_received"] >= _shared_bytes(tmp_path)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["broadcast", "spread"])
def test_rank_that_cannot_open_memory_files_gets_them_by_broadcast(tmp_path: Path, mode: str) -> None:
    """Rank 2 cannot open the others' memory files: every rank then broadcasts those buckets,
    and every rank still ends bit-exact."""
    world = 3
    w.write_checkpoint(tmp_path, world, n_shared=6, shared_elems=3000, small_shared=300)
    shared_total = _shared_bytes(tmp_path)
    out = run_ranks(w.restore_and_compare, world, args=(str(tmp_path), mode, True, "shared", True, 2), timeout=90)
    for r, o in enumerate(out):
        assert o["bad"] == [], f"rank {r}: {o['bad']}"
    own = [sum(v.numel() * v.element_size() for v in torch.load(
        tmp_path / f"checkpoint_{r}.pt", weights_only=True)["model"].values()) for r in range(world)]
    shared_read = [o["bytes_read"] - own[r] for r, o in enumerate(out)]
    assert sum(shared_read) == shared_total and out[2]["bytes_shm"] == 0
    assert out[2]["bytes_received"] >= shared_total - shared_read[2]  # the others' shares, by broadcast
    assert out[1]["bytes_shm"] > 0  # rank 1 had copied from the others' files


@pytest.mark.timeout(120)
def test_report_aggregated_on_rank_0(tmp_path: Path) -> None:
    world = 4
    w.write_checkpoint(tmp_path, world)
    out = run_ranks(w.restore_for_report, world, args=(str(tmp_path),), timeout=90)
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


@pytest.mark.timeout(120)
def test_strict_raises_on_every_rank(tmp_path: Path) -> None:
    world = 4
    w.write_checkpoint(tmp_path, world)
    out = run_ranks(w.restore_expect_failure, world,
                    args=(str(tmp_path), {"shared": "shared", "strict": True}, 3), timeout=90)
    for o in out:
        assert o["error"]["type"] == "RestoreError"
        assert o["error"]["phase"] == "strict"
        assert o["error"]["ranks"] == [3]
        assert "model.not_in_file" in o["error"]["text"]
        assert o["untouched"]
    assert len({o["error"]["text"] for o in out}) == 1


@pytest.mark.timeout(120)
@pytest.mark.parametrize("damage", ["missing", "corrupt", "truncated", "shape"])
def test_one_bad_rank_fails_every_rank_untouched(tmp_path: Path, damage: str) -> None:
    world = 4
    w.write_checkpoint(tmp_path, world)
    bad = tmp_path / "checkpoint_2.pt"
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
    out = run_ranks(w.restore_expect_failure, world, args=(str(tmp_path), {"shared": "shared"}), timeout=90)
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


@pytest.mark.timeout(120)
def test_failing_user_predicate_fails_every_rank(tmp_path: Path) -> None:
    world = 2
    w.write_checkpoint(tmp_path, world)
    out = run_ranks(w.restore_with_failing_predicate, world, args=(str(tmp_path),), timeout=90)
    for o in out:
        assert o["error"]["type"] == "RestoreError" and o["error"]["phase"] == "plan"
        assert o["error"]["ranks"] == [1]
        assert "user predicate exploded on shared.s1" in o["error"]["text"]
        assert o["untouched"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["broadcast", "local"])
def test_shared_non_tensor_values_come_from_src(tmp_path: Path, mode: str) -> None:
    world = 3
    w.write_diverging_values(tmp_path, world)
    out = run_ranks(w.restore_shared_values, world, args=(str(tmp_path), mode), timeout=90)
    steps = [o["meta"]["step"] for o in out]
    if mode == "broadcast":  # travelled from rank 0's file, as did the tensors
        assert steps == [1234] * world
        assert [o["bytes_read"] > 0 for o in out] == [True, False, False]
    else:  # each rank its own copy
        assert steps == [1234, -1, -2]
    assert all(o["meta"]["betas"] == (0.9, 0.999) and o["meta"]["milestones"] == [10, 20] for o in out)
    assert all(torch.equal(o["s0"], out[0]["s0"]) for o in out)


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("victim", "what", "shm", "phase"), [
    (1, "unpack", False, "exchange"), (0, "buffer", False, "exchange"),
    (1, "unpack_from", True, "exchange"), (0, "pack_into", True, "read")])
def test_local_exchange_failure_fails_every_rank_promptly(tmp_path: Path, victim: int, what: str, shm: bool,
                                                          phase: str) -> None:
    """A rank whose own copy fails: the collectives go on, then every rank raises. (With memory
    files the owner packs during the read phase: its failure is a read failure.)"""
    world = 3
    w.write_checkpoint(tmp_path, world, small_shared=50)
    out = run_ranks(w.restore_with_failing_exchange, world, args=(str(tmp_path), victim, what, shm), timeout=100)
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


@pytest.mark.timeout(120)
@pytest.mark.parametrize("target", [None, {"shared": {"meta": None, "w": None}, "own": None}],
                         ids=["no-target", "target"])
def test_shared_values_keep_their_types(tmp_path: Path, target: object) -> None:
    """torch.Size, OrderedDict, dtype, device, complex, bytes and nested tuples among the shared
    values travel from src with their types (a torch.Size came back a tuple)."""
    world = 2
    w.write_value_types(tmp_path, world)
    out = run_ranks(w.restore_value_types, world, args=(str(tmp_path), "broadcast", target), timeout=90)
    src = torch.load(tmp_path / "checkpoint_0.pt", weights_only=True)
    for r, o in enumerate(out):
        _assert_same_types(o["sd"]["shared"], src["shared"], f"rank {r}: shared")
        own = torch.load(tmp_path / f"checkpoint_{r}.pt", weights_only=True)["own"]
        assert torch.equal(o["sd"]["own"], own)


@pytest.mark.timeout(120)
def test_prefix_with_separator_shares_and_unmatched_patterns_named(tmp_path: Path) -> None:
    """shared="shared." reads the shared entries once (it selected nothing, so every rank read
    them itself); a pattern that selects nothing on every rank is named in rank 0's report and
    fails strict on every rank; one that selects something on some rank is not named."""
    world = 2
    w.write_checkpoint(tmp_path, world)
    sd1 = torch.load(tmp_path / "checkpoint_1.pt", weights_only=True)
    sd1["only_on_1"] = torch.ones(3)
    torch.save(sd1, tmp_path / "checkpoint_1.pt")
    own = [sum(v.numel() * v.element_size() for v in torch.load(
        tmp_path / f"checkpoint_{r}.pt", weights_only=True)["model"].values()) for r in range(world)]
    patterns = ["shared.", "only_on_1", "nowhere."]
    out = run_ranks(w.restore_with_patterns, world, args=(str(tmp_path), patterns, False), timeout=90)
    assert [o["error"] for o in out] == [None, None]
    assert out[0]["bytes_read"] == own[0] + _shared_bytes(tmp_path) and out[1]["bytes_read"] == own[1] + 12
    assert out[0]["report"]["unmatched_shared"] == ["nowhere."] and out[1]["report"] is None

    out = run_ranks(w.restore_with_patterns, world, args=(str(tmp_path), patterns, True), timeout=90)
    for o in out:
        assert o["error"]["phase"] == "strict" and o["error"]["ranks"] == [0, 1]
        assert "'nowhere.'" in o["error"]["text"] and "only_on_1" not in o["error"]["text"]


@pytest.mark.timeout(120)
def test_timedelta_timeouts_on_real_ranks(tmp_path: Path) -> None:
    """timeout=timedelta(...) as torch takes it: writer, coordinator with a store barrier, and
    restore's per-call override (each raised TypeError before)."""
    out = run_ranks(w.write_and_restore_with_timedeltas, 2, args=(str(tmp_path),), timeout=90)
    assert [o["own"] for o in out] == [[0.0] * 4, [1.0] * 4]
    assert all(o["shared"] == list(map(float, range(6))) and o["timeout"] == 30.0 for o in out)
    assert out[0]["bytes_read"] == 16 + 24 and out[1]["bytes_read"] == 16


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["broadcast", "spread"])
def test_shared_entry_of_another_dtype_on_one_rank_fails_every_rank(tmp_path: Path, mode: str) -> None:
    """The ranks' shared lists differ (their digests do): they compare them and name the entry."""
    world = 3
    w.write_checkpoint(tmp_path, world)
    w.edit_rank_file(tmp_path, 2, "dtype")
    out = run_ranks(w.restore_whole_and_compare, world, args=(str(tmp_path), mode), timeout=90)
    for o in out:
        assert o["error"] is not None and o["error"]["phase"] == "plan" and o["error"]["ranks"] == [2], o
        assert ("shared entry 'shared.s0' is torch.float64 (1024,) here, torch.float32 (1024,) on rank 0"
                in o["error"]["text"])
        assert "a shared entry must have one dtype and shape on every rank" in o["error"]["text"]
    assert len({o["error"]["text"] for o in out}) == 1


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["spread", "local"])
def test_shared_entry_missing_on_one_rank(tmp_path: Path, mode: str) -> None:
    """Rank 1's file lacks one shared entry: the others still restore theirs bit-exact (spread:
    from the ranks that have it), and so does rank 1 the rest."""
    world = 3
    w.write_checkpoint(tmp_path, world)
    w.edit_rank_file(tmp_path, 1, "missing")
    out = run_ranks(w.restore_whole_and_compare, world, args=(str(tmp_path), mode), timeout=90)
    for r, o in enumerate(out):
        assert o["error"] is None and o["bad"] == [], f"rank {r}: {o}"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("shared,mode", [(None, "broadcast"), ("shared", "local")])
def test_whole_files_without_a_target(tmp_path: Path, shared: object, mode: str) -> None:
    """No target, nothing shared (or shared read locally): each rank gets its whole file as
    torch.load gives it, types included, through the read that makes no object per entry."""
    world = 2
    w.write_value_types(tmp_path, world)
    out = run_ranks(w.restore_everything, world, args=(str(tmp_path), shared, mode), timeout=90)
    for r, o in enumerate(out):
        want = torch.load(tmp_path / f"checkpoint_{r}.pt", weights_only=True)
        _assert_same_types(o["sd"], want, f"rank {r}")
        assert o["missing"] == [] and o["bytes_read"] == 6 * 4 + 2 * 4 + 3 * 8  # w, own, od["a"]


@pytest.mark.timeout(120)
def test_all_gather_bytes_one_collective_when_payloads_fit() -> None:
    """The protocol's all-gather: every rank gets every payload, byte for byte, in rank order;
    one collective when all fit the slot (empty, tiny, exactly the slot), two when one rank's
    is larger (then every rank takes the second, with its own payload of any size)."""
    from dist_restore._protocol.pg import SLOT

    sizes = [[0, 0, 0], [1, 0, 700], [SLOT, SLOT, SLOT], [SLOT + 1, 3, 0], [5, 40_000, SLOT]]
    out = run_ranks(w.gather_payloads, 3, args=(sizes,), timeout=90)
    for o in out:
        assert o["collectives"] == [1, 1, 1, 2, 2]
        for i, row in enumerate(sizes):
            assert o["got"][i] == [bytes((r * 31 + i + j) % 256 for j in range(row[r])) for r in range(3)]
