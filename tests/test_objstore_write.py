"""``CheckpointWriter`` and ``find_latest_checkpoint`` on an object store, in one process.

Against moto's real S3 server on 127.0.0.1 (``tests/_s3.py``): dist_restore talks HTTP to it
through obstore. The writes are compared with a local write of the same state dict.
"""

from __future__ import annotations

import io
import json
import logging
import re
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from dist_restore import RankInfo, RestoreError
from dist_restore._base import objstore
from dist_restore._base.source import location
from dist_restore._format.manifest import (
    MANIFEST_NAME,
    IncompleteCheckpointError,
    Manifest,
    check_checkpoint,
    rank_file_count,
    read_manifest,
)
from dist_restore.discovery import find_latest_checkpoint
from dist_restore.errors import CorruptCheckpointError
from dist_restore.writer import STAGING_ENV, CheckpointWriter
from tests._s3 import S3, s3_server
from tests.test_writer import _assert_same, _Explodes, _state

pytestmark = pytest.mark.timeout(120)

OURS = ["checkpoint_0.idx", "checkpoint_0.pt", MANIFEST_NAME]


@pytest.fixture(scope="module")
def s3() -> Iterator[S3]:
    with s3_server() as server:
        yield server


@pytest.fixture
def prefix(request: pytest.FixtureRequest) -> str:
    """A prefix of its own for each test."""
    return re.sub(r"\W", "_", request.node.name)


@pytest.fixture(autouse=True)
def staging(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test stages its uploads in a directory of its own (checked empty afterwards)."""
    d = tmp_path / "staging"
    d.mkdir()
    monkeypatch.setenv(STAGING_ENV, str(d))
    return d


def _names(s3: S3, prefix: str) -> list[str]:
    return [k[len(prefix) + 1:] for k in s3.keys(prefix + "/")]


def _crc(data: bytes) -> str:
    return f"crc32:{zlib.crc32(data):08x}"


# -- writing ---------------------------------------------------------------------------------


def test_write_matches_a_local_write(s3: S3, prefix: str, tmp_path: Path, staging: Path) -> None:
    sd = _state()
    url = s3.url(prefix, "step_7")
    man = CheckpointWriter().write(url, sd, metadata={"step": 7})
    local = CheckpointWriter().write(tmp_path / "local", sd, metadata={"step": 7})
    assert _names(s3, f"{prefix}/step_7") == OURS  # no marker, no sync files left
    assert list(staging.iterdir()) == []  # the staged temp file is gone
    # the same bytes a local write produces, the same manifest but for its timestamps
    for name in OURS[:2]:
        assert s3.get(f"{prefix}/step_7/{name}") == (tmp_path / "local" / name).read_bytes(), name
    stored = s3.get(f"{prefix}/step_7/{MANIFEST_NAME}")
    assert Manifest.from_json(stored) == man
    doc, local_doc = json.loads(stored), json.loads((tmp_path / "local" / MANIFEST_NAME).read_text())
    for d in (doc, local_doc):
        del d["created"], d["created_unix"]
    assert doc == local_doc
    data = s3.get(f"{prefix}/step_7/checkpoint_0.pt")
    _assert_same(torch.load(io.BytesIO(data), weights_only=True), sd)
    info = man.ranks[0]
    assert (info.size, info.checksum) == (len(data), _crc(data))
    idx = s3.get(f"{prefix}/step_7/checkpoint_0.idx")
    assert (info.index_size, info.index_checksum) == (len(idx), _crc(idx[:-4]))
    assert man.metadata == {"step": 7} and local is not None
    # read back through the URL: the manifest, the checks, the discovery
    assert read_manifest(url) == man
    assert read_manifest(location(url)) == man
    assert check_checkpoint(url, world_size=1, verify=True) == man
    assert rank_file_count(url) == 1
    assert find_latest_checkpoint(s3.url(prefix), world_size=1, verify=True) == url


def test_large_rank_file_is_a_multipart_upload(s3: S3, prefix: str) -> None:
    sd = {"big": torch.arange(5 << 20, dtype=torch.float32)}  # 20 MiB: three 8 MiB parts
    url = s3.url(prefix)
    man = CheckpointWriter().write(url, sd)
    import obstore

    etag = obstore.head(s3.store(), f"{prefix}/checkpoint_0.pt")["e_tag"]
    assert re.search(r"-3\"?$", etag), etag  # S3 names a multipart object's parts in its ETag
    data = s3.get(f"{prefix}/checkpoint_0.pt")
    assert (man.ranks[0].size, man.ranks[0].checksum) == (len(data), _crc(data))
    assert torch.equal(torch.load(io.BytesIO(data), weights_only=True)["big"], sd["big"])
    assert check_checkpoint(url, world_size=1, verify=True) == man


def test_a_failed_write_leaves_no_manifest(s3: S3, prefix: str, staging: Path) -> None:
    url = s3.url(prefix)
    CheckpointWriter().write(url, _state(1), metadata={"step": 1})
    old = s3.get(f"{prefix}/checkpoint_0.pt")
    bad = _state(2)
    bad["optim"]["x"] = _Explodes()
    with pytest.raises(RestoreError, match="cannot pickle this on purpose") as err:
        CheckpointWriter().write(url, bad, metadata={"step": 2})
    assert err.value.phase == "write" and sorted(err.value.failures) == [0]
    names = _names(s3, prefix)
    assert MANIFEST_NAME not in names
    assert [n[:len(MANIFEST_NAME) + 2] for n in names if n.startswith(".")] == [f".{MANIFEST_NAME}."]  # the marker
    assert s3.get(f"{prefix}/checkpoint_0.pt") == old  # nothing was uploaded
    assert list(staging.iterdir()) == []
    assert read_manifest(url) is None
    with pytest.raises(IncompleteCheckpointError, match="no commit manifest; temp files present"):
        check_checkpoint(url, world_size=1)
    # the next write sweeps the marker and commits
    man = CheckpointWriter().write(url, _state(3), metadata={"step": 3})
    assert _names(s3, prefix) == OURS
    assert check_checkpoint(url, world_size=1, verify=True) == man


def test_the_old_manifest_goes_before_any_rank_object_and_the_new_one_comes_last(
        s3: S3, prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    url = s3.url(prefix)
    CheckpointWriter().write(url, _state(1), metadata={"step": 1})
    events: list[tuple[str, str, list[str]]] = []

    def spy(op: str) -> Any:
        real = getattr(objstore.ObjectDir, op)

        def wrapped(self: objstore.ObjectDir, *args: Any) -> Any:
            file = args[-1] if op == "put_file" else args[0]
            events.append((op, file, _names(s3, prefix)))
            return real(self, *args)
        return wrapped

    for op in ("put_file", "put_bytes", "delete"):
        monkeypatch.setattr(objstore.ObjectDir, op, spy(op))
    CheckpointWriter().write(url, _state(2), metadata={"step": 2})
    ops = [(op, f) for op, f, _ in events]
    marker = ops[0][1]
    assert ops == [("put_bytes", marker), ("delete", MANIFEST_NAME), ("put_file", "checkpoint_0.pt"),
                   ("put_bytes", "checkpoint_0.idx"), ("put_bytes", MANIFEST_NAME), ("delete", marker)]
    assert marker.startswith(f".{MANIFEST_NAME}.") and marker.endswith(".tmp")
    seen = {(op, f): names for op, f, names in events}
    assert MANIFEST_NAME not in seen["put_file", "checkpoint_0.pt"]  # given up before the upload
    assert marker in seen["put_file", "checkpoint_0.pt"]
    assert MANIFEST_NAME in seen["delete", MANIFEST_NAME]  # the old manifest was there until then
    _assert_same(torch.load(io.BytesIO(s3.get(f"{prefix}/checkpoint_0.pt")), weights_only=True), _state(2))
    assert read_manifest(url).metadata == {"step": 2}


def test_stale_objects_of_ours_are_swept(s3: S3, prefix: str) -> None:
    for name in (f".{MANIFEST_NAME}.123.deadbeef.tmp", ".checkpoint_0.pt.77.0badf00d.tmp",  # interrupted writes
                 "checkpoint_1.pt", "checkpoint_1.idx", "checkpoint_12.pt",  # a larger world's
                 "notes.txt", "checkpoint_1.pt.bak", "sub/checkpoint_3.pt"):  # not ours: kept
        s3.put(f"{prefix}/{name}", b"x")
    CheckpointWriter().write(s3.url(prefix), _state())
    assert _names(s3, prefix) == [*OURS[:2], "checkpoint_1.pt.bak", MANIFEST_NAME, "notes.txt",
                                  "sub/checkpoint_3.pt"]
    assert check_checkpoint(s3.url(prefix), world_size=1, verify=True) is not None


def test_staging_directory(s3: S3, prefix: str, monkeypatch: pytest.MonkeyPatch, staging: Path) -> None:
    made: list[str] = []
    real = tempfile.mkstemp

    def mkstemp(*args: Any, **kwargs: Any) -> tuple[int, str]:
        fd, path = real(*args, **kwargs)
        made.append(path)
        return fd, path

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    CheckpointWriter().write(s3.url(prefix), _state())
    assert [Path(p).parent for p in made] == [staging]
    assert list(staging.iterdir()) == []
    monkeypatch.setenv(STAGING_ENV, str(staging / "nope"))
    with pytest.raises(RestoreError, match=f"preparing .*{STAGING_ENV}=.*is not a directory"):
        CheckpointWriter().write(s3.url(prefix, "b"), _state())
    assert _names(s3, f"{prefix}/b") == []


def test_barrier_mode_is_refused_for_urls(s3: S3, prefix: str) -> None:
    with pytest.raises(ValueError, match="barrier.*report files.*torch.distributed"):
        CheckpointWriter(RankInfo(0, 2), barrier=lambda: None).write(s3.url(prefix), _state())
    assert _names(s3, prefix) == []
    man = CheckpointWriter(RankInfo(0, 1), barrier=lambda: None).write(s3.url(prefix), _state())  # one rank
    assert man is not None and _names(s3, prefix) == OURS


def test_uncoordinated_ranks_write_without_manifest(s3: S3, prefix: str) -> None:
    url = s3.url(prefix)
    s3.put(f"{prefix}/{MANIFEST_NAME}", b"{}")  # an old manifest must not outlive the overwrite
    CheckpointWriter(RankInfo(1, 2)).write(url, {"x": torch.ones(1)})
    assert CheckpointWriter(RankInfo(0, 2)).write(url, {"x": torch.zeros(1)}) is None
    assert _names(s3, prefix) == ["checkpoint_0.idx", "checkpoint_0.pt", "checkpoint_1.idx", "checkpoint_1.pt"]
    assert check_checkpoint(url, world_size=2) is None
    assert rank_file_count(url) == 2


def test_bad_metadata_fails_before_anything_is_touched(s3: S3, prefix: str) -> None:
    url = s3.url(prefix)
    man = CheckpointWriter().write(url, _state(), metadata={"step": 1})
    with pytest.raises(RestoreError, match="JSON-serialisable"):
        CheckpointWriter().write(url, _state(), metadata={"step": float("nan")})
    assert read_manifest(url) == man


# -- reading the manifest and checking a prefix ----------------------------------------------------


def test_check_checkpoint_on_a_prefix(s3: S3, prefix: str, monkeypatch: pytest.MonkeyPatch,
                                      caplog: pytest.LogCaptureFixture) -> None:
    url = s3.url(prefix)
    with pytest.raises(FileNotFoundError, match="no objects under"):
        check_checkpoint(url, world_size=None)
    man = CheckpointWriter().write(url, _state())
    with pytest.raises(IncompleteCheckpointError, match="world size mismatch"):
        check_checkpoint(url, world_size=2)
    with pytest.raises(ValueError, match="ranks 3 are not in the checkpoint"):
        check_checkpoint(url, world_size=None, ranks=[3])
    data = s3.get(f"{prefix}/checkpoint_0.pt")
    flipped = data[:100] + bytes([data[100] ^ 1]) + data[101:]
    s3.put(f"{prefix}/checkpoint_0.pt", flipped)  # same size: only the checksum tells
    assert check_checkpoint(url, world_size=1) == man
    with pytest.raises(CorruptCheckpointError, match="checksum mismatch") as err:
        check_checkpoint(url, world_size=1, verify=True)
    assert err.value.file == f"{url}/checkpoint_0.pt" and err.value.rank == 0
    s3.put(f"{prefix}/checkpoint_0.pt", data[:-1])
    with pytest.raises(CorruptCheckpointError, match="size mismatch"):
        check_checkpoint(url, world_size=1)
    s3.delete(f"{prefix}/checkpoint_0.pt")
    with pytest.raises(IncompleteCheckpointError, match="listed in the commit manifest is missing"):
        check_checkpoint(url, world_size=1)
    s3.put(f"{prefix}/checkpoint_0.pt", data)
    s3.put(f"{prefix}/checkpoint_0.idx", b"not the index file")
    with caplog.at_level(logging.WARNING, logger="dist_restore"):
        assert check_checkpoint(url, world_size=1, verify=True) == man  # a bad index file only warns
    assert "index file checkpoint_0.idx is crc32:" in caplog.text
    # the manifest itself: garbage, too large
    s3.put(f"{prefix}/{MANIFEST_NAME}", b"{not json")
    with pytest.raises(CorruptCheckpointError, match="not JSON") as err:
        read_manifest(url)
    assert err.value.file == f"{url}/{MANIFEST_NAME}"
    monkeypatch.setattr("dist_restore._format.manifest.MAX_MANIFEST_BYTES", 4)
    with pytest.raises(CorruptCheckpointError, match="larger than the 4 bytes"):
        read_manifest(url)


def test_uncommitted_prefix_without_manifest(s3: S3, prefix: str) -> None:
    url = s3.url(prefix)
    s3.put(f"{prefix}/checkpoint_1.pt", b"x")
    with pytest.raises(IncompleteCheckpointError, match="rank 0 has no file"):
        check_checkpoint(url, world_size=None)
    assert rank_file_count(url) == 2
    s3.put(f"{prefix}/checkpoint_0.pt", b"x")
    assert check_checkpoint(url, world_size=2) is None  # a plain torch.save checkpoint
    assert read_manifest(url) is None


# -- find_latest_checkpoint -----------------------------------------------------------------------


def test_find_latest_checkpoint_on_a_prefix(s3: S3, prefix: str) -> None:
    root = s3.url(prefix)
    with pytest.raises(FileNotFoundError, match="no objects under it"):
        find_latest_checkpoint(root)
    w = CheckpointWriter()
    w.write(f"{root}/step_100", _state(100), metadata={"step": 100})  # complete
    w.write(f"{root}/final", _state(120), metadata={"step": 120})  # complete: ordered by its manifest's step
    w.write(f"{root}/step_150", _state(150), metadata={"step": 150})  # complete, but one byte flipped
    key = f"{prefix}/step_150/checkpoint_0.pt"
    data = s3.get(key)
    s3.put(key, data[:50] + bytes([data[50] ^ 1]) + data[51:])
    bad = _state(200)
    bad["x"] = _Explodes()
    with pytest.raises(RestoreError):
        w.write(f"{root}/step_200", bad, metadata={"step": 200})  # incomplete: the marker, no manifest
    s3.put(f"{prefix}/step_250/checkpoint_0.pt", s3.get(f"{prefix}/step_100/checkpoint_0.pt"))
    s3.put(f"{prefix}/step_250/.checkpoint_1.pt.1.00000000.tmp", b"")  # no manifest, a temp object
    w.write(f"{root}/step_300", _state(300), metadata={"step": 300})  # a rank object gone
    s3.delete(f"{prefix}/step_300/checkpoint_0.pt")
    s3.put(f"{prefix}/logs/train.log", b"not a checkpoint")

    assert find_latest_checkpoint(root) == f"{root}/step_150"
    assert find_latest_checkpoint(root, world_size=1) == f"{root}/step_150"
    assert find_latest_checkpoint(root, verify=True) == f"{root}/final"
    assert find_latest_checkpoint(root + "/", verify=True) == f"{root}/final"
    assert find_latest_checkpoint(root, world_size=2) is None
    s3.delete(f"{prefix}/final/{MANIFEST_NAME}")  # now a plain checkpoint named without a step: last
    assert find_latest_checkpoint(root, verify=True) == f"{root}/step_100"


def test_a_manifest_changed_after_the_listing_is_not_taken_for_another(s3: S3, prefix: str) -> None:
    url = s3.url(prefix)
    man = CheckpointWriter().write(url, _state(), metadata={"step": 1})
    loc = location(url)
    assert loc.files()  # listed now: the manifest's ETag pinned
    s3.put(f"{prefix}/{MANIFEST_NAME}", man.to_json().encode() + b" ")  # replaced
    with pytest.raises(CorruptCheckpointError, match="changed"):
        read_manifest(loc)
    s3.delete(f"{prefix}/{MANIFEST_NAME}")  # gone: an overwrite began; not a plain checkpoint
    with pytest.raises(IncompleteCheckpointError, match="being overwritten"):
        check_checkpoint(loc, world_size=1)
    assert read_manifest(url) is None  # listed afresh: no manifest
