"""Restoring ``torch.distributed.checkpoint`` (DCP) directories with our coordinator (issue #21).

Checkpoints are written by ``dcp.save`` from real plain / FSDP2 / TP / FSDP2+TP models on 1, 2
and 4 gloo ranks (``get_state_dict`` model + optimizer state, plus plain ints), then restored
at other world sizes and layouts. The oracle is ``dcp.load`` into an identically built second
target on the same ranks: every tensor's ``full_tensor()`` must be bit-identical and every
non-tensor leaf equal (see ``_workers_dcp.restore``). Damaged checkpoints (a flipped data
byte, a truncated or missing ``.distcp``, a ``.metadata`` pickle that runs code) must raise the
same ``RestoreError`` on every rank and leave the targets untouched.

Starting ranks is what costs here, so the module starts them five times, each spawn running
several jobs (see :class:`~tests_multiprocess._batch.Batch`): 2 ranks save fsdp2, tp2 and
plain2 (``saved2``); 4 ranks save fsdp4 and fsdp_tp4 and restore the 2-rank checkpoints grown
(``on4``); 1 rank restores with no process group, then saves fsdp1 in a group of its own
(``on1``); 2 and 3 ranks restore the rest (``on2``, ``on3``). Each test checks its own job's results.

``DR_DCP_ORACLE_ONLY=1`` runs the restore tests with ``dcp.load`` in place of ours (dcp.load
against dcp.load): a check of the workers and the comparison themselves, which needs no
feature; the tests that only make sense for ours are skipped then.
"""

from __future__ import annotations

import io
import os
import pickle
import shutil
import struct
import zipfile
from pathlib import Path
from typing import Any

import pytest

from tests_multiprocess import _workers_dcp as w
from tests_multiprocess._batch import Batch

pytestmark = pytest.mark.multiprocess

#: Restore with ours (the default), or with dcp.load (``DR_DCP_ORACLE_ONLY=1``: validates the workers).
_OURS = os.environ.get("DR_DCP_ORACLE_ONLY", "") != "1"
_needs_ours = pytest.mark.skipif(not _OURS, reason="DR_DCP_ORACLE_ONLY=1: dcp.load only")

#: The checkpoints written once per module: ``{world: layouts}``, named ``f"{layout}{world}"``
#: (1: by ``on1``, 2: by ``saved2``, 4: by ``on4``).
_SAVES = {1: ["fsdp"], 2: ["fsdp", "tp", "plain"], 4: ["fsdp", "fsdp_tp"]}

#: The restores of each test, ``(checkpoint name, target layout, partial)``, by target world size.
_RESTORES = {
    2: [("fsdp4", "fsdp", False), ("fsdp_tp4", "fsdp", False), ("plain2", "fsdp", False), ("fsdp2", "fsdp", True)],
    4: [("fsdp2", "fsdp", False), ("fsdp2", "fsdp_tp", False)],
    3: [("fsdp1", "fsdp", False), ("tp2", "fsdp", False)],
}

#: Seconds for a test that may start spawns (up to three: the saves, and the ones it reads from).
_SPAWNS_TIMEOUT = 600

#: The item whose data byte is flipped: read whole when fsdp2 is restored as fsdp on 2 ranks.
_FLIP_KEY = "model.model.norm.weight"

#: Per source chunk a rank may read besides tensor data: one zip local header of the
#: ``torch.save`` archive DCP writes per item (30 fixed bytes + the record name
#: ``archive/data/0`` + up to 63 bytes of alignment padding, <= 128 in all) to find where
#: the data starts.
_HEADER_SLACK = 128


@pytest.fixture(scope="module")
def saved2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The directory of every checkpoint (``root / name``); fsdp2, tp2 and plain2 saved in it
    by ``dcp.save`` on 2 ranks (one spawn)."""
    root = tmp_path_factory.mktemp("dcp")
    b = Batch(2, timeout=200, pg_timeout=60)
    for layout in _SAVES[2]:
        b.add(f"{layout}2", w.save, str(root / f"{layout}2"), layout)
    b.check()
    return root


def _restore_job(b: Batch, root: Path) -> None:
    """Queue job ``restore``: every restore of ``_RESTORES[b.world]`` (ours, or dcp.load alone)."""
    b.add("restore", w.restore_many, [(str(root / name), lay, part) for name, lay, part in _RESTORES[b.world]], _OURS)


def _check_restores(b: Batch, root: Path) -> None:
    _check(b.results("restore"), [(root / name, lay, part) for name, lay, part in _RESTORES[b.world]])


@pytest.fixture(scope="module")
def on4(saved2: Path) -> Batch:
    """One spawn of 4 ranks: save fsdp4 and fsdp_tp4 (``dcp.save``), then job ``restore`` (the 2-rank
    checkpoint grown, ``_RESTORES[4]``) and job ``split_flips`` (see
    ``test_flipped_byte_in_a_record_split_between_ranks``)."""
    b = Batch(4, timeout=300, pg_timeout=60)
    for layout in _SAVES[4]:
        b.add(f"save {layout}4", w.save, str(saved2 / f"{layout}4"), layout)
    _restore_job(b, saved2)
    if _OURS:
        b.add("split_flips", w.restore_expect_errors, [(str(d), "fsdp") for d in _split_flips(saved2)])
    b.run()
    for layout in _SAVES[4]:
        b.results(f"save {layout}4")
    return b


@pytest.fixture(scope="module")
def on1(saved2: Path) -> Batch:
    """One rank, no process group: job ``restore``, fsdp2 into a plain model; then save fsdp1
    (FSDP2 on a 1-rank mesh) in a process group of its own."""
    b = Batch(1, timeout=150, init_process_group=False)
    b.add("restore", w.restore, str(saved2 / "fsdp2"), "plain", _OURS)
    b.add("save fsdp1", w.save_in_own_group, str(saved2 / "fsdp1"), "fsdp")
    b.results("save fsdp1")
    return b


@pytest.fixture(scope="module")
def on2(saved2: Path, on4: Batch, damaged: dict[str, Any]) -> Batch:
    """One spawn of 2 ranks (after ``on4``: it reads fsdp4 and fsdp_tp4): job ``restore``
    (``_RESTORES[2]``), then job ``errors``: ours on each damaged copy (``_CASES``) into fresh
    fsdp targets."""
    b = Batch(2, timeout=300, pg_timeout=60)
    _restore_job(b, saved2)
    if _OURS:
        b.add("errors", w.restore_expect_errors, [(str(damaged[c]), "fsdp") for c in _CASES])
    return b


@pytest.fixture(scope="module")
def on3(saved2: Path, on1: Batch) -> Batch:
    """One spawn of 3 ranks (after ``on1``: it reads fsdp1): job ``restore`` (``_RESTORES[3]``)."""
    b = Batch(3, timeout=200, pg_timeout=60)
    _restore_job(b, saved2)
    return b


def _metadata(path: Path) -> Any:
    from torch.distributed.checkpoint import FileSystemReader

    return FileSystemReader(str(path)).read_metadata()


def _read_slack(path: Path) -> int:
    """What a rank may read besides ``1.1 x`` its shard's bytes: every non-tensor item
    (``param_groups`` values, ``train.*``: each a whole ``torch.save`` archive of ~1.3 KB,
    needed by every rank), plus a zip local header for each saved tensor chunk (an upper
    bound on the chunks one rank's shards overlap)."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    md = _metadata(path)
    objects = sum(info.length for idx, info in md.storage_data.items()
                  if isinstance(md.state_dict_metadata[idx.fqn], BytesStorageMetadata))
    chunks = sum(len(m.chunks) for m in md.state_dict_metadata.values() if not isinstance(m, BytesStorageMetadata))
    return objects + _HEADER_SLACK * chunks


def _check(outs: list[list[dict[str, Any]]], jobs: list[tuple[Path, str, bool]]) -> None:
    """Every rank, every job: restored bit for bit as dcp.load does, in place; nothing missing
    or unexpected but what a ``partial`` target asks for differently."""
    for r, per_rank in enumerate(outs):
        for (path, layout, partial), o in zip(jobs, per_rank):
            where = (r, path.name, layout, partial)
            assert o["bad"] == [], (where, o["bad"])
            assert o["params_bad"] == [], (where, o["params_bad"])
            # a key the checkpoint lacks keeps the target's value; every other one had to change
            assert o["same_before"] == (["extra.new"] if partial else []), (where, "equal before", o["same_before"])
            assert o["not_in_place"] == [], (where, "not filled in place", o["not_in_place"])
            # 21 params x (param, step, exp_avg, exp_avg_sq); 12 param_groups values + 2 in train
            assert (o["n_tensors"], o["n_objects"]) == ((85, 14) if partial else (84, 14)), where
            objs = o["objects"]
            assert objs["train.step"] == 7, (where, objs)
            assert objs.get("train.epoch") == (None if partial else 2), (where, objs)
            assert objs["optim.param_groups.0.lr"] == w.SAVED["lr"], (where, objs)
            assert objs["optim.param_groups.0.betas"] == w.SAVED["betas"], (where, objs)
            if partial:
                assert objs["train.not_saved"] == 5, (where, objs)
            if _OURS:  # dcp.load reports neither
                keys = (sorted(o["missing"]), sorted(o["unexpected"]))
                assert keys == ((["extra.new", "train.not_saved"], ["train.epoch"]) if partial else ([], [])), \
                    (where, keys)
                # every tensor byte read is CRC-checked: whole records, or split ones from the pieces
                if not partial:
                    assert o["bytes_verified"] >= o["shard_bytes"], (where, o["bytes_verified"], o["shard_bytes"])
                bound = 1.1 * o["shard_bytes"] + _read_slack(path)
                assert o["bytes_read"] <= bound, (where, o["bytes_read"], o["shard_bytes"], bound)
                assert (o["report"] is not None) == (r == 0), where
                if r == 0:
                    assert o["report"].strip(), where


@pytest.mark.timeout(_SPAWNS_TIMEOUT)
def test_restore_on_2_ranks(saved2: Path, on2: Batch) -> None:
    """Shrink fsdp 4 -> 2; 2-D (dp x tp, ``_StridedShard``) fsdp_tp 4 -> 1-D fsdp 2; plain
    tensors saved once (deduplicated onto one rank's file) -> fsdp 2; a target that misses a
    saved key and asks for two unsaved ones (dotted keys in ``missing``/``unexpected``)."""
    _check_restores(on2, saved2)


@pytest.mark.timeout(_SPAWNS_TIMEOUT)
def test_restore_on_4_ranks_grow(saved2: Path, on4: Batch) -> None:
    """Grow fsdp 2 -> 4 (each rank reads about its shard's bytes, not the 2x larger saved
    shards); fsdp 2 -> fsdp_tp 4 (1-D to 2-D)."""
    _check_restores(on4, saved2)


@pytest.mark.timeout(_SPAWNS_TIMEOUT)
def test_restore_on_3_ranks_uneven(saved2: Path, on3: Batch) -> None:
    """fsdp 1 -> 3 and tp 2 -> fsdp 3 (column shards of the row-parallel weights and
    replicated norms into uneven row shards: 250 and 96 rows over 3 ranks)."""
    _check_restores(on3, saved2)


@pytest.mark.timeout(_SPAWNS_TIMEOUT)
def test_restore_single_process_without_group(saved2: Path, on1: Batch) -> None:
    """fsdp 2 -> a plain model in one process with no process group: every tensor whole."""
    _check([on1.results("restore")], [(saved2 / "fsdp2", "plain", False)])


# --- damaged checkpoints ------------------------------------------------------------------


def _item_data_span(path: Path, key: str, offset0: int) -> tuple[str, int, int]:
    """``(file, absolute offset, size)`` of the tensor data of ``key``'s chunk at global
    offset ``offset0`` (first dim). DCP writes each tensor item as a whole ``torch.save``
    archive, so the data is the ``archive/data/0`` record inside it (the item ends with the
    zip's central directory, not with data)."""
    md = _metadata(path)
    info = next(i for idx, i in md.storage_data.items() if idx.fqn == key and idx.offset[0] == offset0)
    with open(path / info.relative_path, "rb") as f:
        f.seek(info.offset)
        item = f.read(info.length)
    rec = next(z for z in zipfile.ZipFile(io.BytesIO(item)).infolist() if z.filename.endswith("/data/0"))
    name_len, extra_len = struct.unpack("<HH", item[rec.header_offset + 26:rec.header_offset + 30])
    start = rec.header_offset + 30 + name_len + extra_len
    return info.relative_path, info.offset + start, rec.file_size


class _RunsCode:
    """Pickles as a call of ``builtins.exec`` that creates ``marker``: what a hostile
    ``.metadata`` can do to any reader that unpickles it with ``pickle.load``."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def _malicious_metadata(src: Path, dst: Path, marker: Path) -> None:
    """A copy of ``src`` whose ``.metadata`` is the real one with the payload in a field."""
    shutil.copytree(src, dst)
    md = _metadata(src)
    md.planner_data = {"payload": _RunsCode(marker), **(md.planner_data or {})}
    (dst / ".metadata").write_bytes(pickle.dumps(md))


@pytest.fixture(scope="module")
def damaged(saved2: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Copies of fsdp2, each damaged one way; ``file``: the file each case names."""
    root = tmp_path_factory.mktemp("dcp_damaged")
    src = saved2 / "fsdp2"

    flipped = root / "flipped"
    shutil.copytree(src, flipped)
    fname, start, size = _item_data_span(src, _FLIP_KEY, 0)
    with open(flipped / fname, "r+b") as f:
        f.seek(start + size - 2)  # near the end of the data: a float's exponent byte
        b = f.read(1)
        f.seek(start + size - 2)
        f.write(bytes([b[0] ^ 0x01]))

    truncated = root / "truncated"
    shutil.copytree(src, truncated)
    with open(truncated / "__1_0.distcp", "r+b") as f:
        f.truncate((truncated / "__1_0.distcp").stat().st_size // 2)

    missing = root / "missing"
    shutil.copytree(src, missing)
    (missing / "__0_0.distcp").unlink()

    marker = root / "pwned"
    _malicious_metadata(src, root / "malicious", marker)
    return {"flipped": flipped, "truncated": truncated, "missing": missing, "malicious": root / "malicious",
            "marker": marker, "file": {"flipped": fname, "truncated": "__1_0.distcp", "missing": "__0_0.distcp"}}


_CASES = ["flipped", "truncated", "missing", "malicious"]


@pytest.fixture(scope="module")
def errors(on2: Batch) -> dict[str, list[dict[str, Any]]]:
    """Ours on each damaged copy into fresh fsdp targets on 2 ranks (``on2``'s job ``errors``):
    ``{case: [outcome per rank]}``."""
    if not _OURS:
        pytest.skip("DR_DCP_ORACLE_ONLY=1: dcp.load only")
    outs = on2.results("errors")
    return {c: [per_rank[i] for per_rank in outs] for i, c in enumerate(_CASES)}


def _same_error_everywhere(outcomes: list[dict[str, Any]], *needles: str, untouched: bool = True) -> str:
    """One ``RestoreError`` text on every rank, containing ``needles``; with ``untouched``, a
    plan-phase failure that left every target leaf as it was."""
    for r, o in enumerate(outcomes):
        assert o["type"] == "RestoreError", (r, o["type"], o["error"])
        if untouched:
            assert o["changed"] == [], (r, "target changed by a failed restore", o["changed"])
    msgs = {o["error"] for o in outcomes}
    assert len(msgs) == 1, msgs
    msg = msgs.pop()
    for needle in needles + (("phase 'plan'",) if untouched else ()):
        assert needle in msg, (needle, msg)
    return msg


@pytest.mark.timeout(_SPAWNS_TIMEOUT)
@_needs_ours
def test_flipped_data_byte_raises_everywhere(errors: dict[str, Any], damaged: dict[str, Any]) -> None:
    """The item is read whole, so its zip CRC32 is checked: the error names file and key.

    Not ``untouched``: bytes go straight into the targets and are checked as they are read
    (the read phase), so a failed check leaves targets partly written, as for ``torch.save``
    checkpoints (README: targets are untouched until every rank has validated its plan; a
    CRC32 mismatch can only be found by reading). The restore still fails on every rank."""
    _same_error_everywhere(errors["flipped"], damaged["file"]["flipped"], repr(_FLIP_KEY), "CRC32",
                           "phase 'read'", untouched=False)


@pytest.mark.timeout(_SPAWNS_TIMEOUT)
@_needs_ours
def test_truncated_distcp_raises_everywhere(errors: dict[str, Any], damaged: dict[str, Any]) -> None:
    _same_error_everywhere(errors["truncated"], damaged["file"]["truncated"])


@pytest.mark.timeout(_SPAWNS_TIMEOUT)
@_needs_ours
def test_missing_distcp_raises_everywhere(errors: dict[str, Any], damaged: dict[str, Any]) -> None:
    _same_error_everywhere(errors["missing"], damaged["file"]["missing"])


@pytest.mark.timeout(_SPAWNS_TIMEOUT)
@_needs_ours
def test_malicious_metadata_is_refused_unrun(errors: dict[str, Any], damaged: dict[str, Any]) -> None:
    msg = _same_error_everywhere(errors["malicious"], ".metadata")
    assert "unsafe" in msg.lower(), msg
    assert not damaged["marker"].exists(), "the .metadata pickle ran"


@pytest.mark.timeout(_SPAWNS_TIMEOUT)  # the saves, if it runs first
def test_dcp_metadata_is_a_plain_pickle(saved2: Path, tmp_path: Path) -> None:
    """Why ours must not unpickle ``.metadata`` freely: DCP's own reader runs the payload."""
    marker = tmp_path / "ran"
    _malicious_metadata(saved2 / "fsdp2", tmp_path / "ck", marker)
    _metadata(tmp_path / "ck")
    assert marker.exists()


_SPLIT_KEY = "model.model.embed_tokens.weight"


#: Where the split record's byte is flipped, one damaged copy each.
_SPLIT_FLIPS = ("first", "middle", "last")


def _split_flips(root: Path) -> list[Path]:
    """Copies of fsdp2 (in ``root``), one per ``_SPLIT_FLIPS``: a byte at the start, the middle or
    the end of the data of ``_SPLIT_KEY``'s first saved chunk flipped."""
    src = root / "fsdp2"
    fname, start, size = _item_data_span(src, _SPLIT_KEY, 0)
    dirs = []
    for name, at in zip(_SPLIT_FLIPS, (start, start + size // 2, start + size - 1)):
        d = root / f"split_flip_{name}"
        shutil.copytree(src, d)
        with open(d / fname, "r+b") as f:
            f.seek(at)
            b = f.read(1)
            f.seek(at)
            f.write(bytes([b[0] ^ 0x10]))
        dirs.append(d)
    return dirs


@pytest.mark.timeout(_SPAWNS_TIMEOUT)
@_needs_ours
def test_flipped_byte_in_a_record_split_between_ranks(saved2: Path, on4: Batch) -> None:
    """Grow fsdp 2 -> 4: the embedding's first saved chunk (rows 0-124) is read in two pieces by
    ranks 0 and 1, neither holding the whole record; its CRC32 is still checked, from the pieces'
    shares. A flipped byte at the start, the middle or the end of the record fails every rank,
    naming the file and the key (``on4``'s job ``split_flips``, on the copies of ``_split_flips``);
    the intact checkpoint verifies every byte each rank read."""
    fname, _start, _size = _item_data_span(saved2 / "fsdp2", _SPLIT_KEY, 0)
    outs = on4.results("split_flips")
    for i in range(len(_SPLIT_FLIPS)):
        _same_error_everywhere([per_rank[i] for per_rank in outs], fname, repr(_SPLIT_KEY), "CRC32",
                               "phase 'read'", untouched=False)
    # (that the intact checkpoint verifies every byte each rank read: test_restore_on_4_ranks_grow)
