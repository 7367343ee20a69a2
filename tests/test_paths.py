"""Every error on a path names it: a rank file that is a directory, a FIFO, unreadable, a
dangling symbolic link, I/O errors while reading, and a full disk while writing.

``os.open``/``open`` name the file in their errors; ``pread``, ``fstat``, ``mmap``, ``write`` and
``fsync`` do not. Errors that need root to produce for real (permissions, a full disk, EIO)
are injected where the system would raise them.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from pathlib import Path

import pytest
import torch

from _util import save
from dist_restore import (CheckpointReader, CheckpointWriter, RankInfo, RestoreCoordinator, RestoreError,
                          find_latest_checkpoint, read_index)
from dist_restore._format.manifest import MANIFEST_NAME, check_checkpoint
from dist_restore.cli import main as cli

pytestmark = pytest.mark.timeout(60)

READER = CheckpointReader(RankInfo(0, 1))


def _named(e: BaseException, path: Path) -> bool:
    return str(path) in str(e)


def test_rank_file_that_is_a_directory(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "step_1"
    f = d / "checkpoint_0.pt"
    f.mkdir(parents=True)
    for call in (lambda: read_index(f), lambda: READER.read(d)):
        with pytest.raises(IsADirectoryError) as ei:
            call()
        assert _named(ei.value, f) and "directory" in str(ei.value)
    with pytest.raises(RestoreError) as re_:
        RestoreCoordinator().restore(d)
    assert _named(re_.value, f) and "IsADirectoryError" in str(re_.value)
    with caplog.at_level(logging.WARNING, logger="dist_restore"):
        assert find_latest_checkpoint(tmp_path) is None
    assert any(str(f) in r.getMessage() for r in caplog.records)

    assert cli(["inspect", str(d)]) == 1
    assert str(f) in capsys.readouterr().err
    assert cli(["verify", str(d)]) == 1
    assert "checkpoint_0.pt: missing: a directory, not a rank file" in capsys.readouterr().out


def test_checkpoint_directory_that_is_a_file(tmp_path: Path) -> None:
    f = tmp_path / "not_a_dir"
    f.write_bytes(b"x")
    with pytest.raises(NotADirectoryError, match="not a directory") as ei:
        READER.read(f)
    assert _named(ei.value, f)


def test_dangling_symlink(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "checkpoint_0.pt"
    f.symlink_to(tmp_path / "elsewhere" / "gone.pt")
    with pytest.raises(FileNotFoundError, match="symbolic link") as ei:
        READER.read(tmp_path)
    assert _named(ei.value, f) and str(tmp_path / "elsewhere" / "gone.pt") in str(ei.value)
    assert cli(["verify", str(tmp_path)]) == 1
    assert "a symbolic link to" in capsys.readouterr().out


@pytest.mark.timeout(15)
def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    """A FIFO named like a rank file: refused at once, naming it (opening it used to block
    until some process wrote to it)."""
    f = tmp_path / "checkpoint_0.pt"
    os.mkfifo(f)
    with pytest.raises(OSError, match="not a regular file") as ei:
        read_index(f)
    assert _named(ei.value, f)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_rank_file(tmp_path: Path) -> None:
    f = save({"w": torch.zeros(3)}, tmp_path)
    f.chmod(0)
    try:
        with pytest.raises(PermissionError) as ei:
            READER.read(tmp_path)
        assert _named(ei.value, f)
    finally:
        f.chmod(stat.S_IRUSR | stat.S_IWUSR)


def test_io_error_while_indexing_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An I/O error from pread (a failing disk, a revoked NFS permission) names the file."""
    f = save({"w": torch.zeros(3)}, tmp_path)

    def eio(*a: object) -> bytes:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "pread", eio)
    with pytest.raises(OSError) as ei:
        read_index(f)
    assert ei.value.errno == errno.EIO and _named(ei.value, f)


def test_mapping_error_while_reading_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dist_restore._bytes.read as rd

    f = save({"w": torch.zeros(3)}, tmp_path)
    index = read_index(f)

    class NoMap:
        def __init__(self, *a: object, **k: object) -> None:
            raise OSError(errno.ENOMEM, os.strerror(errno.ENOMEM))

    monkeypatch.setattr(rd.mmap, "mmap", NoMap)
    with pytest.raises(OSError) as ei:
        READER.execute(index, READER.plan(index, None), None)
    assert ei.value.errno == errno.ENOMEM and _named(ei.value, f)


def test_io_error_during_checksum_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dist_restore._format.manifest as mf

    CheckpointWriter().write(tmp_path, {"w": torch.zeros(3)})

    def eio(f: object) -> tuple[int, str]:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(mf, "checksum_fileobj", eio)
    with pytest.raises(OSError) as ei:
        check_checkpoint(tmp_path, world_size=1, verify=True)
    assert ei.value.errno == errno.EIO and _named(ei.value, tmp_path / "checkpoint_0.pt")


def _full_disk_on(monkeypatch: pytest.MonkeyPatch, name_part: str) -> None:
    """fsync of a file whose name contains ``name_part`` fails with ENOSPC, as it does on a
    full disk (delayed allocation, NFS) after every write was accepted."""
    real = os.fsync

    def fsync(fd: int) -> None:
        if name_part in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd")
@pytest.mark.parametrize("victim", ["checkpoint_0.pt", MANIFEST_NAME])
def test_full_disk_while_writing_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                victim: str) -> None:
    _full_disk_on(monkeypatch, victim)
    d = tmp_path / "step_1"
    with pytest.raises(RestoreError) as ei:
        CheckpointWriter().write(d, {"w": torch.zeros(3)})
    text = str(ei.value)
    assert "No space left on device" in text and f"{d}/.{victim}." in text, text
    assert not (d / MANIFEST_NAME).exists()
    assert not [n for n in os.listdir(d) if n.startswith(f".{victim}")]  # the temp file is removed


def test_cli_unreadable_directory_is_an_error_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """An OSError in the CLI (here: listing a directory it may not read) is one error line
    naming the path and exit status 1, not a traceback."""
    save({"w": torch.zeros(3)}, tmp_path)
    real = os.listdir

    def listdir(p: object = ".") -> list[str]:
        if str(p) == str(tmp_path):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(p))
        return real(p)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "listdir", listdir)
    for sub in ("inspect", "verify"):
        assert cli([sub, str(tmp_path)]) == 1
        err = capsys.readouterr().err
        assert err.startswith("dist-restore: error: PermissionError") and str(tmp_path) in err
