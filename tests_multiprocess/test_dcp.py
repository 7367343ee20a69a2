"""Restoring ``torch.distributed.checkpoint`` (DCP) directories with our coordinator (issue #21).

Checkpoints are written by ``dcp.save`` from real plain / FSDP2 / TP / FSDP2+TP models on 1, 2
and 4 gloo ranks (``get_state_dict`` model + optimizer state, plus plain ints), then restored
at other world sizes and layouts. The oracle is ``dcp.load`` into an identically built second
target on the same ranks: every tensor's ``full_tensor()`` must be bit-identical and every
non-tensor leaf equal (see ``_workers_dcp.restore``). Damaged checkpoints (a flipped data
byte, a truncated or missing ``.distcp``, a ``.metadata`` pickle that runs code) must raise the
same ``RestoreError`` on every rank and leave the targets untouched.

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
from tests_multiprocess.harness import run_ranks

pytestmark = pytest.mark.multiprocess

#: Restore with ours (the default), or with dcp.load (``DR_DCP_ORACLE_ONLY=1``: validates the workers).
_OURS = os.environ.get("DR_DCP_ORACLE_ONLY", "") != "1"
_needs_ours = pytest.mark.skipif(not _OURS, reason="DR_DCP_ORACLE_ONLY=1: dcp.load only")

#: The checkpoints written once per module: ``{world: layouts}``, named ``f"{layout}{world}"``.
_SAVES = {1: ["fsdp"], 2: ["fsdp", "tp", "plain"], 4: ["fsdp", "fsdp_tp"]}

#: The item whose data byte is flipped: read whole when fsdp2 is restored as fsdp on 2 ranks.
_FLIP_KEY = "model.model.norm.weight"

#: Per source chunk a rank may read besides tensor data: one zip local header of the
#: ``torch.save`` archive DCP writes per item (30 fixed bytes + the record name
#: ``archive/data/0`` + up to 63 bytes of alignment padding, <= 128 in all) to find where
#: the data starts.
_HEADER_SLACK = 128


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every checkpoint of ``_SAVES``, written by ``dcp.save`` (one ``run_ranks`` per world)."""
    root = tmp_path_factory.mktemp("dcp")
    out: dict[str, Path] = {}
    for world, layouts in _SAVES.items():
        jobs = [(str(root / f"{layout}{world}"), layout) for layout in layouts]
        run_ranks(w.save_many, world, args=(jobs,), timeout=150)
        out |= {f"{layout}{world}": root / f"{layout}{world}" for layout in layouts}
    return out


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


def _run(ckpts: dict[str, Path], world: int, jobs: list[tuple[str, str, bool]], timeout: float) -> None:
    """Restore each ``(checkpoint name, target layout, partial)`` on ``world`` ranks; check."""
    full = [(ckpts[name], layout, partial) for name, layout, partial in jobs]
    outs = run_ranks(w.restore_many, world, args=([(str(p), lay, part) for p, lay, part in full], _OURS),
                     timeout=timeout, pg_timeout=60)
    _check(outs, full)


@pytest.mark.timeout(240)
def test_restore_on_2_ranks(ckpts: dict[str, Path]) -> None:
    """Shrink fsdp 4 -> 2; 2-D (dp x tp, ``_StridedShard``) fsdp_tp 4 -> 1-D fsdp 2; plain
    tensors saved once (deduplicated onto one rank's file) -> fsdp 2; a target that misses a
    saved key and asks for two unsaved ones (dotted keys in ``missing``/``unexpected``)."""
    _run(ckpts, 2, [("fsdp4", "fsdp", False), ("fsdp_tp4", "fsdp", False), ("plain2", "fsdp", False),
                    ("fsdp2", "fsdp", True)], timeout=200)


@pytest.mark.timeout(240)
def test_restore_on_4_ranks_grow(ckpts: dict[str, Path]) -> None:
    """Grow fsdp 2 -> 4 (each rank reads about its shard's bytes, not the 2x larger saved
    shards); fsdp 2 -> fsdp_tp 4 (1-D to 2-D)."""
    _run(ckpts, 4, [("fsdp2", "fsdp", False), ("fsdp2", "fsdp_tp", False)], timeout=200)


@pytest.mark.timeout(240)
def test_restore_on_3_ranks_uneven(ckpts: dict[str, Path]) -> None:
    """fsdp 1 -> 3 and tp 2 -> fsdp 3 (column shards of the row-parallel weights and
    replicated norms into uneven row shards: 250 and 96 rows over 3 ranks)."""
    _run(ckpts, 3, [("fsdp1", "fsdp", False), ("tp2", "fsdp", False)], timeout=200)


@pytest.mark.timeout(120)
def test_restore_single_process_without_group(ckpts: dict[str, Path]) -> None:
    """fsdp 2 -> a plain model in one process with no process group: every tensor whole."""
    full = [(ckpts["fsdp2"], "plain", False)]
    outs = run_ranks(w.restore, 1, args=(str(full[0][0]), "plain", _OURS), timeout=100,
                     init_process_group=False)
    _check([[o] for o in outs], full)


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
def damaged(ckpts: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Copies of fsdp2, each damaged one way; ``file``: the file each case names."""
    root = tmp_path_factory.mktemp("dcp_damaged")
    src = ckpts["fsdp2"]

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
def errors(damaged: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Ours on each damaged copy into fresh fsdp targets on 2 ranks (one ``run_ranks``):
    ``{case: [outcome per rank]}``."""
    if not _OURS:
        pytest.skip("DR_DCP_ORACLE_ONLY=1: dcp.load only")
    outs = run_ranks(w.restore_expect_errors, 2, args=([(str(damaged[c]), "fsdp") for c in _CASES],),
                     timeout=200, pg_timeout=60)
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


@pytest.mark.timeout(240)
@_needs_ours
def test_flipped_data_byte_raises_everywhere(errors: dict[str, Any], damaged: dict[str, Any]) -> None:
    """The item is read whole, so its zip CRC32 is checked: the error names file and key.

    Not ``untouched``: bytes go straight into the targets and are checked as they are read
    (the read phase), so a failed check leaves targets partly written, as for ``torch.save``
    checkpoints (README: targets are untouched until every rank has validated its plan; a
    CRC32 mismatch can only be found by reading). The restore still fails on every rank."""
    _same_error_everywhere(errors["flipped"], damaged["file"]["flipped"], repr(_FLIP_KEY), "CRC32",
                           "phase 'read'", untouched=False)


@pytest.mark.timeout(240)
@_needs_ours
def test_truncated_distcp_raises_everywhere(errors: dict[str, Any], damaged: dict[str, Any]) -> None:
    _same_error_everywhere(errors["truncated"], damaged["file"]["truncated"])


@pytest.mark.timeout(240)
@_needs_ours
def test_missing_distcp_raises_everywhere(errors: dict[str, Any], damaged: dict[str, Any]) -> None:
    _same_error_everywhere(errors["missing"], damaged["file"]["missing"])


@pytest.mark.timeout(240)
@_needs_ours
def test_malicious_metadata_is_refused_unrun(errors: dict[str, Any], damaged: dict[str, Any]) -> None:
    msg = _same_error_everywhere(errors["malicious"], ".metadata")
    assert "unsafe" in msg.lower(), msg
    assert not damaged["marker"].exists(), "the .metadata pickle ran"


@pytest.mark.timeout(30)
def test_dcp_metadata_is_a_plain_pickle(ckpts: dict[str, Path], tmp_path: Path) -> None:
    """Why ours must not unpickle ``.metadata`` freely: DCP's own reader runs the payload."""
    marker = tmp_path / "ran"
    _malicious_metadata(ckpts["fsdp2"], tmp_path / "ck", marker)
    _metadata(tmp_path / "ck")
    assert marker.exists()


_SPLIT_KEY = "model.model.embed_tokens.weight"


@pytest.mark.timeout(300)
@_needs_ours
def test_flipped_byte_in_a_record_split_between_ranks(ckpts: dict[str, Path], tmp_path: Path) -> None:
    """Grow fsdp 2 -> 4: the embedding's first saved chunk (rows 0-124) is read in two pieces by
    ranks 0 and 1, neither holding the whole record; its CRC32 is still checked, from the pieces'
    shares. A flipped byte at the start, the middle or the end of the record fails every rank,
    naming the file and the key; the intact checkpoint verifies every byte each rank read."""
    src = ckpts["fsdp2"]
    fname, start, size = _item_data_span(src, _SPLIT_KEY, 0)
    jobs = []
    for name, at in (("first", start), ("middle", start + size // 2), ("last", start + size - 1)):
        d = tmp_path / name
        shutil.copytree(src, d)
        with open(d / fname, "r+b") as f:
            f.seek(at)
            b = f.read(1)
            f.seek(at)
            f.write(bytes([b[0] ^ 0x10]))
        jobs.append((str(d), "fsdp"))
    outs = run_ranks(w.restore_expect_errors, 4, args=(jobs,), timeout=250, pg_timeout=60)
    for i in range(len(jobs)):
        _same_error_everywhere([per_rank[i] for per_rank in outs], fname, repr(_SPLIT_KEY), "CRC32",
                               "phase 'read'", untouched=False)
    # (that the intact checkpoint verifies every byte each rank read: test_restore_on_4_ranks_grow)
