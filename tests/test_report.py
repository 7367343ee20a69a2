"""Tests of the aggregated restore report: rank ranges, aggregation, rendering, JSON, pickle."""

from __future__ import annotations

import json
import pickle

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dist_restore._protocol.report import KeyIssue, RankReport, RestoreReport, format_ranks

SHAPE_MSG = "shape (10, 4) in checkpoint, (12, 4) in target"


# -- format_ranks ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ranks", "expected"),
    [
        ([], ""),
        ([5], "5"),
        ([1, 2], "1-2"),
        ([0, 1, 2, 3, 6], "0-3,6"),
        ([6, 3, 2, 1, 0, 3, 6], "0-3,6"),  # unsorted, duplicated
        ([0, 2, 4], "0,2,4"),
        ([0, 1, 3, 4, 7], "0-1,3-4,7"),
        ([9, 10, 11], "9-11"),
        (range(0, 8), "0-7"),
        (iter([3, 3, 3]), "3"),  # any iterable, consumed once
    ],
)
def test_format_ranks(ranks, expected: str) -> None:
    assert format_ranks(ranks) == expected


@given(st.sets(st.integers(min_value=0, max_value=64)))
def test_format_ranks_round_trips(ranks: set[int]) -> None:
    text = format_ranks(ranks)
    parsed: set[int] = set()
    for part in filter(None, text.split(",")):
        lo, _, hi = part.partition("-")
        parsed.update(range(int(lo), int(hi or lo) + 1))
    assert parsed == ranks


# -- aggregation -------------------------------------------------------------------------


def _eight_ranks() -> list[RankReport]:
    """8 simulated ranks: ``model.head.w`` and ``opt.state.7`` on every rank,
    ``model.layers.3.w`` missing on 0-3,6, ``model.emb`` mismatched on rank 2 only."""
    reports = []
    for r in range(8):
        missing = ["model.head.w"] + (["model.layers.3.w"] if r in (0, 1, 2, 3, 6) else [])
        mismatched = (("model.emb", SHAPE_MSG),) if r == 2 else ()
        reports.append(RankReport(r, tuple(missing), ("opt.state.7",), mismatched))
    return reports


def test_aggregate_eight_ranks() -> None:
    rep = RestoreReport.aggregate(_eight_ranks()[::-1], world_size=8)  # order must not matter
    assert rep.issues == (
        KeyIssue("model.head.w", "missing", tuple(range(8))),
        KeyIssue("model.layers.3.w", "missing", (0, 1, 2, 3, 6)),
        KeyIssue("opt.state.7", "unexpected", tuple(range(8))),
        KeyIssue("model.emb", "mismatched", (2,), SHAPE_MSG),
    )
    assert rep.missing_keys == ("model.head.w", "model.layers.3.w")
    assert rep.unexpected_keys == ("opt.state.7",)
    assert rep.mismatched_keys == ("model.emb",)
    assert not rep.ok
    assert [i.key for i in rep.on_all_ranks()] == ["model.head.w", "opt.state.7"]
    assert [i.key for i in rep.on_all_ranks("missing")] == ["model.head.w"]
    assert [i.key for i in rep.on_some_ranks()] == ["model.layers.3.w", "model.emb"]
    assert rep.on_some_ranks("unexpected") == ()


def test_aggregate_subset_of_ranks_is_never_all() -> None:
    # Only ranks 0 and 1 reported; with world_size 4 the key is not on all ranks.
    rep = RestoreReport.aggregate([RankReport(0, ("a",)), RankReport(1, ("a",))], 4)
    assert rep.on_all_ranks() == ()
    assert rep.on_some_ranks("missing") == (KeyIssue("a", "missing", (0, 1)),)


def test_aggregate_duplicate_keys_and_reports_merge() -> None:
    rep = RestoreReport.aggregate([RankReport(1, ("a", "a")), RankReport(1, ("a",))], 2)
    assert rep.issues == (KeyIssue("a", "missing", (1,)),)


def test_differing_mismatch_messages_keep_one_issue_each() -> None:
    reports = [
        RankReport(0, mismatched=(("w", "dtype float16 in checkpoint, float32 in target"),)),
        RankReport(1, mismatched=(("w", "shape (2,) in checkpoint, (3,) in target"),)),
        RankReport(2, mismatched=(("w", "shape (2,) in checkpoint, (3,) in target"),)),
        RankReport(3, mismatched=(("w", "dtype float16 in checkpoint, float32 in target"),)),
    ]
    rep = RestoreReport.aggregate(reports, 4)
    assert rep.mismatched_keys == ("w",)
    assert [(i.ranks, i.detail[:5]) for i in rep.issues] == [((0, 3), "dtype"), ((1, 2), "shape")]
    assert rep.render().splitlines() == [
        "restore report (4 ranks): 0 missing, 0 unexpected, 1 mismatched",
        "mismatched on some ranks (2):",
        "  w  on ranks 0,3: dtype float16 in checkpoint, float32 in target",
        "  w  on ranks 1-2: shape (2,) in checkpoint, (3,) in target",
    ]


def test_empty_reports_are_ok() -> None:
    rep = RestoreReport.aggregate([RankReport(r) for r in range(8)], 8)
    assert rep.ok and rep.issues == () and rep.missing_keys == ()
    assert str(rep) == "restore report (8 ranks): no missing, unexpected or mismatched keys"
    assert str(RestoreReport.aggregate([], 1)) == (
        "restore report (1 rank): no missing, unexpected or mismatched keys")


@pytest.mark.parametrize(
    ("reports", "world"), [([], 0), ([RankReport(4)], 4), ([RankReport(-1)], 2)])
def test_aggregate_rejects_bad_ranks(reports: list[RankReport], world: int) -> None:
    with pytest.raises(ValueError, match="world_size"):
        RestoreReport.aggregate(reports, world)


# -- rendering ---------------------------------------------------------------------------


def test_render_eight_ranks_exact() -> None:
    rep = RestoreReport.aggregate(_eight_ranks(), 8)
    assert str(rep) == rep.render() == "\n".join([
        "restore report (8 ranks): 2 missing, 1 unexpected, 1 mismatched",
        "missing on all ranks (1):",
        "  model.head.w",
        "missing on some ranks (1):",
        "  model.layers.3.w  missing on ranks 0-3,6",
        "unexpected on all ranks (1):",
        "  opt.state.7",
        "mismatched on some ranks (1):",
        f"  model.emb  on rank 2: {SHAPE_MSG}",
    ])


def test_render_aligns_keys_within_a_section() -> None:
    reports = [RankReport(0, ("a", "long.key.name")), RankReport(1, ("a", "mid.key", "b"))]
    reports.append(RankReport(2, unexpected=("x",), mismatched=(("m", "dtype"), ("mm", "shape"))))
    assert RestoreReport.aggregate(reports, 3).render() == "\n".join([
        "restore report (3 ranks): 4 missing, 1 unexpected, 2 mismatched",
        "missing on some ranks (4):",
        "  a              missing on ranks 0-1",
        "  b              missing on rank 1",
        "  long.key.name  missing on rank 0",
        "  mid.key        missing on rank 1",
        "unexpected on some ranks (1):",
        "  x  unexpected on rank 2",
        "mismatched on some ranks (2):",
        "  m   on rank 2: dtype",
        "  mm  on rank 2: shape",
    ])


def test_render_mismatch_on_all_ranks_shows_message_aligned() -> None:
    reports = [RankReport(r, mismatched=(("a", "dtype"), ("bbb", "shape"))) for r in range(2)]
    assert RestoreReport.aggregate(reports, 2).render().splitlines()[1:] == [
        "mismatched on all ranks (2):",
        "  a    dtype",
        "  bbb  shape",
    ]


def test_render_single_rank_has_no_rank_split() -> None:
    rep = RestoreReport.aggregate(
        [RankReport(0, ("b", "a"), ("u",), (("emb", SHAPE_MSG),))], world_size=1)
    assert rep.render() == "\n".join([
        "restore report (1 rank): 2 missing, 1 unexpected, 1 mismatched",
        "missing (2):",
        "  a",
        "  b",
        "unexpected (1):",
        "  u",
        "mismatched (1):",
        f"  emb  {SHAPE_MSG}",
    ])


def test_render_truncates_each_section_at_the_cap() -> None:
    keys = tuple(f"k{i:02d}" for i in range(12))
    reports = [RankReport(0, keys, ("u",)), RankReport(1, keys[:3])]
    rep = RestoreReport.aggregate(reports, 2)
    lines = rep.render(max_keys_per_section=2).splitlines()
    assert lines == [
        "restore report (2 ranks): 12 missing, 1 unexpected, 0 mismatched",
        "missing on all ranks (3):",
        "  k00",
        "  k01",
        "  ... and 1 more",
        "missing on some ranks (9):",
        "  k03  missing on rank 0",
        "  k04  missing on rank 0",
        "  ... and 7 more",
        "unexpected on some ranks (1):",
        "  u  unexpected on rank 0",
    ]
    assert "... and" not in rep.render()  # default cap of 50 shows everything
    assert rep.render(max_keys_per_section=0).splitlines()[1:3] == [
        "missing on all ranks (3):", "  ... and 3 more"]
    with pytest.raises(ValueError, match="max_keys_per_section"):
        rep.render(max_keys_per_section=-1)


# -- serialisation -----------------------------------------------------------------------


def test_json_round_trip() -> None:
    reports = _eight_ranks() + [RankReport(5, mismatched=(("model.emb", "dtype differs"),))]
    rep = RestoreReport.aggregate(reports, 8)
    text = rep.to_json()
    assert json.loads(text) == rep.to_dict()
    assert json.loads(rep.to_json(indent=None))["issues"][0] == {
        "key": "model.head.w", "kind": "missing", "ranks": list(range(8)), "detail": ""}
    back = RestoreReport.from_dict(json.loads(text))
    assert back == rep
    assert back.render() == rep.render()
    assert RestoreReport.from_dict(json.loads(RestoreReport(3).to_json())) == RestoreReport(3)


def test_from_dict_rejects_unknown_kind() -> None:
    d = {"world_size": 2, "issues": [{"key": "a", "kind": "absent", "ranks": [0]}]}
    with pytest.raises(ValueError, match="'absent'.*'a'"):
        RestoreReport.from_dict(d)


def test_pickle_round_trip() -> None:
    r = RankReport(3, ("a", "b"), ("c",), (("d", SHAPE_MSG),))
    assert pickle.loads(pickle.dumps(r)) == r
    rep = RestoreReport.aggregate(_eight_ranks(), 8)
    assert pickle.loads(pickle.dumps(rep)) == rep


def test_reports_are_frozen() -> None:
    with pytest.raises(AttributeError):
        RankReport(0).rank = 1  # type: ignore[misc]
    with pytest.raises(AttributeError):
        RestoreReport(1).world_size = 2  # type: ignore[misc]


def test_shared_patterns_selecting_nothing_on_every_rank_are_named() -> None:
    """Only a pattern that selects nothing on *every* rank is named; the report is not ok then."""
    reports = [RankReport(0, unmatched_shared=("emb", "*.bais")), RankReport(1, unmatched_shared=("*.bais",)),
               RankReport(2, unmatched_shared=("*.bais", "emb"))]
    rep = RestoreReport.aggregate(reports, 3)
    assert rep.unmatched_shared == ("*.bais",) and rep.issues == () and not rep.ok
    assert rep.render().splitlines() == [
        "restore report (3 ranks): 0 missing, 0 unexpected, 0 mismatched",
        "shared patterns that select nothing on any rank (1): '*.bais' (every rank reads those entries itself)",
    ]
    assert RestoreReport.from_dict(json.loads(rep.to_json())) == rep
    assert rep.to_dict()["unmatched_shared"] == ["*.bais"]
    assert "unmatched_shared" not in RestoreReport(3).to_dict()  # the JSON of a clean report is unchanged
    assert RestoreReport.aggregate(reports[:2], 3).unmatched_shared == ()  # rank 2 did not report
