"""Pure tests of shared-entry selection, owner assignment and bucket layout (no processes)."""

from __future__ import annotations

import random
from typing import NamedTuple

import pytest
import torch

from dist_restore._planning.shared import SharedItem, assign_owners, make_buckets, make_selector, shared_items
from dist_restore._format.unpickle import StorageRef, TensorRef


def test_prefix_selects_subtree_not_siblings() -> None:
    sel = make_selector("model")
    assert sel("model") and sel("model.w") and sel("model[0]") and sel("model.layers.3.w")
    assert not sel("model2.w") and not sel("opt.model")


@pytest.mark.parametrize("prefix", ["model.", "model..", "model"])
def test_prefix_with_trailing_separator_selects_the_same(prefix: str) -> None:
    """As torch writes prefixes (consume_prefix_in_state_dict_if_present(sd, "module.")):
    "model." selects what "model" does."""
    keys = ["model", "model.w", "model[0]", "model.layers.3.w", "model2.w", "opt.model", "modelx"]
    assert [k for k in keys if make_selector([prefix])(k)] == ["model", "model.w", "model[0]",
                                                               "model.layers.3.w"]
    assert make_selector("module.")("module.encoder.w") and not make_selector("module.")("modules.w")


@pytest.mark.parametrize("bad", ["", ".", ".."])
def test_empty_prefix_is_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="empty"):
        make_selector(["model", bad])


def test_unmatched_patterns_named() -> None:
    from dist_restore._planning.shared import unmatched_patterns

    keys = ["model.w", "opt.lr"]
    assert unmatched_patterns(["model.", "emb", "*.bias", "opt"], keys) == ["emb", "*.bias"]
    assert unmatched_patterns("model.", keys) == []
    assert unmatched_patterns(None, []) == []

    def never(key: str) -> bool:
        return False

    assert unmatched_patterns(never, []) == ["test_unmatched_patterns_named.<locals>.never"]
    assert unmatched_patterns(never, ["x"]) == []


def test_globs_and_lists() -> None:
    sel = make_selector(["*.bias", "emb"])
    assert sel("a.b.bias") and sel("emb.weight") and not sel("a.weight")
    assert make_selector(None)("anything") is False
    assert make_selector(lambda k: k.endswith("x"))("ax")


def test_bad_pattern_type() -> None:
    with pytest.raises(TypeError, match="strings"):
        make_selector(["a", 3])  # type: ignore[list-item]


def _items(sizes: list[int]) -> list[SharedItem]:
    return [SharedItem(f"k{i}", "torch.float32", (n // 4,), n) for i, n in enumerate(sizes)]


def test_broadcast_owner_is_src() -> None:
    assert {i.owner for i in assign_owners(_items([4, 8, 12]), "broadcast", 4, 2)} == {2}
    assert {i.owner for i in assign_owners(_items([4]), "local", 4, 0)} == {-1}


def test_spread_balances_bytes_deterministically() -> None:
    sizes = [400, 400, 400, 400, 100, 100, 100, 100]
    a = assign_owners(_items(sizes), "spread", 4, 0)
    b = assign_owners(_items(sizes), "spread", 4, 0)
    assert a == b
    load = [0] * 4
    for it in a:
        load[it.owner] += it.nbytes
    assert load == [500, 500, 500, 500]
    # order of the canonical list is kept
    assert [i.key for i in a] == [f"k{i}" for i in range(8)]


def test_buckets_bounded_and_grouped() -> None:
    items = assign_owners(_items([10] * 25 + [1000]), "broadcast", 2, 0)
    buckets = make_buckets(items, 100)
    assert all(b.nbytes <= 100 or len(b.items) == 1 for b in buckets)
    big = [b for b in buckets if b.nbytes == 1000]
    assert len(big) == 1 and len(big[0].items) == 1
    flat = [it.key for b in buckets for it in b.items]
    assert sorted(flat) == sorted(i.key for i in items)
    for b in buckets:
        assert list(b.offsets) == [sum(it.nbytes for it in b.items[:j]) for j in range(len(b.items))]


def test_buckets_split_by_dtype_and_owner_and_skip_empty() -> None:
    items = [SharedItem("a", "torch.float32", (1,), 4, 0), SharedItem("b", "torch.int64", (1,), 8, 0),
             SharedItem("c", "torch.float32", (1,), 4, 1), SharedItem("z", "torch.float32", (0,), 0, 0)]
    buckets = make_buckets(items, 1 << 20)
    assert [(b.owner, b.dtype, [i.key for i in b.items]) for b in buckets] == [
        (0, "torch.float32", ["a"]), (0, "torch.int64", ["b"]), (1, "torch.float32", ["c"])]


def _spread_reference(items: list[SharedItem], world: int) -> list[int]:
    """The spread rule written plainly: largest first, to the least-loaded rank, ties to the lower."""
    load = [0] * world
    owner = {}
    for j in sorted(range(len(items)), key=lambda j: (-items[j].nbytes, j)):
        r = min(range(world), key=lambda q: (load[q], q))
        owner[j] = r
        load[r] += items[j].nbytes
    return [owner[j] for j in range(len(items))]


@pytest.mark.parametrize("seed", range(20))
def test_spread_matches_the_plain_rule(seed: int) -> None:
    rng = random.Random(seed)
    world = rng.randint(1, 9)
    items = _items([rng.choice([0, 4, 8, 64, 4096, rng.randint(0, 10_000)]) for _ in range(rng.randint(0, 60))])
    got = assign_owners(items, "spread", world, 0)
    assert [i.owner for i in got] == _spread_reference(items, world)
    assert [i[:4] for i in got] == [i[:4] for i in items]
    assert all(type(i) is SharedItem for i in got)


class _Leaf(NamedTuple):
    key: str
    source: object


def _ref(dtype: torch.dtype, size: tuple[int, ...]) -> TensorRef:
    n = 1
    for s in size:
        n *= s
    return TensorRef(StorageRef("0", dtype, n, "cpu"), dtype, 0, size, tuple(range(len(size))))


def test_shared_items_and_digest() -> None:
    leaves = [_Leaf("a", _ref(torch.float32, (3, 4))), _Leaf("b", "not a tensor ref"),
              _Leaf("c", _ref(torch.bfloat16, ())), _Leaf("d", _ref(torch.int64, (5,)))]
    items, digest = shared_items(leaves, 2, skip={"d"})
    assert items == [SharedItem("a", "torch.float32", (3, 4), 48, 2), SharedItem("c", "torch.bfloat16", (), 2, 2)]
    assert all(type(i) is SharedItem for i in items)
    assert shared_items(leaves, -1, skip={"d"})[1] == digest  # the owner is not part of it
    assert shared_items([], 0)[1] != digest
    others = [
        [_Leaf("a", _ref(torch.float32, (4, 3))), _Leaf("c", _ref(torch.bfloat16, ()))],  # shape
        [_Leaf("a", _ref(torch.float32, (3, 4))), _Leaf("c", _ref(torch.float16, ()))],  # dtype
        [_Leaf("a", _ref(torch.float32, (3, 4))), _Leaf("e", _ref(torch.bfloat16, ()))],  # key
        [_Leaf("c", _ref(torch.bfloat16, ())), _Leaf("a", _ref(torch.float32, (3, 4)))],  # order
        [_Leaf("a", _ref(torch.float32, (3, 4)))],  # one fewer
        [_Leaf("a", _ref(torch.float32, (3, 4, 1))), _Leaf("c", _ref(torch.bfloat16, ()))],  # rank of the shape
    ]
    assert len({digest, *(shared_items(o, 2)[1] for o in others)}) == len(others) + 1
    # boundaries between keys, and between shapes, are part of what is hashed
    assert shared_items([_Leaf("a\0b", _ref(torch.float32, (2,)))], 0)[1] != \
        shared_items([_Leaf("a", _ref(torch.float32, (2,))), _Leaf("b", _ref(torch.float32, ()))], 0)[1]
    assert shared_items([_Leaf("a", _ref(torch.float32, (2, 3))), _Leaf("b", _ref(torch.float32, ()))], 0)[1] != \
        shared_items([_Leaf("a", _ref(torch.float32, (2,))), _Leaf("b", _ref(torch.float32, (3,)))], 0)[1]


def test_digest_of_odd_sizes_does_not_raise() -> None:
    """Sizes a damaged file may hold (not int64s) still hash; the read checks name them later."""
    odd = [_Leaf("a", _ref(torch.float32, (2,))), _Leaf("b", _ref(torch.float32, (2,)))]
    odd[1].source.size = (2**70,)
    items, digest = shared_items(odd, 0)
    assert len(items) == 2 and digest != shared_items(odd[:1], 0)[1]
