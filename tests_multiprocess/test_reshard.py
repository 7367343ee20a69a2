"""Resharding on real FSDP2 / FSDP2+TP / TP models (gloo, CPU meshes): save at one world
size and layout, restore at another, compare every entry's ``full_tensor()`` bit for bit
with the values saved.

Starting ranks is what costs here (seconds per rank), not the restores, so the module starts
them five times: one spawn per world size saves every checkpoint (``saved``), and one per
world size runs every restore of the module in turn (``restored``, a :class:`Batch` per world,
started by the first test that needs it). Each test then checks its own job's per-rank
results; damaged copies are made before the restores start.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from dist_restore import read_index
from dist_restore._base.regions import full_runs
from dist_restore._planning.reshard import dtensor_holders
from tests_multiprocess import _workers_dtensor as w
from tests_multiprocess._batch import Batch

pytestmark = pytest.mark.multiprocess

#: ``{world: [(name, kind, writer)]}``: the checkpoints saved once per module, in one spawn per
#: world; a name is ``f"{kind}{world}"``, plus ``_w`` when written by our CheckpointWriter.
_SAVES = {
    4: [("fsdp4", "fsdp", False), ("fsdp_tp4", "fsdp_tp", False), ("fsdp_tp4_w", "fsdp_tp", True),
        ("fsdp4_w", "fsdp", True), ("plain4", "plain", False)],
    2: [("fsdp2", "fsdp", False), ("tp2", "tp", False), ("plain2_w", "plain", True), ("fsdp2_w", "fsdp", True)],
}

#: Seconds for a test that may start spawns: the saves (two spawns) and a restore batch.
_SPAWNS_TIMEOUT = 600


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every checkpoint of ``_SAVES`` plus ``big`` (one large weight saved by rows on 2 ranks)
    and ``cols`` (the same by columns), by name; written once per module."""
    root = tmp_path_factory.mktemp("reshard")
    paths = {name: root / name for saves in _SAVES.values() for name, _k, _w in saves}
    paths |= {"big": root / "big", "cols": root / "cols"}
    batches = {world: Batch(world, timeout=300, pg_timeout=60) for world in _SAVES}
    for world, saves in _SAVES.items():
        for name, kind, writer in saves:
            batches[world].add(name, w.save, str(paths[name]), kind, writer)
    batches[2].add("big", w.save_big, str(paths["big"]))
    batches[2].add("cols", w.save_big, str(paths["cols"]), 1)
    for b in batches.values():
        b.check()  # raises here if a save failed
    return paths


def _broken(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="module")
def restored(saved: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[int, Batch]:
    """Every restore of the module, as named jobs of one :class:`Batch` per target world size
    (each spawns on first use). ``f"{src}>{kind}{world}"`` names a restore of checkpoint ``src``
    into a fresh ``kind`` model (``w.restore``); the damaged copies are made here."""
    root = tmp_path_factory.mktemp("reshard_broken")
    b = {world: Batch(world, timeout=360, pg_timeout=60) for world in (2, 3, 4)}

    def restore(src: str, kind: str, world: int) -> None:
        b[world].add(f"{src}>{kind}{world}", w.restore, str(saved[src]), kind)

    for src, kind, world in [("fsdp4", "fsdp", 2), ("fsdp4", "fsdp", 3), ("fsdp2", "fsdp", 4),
                             ("fsdp_tp4", "fsdp", 2), ("fsdp2", "fsdp_tp", 4), ("tp2", "fsdp", 2),
                             ("fsdp_tp4_w", "fsdp", 2), ("fsdp_tp4", "fsdp_tp", 4), ("plain2_w", "fsdp", 4),
                             ("plain4", "fsdp", 2), ("plain4", "fsdp", 3), ("plain4", "fsdp_tp", 2),
                             ("fsdp2", "tp", 2)]:
        restore(src, kind, world)
    b[2].add("full_targets", w.restore, str(saved["fsdp_tp4"]), "plain", "full")
    b[4].add("per_rank", w.restore, str(saved["fsdp2_w"]), "fsdp", "dtensor", ["extra.rank_value"])
    b[2].add("per_rank_prefix", w.restore, str(saved["fsdp4"]), "fsdp", "dtensor", "extra.")
    b[2].add("mismatch", w.restore_mismatch, str(saved["fsdp4"]))
    b[2].add("partial", w.restore_partial, str(saved["fsdp4"]))
    b[4].add("big", w.restore_big, str(saved["big"]))
    b[2].add("cols", w.restore_big, str(saved["cols"]))

    # a rank file listed in the manifest is missing
    missing = _broken(saved["fsdp4_w"], root / "missing")
    (missing / "checkpoint_3.pt").unlink()
    b[2].add("missing_file", w.restore_expect_error, str(missing), "fsdp")
    # no manifest, and rank file 2's data.pkl damaged
    corrupt = _broken(saved["fsdp4_w"], root / "corrupt")
    (corrupt / "dist_restore_manifest.json").unlink()
    data = bytearray((corrupt / "checkpoint_2.pt").read_bytes())
    at = data.find(b"data.pkl") + 60
    data[at:at + 16] = b"\xff" * 16  # inside data.pkl: its CRC32 no longer matches
    (corrupt / "checkpoint_2.pt").write_bytes(bytes(data))
    b[2].add("corrupt_file", w.restore_expect_error, str(corrupt), "fsdp")
    # no manifest, and the last rank file lost
    lost = _broken(saved["fsdp4"], root / "lost_last")
    (lost / "checkpoint_3.pt").unlink()
    b[2].add("lost_last", w.restore_expect_error, str(lost), "fsdp")
    # a flipped byte in a record split between ranks: first, middle, last byte
    for where in ("first", "middle", "last"):
        flipped = _broken(saved["fsdp2"], root / f"flip_{where}")
        _flip(flipped / "checkpoint_1.pt", "model.up.weight", where)
        b[4].add(f"flip_{where}", w.restore_expect_error, str(flipped), "fsdp")
    flipped = _broken(saved["fsdp_tp4"], root / "flip_2d")
    _flip(flipped / "checkpoint_3.pt", "model.down.weight", "middle")
    b[2].add("flip_2d", w.restore_expect_error, str(flipped), "fsdp")
    return b


def _check(out: list[dict], *, exact_bytes: bool = True) -> None:
    for r, o in enumerate(out):
        assert o["bad"] == [], f"rank {r}: {o['bad']}"
        assert o["step"] == 7
        if exact_bytes:  # only the bytes of its own shard (plus the plain entries src reads)
            assert o["bytes_read"] <= 1.1 * o["shard_bytes"] + 64, (r, o["bytes_read"], o["shard_bytes"])


@pytest.mark.timeout(_SPAWNS_TIMEOUT)
@pytest.mark.parametrize("src_kind,src_world,dst_kind,dst_world", [
    ("fsdp", 4, "fsdp", 2),        # shrink
    ("fsdp", 4, "fsdp", 3),        # uneven: 10 and 14 rows over 3 ranks
    ("fsdp", 2, "fsdp", 4),        # grow
    ("fsdp_tp", 4, "fsdp", 2),     # 2-D (_StridedShard) to 1-D
    ("fsdp", 2, "fsdp_tp", 4),     # 1-D to 2-D
    ("tp", 2, "fsdp", 2),          # same ranks, other placements
])
def test_reshard_bit_exact(restored, src_kind: str, src_world: int, dst_kind: str, dst_world: int) -> None:
    out = restored[dst_world].results(f"{src_kind}{src_world}>{dst_kind}{dst_world}")
    _check(out)
    if src_world != dst_world:
        assert "resharded: checkpoint written by" in out[0]["report"]
        assert f"taken from rank 0's file" in out[0]["report"]
    for r, o in enumerate(out):  # files holding bytes it needs, plus at most the one for the layout
        assert o["files_opened"] <= src_world


@pytest.mark.timeout(_SPAWNS_TIMEOUT)
def test_index_files_of_a_2d_checkpoint(saved, restored) -> None:
    """Our writer's index files describe DTensor entries exactly as their pickles do, and a
    resharding restore through them is bit exact."""
    path = saved["fsdp_tp4_w"]
    for r in range(4):
        f = path / f"checkpoint_{r}.pt"
        ix, ref = read_index(f), read_index(f, use_index_file=False)
        assert ix.source == "index file" and ref.source == "pickle"
        assert ix.entries == ref.entries  # layouts (placements, mesh, coordinate, groups) included
        assert any(e.kind == "dtensor" for e in ix)
        layouts = [e.layout for e in ref if e.kind == "dtensor"]  # what the saved-world check reads
        assert list(ix.dtensor_layouts()) == list(ref.dtensor_layouts()) == layouts
    # one index file tells every rank's region: its layouts record each mesh's rank map
    zero = read_index(path / "checkpoint_0.pt").entries
    others = [read_index(path / f"checkpoint_{r}.pt").entries for r in range(4)]
    for key, e in zero.items():
        if e.kind != "dtensor":
            continue
        held = {}
        for runs, holders in dtensor_holders(e.layout, full_runs(e.shape)):
            for file_rank, coord in holders:
                held[file_rank] = runs
        assert sorted(held) == [0, 1, 2, 3], key
        for r in range(4):
            mine = others[r][key].layout
            assert held[r] == mine.runs_at(mine.mesh.coordinate), (key, r)
    out = restored[2].results("fsdp_tp4_w>fsdp2")
    _check(out)


@pytest.mark.timeout(_SPAWNS_TIMEOUT)
def test_same_layout_reads_own_file_only(restored) -> None:
    out = restored[4].results("fsdp_tp4>fsdp_tp4")
    _check(out)
    assert [o["files_opened"] for o in out] == [1, 1, 1, 1]
    assert [o["bytes_read"] for o in out] == [o["shard_bytes"] for o in out]
    assert [float(o["rank_value"]) for o in out] == [0.0, 1.0, 2.0, 3.0]  # per-rank values: own file


@pytest.mark.timeout(_SPAWNS_TIMEOUT)
def test_dtensor_files_into_full_tensors_on_every_rank(saved, restored) -> None:
    path = saved["fsdp_tp4"]
    out = restored[2].results("full_targets")
    _check(out, exact_bytes=False)
    full = torch.load(path.parent / f"{path.name}_full.pt", weights_only=True)
    whole = sum(v.numel() * v.element_size() for k, v in full.items() if k.startswith(("model.", "optim.state"))
                and v.dim() > 0)
    for o in out:
        assert whole <= o["bytes_read"] <= whole + 64


@pytest.mark.timeout(_SPAWNS_TIMEOUT)  # the saves, if it runs first
def test_dtensor_files_into_full_tensors_in_one_process(saved) -> None:
    """No process group: one process consolidates every shard of every file."""
    from dist_restore import RestoreCoordinator

    path = saved["fsdp_tp4"]
    full = torch.load(path.parent / f"{path.name}_full.pt", weights_only=True)
    target = {"model": {k[len("model."):]: torch.zeros_like(v) for k, v in full.items() if k.startswith("model.")}}
    res = RestoreCoordinator().restore(path, target)
    for k, v in res.state_dict["model"].items():
        assert torch.equal(v, full[f"model.{k}"]), k
    assert res.stats.files_opened == 4


@pytest.mark.timeout(_SPAWNS_TIMEOUT)
def test_plain_full_files_into_dtensor_targets(restored) -> None:
    """A DDP-style checkpoint (whole tensors in every file) into FSDP2 shards: each rank
    reads only its slice."""
    # plain files by our writer (plain2_w): the manifest says how many ranks wrote them
    out = restored[4].results("plain2_w>fsdp4")
    _check(out)
    assert all(o["files_opened"] == 1 for o in out)


@pytest.mark.timeout(_SPAWNS_TIMEOUT)
def test_per_rank_entries_and_our_writer(restored) -> None:
    # fsdp2_w, written by CheckpointWriter: the manifest gives the world size
    out = restored[4].results("per_rank")
    _check(out)
    assert [float(o["rank_value"]) for o in out] == [0.0, 1.0, 2.0, 3.0]  # 2, 3: kept (missing)
    assert [o["missing"] for o in out] == [[], [], ["extra.rank_value"], ["extra.rank_value"]]
    assert "extra.rank_value  missing on ranks 2-3" in out[0]["report"]
    # a prefix written torch's way, with its separator: the same rules as shared=
    out = restored[2].results("per_rank_prefix")  # fsdp4 on 2 ranks
    assert [float(o["rank_value"]) for o in out] == [0.0, 1.0]
    assert all(o["step"] == 7 and o["missing"] == [] for o in out)


@pytest.mark.timeout(_SPAWNS_TIMEOUT)
def test_shape_mismatch_fails_every_rank_untouched(restored) -> None:
    out = restored[2].results("mismatch")
    for o in out:
        assert o["untouched"]
        assert "RestoreError" in o["error"] and "model.up.weight" in o["error"]
        assert "(14, 10) in checkpoint, (15, 10) in target" in o["error"]


@pytest.mark.timeout(_SPAWNS_TIMEOUT)
def test_partial_target_placement_is_refused(restored) -> None:
    out = restored[2].results("partial")
    for o in out:
        assert "'model.norm.bias'" in o["error"] and "Partial" in o["error"] and o["untouched"]


@pytest.mark.timeout(_SPAWNS_TIMEOUT)
def test_missing_and_corrupt_source_file_named_with_key(restored) -> None:
    """fsdp4_w on 2 ranks: without rank file 3 (listed in the manifest); then without the
    manifest and with rank file 2's data.pkl damaged (see ``restored``)."""
    out = restored[2].results("missing_file")
    assert "checkpoint_3.pt" in out[0]["error"] and "rank file listed in the commit manifest is missing" \
        in out[0]["error"]
    assert "holds part of 'model." in out[1]["error"]  # rank 1 needed file 3
    assert all(o["untouched"] for o in out)
    out = restored[2].results("corrupt_file")
    assert "checkpoint_2.pt" in out[1]["error"] and "holds part of" in out[1]["error"]
    assert all(o["untouched"] for o in out)


@pytest.mark.timeout(_SPAWNS_TIMEOUT)  # the saves, if it runs first
@pytest.mark.parametrize("writer", [False, True], ids=["torch.save", "own writer"])
def test_reader_indexes_dtensor_entries_like_torch_load(saved, writer: bool) -> None:
    """One process: the index's layout and local reads against torch.load of the same files
    (whole reads: through the pickle, or through the index file's tables)."""
    import torch.distributed.tensor  # noqa: F401 - torch.load needs it to allow DTensors

    from dist_restore import CheckpointReader, RankInfo

    path = saved["fsdp_tp4_w" if writer else "fsdp_tp4"]
    for rank in range(4):
        ref = torch.load(path / f"checkpoint_{rank}.pt", weights_only=True)
        reader = CheckpointReader(RankInfo(rank, 4))
        index = reader.index(path)
        sd, missing = reader.read(path)
        assert missing == []
        for key, v in ref["model"].items():
            e = index[f"model.{key}"]
            assert e.kind == "dtensor"
            assert e.shape == tuple(v.shape) and e.dtype == v.dtype
            assert e.local_shape == tuple(v.to_local().shape)
            assert e.layout.mesh.shape == tuple(v.device_mesh.shape)
            assert e.layout.mesh.dim_names == v.device_mesh.mesh_dim_names
            assert e.layout.mesh.coordinate == tuple(v.device_mesh.get_coordinate())
            assert [_plain(p) for p in e.layout.placements] == [_plain(p) for p in v.placements]
            got = sd["model"][key]
            assert type(got) is torch.Tensor and torch.equal(got, v.to_local())
        assert sd["optim"]["param_groups"] == ref["optim"]["param_groups"]
        assert torch.equal(sd["optim"]["state"][0]["step"], ref["optim"]["state"][0]["step"])



def _plain(p: object) -> tuple:
    """A placement, torch's or ours, as plain values (``_StridedShard`` first: it is a Shard)."""
    from torch.distributed.tensor.placement_types import Replicate, Shard, _StridedShard

    from dist_restore._base import regions as _regions

    if isinstance(p, _StridedShard):
        return ("shard", p.dim, p.split_factor)
    if isinstance(p, Shard):
        return ("shard", p.dim, 0)
    if isinstance(p, _regions.Shard):
        return ("shard", p.dim, p.split_factor)
    if isinstance(p, (Replicate, _regions.Replicate)):
        return ("replicate",)
    return ("other", repr(p))


@pytest.mark.timeout(_SPAWNS_TIMEOUT)  # the saves, if it runs first
def test_reader_fills_whole_tensors_from_every_file_and_checks_crc(saved, tmp_path: Path) -> None:
    """One process, no group: plain targets of the global shape are filled from all rank files;
    a record copied whole is CRC-checked, and a flipped byte names the file and the key."""
    import struct
    import zipfile

    from dist_restore import CheckpointReader, RankInfo
    from dist_restore.errors import CorruptCheckpointError

    path = saved["fsdp_tp4"]
    full = torch.load(path.parent / f"{path.name}_full.pt", weights_only=True)
    target = {"model": {k[len("model."):]: torch.zeros_like(v) for k, v in full.items() if k.startswith("model.")}}
    res = CheckpointReader(RankInfo(1, 4)).load(path, target)
    for k, v in res.state_dict["model"].items():
        assert torch.equal(v, full[f"model.{k}"]), k
    assert res.bytes_read == sum(v.numel() * v.element_size() for v in target["model"].values())
    # every byte read is checked; padded records (FSDP2 pads uneven shards) with their padding
    assert res.bytes_read <= res.bytes_verified
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    f = broken / "checkpoint_2.pt"
    from dist_restore._format.index import read_index

    index = read_index(f)  # a model entry whose record holds exactly its local shard
    entry = next(e for e in index if e.key.startswith("model.") and e.nbytes == index.records[e.storage_key].size)
    with zipfile.ZipFile(f) as z:
        info = next(i for i in z.infolist() if i.filename.endswith(f"/data/{entry.storage_key}"))
    data = bytearray(f.read_bytes())
    h = info.header_offset
    name_len, extra_len = struct.unpack("<HH", data[h + 26:h + 30])
    data[h + 30 + name_len + extra_len + 5] ^= 0xFF
    f.write_bytes(bytes(data))
    target = {"model": {k[len("model."):]: torch.zeros_like(v) for k, v in full.items() if k.startswith("model.")}}
    with pytest.raises(CorruptCheckpointError, match="CRC32 mismatch") as e:
        CheckpointReader(RankInfo(1, 4)).load(broken, target)
    assert "checkpoint_2.pt" in str(e.value) and e.value.key == entry.key


@pytest.mark.timeout(_SPAWNS_TIMEOUT)
def test_lost_last_file_without_manifest_is_not_a_smaller_world(restored) -> None:
    """No manifest: the saved mesh's rank map says 4 ranks saved; 3 files are not a 3-rank checkpoint."""
    out = restored[2].results("lost_last")  # fsdp4 without checkpoint_3.pt, on 2 ranks
    for o in out:
        assert "the saved DeviceMesh spans 4 ranks, but the checkpoint has 3 rank file(s)" in o["error"]
        assert o["untouched"]


@pytest.mark.timeout(_SPAWNS_TIMEOUT)
def test_large_pieces_by_the_io_pool(saved, restored, tmp_path: Path) -> None:
    """Pieces of 256 KiB and more go by the I/O pool (requests in flight, each CRC'd by its
    thread): grown 2 -> 4 (half a record each: not checkable) and read whole in one process
    (whole records: CRC-checked; a flipped byte names the file and the key)."""
    import struct
    import zipfile

    from dist_restore import CheckpointReader, RankInfo
    from dist_restore.errors import CorruptCheckpointError

    out = restored[4].results("big")  # saved by rows on 2 ranks, restored on 4
    piece = w.BIG[0] // 4 * w.BIG[1] * 4
    assert [o["ok"] for o in out] == [True] * 4
    assert [o["bytes_read"] for o in out] == [piece] * 4 and all(o["files_opened"] <= 2 for o in out)
    full = w._big_full()
    res = CheckpointReader(RankInfo(0, 2)).load(saved["big"], {"w": torch.zeros(*w.BIG)})
    assert torch.equal(res.state_dict["w"], full)
    assert res.bytes_read == res.bytes_verified == full.nbytes
    path = _broken(saved["big"], tmp_path / "big")
    f = path / "checkpoint_1.pt"
    with zipfile.ZipFile(f) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("/data/0"))
    data = bytearray(f.read_bytes())
    h = info.header_offset
    name_len, extra_len = struct.unpack("<HH", data[h + 26:h + 30])
    data[h + 30 + name_len + extra_len + 300_000] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="CRC32 mismatch") as e:
        CheckpointReader(RankInfo(0, 2)).load(path, {"w": torch.zeros(*w.BIG)})
    assert "checkpoint_1.pt" in str(e.value) and e.value.key == "w"


@pytest.mark.timeout(_SPAWNS_TIMEOUT)
def test_large_column_slices_by_the_io_pool(restored) -> None:
    """Saved split by columns, restored split by rows: each target row-block takes a column
    slice from every file (one iovec per row), 384 KiB per piece: by the I/O pool."""
    out = restored[2].results("cols")
    assert [o["ok"] for o in out] == [True, True]
    assert [o["bytes_read"] for o in out] == [w.BIG[0] // 2 * w.BIG[1] * 4] * 2


@pytest.mark.timeout(_SPAWNS_TIMEOUT)
def test_ddp_files_without_manifest_into_sharded_models(saved, restored) -> None:
    """DDP-style files from 4 ranks (every tensor whole in each, torch.save, no manifest) into
    FSDP2 at 2 and 3 ranks and FSDP2+TP at 2: one file is enough, whatever was lost; each rank
    reads its slice; the report says where the entries came from."""
    assert not (saved["plain4"] / "dist_restore_manifest.json").exists()
    for kind, world in (("fsdp", 2), ("fsdp", 3), ("fsdp_tp", 2)):
        out = restored[world].results(f"plain4>{kind}{world}")
        _check(out)
        assert "no commit manifest: the files hold no DTensor" in out[0]["report"], out[0]["report"]
        assert "taken from rank 0's file" in out[0]["report"]


def _flip(f: Path, key: str, where: str) -> None:
    """Flip one byte of ``key``'s storage record in rank file ``f``: its first, middle or last."""
    import struct
    import zipfile

    from dist_restore._format.index import read_index

    index = read_index(f)
    entry = index.entries[key]
    rec = index.records[entry.storage_key]
    with zipfile.ZipFile(f) as z:
        info = next(i for i in z.infolist() if i.filename.endswith(f"/data/{entry.storage_key}"))
    data = bytearray(f.read_bytes())
    h = info.header_offset
    name_len, extra_len = struct.unpack("<HH", data[h + 26:h + 30])
    at = {"first": 0, "middle": rec.size // 2, "last": rec.size - 1}[where]
    data[h + 30 + name_len + extra_len + at] ^= 0x01
    f.write_bytes(bytes(data))


@pytest.mark.timeout(_SPAWNS_TIMEOUT)
@pytest.mark.parametrize("src_kind,src_world,dst_kind,dst_world", [
    ("fsdp", 2, "fsdp", 4),        # grow: every record split in two
    ("fsdp", 4, "fsdp", 3),        # shrink, uneven: records split, padded shards
    ("fsdp_tp", 4, "fsdp", 2),     # 2-D sources (_StridedShard)
    ("fsdp", 2, "tp", 2),          # column slices: the column piece of every row
])
def test_split_records_are_checked_together(restored, src_kind: str, src_world: int, dst_kind: str,
                                            dst_world: int) -> None:
    """Records that no rank reads whole are checked from the ranks' pieces together: every
    byte read is verified. (The first three are the restores of ``test_reshard_bit_exact``.)"""
    out = restored[dst_world].results(f"{src_kind}{src_world}>{dst_kind}{dst_world}")
    _check(out)
    for o in out:
        assert o["bytes_verified"] >= o["bytes_read"], (o["bytes_verified"], o["bytes_read"])


@pytest.mark.timeout(_SPAWNS_TIMEOUT)
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_a_flipped_byte_in_a_split_record_fails_every_rank(restored, where: str) -> None:
    """FSDP2 saved on 2 ranks, restored on 4: every record is read half by one rank, half by
    another; a flipped byte anywhere in one fails the restore on every rank, naming file and key.
    (fsdp2 with a byte of ``model.up.weight`` flipped in checkpoint_1.pt: see ``restored``.)"""
    out = restored[4].results(f"flip_{where}")
    errors = {o["error"] for o in out}
    assert len(errors) == 1, errors
    err = errors.pop()
    assert "CRC32 mismatch" in err and "checkpoint_1.pt" in err and "'model.up.weight'" in err, err
    assert "phase 'read'" in err and "checked from the pieces the ranks read" in err


@pytest.mark.timeout(_SPAWNS_TIMEOUT)
def test_a_flipped_byte_in_a_2d_source_record_fails(restored) -> None:
    """fsdp_tp4 with a byte of ``model.down.weight`` flipped in checkpoint_3.pt, on 2 ranks."""
    out = restored[2].results("flip_2d")
    assert all("CRC32 mismatch" in o["error"] and "checkpoint_3.pt" in o["error"] for o in out), out
