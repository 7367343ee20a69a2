"""One rank's plan: everything the coordinator's plan phase decided, and the read it implies.

The plan phase fills one :class:`RankPlan` per rank, whatever the source: our own rank files
(entries of the home file, resharded slices of other rank files, per-rank entries of its own
file, shared entries it owns), or a catalogue source (safetensors: byte ranges of chunks). The
read phase walks it with :meth:`RankPlan.read` and the finish phase assembles the result with
:meth:`RankPlan.result`, without asking which format it came from.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from dist_restore._bytes.read import MapLocation, ReadStats, Verify, produce
from dist_restore._bytes.readall import read_all
from dist_restore._bytes.slices import read_jobs
from dist_restore._planning.catalog import CatalogPlan
from dist_restore._planning.plan import ReadPlan, assemble
from dist_restore._planning.reshard import ShardPlan
from dist_restore._planning.shared import SharedItem
from dist_restore._sources import read_source
from dist_restore._types import STATE_DICT

_NOTHING = ReadPlan((), (), (), ())


@dataclass
class RankPlan:
    """What one rank reads, shares and reports.

    Attributes:
        index: The home rank file's index (``None`` for a catalogue source).
        plan: Leaves read from the home file (shared ones included), and the key report.
        object_paths: ``{key: raw path}`` of non-tensor values that may arrive from ``src``.
        shared: This rank's list of shared entries (before the canonical list is agreed).
        shared_objects: Shared non-tensor values this rank would send.
        mode: The effective shared mode (``"local"``: nothing is exchanged).
        shards: DTensor targets filled from slices of rank files, if any.
        own: ``(index, leaves)`` of per-rank entries read from this rank's own file.
        overrides: ``{raw path: value}`` replacing the home file's (per-rank entries).
        files_opened: Files indexed or read (a catalogue source: set by :meth:`read`).
        whole: The home file is read whole into new tensors (no target, nothing shared).
        catalog: The byte ranges of a catalogue source (safetensors).
    """

    index: Any = None
    plan: ReadPlan = _NOTHING
    object_paths: dict[str, Any] = field(default_factory=dict)
    shared: list[SharedItem] = field(default_factory=list)
    shared_objects: dict[str, Any] = field(default_factory=dict)
    mode: str = "local"
    shards: ShardPlan | None = None
    own: tuple[Any, list[Any]] = (None, [])
    overrides: dict[Any, Any] = field(default_factory=dict)
    files_opened: int = 0
    whole: bool = False
    catalog: CatalogPlan | None = None
    _whole_sd: Any = None

    @property
    def tensors(self) -> int:
        """Tensors this rank fills or makes (for progress lines)."""
        return len(self.catalog.jobs) if self.catalog is not None else len(self.plan.leaves)

    @property
    def missing(self) -> list[str]:
        return list(self.catalog.missing if self.catalog is not None else self.plan.missing)

    @property
    def unexpected(self) -> list[str]:
        return list(self.catalog.unexpected if self.catalog is not None else self.plan.unexpected)

    def read(self, received: Collection[str], *, map_location: MapLocation, verify: Verify,
             stats: ReadStats) -> dict[Any, Any]:
        """(read phase) Fill the targets this rank reads itself; ``{raw path: value}`` of what
        it allocated. ``received``: keys that arrive from another rank instead."""
        if self.catalog is not None:
            nbytes, self.files_opened, verified = read_source(self.catalog, verify=verify == "crc32", pieces=stats.pieces)
            stats.bytes_read += nbytes
            stats.bytes_verified += verified
            return {}
        if self.whole:
            self._whole_sd = read_all(self.index, map_location=map_location, verify=verify, stats=stats)
        todo = [lf for lf in self.plan.leaves if lf.key not in received]
        values = produce(self.index, todo, map_location=map_location, verify=verify, stats=stats)
        own_index, own_leaves = self.own
        if own_leaves:  # per-rank entries of a rank's own file, the rest coming from src's
            values.update(produce(own_index, own_leaves, map_location=map_location, verify=verify, stats=stats))
        if self.shards is not None:  # DTensor targets: slices of the rank files
            read_jobs(self.shards.jobs, self.shards.indexes, self.shards.entries, stats, verify=verify == "crc32")
        values.update(self.overrides)
        return values

    def result(self, state_dict: STATE_DICT | None, values: dict[Any, Any]) -> STATE_DICT:
        """(finish phase) The restored state dict: the target filled, allocated values put in."""
        if self.catalog is not None:
            return self.catalog.result(state_dict)  # type: ignore[return-value]
        if self.whole:
            return self._whole_sd
        return assemble(state_dict, self.index.walkable[0], values, self.index.walkable[1])


__all__ = ["RankPlan"]
