"""Pausing Python's cyclic garbage collector around allocation-heavy steps.

Indexing, planning and reading a file of 10,000 tensors create several objects per tensor
and no reference cycles; left on, the collector runs repeated full collections over every
live object (all of torch included) and made a plan step vary from 30 to 150 ms.
"""

from __future__ import annotations

import functools
import gc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

F = TypeVar("F", bound=Callable[..., object])


@contextmanager
def paused() -> Iterator[None]:
    """Disable the collector inside the block; restore its previous state after (nests)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def gc_paused(fn: F) -> F:
    """Decorator: run ``fn`` with the collector paused."""
    @functools.wraps(fn)
    def wrapper(*args: object, **kwargs: object) -> object:
        with paused():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
