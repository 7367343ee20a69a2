"""``RowPlan``: scatter/gather between a flat buffer and many tensors, one numpy call per size.

Oracle: the same bytes moved one tensor at a time with torch (``cat`` / ``split``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dist_restore._bytes import rows as _rows
from dist_restore._bytes.rows import ROW_MAX, RowPlan

pytestmark = pytest.mark.timeout(60)


def _layout(tensors: list[torch.Tensor]) -> tuple[list[int], list[int], list[int]]:
    sizes = [t.numel() * t.element_size() for t in tensors]
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    return [t.data_ptr() for t in tensors], sizes, offsets


def _bytes(tensors: list[torch.Tensor]) -> bytes:
    return b"".join(t.view(-1).view(torch.uint8).numpy().tobytes() for t in tensors)


def _roundtrip(tensors: list[torch.Tensor], seed: int = 0) -> RowPlan:
    """Scatter random bytes into ``tensors``, gather them back: both exact."""
    addresses, sizes, offsets = _layout(tensors)
    plan = RowPlan(addresses, sizes, offsets)
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(0, 256, (sum(sizes),), dtype=torch.uint8, generator=g)
    plan.scatter(src.numpy())
    assert _bytes(tensors) == src.numpy().tobytes()
    for t in tensors:  # new contents, gathered back into a fresh buffer
        t.view(torch.uint8).copy_(torch.randint(0, 256, (t.numel() * t.element_size(),), dtype=torch.uint8,
                                                generator=g).view(t.view(torch.uint8).shape))
    out = np.zeros(sum(sizes), dtype=np.uint8)
    plan.gather(out)
    assert out.tobytes() == _bytes(tensors)
    return plan


def test_many_tensors_of_one_size_are_one_group() -> None:
    tensors = [torch.zeros(64) for _ in range(2000)]
    plan = _roundtrip(tensors)
    assert plan.groups == 1 and plan.singles == 0


def test_interleaved_sizes_dtypes_and_odd_byte_counts() -> None:
    sizes = [3, 7, 1, 64, 3, 7, 1, 64, 5]
    tensors = [torch.zeros(n, dtype=torch.uint8) for n in sizes * 40]
    tensors += [torch.zeros(5, dtype=torch.bfloat16) for _ in range(9)]  # 10 bytes, unaligned use
    plan = _roundtrip(tensors)
    assert plan.groups == 6 and plan.singles == 0  # 3, 7, 1, 64, 5 and 10 bytes


def test_large_and_unique_sizes_are_copied_one_by_one() -> None:
    tensors = [torch.zeros(ROW_MAX // 4 + 1), torch.zeros(ROW_MAX // 4 + 1), torch.zeros(17), torch.zeros(3, 3)]
    tensors += [torch.zeros(8) for _ in range(5)]
    plan = _roundtrip(tensors)
    assert plan.singles == 4 and plan.odd == 2 and plan.groups == 1


def test_views_into_one_storage_and_out_of_buffer_order() -> None:
    base = torch.zeros(10_000)
    tensors = [base[i * 37 : i * 37 + 30] for i in range(200)][::-1]  # addresses descending
    _roundtrip(tensors)
    for i in range(200):  # the gaps between the views are untouched
        assert not base[i * 37 + 30 : i * 37 + 37].any(), i
    assert not base[200 * 37 :].any()


def test_gaps_between_targets_are_never_written() -> None:
    base = torch.full((4000,), -1.0)
    tensors = [base[i * 10 : i * 10 + 7] for i in range(400)]
    addresses, sizes, offsets = _layout(tensors)
    RowPlan(addresses, sizes, offsets).scatter(np.zeros(sum(sizes), dtype=np.uint8))
    for i in range(400):
        assert not base[i * 10 : i * 10 + 7].any()
        assert (base[i * 10 + 7 : i * 10 + 10] == -1).all()


def test_items_not_wanted_are_skipped() -> None:
    tensors = [torch.zeros(5) for _ in range(100)]
    addresses = [t.data_ptr() if i % 3 else -1 for i, t in enumerate(tensors)]
    src = torch.randn(500)
    RowPlan(addresses, [20] * 100, list(range(0, 2000, 20))).scatter(src.view(torch.uint8).numpy())
    for i, t in enumerate(tensors):
        assert torch.equal(t, src[i * 5 : i * 5 + 5] if i % 3 else torch.zeros(5)), i


def test_far_apart_addresses_use_several_windows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_rows, "_SPAN_MAX", 4096)
    big = torch.zeros(1 << 16)
    tensors = [big[i * 256 : i * 256 + 16] for i in range(50)]  # 1 KiB apart: 49 KiB in all
    plan = _roundtrip(tensors)
    assert plan.groups > 1
    for g in plan._groups:  # no gap above the limit, yet no window spans more
        assert int(g.index.max()) <= 4096


def test_bad_buffers_and_layouts_are_refused() -> None:
    t = [torch.zeros(4), torch.zeros(4)]
    plan = RowPlan(*_layout(t))
    with pytest.raises(ValueError, match="holds 31 bytes"):
        plan.scatter(np.zeros(31, dtype=np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        plan.scatter(np.zeros(8, dtype=np.float32))
    ro = np.zeros(32, dtype=np.uint8)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        plan.gather(ro)
    with pytest.raises(ValueError, match="one length"):
        RowPlan([t[0].data_ptr()], [16, 16], [0, 16])
    with pytest.raises(ValueError, match="at least one byte"):
        RowPlan([t[0].data_ptr()], [0], [0])


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([torch.uint8, torch.float16, torch.float32, torch.float64]),
                          st.integers(1, 300)), min_size=1, max_size=60),
       st.integers(0, 2**31))
def test_random_layouts_match_one_by_one_copies(specs: list[tuple[torch.dtype, int]], seed: int) -> None:
    tensors = [torch.zeros(n, dtype=dt) for dt, n in specs]
    _roundtrip(tensors, seed)
