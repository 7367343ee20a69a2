"""Tests of the commit manifest, file checksums and ``check_checkpoint`` (single process)."""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

import pytest
import torch

from dist_restore._format import manifest as m
from dist_restore._format.manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    IncompleteCheckpointError,
    Manifest,
    RankFileInfo,
    check_checkpoint,
    file_checksum,
    is_temp_file,
    read_manifest,
    temp_path,
    write_manifest,
)
from dist_restore.errors import CheckpointError, CorruptCheckpointError

pytestmark = pytest.mark.timeout(60)


def _make_checkpoint(d: Path, world: int, *, manifest: bool = True, skip: tuple[int, ...] = (),
                     metadata: dict | None = None) -> Manifest | None:
    """Rank files ``checkpoint_{r}.pt`` (each a little different) and, optionally, a manifest."""
    d.mkdir(parents=True, exist_ok=True)
    infos = []
    for r in range(world):
        f = d / f"checkpoint_{r}.pt"
        if r not in skip:
            torch.save({"w": torch.arange(100 + r, dtype=torch.float32), "rank": r}, f)
            infos.append(RankFileInfo(r, f.name, f.stat().st_size, file_checksum(f)))
    if not manifest:
        return None
    man = Manifest.create(infos, metadata or {"step": 7})
    write_manifest(d, man)
    return man


def _manifest_doc(**changes: object) -> str:
    man = Manifest.create([RankFileInfo(0, "checkpoint_0.pt", 10, "crc32:0000abcd")], {"step": 1})
    doc = json.loads(man.to_json())
    doc.update(changes)
    return json.dumps(doc)


# -- the manifest ------------------------------------------------------------------------


def test_json_round_trip() -> None:
    man = Manifest.create([RankFileInfo(0, "checkpoint_0.pt", 1234, "crc32:deadbeef"),
                           RankFileInfo(1, "checkpoint_1.pt", 5678, "crc32:00c0ffee")],
                          {"step": 2000, "epoch": 3, "note": "ünïcode", "lrs": [0.1, 0.01]})
    again = Manifest.from_json(man.to_json())
    assert again == man
    assert again.ranks[1] == RankFileInfo(1, "checkpoint_1.pt", 5678, "crc32:00c0ffee")
    assert again.metadata["step"] == 2000


def test_json_is_readable() -> None:
    man = Manifest.create([RankFileInfo(r, f"checkpoint_{r}.pt", 10 * r, "crc32:%08x" % r) for r in range(3)],
                          {"step": 5}, now=0.0)
    text = man.to_json()
    doc = json.loads(text)
    assert set(doc) == {"format_version", "world_size", "created", "created_unix",
                        "checksum_algorithm", "ranks", "metadata"}
    assert doc["format_version"] == FORMAT_VERSION
    assert doc["world_size"] == 3
    assert doc["created"] == "1970-01-01T00:00:00.000Z"
    assert doc["checksum_algorithm"] == "crc32"
    assert doc["ranks"][2] == {"rank": 2, "file": "checkpoint_2.pt", "size": 20, "checksum": "crc32:00000002"}
    assert doc["metadata"] == {"step": 5}
    assert text.count("\n") > 10  # indented, one rank per line
    assert '    {"rank": 1, "file": "checkpoint_1.pt"' in text


def test_create_rejects_ranks_out_of_order() -> None:
    with pytest.raises(ValueError, match="one entry per rank"):
        Manifest.create([RankFileInfo(1, "checkpoint_1.pt", 1, "crc32:00000000")])


def test_to_json_rejects_non_json_metadata() -> None:
    man = Manifest.create([RankFileInfo(0, "checkpoint_0.pt", 1, "crc32:00000000")], {"t": torch.zeros(1)})
    with pytest.raises(TypeError):
        man.to_json()


_MALFORMED = [
    ("{not json", "not JSON"),
    ("[1, 2]", "expected a JSON object"),
    (_manifest_doc(format_version=99), "unsupported format_version 99"),
    (_manifest_doc(format_version="1"), "format_version"),
    (_manifest_doc(world_size=2), "world_size 2 but 1 rank entries"),
    (_manifest_doc(checksum_algorithm="md5"), "unsupported checksum_algorithm"),
    (_manifest_doc(metadata=[]), "'metadata'"),
    (_manifest_doc(created_unix="yesterday"), "'created_unix'"),
    (_manifest_doc(ranks=[{"rank": 0, "file": "../../etc/passwd", "size": 1, "checksum": "crc32:00000000"}]),
     "not a plain file name"),
    (_manifest_doc(ranks=[{"rank": 0, "file": "checkpoint_0.pt", "size": -1, "checksum": "crc32:00000000"}]),
     "size -1"),
    (_manifest_doc(ranks=[{"rank": 0, "file": "checkpoint_0.pt", "size": 1, "checksum": "sha1:00"}]),
     "checksum"),
    (_manifest_doc(ranks=[{"rank": 3, "file": "checkpoint_3.pt", "size": 1, "checksum": "crc32:00000000"}]),
     "ranks\\[0\\] is for rank 3"),
    (_manifest_doc(ranks=[{"rank": 0, "file": "checkpoint_0.pt", "size": True, "checksum": "crc32:00000000"}]),
     "'size'"),
]


# ids from the expected message: the texts carry a timestamp, and ids must be the same in every
# process that collects them (pytest-xdist)
@pytest.mark.parametrize(("text", "why"), _MALFORMED, ids=[why for _t, why in _MALFORMED])
def test_from_json_rejects_malformed(text: str, why: str) -> None:
    with pytest.raises(CorruptCheckpointError, match=why) as info:
        Manifest.from_json(text, file="/ckpt/step_1/dist_restore_manifest.json")
    assert info.value.file == "/ckpt/step_1/dist_restore_manifest.json"
    assert "/ckpt/step_1/dist_restore_manifest.json" in str(info.value)


def test_read_manifest_absent_and_corrupt(tmp_path: Path) -> None:
    assert read_manifest(tmp_path) is None
    (tmp_path / MANIFEST_NAME).write_text('{"format_version": 1, "world_')  # torn write
    with pytest.raises(CorruptCheckpointError, match="not JSON") as info:
        read_manifest(tmp_path)
    assert info.value.file == str(tmp_path / MANIFEST_NAME)


def test_write_manifest_is_atomic_and_leaves_no_temp_file(tmp_path: Path) -> None:
    man = _make_checkpoint(tmp_path, 2)
    assert read_manifest(tmp_path) == man
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_0.pt", "checkpoint_1.pt", MANIFEST_NAME]
    man2 = Manifest.create(man.ranks, {"step": 8})
    write_manifest(tmp_path, man2)  # replaces
    assert read_manifest(tmp_path).metadata == {"step": 8}
    assert not [n for n in os.listdir(tmp_path) if is_temp_file(n)]


def test_temp_names() -> None:
    t = temp_path("/x/checkpoint_3.pt")
    assert t.parent == Path("/x")
    assert t.name.startswith(".checkpoint_3.pt.") and t.name.endswith(".tmp")
    assert is_temp_file(t.name)
    assert t != temp_path("/x/checkpoint_3.pt")
    assert m._OUR_TEMP.match(t.name)
    assert m._OUR_TEMP.match(temp_path(f"/x/{MANIFEST_NAME}").name)
    for name in ("checkpoint_3.pt", MANIFEST_NAME, ".tmp", "x.tmp", ".hidden"):
        assert not is_temp_file(name), name


# -- checksums ---------------------------------------------------------------------------


@pytest.mark.parametrize("nbytes", [0, 1, 4096, 3 * 1024 + 17])
def test_checksum_equals_zlib_crc32(tmp_path: Path, nbytes: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(m, "_CHUNK", 1024)  # several chunks, a partial last one
    data = os.urandom(nbytes)
    f = tmp_path / "blob"
    f.write_bytes(data)
    assert file_checksum(f) == "crc32:%08x" % zlib.crc32(data)


def test_checksum_of_a_torch_file(tmp_path: Path) -> None:
    f = tmp_path / "checkpoint_0.pt"
    torch.save({"w": torch.randn(300_000)}, f)
    assert file_checksum(f) == "crc32:%08x" % zlib.crc32(f.read_bytes())


# -- check_checkpoint --------------------------------------------------------------------


def test_complete_checkpoint_passes(tmp_path: Path) -> None:
    man = _make_checkpoint(tmp_path, 4)
    assert check_checkpoint(tmp_path, world_size=4) == man
    assert check_checkpoint(tmp_path, world_size=None, verify=True) == man
    assert check_checkpoint(tmp_path, world_size=4, ranks=[2], verify=True) == man


def test_temp_files_are_ignored_with_a_manifest(tmp_path: Path) -> None:
    man = _make_checkpoint(tmp_path, 2)
    (tmp_path / ".checkpoint_1.pt.123.0badf00d.tmp").write_bytes(b"old crash")
    assert check_checkpoint(tmp_path, world_size=2) == man


def test_plain_directory_without_manifest_passes_with_none(tmp_path: Path) -> None:
    _make_checkpoint(tmp_path, 3, manifest=False)
    assert check_checkpoint(tmp_path, world_size=3) is None
    assert check_checkpoint(tmp_path, world_size=None) is None


def test_missing_rank_files_without_manifest(tmp_path: Path) -> None:
    _make_checkpoint(tmp_path, 6, manifest=False, skip=(3, 5))
    with pytest.raises(IncompleteCheckpointError) as info:
        check_checkpoint(tmp_path, world_size=6)
    assert info.value.reason == "incomplete checkpoint: no commit manifest; ranks 3,5 have no file"
    assert str(tmp_path) in str(info.value)


def test_one_missing_rank_file_and_inferred_world(tmp_path: Path) -> None:
    _make_checkpoint(tmp_path, 4, manifest=False, skip=(1,))
    with pytest.raises(IncompleteCheckpointError) as info:
        check_checkpoint(tmp_path, world_size=None)  # world inferred from checkpoint_3.pt
    assert info.value.reason == "incomplete checkpoint: no commit manifest; rank 1 has no file"
    with pytest.raises(IncompleteCheckpointError, match="ranks 1,4-7 have no file"):
        check_checkpoint(tmp_path, world_size=8)


def test_temp_files_without_manifest(tmp_path: Path) -> None:
    _make_checkpoint(tmp_path, 2, manifest=False)
    (tmp_path / ".checkpoint_1.pt.42.0123abcd.tmp").write_bytes(b"partial")
    (tmp_path / ".dist_restore_manifest.json.41.fedc0000.tmp").touch()
    with pytest.raises(IncompleteCheckpointError) as info:
        check_checkpoint(tmp_path, world_size=2)
    assert info.value.reason == ("incomplete checkpoint: no commit manifest; temp files present: "
                                 ".checkpoint_1.pt.42.0123abcd.tmp, .dist_restore_manifest.json.41.fedc0000.tmp")
    (tmp_path / "checkpoint_0.pt").unlink()
    with pytest.raises(IncompleteCheckpointError, match=r"; rank 0 has no file; temp files present: \.checkpoint_1"):
        check_checkpoint(tmp_path, world_size=2)


def test_extra_rank_files_without_manifest_are_a_world_size_mismatch(tmp_path: Path) -> None:
    _make_checkpoint(tmp_path, 4, manifest=False)
    with pytest.raises(IncompleteCheckpointError) as info:
        check_checkpoint(tmp_path, world_size=2)
    assert info.value.reason == ("world size mismatch: checkpoint has files for ranks up to 3 "
                                 "(no commit manifest), this job has 2")


def test_empty_directory_is_incomplete(tmp_path: Path) -> None:
    with pytest.raises(IncompleteCheckpointError, match="no rank files"):
        check_checkpoint(tmp_path, world_size=None)


def test_world_size_mismatch(tmp_path: Path) -> None:
    _make_checkpoint(tmp_path, 2)
    with pytest.raises(IncompleteCheckpointError) as info:
        check_checkpoint(tmp_path, world_size=4)
    assert info.value.reason == "world size mismatch: checkpoint was written by 2 ranks, this job has 4"
    assert str(tmp_path) in str(info.value)


def test_size_mismatch_after_truncation(tmp_path: Path) -> None:
    _make_checkpoint(tmp_path, 3)
    f = tmp_path / "checkpoint_1.pt"
    size = f.stat().st_size
    os.truncate(f, size - 100)
    assert check_checkpoint(tmp_path, world_size=3, ranks=[0, 2]) is not None  # only those checked
    with pytest.raises(CorruptCheckpointError, match=f"size mismatch: the commit manifest says {size} bytes, "
                                                     f"the file has {size - 100}") as info:
        check_checkpoint(tmp_path, world_size=3)
    assert info.value.rank == 1
    assert info.value.file == str(f)


def test_flipped_bit_caught_only_with_verify(tmp_path: Path) -> None:
    _make_checkpoint(tmp_path, 2)
    f = tmp_path / "checkpoint_1.pt"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x10
    f.write_bytes(bytes(data))
    assert check_checkpoint(tmp_path, world_size=2) is not None
    with pytest.raises(CorruptCheckpointError, match="checksum mismatch") as info:
        check_checkpoint(tmp_path, world_size=2, verify=True)
    assert info.value.rank == 1
    assert "checkpoint_1.pt" in str(info.value)


def test_listed_rank_file_missing(tmp_path: Path) -> None:
    _make_checkpoint(tmp_path, 2)
    (tmp_path / "checkpoint_0.pt").unlink()
    with pytest.raises(IncompleteCheckpointError, match="listed in the commit manifest is missing") as info:
        check_checkpoint(tmp_path, world_size=2)
    assert info.value.rank == 0


def test_corrupt_manifest_is_reported(tmp_path: Path) -> None:
    _make_checkpoint(tmp_path, 1)
    (tmp_path / MANIFEST_NAME).write_text(_manifest_doc(format_version=2))
    with pytest.raises(CorruptCheckpointError, match="format_version 2") as info:
        check_checkpoint(tmp_path, world_size=1)
    assert MANIFEST_NAME in str(info.value)


def test_bad_arguments_and_missing_directory(tmp_path: Path) -> None:
    _make_checkpoint(tmp_path / "c", 2)
    with pytest.raises(ValueError, match="ranks 2,5 are not in the checkpoint"):
        check_checkpoint(tmp_path / "c", world_size=2, ranks=[0, 2, 5])
    with pytest.raises(FileNotFoundError, match="nope"):
        check_checkpoint(tmp_path / "nope", world_size=2)
    with pytest.raises(NotADirectoryError):
        check_checkpoint(tmp_path / "c" / "checkpoint_0.pt", world_size=1)


def test_incomplete_is_a_checkpoint_error_and_pickles() -> None:
    import pickle

    e = IncompleteCheckpointError("incomplete checkpoint: x", file="/d")
    assert isinstance(e, CheckpointError)
    again = pickle.loads(pickle.dumps(e))
    assert type(again) is IncompleteCheckpointError and str(again) == str(e)
