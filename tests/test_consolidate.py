"""``consolidate`` on plain ``torch.save`` rank files (no DTensor; those are in
``tests_multiprocess/test_consolidate.py``), its writers, and ``dist-restore consolidate``.

Oracles: ``torch.load(weights_only=True)`` of rank 0's file (a plain checkpoint consolidates
to rank 0's state dict, nesting, types and storage sharing included), ``safetensors``'s own
loader, Python's ``zipfile`` (CRC32s), and our reader.
"""

from __future__ import annotations

import collections
import io
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch

from dist_restore import consolidate, read_index

from dist_restore._format import torchzip as _torchzip
from dist_restore._format.index import iter_leaves
from dist_restore._base.regions import Box
from dist_restore._bytes.segments import Segment, box_segments
from dist_restore._format.unpickle import StorageRef, TensorRef
from dist_restore.cli import main
from dist_restore import IncompleteCheckpointError
from dist_restore.errors import CorruptCheckpointError

pytestmark = pytest.mark.timeout(60)


def _state() -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 8, generator=g)
    model = collections.OrderedDict(w=base, w_t=base.t(), row=base[2], tied=base)  # views of one storage
    model._metadata = collections.OrderedDict({"": {"version": 2}})  # type: ignore[attr-defined]
    return {
        "model": model,
        "p": torch.nn.Parameter(torch.arange(4.0)),
        "dtypes": {str(dt): torch.arange(5).to(dt) for dt in
                   (torch.bfloat16, torch.float16, torch.int64, torch.int8, torch.bool, torch.uint16,
                    torch.float8_e4m3fn)},
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 3),
        "opt": {"state": {0: {"step": torch.tensor(7.0)}}, "param_groups": [{"lr": 0.1, "params": [0]}]},
        "sizes": (torch.Size([2, 3]), [1, 2.5, "x", None]),
        "nothing": {},
    }


def _write(d: Path, world: int = 2, sd: dict[str, Any] | None = None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for r in range(world):
        torch.save(sd if sd is not None else _state(), d / f"checkpoint_{r}.pt")
    return d


def _same(a: Any, b: Any, where: str = "") -> None:
    """Equal values, container types, nesting and tensor types/dtypes/strides."""
    assert type(a) is type(b), (where, type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride(), where
        assert a.requires_grad == b.requires_grad, where
        assert torch.equal(a.view(torch.uint8) if a.dtype.is_floating_point and a.itemsize == 1 else a,
                           b.view(torch.uint8) if b.dtype.is_floating_point and b.itemsize == 1 else b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        assert getattr(a, "__dict__", {}) == getattr(b, "__dict__", {}), where  # _metadata
        for k in a:
            _same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)) and not isinstance(a, torch.Size):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


# -------------------------------------------------------------------------------- torch format


@pytest.mark.parametrize("zip64", [False, True])
def test_torch_output_is_rank0s_state_dict(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, zip64: bool) -> None:
    if zip64:  # every size and offset through zip64 fields (as a > 4 GiB file would have them)
        monkeypatch.setattr(_torchzip, "_ZIP64_AT", 1)
    d = _write(tmp_path / "ck")
    out = tmp_path / "full.pt"
    res = consolidate(d, out)
    want = torch.load(d / "checkpoint_0.pt", weights_only=True)
    got = torch.load(out, weights_only=True)
    _same(got, want)
    m = got["model"]  # views of one storage stay views of one storage
    assert m["w"].untyped_storage().data_ptr() == m["w_t"].untyped_storage().data_ptr() == \
        m["row"].untyped_storage().data_ptr()
    _same(torch.load(out, weights_only=True, mmap=True), want)  # records aligned for mmap
    assert zipfile.ZipFile(out).testzip() is None  # every CRC32 right
    assert len(read_index(out)) == len(read_index(d / "checkpoint_0.pt"))
    assert res.file_bytes == out.stat().st_size and res.rank_files == 2
    assert res.bytes_copied == res.bytes_read  # plain records: copied file to file
    assert res.tensors == sum(1 for e in read_index(d / "checkpoint_0.pt") if e.kind == "tensor")


def test_same_input_same_bytes_apart_from_serialization_id(tmp_path: Path) -> None:
    d = _write(tmp_path / "ck")
    consolidate(d, tmp_path / "a.pt")
    consolidate(d, tmp_path / "b.pt")
    za, zb = zipfile.ZipFile(tmp_path / "a.pt"), zipfile.ZipFile(tmp_path / "b.pt")
    names = [n for n in za.namelist() if not n.endswith("serialization_id")]
    assert names == [n for n in zb.namelist() if not n.endswith("serialization_id")]
    assert all(za.read(n) == zb.read(n) for n in names)


def test_keys_select_entries_and_prune_containers(tmp_path: Path) -> None:
    d = _write(tmp_path / "ck")
    consolidate(d, tmp_path / "m.pt", keys="model")
    got = torch.load(tmp_path / "m.pt", weights_only=True)
    assert list(got) == ["model"] and list(got["model"]) == ["w", "w_t", "row", "tied"]
    consolidate(d, tmp_path / "g.pt", keys=["*.step", "opt.param_groups[[]0].lr"])
    got = torch.load(tmp_path / "g.pt", weights_only=True)
    assert got == {"opt": {"state": {0: {"step": torch.tensor(7.0)}}, "param_groups": [{"lr": 0.1}]}}
    with pytest.raises(ValueError, match="select no entry"):
        consolidate(d, tmp_path / "none.pt", keys="nope")
    assert not (tmp_path / "none.pt").exists()


# -------------------------------------------------------------------------------- safetensors


def test_safetensors_output_matches_the_flat_state_dict(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    sd = _state()
    del sd["dtypes"]["torch.uint16"]  # safetensors' torch loader knows it, older ones do not
    d = _write(tmp_path / "ck", sd=sd)
    out = tmp_path / "full.safetensors"
    res = consolidate(d, out, format="safetensors")
    got = load_file(out)
    want = {k: v for k, _p, v in iter_leaves(torch.load(d / "checkpoint_0.pt", weights_only=True))
            if isinstance(v, torch.Tensor)}
    assert list(got) == list(want)  # dotted keys, in pickle order
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        assert torch.equal(got[k].float(), v.float()), k  # model.w_t: a transposed view, made contiguous
    assert "opt.param_groups[0].lr" in res.skipped and "sizes[1][2]" in res.skipped
    with open(out, "rb") as f:  # the header is padded to 8 bytes, as safetensors writes it
        assert int.from_bytes(f.read(8), "little") % 8 == 0


def test_safetensors_refuses_a_dtype_it_has_no_name_for(tmp_path: Path) -> None:
    d = _write(tmp_path / "ck", sd={"c": torch.zeros(2, dtype=torch.complex64)})
    with pytest.raises(ValueError, match=r"key 'c'.*complex64"):
        consolidate(d, tmp_path / "x.safetensors", format="safetensors")
    assert os.listdir(tmp_path) == ["ck"]


# -------------------------------------------------------------------------------- segments


def _ref(key: str, rows: int, cols: int, *, stride: tuple[int, int] | None = None) -> TensorRef:
    return TensorRef(StorageRef(key, torch.float32, rows * cols, "cpu"), torch.float32, 0, (rows, cols),
                     stride or (cols, 1))


def test_box_segments_concatenate_row_shards_and_refuse_column_shards() -> None:
    offsets = {(0, "a"): 100, (1, "b"): 200}
    sizes = {(0, "a"): 3 * 4 * 4, (1, "b"): 2 * 4 * 4}
    rows = [(1, _ref("b", 2, 4), [Box((0, 0), (3, 0), (2, 4))]), (0, _ref("a", 3, 4), [Box((0, 0), (0, 0), (3, 4))])]
    segs = box_segments((5, 4), 4, rows, lambda f, k: offsets[(f, k)], lambda f, k: sizes[(f, k)])
    assert segs == [Segment(0, 100, 48, "a", True), Segment(1, 200, 32, "b", True)]
    half = [(0, _ref("a", 3, 4), [Box((1, 0), (0, 0), (2, 4))])]  # part of a record: no CRC of its own
    assert box_segments((2, 4), 4, half, lambda f, k: 100, lambda f, k: 48) == [Segment(0, 116, 32, "a", False)]
    cols = [(0, _ref("a", 5, 2), [Box((0, 0), (0, 0), (5, 2))]), (1, _ref("b", 5, 2), [Box((0, 0), (0, 2), (5, 2))])]
    assert box_segments((5, 4), 4, cols, lambda f, k: 0, lambda f, k: 40) is None
    gap = [(0, _ref("a", 3, 4), [Box((0, 0), (0, 0), (3, 4))])]
    assert box_segments((5, 4), 4, gap, lambda f, k: 0, lambda f, k: 48) is None
    transposed = [(0, _ref("a", 4, 5, stride=(1, 4)), [Box((0, 0), (0, 0), (4, 5))])]
    assert box_segments((4, 5), 4, transposed, lambda f, k: 0, lambda f, k: 80) is None


# -------------------------------------------------------------------------------- errors


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(["consolidate", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dist-restore: error: "), err
    return lines[0]


def test_cli_writes_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = _write(tmp_path / "ck")
    rc, out, err = _cli(capsys, str(d), str(tmp_path / "o.safetensors"))
    assert rc == 0, err
    assert "wrote" in out and "(safetensors" in out and "left out" in out
    assert err == ""  # no progress line when stderr is not a terminal
    rc, out, err = _cli(capsys, str(d), str(tmp_path / "o.pt"), "--quiet")
    assert (rc, out, err) == (0, "", "")
    _same(torch.load(tmp_path / "o.pt", weights_only=True), torch.load(d / "checkpoint_0.pt", weights_only=True))


def test_cli_progress_on_a_terminal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    d = _write(tmp_path / "ck")
    err = Tty()
    monkeypatch.setattr(sys, "stderr", err)
    assert main(["consolidate", str(d), str(tmp_path / "o.pt")]) == 0
    text = err.getvalue()
    assert "\rconsolidate: " in text and "tensors" in text and "(100%)" in text


def test_cli_refuses_an_existing_output_unless_forced(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = _write(tmp_path / "ck")
    out = tmp_path / "o.pt"
    out.write_bytes(b"keep me")
    rc, _, err = _cli(capsys, str(d), str(out))
    assert rc == 1 and "output file exists" in _one_error_line(err) and "--force" in err
    assert out.read_bytes() == b"keep me"
    rc, _, err = _cli(capsys, str(d), str(out), "--force")
    assert rc == 0, err
    assert torch.load(out, weights_only=True)["scalar"] == 3.5
    rc, _, err = _cli(capsys, str(d), str(d / "checkpoint_1.pt"), "--force")
    assert rc == 1 and "would replace a file of the checkpoint" in _one_error_line(err)
    rc, _, err = _cli(capsys, str(d), str(tmp_path / "no" / "such" / "dir.pt"))
    assert rc == 1 and "output directory does not exist" in _one_error_line(err)


def test_cli_missing_truncated_and_uncommitted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = _write(tmp_path / "ck", world=3)
    out = str(tmp_path / "o.pt")
    (d / "checkpoint_1.pt").unlink()
    rc, _, err = _cli(capsys, str(d), out)
    assert rc == 1 and "incomplete checkpoint" in _one_error_line(err) and "rank 1 has no file" in err

    d = _write(tmp_path / "ck2")
    data = (d / "checkpoint_0.pt").read_bytes()
    (d / "checkpoint_0.pt").write_bytes(data[: len(data) // 2])
    rc, _, err = _cli(capsys, str(d), out)
    line = _one_error_line(err)
    assert rc == 1 and "checkpoint_0.pt" in line and "rank 0" in line and "truncated or corrupt" in line

    d = _write(tmp_path / "ck3")
    (d / ".checkpoint_1.pt.123.abcd.tmp").write_bytes(b"")
    rc, _, err = _cli(capsys, str(d), out)
    assert rc == 1 and "temp files present" in _one_error_line(err)
    assert not Path(out).exists()


def test_a_failure_midway_leaves_no_output_and_no_temp_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A CRC32 mismatch in a record read late: the output never appears, the temp file goes."""
    d = _write(tmp_path / "ck", sd={"a": torch.zeros(1000), "b": torch.arange(1000.0)})
    index = read_index(d / "checkpoint_0.pt")
    rec = index.records[next(e for e in index if e.key == "b").storage_key]
    with open(d / "checkpoint_0.pt", "rb") as f:
        import mmap

        off = index.data_offset(rec.name.rsplit("/", 1)[1], mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
    with open(d / "checkpoint_0.pt", "r+b") as f:
        f.seek(off + 100)
        byte = f.read(1)
        f.seek(off + 100)
        f.write(bytes([byte[0] ^ 0xFF]))
    outdir = tmp_path / "out"
    outdir.mkdir()
    rc, _, err = _cli(capsys, str(d), str(outdir / "o.pt"))
    line = _one_error_line(err)
    assert rc == 1 and "CRC32 mismatch" in line and "key 'b'" in line and "rank 0" in line
    assert os.listdir(outdir) == []
    with pytest.raises(CorruptCheckpointError):
        consolidate(d, outdir / "o.safetensors", format="safetensors")
    assert os.listdir(outdir) == []
    consolidate(d, outdir / "o.pt", verify=False)  # without the check, the damaged bytes go through
    assert torch.load(outdir / "o.pt", weights_only=True)["b"][25] != 25.0


def test_no_rank_files_and_bad_arguments(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(IncompleteCheckpointError, match="no rank files"):
        consolidate(tmp_path / "empty", tmp_path / "o.pt")
    with pytest.raises(ValueError, match="format"):
        consolidate(tmp_path / "empty", tmp_path / "o.pt", format="npz")  # type: ignore[arg-type]


def test_module_entry_point_exit_codes(tmp_path: Path) -> None:
    d = _write(tmp_path / "ck")
    cmd = [sys.executable, "-m", "dist_restore", "consolidate", str(d), str(tmp_path / "o.pt")]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 0, p.stderr
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and "output file exists" in p.stderr
