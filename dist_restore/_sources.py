"""Restores from the sources that are not our own rank files (Hugging Face safetensors, DCP), for
the reader and the coordinator: detect the format, open its catalogue for the keys the target
needs, plan, and move the bytes. One plan shape (:class:`CatalogPlan`) whatever the format."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from dist_restore._base.regions import LayoutError
from dist_restore._bytes.ranges import read_catalog_jobs
from dist_restore._bytes.read import MapLocation, resolve_device
from dist_restore._base.source import is_url, location
from dist_restore._format import dcp, hf, rankfiles
from dist_restore._format.catalog import Catalog, flatten
from dist_restore._planning.catalog import CatalogPlan, KeyMap, map_key, plan_catalog
from dist_restore.errors import StateDictMismatchError


def source_format(path: str | os.PathLike[str]) -> str | None:
    """``"safetensors"`` for a safetensors file or directory, ``"dcp"`` for a DCP directory (it
    holds ``.metadata``), ``"rank files"`` for our rank files in an object store; ``None`` for
    our rank files on a local file system (their own path).

    Raises:
        FileNotFoundError: a URL that names nothing a restore can read.
    """
    if not isinstance(path, (str, os.PathLike)):
        return None
    if dcp.is_dcp(path):
        return "dcp"
    if hf.is_safetensors(path):
        return "safetensors"
    if is_url(path):
        if rankfiles.is_rank_files(location(path)):
            return "rank files"
        raise FileNotFoundError(f"no checkpoint at {str(path)!r}: no rank files (checkpoint_*.pt), DCP .metadata or "
                                ".safetensors file under it")
    return None


def wanted_keys(state_dict: Mapping[str, Any] | None, key_map: KeyMap, fmt: str | None = None) -> set[str] | None:
    """The file keys a target asks for (``None``: every key), flattened as format ``fmt`` keys them."""
    if state_dict is None:
        return None
    out = set()
    walk = dcp.dcp_flatten if fmt == "dcp" else flatten
    for key, _parent, _k, v in walk(state_dict):
        f = map_key(key_map, key)
        if f is not None:
            if v is None:  # may stand for a whole subtree: every key is looked at
                return None
            out.add(f)
    return out


def read_catalog(path: str | os.PathLike[str], keys: Iterable[str] | None = None, *, rank: int = 0,
                 world: int = 1) -> Catalog:
    """The catalogue of a Hugging Face safetensors checkpoint (a ``.safetensors`` file or a
    directory of them) or a DCP directory: every key's dtype, shape and chunks; for safetensors
    each file's ``__metadata__`` (``catalog.metadata[file]``), for DCP the keys of non-tensor
    values (``catalog.objects``). Reads headers and metadata only, every field checked, nothing
    in them run.

    Args:
        path: The file or directory.
        keys: Only these keys (safetensors with ``model.safetensors.index.json``: only their
            files' headers are read).

    Raises:
        FileNotFoundError: no such file or directory, or no safetensors file in it.
        UnsafeCheckpointError: DCP metadata that asks for anything but DCP's own classes.
        CorruptCheckpointError: a malformed header, index or metadata, naming the file and key.
    """
    return _open(path, keys, rank, world)[0]


def _open(path: str | os.PathLike[str], keys: Iterable[str] | None, rank: int = 0,
          world: int = 1) -> tuple[Catalog, tuple[str, ...]]:
    fmt = source_format(path)
    if fmt == "dcp":
        return dcp.open_catalog(path, keys)
    if fmt == "rank files":
        cat, all_keys, _note = rankfiles.open_catalog(location(path), rank, world, None if keys is None else set(keys))
        return cat, all_keys
    return hf.open_catalog(path, keys)


def plan_source(path: str | os.PathLike[str], state_dict: Mapping[str, Any] | None, *, key_map: KeyMap = None,
                cast: bool = False, map_location: MapLocation = None, rank: int = 0, world: int = 1) -> CatalogPlan:
    """Open the catalogue (only the files holding the wanted keys, where an index says which)
    and plan this rank's reads; load the non-tensor values the target asks for (DCP: small, and
    refused here if unsafe). Targets are not touched (``None`` values are allocated).

    Raises:
        CorruptCheckpointError: a malformed source, naming the file and key.
        StateDictMismatchError: a placement the region math cannot map.
    """
    if state_dict is not None and not isinstance(state_dict, Mapping):
        raise TypeError(f"a {source_format(path)} restore takes a dict of tensors (model.state_dict()), not "
                        f"{type(state_dict).__name__}")
    catalog, all_keys = _open(path, wanted_keys(state_dict, key_map, source_format(path)), rank, world)
    device = resolve_device("cpu", map_location, file=path, key="")
    try:
        plan = plan_catalog(catalog, all_keys, state_dict, key_map=key_map, cast=cast, device=device)
    except LayoutError as e:
        raise StateDictMismatchError(str(e), file=path) from None
    if not plan.mismatched:
        _load_objects(plan)
    return plan


def read_source(plan: CatalogPlan, *, verify: bool = True, pieces: dict[Any, Any] | None = None) -> tuple[int, int, int]:
    """Fill the plan's targets and load its non-tensor values; ``(bytes read, files opened,
    bytes verified)``. ``verify``: check the CRC32 of each chunk read whole, where the format
    records one (a non-tensor value's records are always checked); ``pieces``: where the CRC32
    shares of records read in part go (the coordinator checks them with the other ranks')."""
    with torch.no_grad():
        nbytes, files, verified = read_catalog_jobs(plan.catalog, plan.jobs, verify=verify, pieces=pieces)
    return nbytes + plan.object_bytes, files, verified


def _load_objects(plan: CatalogPlan) -> None:
    """(plan phase) Load the plan's non-tensor values (small, and unpickled with checks that may
    refuse them: done before any target is touched); they go into the target with the result."""
    source = plan.catalog.source
    for job in plan.objects:
        value = source.load_object(plan.catalog, job.file_key)
        plan.object_bytes += plan.catalog.objects[job.file_key].length
        plan.values[job.key] = value
        if job.parent is not None:
            plan.assign.append((job.parent, job.slot, value))


__all__ = ["plan_source", "read_catalog", "read_source", "source_format", "wanted_keys"]
