"""The aggregated restore report: missing/unexpected/mismatched keys of every rank, per key.

Pure and picklable: each rank builds a :class:`RankReport`; rank 0 aggregates them into
one :class:`RestoreReport` that renders compactly (``model.w  missing on ranks 0-3,6``)
and to JSON.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

IssueKind = Literal["missing", "unexpected", "mismatched"]
_KINDS: tuple[IssueKind, ...] = ("missing", "unexpected", "mismatched")


def format_ranks(ranks: Iterable[int]) -> str:
    """``[0, 1, 2, 3, 6]`` -> ``"0-3,6"`` (sorted, deduplicated, runs compressed)."""
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


@dataclass(frozen=True)
class RankReport:
    """One rank's keys that did not restore cleanly.

    Attributes:
        rank: The rank.
        missing: Keys its target asked for that its file lacks.
        unexpected: Keys in its file under a level the target named, not asked for.
        mismatched: ``(key, message)`` for shape/dtype/structure conflicts.
    """

    rank: int
    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()
    mismatched: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class KeyIssue:
    """One key with one kind of problem, and the ranks where it occurs."""

    key: str
    kind: IssueKind
    ranks: tuple[int, ...]
    detail: str = ""


@dataclass(frozen=True)
class RestoreReport:
    """Every rank's problems, aggregated per key.

    Attributes:
        world_size: Number of ranks in the restore.
        issues: Sorted by kind (missing, unexpected, mismatched), then key.
    """

    world_size: int
    issues: tuple[KeyIssue, ...] = ()

    @classmethod
    def aggregate(cls, reports: Sequence[RankReport], world_size: int) -> RestoreReport:
        """Merge per-rank reports: one :class:`KeyIssue` per (kind, key, detail)."""
        acc: dict[tuple[IssueKind, str, str], set[int]] = {}
        for r in reports:
            for k in r.missing:
                acc.setdefault(("missing", k, ""), set()).add(r.rank)
            for k in r.unexpected:
                acc.setdefault(("unexpected", k, ""), set()).add(r.rank)
            for k, msg in r.mismatched:
                acc.setdefault(("mismatched", k, msg), set()).add(r.rank)
        issues = [KeyIssue(k, kind, tuple(sorted(rs)), d) for (kind, k, d), rs in acc.items()]
        issues.sort(key=lambda i: (_KINDS.index(i.kind), i.key, i.detail))
        return cls(world_size, tuple(issues))

    def _keys(self, kind: IssueKind) -> tuple[str, ...]:
        return tuple(sorted({i.key for i in self.issues if i.kind == kind}))

    @property
    def missing_keys(self) -> tuple[str, ...]:
        """Keys missing on any rank."""
        return self._keys("missing")

    @property
    def unexpected_keys(self) -> tuple[str, ...]:
        """Keys unexpected on any rank."""
        return self._keys("unexpected")

    @property
    def mismatched_keys(self) -> tuple[str, ...]:
        """Keys with a shape/dtype/structure conflict on any rank."""
        return self._keys("mismatched")

    @property
    def ok(self) -> bool:
        """No missing, unexpected or mismatched key on any rank."""
        return not self.issues

    def _everywhere(self, issue: KeyIssue) -> bool:
        return len(issue.ranks) == self.world_size and set(issue.ranks) == set(range(self.world_size))

    def on_all_ranks(self, kind: IssueKind | None = None) -> tuple[KeyIssue, ...]:
        """Issues that occur on every rank (optionally of one kind)."""
        return tuple(i for i in self.issues if self._everywhere(i) and kind in (None, i.kind))

    def on_some_ranks(self, kind: IssueKind | None = None) -> tuple[KeyIssue, ...]:
        """Issues that occur on some ranks only (optionally of one kind)."""
        return tuple(i for i in self.issues if not self._everywhere(i) and kind in (None, i.kind))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict."""
        return {"world_size": self.world_size,
                "issues": [{"key": i.key, "kind": i.kind, "ranks": list(i.ranks), "detail": i.detail}
                           for i in self.issues]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RestoreReport:
        """Inverse of :meth:`to_dict`."""
        return cls(int(d["world_size"]),
                   tuple(KeyIssue(i["key"], i["kind"], tuple(i["ranks"]), i.get("detail", ""))
                         for i in d["issues"]))

    def to_json(self, indent: int | None = 2) -> str:
        """The report as JSON text."""
        return json.dumps(self.to_dict(), indent=indent)

    def render(self, max_keys_per_section: int = 50) -> str:
        """Compact, aligned text; sections omitted when empty, long ones cut."""
        n = self.world_size
        head = f"restore report ({n} rank{'s' if n != 1 else ''}): "
        if self.ok:
            return head + "no missing, unexpected or mismatched keys"
        counts = [f"{len(self._keys(k))} {k}" for k in _KINDS]
        lines = [head + ", ".join(counts)]
        for kind in _KINDS:
            if n == 1:
                groups = [("", tuple(i for i in self.issues if i.kind == kind))]
            else:
                groups = [(" on all ranks", self.on_all_ranks(kind)), (" on some ranks", self.on_some_ranks(kind))]
            for where, issues in groups:
                if not issues:
                    continue
                lines.append(f"{kind}{where} ({len(issues)}):")
                shown = issues[:max_keys_per_section]
                width = max(len(i.key) for i in shown)
                for i in shown:
                    tail = ""
                    if n > 1 and not self._everywhere(i):
                        word = "rank" if len(i.ranks) == 1 else "ranks"
                        tail = f"  {kind if kind != 'mismatched' else ''} on {word} {format_ranks(i.ranks)}"
                        tail = tail.replace("   on", "  on")
                    if i.detail:
                        tail += f": {i.detail}" if tail else f"  {i.detail}"
                    lines.append(f"  {i.key.ljust(width) if tail else i.key}{tail}".rstrip())
                if len(issues) > len(shown):
                    lines.append(f"  ... and {len(issues) - len(shown)} more")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.render()
