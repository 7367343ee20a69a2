"""The aggregated restore report: missing/unexpected/mismatched keys of every rank, per key.

Pure and picklable: each rank builds a :class:`RankReport`; rank 0 aggregates them into
one :class:`RestoreReport` that renders compactly (``model.w  missing on ranks 0-3,6``)
and to JSON.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from dist_restore._base.ranks import format_ranks

IssueKind = Literal["missing", "unexpected", "mismatched"]
_KINDS: tuple[IssueKind, ...] = ("missing", "unexpected", "mismatched")


@dataclass(frozen=True)
class RankReport:
    """One rank's keys that did not restore cleanly.

    Attributes:
        rank: The rank.
        missing: Keys its target asked for that its file lacks.
        unexpected: Keys in its file under a level the target named, not asked for.
        mismatched: ``(key, message)`` for shape/dtype/structure conflicts.
        unmatched_shared: The ``shared=`` patterns that selected none of its entries.
    """

    rank: int
    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()
    mismatched: tuple[tuple[str, str], ...] = ()
    unmatched_shared: tuple[str, ...] = ()


@dataclass(frozen=True)
class KeyIssue:
    """One key with one kind of problem, and the ranks where it occurs.

    Attributes:
        key: The dotted key path.
        kind: ``"missing"``, ``"unexpected"`` or ``"mismatched"``.
        ranks: The ranks reporting it, sorted.
        detail: For mismatches, the message (ranks with different messages for the same
            key give separate issues); ``""`` otherwise.
    """

    key: str
    kind: IssueKind
    ranks: tuple[int, ...]
    detail: str = ""


@dataclass(frozen=True)
class RestoreReport:
    """Every rank's problems, aggregated per key.

    Attributes:
        world_size: Number of ranks in the restore.
        issues: Sorted by kind (missing, unexpected, mismatched), then key, then detail.
        unmatched_shared: The ``shared=`` patterns that selected nothing on every rank (so
            every rank read those entries itself, if they exist at all).
        notes: How the restore went where it is worth saying (e.g. resharded from another
            world size, entries taken from one rank's file); not problems.
    """

    world_size: int
    issues: tuple[KeyIssue, ...] = ()
    unmatched_shared: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    @classmethod
    def aggregate(cls, reports: Sequence[RankReport], world_size: int) -> RestoreReport:
        """Merges per-rank reports into one :class:`KeyIssue` per (kind, key, detail).

        Args:
            reports: Reports of any subset of the ranks (a rank may appear twice).
            world_size: Number of ranks in the job; an issue is "on all ranks" when every
                rank in ``range(world_size)`` reports it.

        Returns:
            The aggregated report.

        Raises:
            ValueError: If ``world_size < 1`` or a report's rank is outside the world.
        """
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        acc: dict[tuple[IssueKind, str, str], set[int]] = {}
        for r in reports:
            if not 0 <= r.rank < world_size:
                raise ValueError(f"report of rank {r.rank} is outside world_size {world_size}")
            for k in r.missing:
                acc.setdefault(("missing", k, ""), set()).add(r.rank)
            for k in r.unexpected:
                acc.setdefault(("unexpected", k, ""), set()).add(r.rank)
            for k, msg in r.mismatched:
                acc.setdefault(("mismatched", k, msg), set()).add(r.rank)
        issues = [KeyIssue(k, kind, tuple(sorted(rs)), d) for (kind, k, d), rs in acc.items()]
        issues.sort(key=lambda i: (_KINDS.index(i.kind), i.key, i.detail))
        unmatched: dict[str, set[int]] = {}
        for r in reports:
            for p in r.unmatched_shared:
                unmatched.setdefault(p, set()).add(r.rank)
        everywhere = tuple(p for p, rs in unmatched.items() if len(rs) == world_size)
        return cls(world_size, tuple(issues), everywhere)

    def _keys(self, kind: IssueKind) -> tuple[str, ...]:
        return tuple(sorted({i.key for i in self.issues if i.kind == kind}))

    @property
    def missing_keys(self) -> tuple[str, ...]:
        """Keys missing on any rank, sorted."""
        return self._keys("missing")

    @property
    def unexpected_keys(self) -> tuple[str, ...]:
        """Keys unexpected on any rank, sorted."""
        return self._keys("unexpected")

    @property
    def mismatched_keys(self) -> tuple[str, ...]:
        """Keys with a shape/dtype/structure conflict on any rank, sorted."""
        return self._keys("mismatched")

    @property
    def ok(self) -> bool:
        """True when no rank has a missing, unexpected or mismatched key, and every
        ``shared=`` pattern selected something."""
        return not self.issues and not self.unmatched_shared

    def _everywhere(self, issue: KeyIssue) -> bool:
        return set(issue.ranks) == set(range(self.world_size))

    def on_all_ranks(self, kind: IssueKind | None = None) -> tuple[KeyIssue, ...]:
        """Returns the issues that every rank reports, optionally only those of ``kind``."""
        return tuple(i for i in self.issues if self._everywhere(i) and kind in (None, i.kind))

    def on_some_ranks(self, kind: IssueKind | None = None) -> tuple[KeyIssue, ...]:
        """Returns the issues that only some ranks report, optionally only of ``kind``."""
        return tuple(i for i in self.issues if not self._everywhere(i) and kind in (None, i.kind))

    def to_dict(self) -> dict[str, Any]:
        """Returns the report as a JSON-safe dict (inverse of :meth:`from_dict`);
        ``unmatched_shared`` appears only when a pattern selected nothing."""
        d: dict[str, Any] = {
            "world_size": self.world_size,
            "issues": [
                {"key": i.key, "kind": i.kind, "ranks": list(i.ranks), "detail": i.detail}
                for i in self.issues
            ],
        }
        if self.unmatched_shared:
            d["unmatched_shared"] = list(self.unmatched_shared)
        if self.notes:  # only when there are some: older readers of the JSON see no change
            d["notes"] = list(self.notes)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RestoreReport:
        """Rebuilds a report from :meth:`to_dict` output (e.g. after ``json.loads``).

        Raises:
            ValueError: If an issue has an unknown kind.
        """
        issues = []
        for i in d["issues"]:
            if i["kind"] not in _KINDS:
                raise ValueError(f"unknown issue kind {i['kind']!r} for key {i['key']!r}; "
                                 f"expected one of {_KINDS}")
            issues.append(KeyIssue(str(i["key"]), i["kind"], tuple(int(r) for r in i["ranks"]),
                                   str(i.get("detail", ""))))
        return cls(int(d["world_size"]), tuple(issues), tuple(str(p) for p in d.get("unmatched_shared", ())),
                   tuple(str(n) for n in d.get("notes", ())))

    def to_json(self, indent: int | None = 2) -> str:
        """Returns the report as JSON text."""
        return json.dumps(self.to_dict(), indent=indent)

    def _tail(self, issue: KeyIssue) -> str:
        """What follows the key on its line: the ranks (if not all) and the detail."""
        if self.world_size == 1 or self._everywhere(issue):
            return issue.detail
        word = "rank" if len(issue.ranks) == 1 else "ranks"
        where = f"on {word} {format_ranks(issue.ranks)}"
        if issue.kind != "mismatched":  # the message already says what is wrong
            where = f"{issue.kind} {where}"
        return f"{where}: {issue.detail}" if issue.detail else where

    def render(self, max_keys_per_section: int = 50) -> str:
        """Renders compact text: a summary line, then one section per kind and spread.

        Sections are "<kind> on all ranks (n):" and "<kind> on some ranks (n):" (just
        "<kind> (n):" for one rank), omitted when empty; keys are aligned within a section.

        Args:
            max_keys_per_section: Lines shown per section before "... and N more".

        Returns:
            The multi-line report, without a trailing newline.

        Raises:
            ValueError: If ``max_keys_per_section`` is negative.
        """
        if max_keys_per_section < 0:
            raise ValueError(f"max_keys_per_section must be >= 0, got {max_keys_per_section}")
        n = self.world_size
        head = f"restore report ({n} rank{'s' if n != 1 else ''}): "
        notes = [f"note: {n}" for n in self.notes]
        if self.ok:
            return "\n".join([head + "no missing, unexpected or mismatched keys"] + notes)
        lines = [head + ", ".join(f"{len(self._keys(k))} {k}" for k in _KINDS)] + notes
        if self.unmatched_shared:
            lines.append(f"shared patterns that select nothing on any rank ({len(self.unmatched_shared)}): "
                         + ", ".join(repr(p) for p in self.unmatched_shared)
                         + " (every rank reads those entries itself)")
        for kind in _KINDS:
            if n == 1:
                groups = [("", tuple(i for i in self.issues if i.kind == kind))]
            else:
                groups = [(" on all ranks", self.on_all_ranks(kind)),
                          (" on some ranks", self.on_some_ranks(kind))]
            for where, issues in groups:
                if not issues:
                    continue
                lines.append(f"{kind}{where} ({len(issues)}):")
                shown = issues[:max_keys_per_section]
                width = max((len(i.key) for i in shown), default=0)
                for i in shown:
                    tail = self._tail(i)
                    lines.append(f"  {i.key.ljust(width)}  {tail}" if tail else f"  {i.key}")
                if len(issues) > len(shown):
                    lines.append(f"  ... and {len(issues) - len(shown)} more")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.render()
