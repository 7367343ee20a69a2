"""Key paths: ``model.w``, ``opt.groups[1].lr`` (the reference reader's format)."""

from __future__ import annotations

from typing import Any

#: Raw path of a value: dict keys and list/tuple positions, from the root.
RawPath = tuple[Any, ...]


def join_key(prefix: str, key: Any) -> str:
    """Dotted path of ``key`` under the dict at ``prefix``."""
    return f"{prefix}.{key}" if prefix else str(key)


def join_index(prefix: str, i: int) -> str:
    """Path of position ``i`` of the list/tuple at ``prefix``."""
    return f"{prefix}[{i}]"
