"""Running a call that may recurse deeply in C on a thread whose stack is large enough for it.

Some C code recurses without Python's recursion check: hashing a tuple hashes its items, so a
dict key nested 200,000 tuples deep (a few hundred KB of pickle) needs ~12 MiB of C stack while
the C unpickler sets it in a dict, more than a main thread's 8 MiB. The only bound such a call
has is the size of what it works on; :func:`call_with_stack` runs it on a thread whose stack
holds that bound. A stack is reserved address space: only the pages the call touches are
memory, so a generous reservation costs nothing unless the input really nests that deep.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

_GRANULE = 1 << 16  # threading.stack_size wants a multiple of the page size on some systems
_LOCK = threading.Lock()  # threading.stack_size is process-wide: set and restore it under a lock


class StackUnavailable(Exception):
    """No thread with a stack of the asked size could be started (address space or a
    ``RLIMIT_AS``)."""


def call_with_stack(fn: Callable[[], T], nbytes: int) -> T:
    """``fn()`` on a new thread with a stack of at least ``nbytes``; its result, or its exception
    raised here (its traceback includes the thread's frames).

    Raises:
        StackUnavailable: the thread could not be started with that stack.
    """
    size = -(-max(nbytes, 1 << 20) // _GRANULE) * _GRANULE
    box: list[tuple[bool, object]] = []

    def run() -> None:
        try:
            box.append((True, fn()))
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread as is
            box.append((False, e))

    with _LOCK:
        old = threading.stack_size()
        try:
            threading.stack_size(size)
            t = threading.Thread(target=run, name="dist_restore-deep-stack", daemon=True)
            t.start()
        except (RuntimeError, MemoryError, ValueError, OverflowError) as e:
            raise StackUnavailable(f"cannot start a thread with a {size >> 20} MiB stack: {e}") from None
        finally:
            threading.stack_size(old)
    t.join()
    ok, value = box[0]
    if ok:
        return value  # type: ignore[return-value]
    raise value  # type: ignore[misc]
