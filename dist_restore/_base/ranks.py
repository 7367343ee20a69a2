"""Rank numbers as compact text (``0-3,6``)."""

from __future__ import annotations

from collections.abc import Iterable


def format_ranks(ranks: Iterable[int]) -> str:
    """Formats ranks compactly, e.g. ``[0, 1, 2, 3, 6]`` -> ``"0-3,6"``.

    Args:
        ranks: Rank numbers, in any order, duplicates allowed.

    Returns:
        The sorted, deduplicated ranks with consecutive runs written ``a-b``, joined by
        commas; ``""`` for no ranks.
    """
    rs = sorted(set(ranks))
    out: list[str] = []
    i = 0
    while i < len(rs):
        j = i
        while j + 1 < len(rs) and rs[j + 1] == rs[j] + 1:
            j += 1
        out.append(str(rs[i]) if i == j else f"{rs[i]}-{rs[j]}")
        i = j + 1
    return ",".join(out)


__all__ = ["format_ranks"]
