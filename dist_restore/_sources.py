"""Restores from the sources that are not our own rank files (safetensors today), for the reader
and the coordinator: detect the format, open its catalogue for the keys the target needs,
plan, and move the bytes. One plan shape (:class:`CatalogPlan`) whatever the format."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from dist_restore._bytes.ranges import read_catalog_jobs
from dist_restore._bytes.read import MapLocation, resolve_device
from dist_restore._format import hf
from dist_restore._format.catalog import Catalog
from dist_restore._planning.catalog import CatalogPlan, KeyMap, flatten, map_key, plan_catalog
from dist_restore._base.regions import LayoutError
from dist_restore.errors import StateDictMismatchError


def source_format(path: str | os.PathLike[str]) -> str | None:
    """``"safetensors"`` for a safetensors file or directory; ``None`` for our rank files."""
    if isinstance(path, (str, os.PathLike)) and hf.is_safetensors(path):
        return "safetensors"
    return None


def wanted_keys(state_dict: Mapping[str, Any] | None, key_map: KeyMap) -> set[str] | None:
    """The file keys a target asks for (``None``: every key)."""
    if state_dict is None:
        return None
    out = set()
    for key, _parent, _k, _v in flatten(state_dict):
        f = map_key(key_map, key)
        if f is not None:
            out.add(f)
    return out


def read_catalog(path: str | os.PathLike[str], keys: Iterable[str] | None = None) -> Catalog:
    """The catalogue of a Hugging Face safetensors checkpoint (a ``.safetensors`` file or a
    directory of them): every key's dtype, shape and chunks, each file's ``__metadata__``
    (``catalog.metadata[file]``). Reads headers only, every field checked.

    Args:
        path: The file or directory.
        keys: Only these keys' files (with ``model.safetensors.index.json``; without one every
            header is read).

    Raises:
        FileNotFoundError: no such file or directory, or no safetensors file in it.
        CorruptCheckpointError: a malformed header or index, naming the file and key.
    """
    return hf.open_catalog(path, keys)[0]


def plan_source(path: str | os.PathLike[str], state_dict: Mapping[str, Any] | None, *, key_map: KeyMap = None,
                cast: bool = False, map_location: MapLocation = None) -> CatalogPlan:
    """Open the catalogue (only the files holding the wanted keys, where an index says which)
    and plan this rank's reads. Targets are not touched (``None`` values are allocated).

    Raises:
        CorruptCheckpointError: a malformed source, naming the file and key.
        StateDictMismatchError: a placement the region math cannot map.
    """
    if state_dict is not None and not isinstance(state_dict, Mapping):
        raise TypeError(f"a safetensors restore takes a dict of tensors (model.state_dict()), not "
                        f"{type(state_dict).__name__}")
    catalog, all_keys = hf.open_catalog(path, wanted_keys(state_dict, key_map))
    device = resolve_device("cpu", map_location, file=path, key="")
    try:
        return plan_catalog(catalog, all_keys, state_dict, key_map=key_map, cast=cast, device=device)
    except LayoutError as e:
        raise StateDictMismatchError(str(e), file=path) from None


def read_source(plan: CatalogPlan) -> tuple[int, int]:
    """Fill the plan's targets; ``(bytes read, files opened)``."""
    with torch.no_grad():
        return read_catalog_jobs(plan.catalog, plan.jobs)


__all__ = ["plan_source", "read_catalog", "read_source", "source_format", "wanted_keys"]
