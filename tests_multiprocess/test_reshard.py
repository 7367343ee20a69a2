"""Resharding on real FSDP2 / FSDP2+TP / TP models (gloo, CPU meshes): save at one world
size and layout, restore at another, compare every entry's ``full_tensor()`` bit for bit
with the values saved."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from dist_restore import read_index
from dist_restore._base.regions import full_runs
from dist_restore._planning.reshard import dtensor_holders
from tests_multiprocess import _workers_dtensor as w
from tests_multiprocess.harness import run_ranks

pytestmark = pytest.mark.multiprocess

_SAVED: dict[tuple[str, int, bool], Path] = {}


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory):
    """``saved(kind, world, writer=False)``: a checkpoint directory, written once per module."""
    root = tmp_path_factory.mktemp("reshard")

    def get(kind: str, world: int, writer: bool = False) -> Path:
        key = (kind, world, writer)
        if key not in _SAVED:
            path = root / f"{kind}{world}{'_w' if writer else ''}"
            run_ranks(w.save, world, args=(str(path), kind, writer), timeout=120)
            _SAVED[key] = path
        return _SAVED[key]

    yield get
    _SAVED.clear()


def _check(out: list[dict], *, exact_bytes: bool = True) -> None:
    for r, o in enumerate(out):
        assert o["bad"] == [], f"rank {r}: {o['bad']}"
        assert o["step"] == 7
        if exact_bytes:  # only the bytes of its own shard (plus the plain entries src reads)
            assert o["bytes_read"] <= 1.1 * o["shard_bytes"] + 64, (r, o["bytes_read"], o["shard_bytes"])


@pytest.mark.timeout(240)
@pytest.mark.parametrize("src_kind,src_world,dst_kind,dst_world", [
    ("fsdp", 4, "fsdp", 2),        # shrink
    ("fsdp", 4, "fsdp", 3),        # uneven: 10 and 14 rows over 3 ranks
    ("fsdp", 2, "fsdp", 4),        # grow
    ("fsdp_tp", 4, "fsdp", 2),     # 2-D (_StridedShard) to 1-D
    ("fsdp", 2, "fsdp_tp", 4),     # 1-D to 2-D
    ("tp", 2, "fsdp", 2),          # same ranks, other placements
])
def test_reshard_bit_exact(saved, src_kind: str, src_world: int, dst_kind: str, dst_world: int) -> None:
    path = saved(src_kind, src_world)
    out = run_ranks(w.restore, dst_world, args=(str(path), dst_kind), timeout=180)
    _check(out)
    if src_world != dst_world:
        assert "resharded: checkpoint written by" in out[0]["report"]
        assert f"taken from rank 0's file" in out[0]["report"]
    for r, o in enumerate(out):  # files holding bytes it needs, plus at most the one for the layout
        assert o["files_opened"] <= src_world


@pytest.mark.timeout(240)
def test_index_files_of_a_2d_checkpoint(saved) -> None:
    """Our writer's index files describe DTensor entries exactly as their pickles do, and a
    resharding restore through them is bit exact."""
    path = saved("fsdp_tp", 4, True)
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
    out = run_ranks(w.restore, 2, args=(str(path), "fsdp"), timeout=180)
    _check(out)


@pytest.mark.timeout(180)
def test_same_layout_reads_own_file_only(saved) -> None:
    path = saved("fsdp_tp", 4)
    out = run_ranks(w.restore, 4, args=(str(path), "fsdp_tp"), timeout=150)
    _check(out)
    assert [o["files_opened"] for o in out] == [1, 1, 1, 1]
    assert [o["bytes_read"] for o in out] == [o["shard_bytes"] for o in out]
    assert [float(o["rank_value"]) for o in out] == [0.0, 1.0, 2.0, 3.0]  # per-rank values: own file


@pytest.mark.timeout(180)
def test_dtensor_files_into_full_tensors_on_every_rank(saved) -> None:
    path = saved("fsdp_tp", 4)
    out = run_ranks(w.restore, 2, args=(str(path), "plain", "full"), timeout=150)
    _check(out, exact_bytes=False)
    full = torch.load(path.parent / f"{path.name}_full.pt", weights_only=True)
    whole = sum(v.numel() * v.element_size() for k, v in full.items() if k.startswith(("model.", "optim.state"))
                and v.dim() > 0)
    for o in out:
        assert whole <= o["bytes_read"] <= whole + 64


@pytest.mark.timeout(120)
def test_dtensor_files_into_full_tensors_in_one_process(saved) -> None:
    """No process group: one process consolidates every shard of every file."""
    from dist_restore import RestoreCoordinator

    path = saved("fsdp_tp", 4)
    full = torch.load(path.parent / f"{path.name}_full.pt", weights_only=True)
    target = {"model": {k[len("model."):]: torch.zeros_like(v) for k, v in full.items() if k.startswith("model.")}}
    res = RestoreCoordinator().restore(path, target)
    for k, v in res.state_dict["model"].items():
        assert torch.equal(v, full[f"model.{k}"]), k
    assert res.stats.files_opened == 4


@pytest.mark.timeout(180)
def test_plain_full_files_into_dtensor_targets(saved) -> None:
    """A DDP-style checkpoint (whole tensors in every file) into FSDP2 shards: each rank
    reads only its slice."""
    path = saved("plain", 2, True)  # plain files: the manifest says how many ranks wrote them
    out = run_ranks(w.restore, 4, args=(str(path), "fsdp"), timeout=150)
    _check(out)
    assert all(o["files_opened"] == 1 for o in out)


@pytest.mark.timeout(240)
def test_per_rank_entries_and_our_writer(saved) -> None:
    path = saved("fsdp", 2, True)  # CheckpointWriter: the manifest gives the world size
    out = run_ranks(w.restore, 4, args=(str(path), "fsdp", "dtensor", ["extra.rank_value"]), timeout=180)
    _check(out)
    assert [float(o["rank_value"]) for o in out] == [0.0, 1.0, 2.0, 3.0]  # 2, 3: kept (missing)
    assert [o["missing"] for o in out] == [[], [], ["extra.rank_value"], ["extra.rank_value"]]
    assert "extra.rank_value  missing on ranks 2-3" in out[0]["report"]
    # a prefix written torch's way, with its separator: the same rules as shared=
    out = run_ranks(w.restore, 2, args=(str(saved("fsdp", 4)), "fsdp", "dtensor", "extra."), timeout=150)
    assert [float(o["rank_value"]) for o in out] == [0.0, 1.0]
    assert all(o["step"] == 7 and o["missing"] == [] for o in out)


@pytest.mark.timeout(180)
def test_shape_mismatch_fails_every_rank_untouched(saved) -> None:
    out = run_ranks(w.restore_mismatch, 2, args=(str(saved("fsdp", 4)),), timeout=150)
    for o in out:
        assert o["untouched"]
        assert "RestoreError" in o["error"] and "model.up.weight" in o["error"]
        assert "(14, 10) in checkpoint, (15, 10) in target" in o["error"]


@pytest.mark.timeout(180)
def test_partial_target_placement_is_refused(saved) -> None:
    out = run_ranks(w.restore_partial, 2, args=(str(saved("fsdp", 4)),), timeout=150)
    for o in out:
        assert "'model.norm.bias'" in o["error"] and "Partial" in o["error"] and o["untouched"]


@pytest.mark.timeout(180)
def test_missing_and_corrupt_source_file_named_with_key(saved, tmp_path: Path) -> None:
    src = saved("fsdp", 4, True)
    broken = tmp_path / "broken"
    shutil.copytree(src, broken)
    (broken / "checkpoint_3.pt").unlink()
    out = run_ranks(w.restore_expect_error, 2, args=(str(broken), "fsdp"), timeout=150)
    assert "checkpoint_3.pt" in out[0]["error"] and "rank file listed in the commit manifest is missing" \
        in out[0]["error"]
    assert "holds part of 'model." in out[1]["error"]  # rank 1 needed file 3
    assert all(o["untouched"] for o in out)
    shutil.copy(src / "checkpoint_3.pt", broken / "checkpoint_3.pt")
    (broken / "dist_restore_manifest.json").unlink()
    data = bytearray((broken / "checkpoint_2.pt").read_bytes())
    at = data.find(b"data.pkl") + 60
    data[at:at + 16] = b"\xff" * 16  # inside data.pkl: its CRC32 no longer matches
    (broken / "checkpoint_2.pt").write_bytes(bytes(data))
    out = run_ranks(w.restore_expect_error, 2, args=(str(broken), "fsdp"), timeout=150)
    assert "checkpoint_2.pt" in out[1]["error"] and "holds part of" in out[1]["error"]
    assert all(o["untouched"] for o in out)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("writer", [False, True], ids=["torch.save", "own writer"])
def test_reader_indexes_dtensor_entries_like_torch_load(saved, writer: bool) -> None:
    """One process: the index's layout and local reads against torch.load of the same files
    (whole reads: through the pickle, or through the index file's tables)."""
    import torch.distributed.tensor  # noqa: F401 - torch.load needs it to allow DTensors

    from dist_restore import CheckpointReader, RankInfo

    path = saved("fsdp_tp", 4, writer)
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


@pytest.mark.timeout(120)
def test_reader_fills_whole_tensors_from_every_file_and_checks_crc(saved, tmp_path: Path) -> None:
    """One process, no group: plain targets of the global shape are filled from all rank files;
    a record copied whole is CRC-checked, and a flipped byte names the file and the key."""
    import struct
    import zipfile

    from dist_restore import CheckpointReader, RankInfo
    from dist_restore.errors import CorruptCheckpointError

    path = saved("fsdp_tp", 4)
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


@pytest.mark.timeout(180)
def test_lost_last_file_without_manifest_is_not_a_smaller_world(saved, tmp_path: Path) -> None:
    """No manifest: the saved mesh's rank map says 4 ranks saved; 3 files are not a 3-rank checkpoint."""
    broken = tmp_path / "broken"
    shutil.copytree(saved("fsdp", 4), broken)
    (broken / "checkpoint_3.pt").unlink()
    out = run_ranks(w.restore_expect_error, 2, args=(str(broken), "fsdp"), timeout=150)
    for o in out:
        assert "the saved DeviceMesh spans 4 ranks, but the checkpoint has 3 rank file(s)" in o["error"]
        assert o["untouched"]


@pytest.mark.timeout(180)
def test_large_pieces_by_the_io_pool(tmp_path: Path) -> None:
    """Pieces of 256 KiB and more go by the I/O pool (requests in flight, each CRC'd by its
    thread): grown 2 -> 4 (half a record each: not checkable) and read whole in one process
    (whole records: CRC-checked; a flipped byte names the file and the key)."""
    import struct
    import zipfile

    from dist_restore import CheckpointReader, RankInfo
    from dist_restore.errors import CorruptCheckpointError

    path = tmp_path / "big"
    run_ranks(w.save_big, 2, args=(str(path),), timeout=120)
    out = run_ranks(w.restore_big, 4, args=(str(path),), timeout=150)
    piece = w.BIG[0] // 4 * w.BIG[1] * 4
    assert [o["ok"] for o in out] == [True] * 4
    assert [o["bytes_read"] for o in out] == [piece] * 4 and all(o["files_opened"] <= 2 for o in out)
    full = w._big_full()
    res = CheckpointReader(RankInfo(0, 2)).load(path, {"w": torch.zeros(*w.BIG)})
    assert torch.equal(res.state_dict["w"], full)
    assert res.bytes_read == res.bytes_verified == full.nbytes
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


@pytest.mark.timeout(180)
def test_large_column_slices_by_the_io_pool(tmp_path: Path) -> None:
    """Saved split by columns, restored split by rows: each target row-block takes a column
    slice from every file (one iovec per row), 384 KiB per piece: by the I/O pool."""
    path = tmp_path / "cols"
    run_ranks(w.save_big, 2, args=(str(path), 1), timeout=120)
    out = run_ranks(w.restore_big, 2, args=(str(path),), timeout=150)
    assert [o["ok"] for o in out] == [True, True]
    assert [o["bytes_read"] for o in out] == [w.BIG[0] // 2 * w.BIG[1] * 4] * 2


@pytest.mark.timeout(300)
def test_ddp_files_without_manifest_into_sharded_models(saved) -> None:
    """DDP-style files from 4 ranks (every tensor whole in each, torch.save, no manifest) into
    FSDP2 at 2 and 3 ranks and FSDP2+TP at 2: one file is enough, whatever was lost; each rank
    reads its slice; the report says where the entries came from."""
    path = saved("plain", 4)
    assert not (path / "dist_restore_manifest.json").exists()
    for kind, world in (("fsdp", 2), ("fsdp", 3), ("fsdp_tp", 2)):
        out = run_ranks(w.restore, world, args=(str(path), kind), timeout=200)
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


@pytest.mark.timeout(300)
@pytest.mark.parametrize("src_kind,src_world,dst_kind,dst_world", [
    ("fsdp", 2, "fsdp", 4),        # grow: every record split in two
    ("fsdp", 4, "fsdp", 3),        # shrink, uneven: records split, padded shards
    ("fsdp_tp", 4, "fsdp", 2),     # 2-D sources (_StridedShard)
    ("fsdp", 2, "tp", 2),          # column slices: the column piece of every row
])
def test_split_records_are_checked_together(saved, src_kind: str, src_world: int, dst_kind: str,
                                            dst_world: int) -> None:
    """Records that no rank reads whole are checked from the ranks' pieces together: every
    byte read is verified."""
    out = run_ranks(w.restore, dst_world, args=(str(saved(src_kind, src_world)), dst_kind), timeout=200)
    _check(out)
    for o in out:
        assert o["bytes_verified"] >= o["bytes_read"], (o["bytes_verified"], o["bytes_read"])


@pytest.mark.timeout(400)
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_a_flipped_byte_in_a_split_record_fails_every_rank(saved, tmp_path: Path, where: str) -> None:
    """FSDP2 saved on 2 ranks, restored on 4: every record is read half by one rank, half by
    another; a flipped byte anywhere in one fails the restore on every rank, naming file and key."""
    broken = tmp_path / "broken"
    shutil.copytree(saved("fsdp", 2), broken)
    _flip(broken / "checkpoint_1.pt", "model.up.weight", where)
    out = run_ranks(w.restore_expect_error, 4, args=(str(broken), "fsdp"), timeout=200)
    errors = {o["error"] for o in out}
    assert len(errors) == 1, errors
    err = errors.pop()
    assert "CRC32 mismatch" in err and "checkpoint_1.pt" in err and "'model.up.weight'" in err, err
    assert "phase 'read'" in err and "checked from the pieces the ranks read" in err


@pytest.mark.timeout(300)
def test_a_flipped_byte_in_a_2d_source_record_fails(saved, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(saved("fsdp_tp", 4), broken)
    _flip(broken / "checkpoint_3.pt", "model.down.weight", "middle")
    out = run_ranks(w.restore_expect_error, 2, args=(str(broken), "fsdp"), timeout=200)
    assert all("CRC32 mismatch" in o["error"] and "checkpoint_3.pt" in o["error"] for o in out), out
