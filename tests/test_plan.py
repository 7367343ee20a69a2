"""Pure tests of the read plan's fast paths against the plain checks they inline (no files)."""

from __future__ import annotations

import random

import pytest
import torch

from dist_restore._planning.plan import PlannedLeaf, check_tensor, first_out_of_bounds, plan_read, view_out_of_bounds
from dist_restore._format.unpickle import StorageRef, TensorRef


def _random_ref(rng: random.Random) -> TensorRef:
    dtype = rng.choice([torch.float32, torch.int8, torch.float64, torch.bfloat16])
    ndim = rng.choice([0, 1, 1, 1, 2, 3])
    size = tuple(rng.choice([0, 1, 2, 3, 7]) for _ in range(ndim))
    # a damaged file may pair a size with a stride of another length
    sdim = ndim if rng.random() < 0.9 else rng.choice([0, 1, 2])
    stride = tuple(rng.choice([-3, -1, 0, 1, 2, 5, 7]) for _ in range(sdim))
    return TensorRef(StorageRef("0", dtype, rng.randint(0, 40), "cpu"), dtype, rng.randint(-2, 30), size, stride)


@pytest.mark.parametrize("seed", range(10))
def test_first_out_of_bounds_is_the_first_that_view_out_of_bounds_rejects(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(200):
        leaves = [PlannedLeaf(f"k{i}", (f"k{i}",), _random_ref(rng), None) for i in range(rng.randint(0, 6))]
        want = next(((lf, p) for lf in leaves if (p := view_out_of_bounds(lf.source))), None)
        got = first_out_of_bounds(leaves)
        assert got == want or (got and want and got[0] is want[0] and got[1] == want[1])


def test_plan_read_fast_leaf_and_mismatches_keep_their_messages() -> None:
    f32 = torch.float32
    tree = {"m": {"w": TensorRef(StorageRef("0", f32, 6, "cpu"), f32, 0, (2, 3), (3, 1)),
                  "b": TensorRef(StorageRef("1", f32, 3, "cpu"), f32, 0, (3,), (1,)),
                  "c": TensorRef(StorageRef("2", f32, 3, "cpu"), f32, 0, (3,), (1,)),
                  "n": 5},
            7: {"x": TensorRef(StorageRef("3", f32, 1, "cpu"), f32, 0, (), ())}}
    target = {"m": {"w": torch.zeros(2, 3), "b": torch.zeros(4), "c": torch.zeros(3, dtype=torch.int64),
                    "n": torch.zeros(1), "gone": None}, 7: {"x": torch.zeros(())}}
    plan = plan_read(target, tree)
    assert [(lf.key, lf.path) for lf in plan.leaves] == [("m.w", ("m", "w")), ("7.x", (7, "x"))]
    assert plan.leaves[0].target is target["m"]["w"] and plan.leaves[0].source is tree["m"]["w"]
    assert plan.mismatched == (
        ("m.b", check_tensor("m.b", target["m"]["b"], tree["m"]["b"])),
        ("m.c", check_tensor("m.c", target["m"]["c"], tree["m"]["c"])),
        ("m.n", "checkpoint holds a int, target holds a tensor (torch.float32, shape (1,))"),
    )
    assert plan.mismatched[0][1] == "shape (3,) in checkpoint, (4,) in target"
    assert plan.missing == ("m.gone",)
