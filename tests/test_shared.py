"""Pure tests of shared-entry selection, owner assignment and bucket layout (no processes)."""

from __future__ import annotations

import pytest

from dist_restore._shared import SharedItem, assign_owners, make_buckets, make_selector


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
    from dist_restore._shared import unmatched_patterns

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
