"""Exception types raised by dist_restore.

Bad arguments raise ``ValueError``/``TypeError``; a missing rank file raises
``FileNotFoundError``. Everything that is wrong *with a checkpoint* raises a
:class:`CheckpointError` subclass whose message names the file, the rank and the key
where they are known.
"""

from __future__ import annotations

from collections.abc import Mapping


def _where(file: object | None, rank: int | None, key: str | None) -> str:
    parts = []
    if file is not None:
        parts.append(f"file {str(file)!r}")
    if rank is not None:
        parts.append(f"rank {rank}")
    if key is not None:
        parts.append(f"key {key!r}")
    return ", ".join(parts)


class CheckpointError(Exception):
    """Base class of dist_restore's own errors.

    Attributes:
        file: The rank file concerned, if any.
        rank: The rank concerned, if known.
        key: The dotted key path concerned, if known.
    """

    def __init__(
        self,
        message: str,
        *,
        file: object | None = None,
        rank: int | None = None,
        key: str | None = None,
    ) -> None:
        self.file = None if file is None else str(file)
        self.rank = rank
        self.key = key
        self.reason = message
        where = _where(file, rank, key)
        super().__init__(f"{message} ({where})" if where else message)

    def __reduce__(self):  # keep keyword-only fields when pickled
        return (_rebuild_error, (type(self), self.reason, self.file, self.rank, self.key))


def _rebuild_error(cls, message, file, rank, key):  # pragma: no cover - trivial
    return cls(message, file=file, rank=rank, key=key)


class CorruptCheckpointError(CheckpointError):
    """A rank file is truncated, corrupt (bad zip structure, CRC32 mismatch), or unreadable."""


class UnsafeCheckpointError(CheckpointError):
    """The pickle asks for a global outside the weights-only allowlist; refused before it runs."""


class StateDictMismatchError(CheckpointError, ValueError):
    """A target's structure, shape or dtype does not match the checkpoint."""


class RestoreError(CheckpointError):
    """One or more ranks failed a restore (or a checkpoint write); raised identically on every rank.

    Attributes:
        phase: The protocol phase that failed (e.g. ``"plan"``, ``"read"``).
        failures: ``{rank: message}`` for every rank that failed.
    """

    def __init__(self, phase: str, failures: Mapping[int, str], *, detail: str = "") -> None:
        self.phase = phase
        self.failures = dict(sorted(failures.items()))
        what = "checkpoint write" if phase == "write" else "restore"
        lines = [f"{what} failed in phase {phase!r} on rank(s) {_ranks(self.failures)}:"]
        for r, msg in self.failures.items():
            lines.append(f"  [rank {r}] {msg}")
        if detail:
            lines.append(detail)
        super().__init__("\n".join(lines))

        self.detail = detail

    def __reduce__(self):
        return (_rebuild_restore_error, (self.phase, self.failures, self.detail))


def _rebuild_restore_error(phase, failures, detail):  # pragma: no cover - trivial
    return RestoreError(phase, failures, detail=detail)


def _ranks(failures: Mapping[int, str]) -> str:
    from dist_restore._base.ranks import format_ranks

    return format_ranks(failures.keys())
