"""Timeouts as torch takes them: a ``datetime.timedelta`` or a number of seconds.

``init_process_group``, ``new_group`` and ``TCPStore`` take ``timedelta``; shell options and
older code pass seconds. Every public timeout of the project goes through :func:`to_seconds`
where it is given (a constructor, a call's first line), so a bad value fails there, the
same way on every rank, and never in the middle of a collective.
"""

from __future__ import annotations

import math
import numbers
from datetime import timedelta

Timeout = float | timedelta  #: what a public ``timeout=`` accepts (an int is a float here)

_MAX_SECONDS = timedelta.max.total_seconds()  # larger ones cannot become a timedelta


def to_seconds(value: object, name: str = "timeout") -> float:
    """``value`` (seconds, or a ``datetime.timedelta``) as seconds, checked.

    Args:
        value: A positive, finite number of seconds or a positive ``timedelta``.
        name: The argument's name, for the error message.

    Raises:
        TypeError: neither a real number (``bool`` is not one here) nor a ``timedelta``.
        ValueError: zero, negative, NaN, infinite, or beyond what a ``timedelta`` holds.
    """
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        seconds = float(value)
    else:
        raise TypeError(f"{name} must be a number of seconds or a datetime.timedelta, got "
                        f"{type(value).__name__} {value!r}; e.g. {name}=300 or "
                        f"{name}=timedelta(minutes=5)")
    if not (math.isfinite(seconds) and 0 < seconds <= _MAX_SECONDS):
        raise ValueError(f"{name} must be more than 0 seconds and finite (every collective needs a "
                         f"timeout), got {value!r}")
    return seconds
