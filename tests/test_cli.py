"""The ``dist-restore`` command line: ``inspect`` and ``verify`` through ``main([...])``.

Checkpoints are small real ``torch.save`` files; one test runs ``python -m dist_restore``
in a subprocess and checks its exit code.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dist_restore import _cli_verify, cli, read_index
from dist_restore._format.manifest import MANIFEST_NAME, Manifest, RankFileInfo, file_checksum, write_manifest
from dist_restore.cli import main

pytestmark = pytest.mark.timeout(60)

WORLD = 3
SHARED_KEYS = ["shared.emb", "shared.ln.w", "shared.ln.b"]


def _save_checkpoint(directory: Path, world: int = WORLD) -> Path:
    """``world`` rank files: a replicated ``shared`` subtree, per-rank ``local`` data of
    per-rank shapes (so that it does not look replicated), and a few plain values."""
    directory.mkdir(parents=True, exist_ok=True)
    shared = {"emb": torch.arange(40, dtype=torch.float32).reshape(10, 4),
              "ln": {"w": torch.ones(4, dtype=torch.bfloat16), "b": torch.zeros(4, dtype=torch.float16)}}
    for r in range(world):
        torch.save({
            "shared": shared,
            "local": {"w": torch.full((r + 1, 3), float(r)), "ids": torch.arange(r + 2)},
            "step": 1234,
            "opt": [{"lr": 0.5, "name": "adam"}],
        }, directory / f"checkpoint_{r}.pt")
    return directory


def _commit(directory: Path, world: int = WORLD) -> None:
    """Write the manifest the way dist_restore's writer does, from the files as they are now."""
    infos = [RankFileInfo(r, f"checkpoint_{r}.pt", (directory / f"checkpoint_{r}.pt").stat().st_size,
                          file_checksum(directory / f"checkpoint_{r}.pt")) for r in range(world)]
    write_manifest(directory, Manifest.create(infos, {"step": 1234}))


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def _lines_with(text: str, *words: str) -> list[str]:
    return [ln for ln in text.splitlines() if all(w in ln for w in words)]


def _keys(text: str) -> list[str]:
    """The dotted keys that start the table rows of ``text``."""
    return [m.group(1) for m in re.finditer(r"^  ([\w]+(?:\.\w+|\[\d+\])+)  ", text, re.M)]


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    return _save_checkpoint(tmp_path / "ckpt")


# ---------------------------------------------------------------------------------- inspect


def test_inspect_lists_entries_totals_and_replicated(ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = _run(capsys, "inspect", str(ckpt))
    assert rc == 0, err
    for r in range(WORLD):
        assert _lines_with(out, f"rank {r}:", f"checkpoint_{r}.pt")
        # per-rank entry: dtype, shape and bytes on one line
        assert _lines_with(out, "local.w", "float32", f"[{r + 1}, 3]", str((r + 1) * 3 * 4))
        assert _lines_with(out, "local.ids", "int64", f"[{r + 2}]", str((r + 2) * 8))
    assert len(_lines_with(out, "shared.emb", "float32", "[10, 4]", "160")) == WORLD + 1  # + replicated
    assert _lines_with(out, "shared.ln.w", "bfloat16", "[4]", "8")
    assert _lines_with(out, "step", "int", "1234")  # non-tensors: Python type and repr
    assert _lines_with(out, "opt[0].name", "str", "'adam'")
    rank0_tensor_bytes = 160 + 8 + 8 + 12 + 16
    assert _lines_with(out, "total: 5 tensors", f"{rank0_tensor_bytes} bytes")

    rep = out[out.index("replicated across all 3 rank files"):]
    assert _keys(rep) == SHARED_KEYS
    assert "176 bytes" in rep.splitlines()[0]  # 160 + 8 + 8 per rank
    assert "352 bytes" in rep  # read by one rank instead of three: 2 x 176 fewer
    assert "shared=['shared']" in rep
    assert "\r" not in err


def test_inspect_is_aligned(ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = _run(capsys, "inspect", str(ckpt), "--rank", "0")
    assert rc == 0
    table = [ln for ln in out.splitlines() if ln.startswith("  ") and not ln.startswith("  total")]
    header = table[0]
    col = header.index("dtype/type")
    for ln in table[1:]:
        assert ln[col - 2 : col] == "  " and ln[col] != " ", ln  # every dtype starts in the column


def test_inspect_rank_and_keys_filters(ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = _run(capsys, "inspect", str(ckpt), "--rank", "2")
    assert rc == 0
    assert "rank 2:" in out and "rank 0:" not in out and "rank 1:" not in out
    assert "replicated: not computed (--rank given" in out

    rc, out, _ = _run(capsys, "inspect", str(ckpt), "--keys", "shared.ln")  # a prefix
    assert rc == 0
    assert _keys(out) == ["shared.ln.w", "shared.ln.b"] * WORLD + ["shared.ln.w", "shared.ln.b"]
    assert "2 shown" in out

    # a prefix written as torch writes them, with the separator: the same entries
    rc, out2, _ = _run(capsys, "inspect", str(ckpt), "--keys", "shared.ln.")
    assert rc == 0 and out2 == out

    rc, out, _ = _run(capsys, "inspect", str(ckpt), "--keys", "*.w", "--rank", "1")  # a glob
    assert rc == 0 and _keys(out) == ["shared.ln.w", "local.w"]

    rc, _, err = _run(capsys, "inspect", str(ckpt), "--rank", "7")
    assert rc == 1 and "checkpoint_7.pt" in err and "0-2" in err

    rc, _, err = _run(capsys, "inspect", str(ckpt), "--keys", ".")  # a usage error, not a traceback
    assert rc == 2 and "empty" in err


def test_inspect_json(ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _commit(ckpt)
    rc, out, _ = _run(capsys, "inspect", str(ckpt), "--json")
    assert rc == 0
    doc = json.loads(out)
    assert [rd["rank"] for rd in doc["ranks"]] == [0, 1, 2]
    by_key = {e["key"]: e for e in doc["ranks"][1]["entries"]}
    assert by_key["local.w"] == {"key": "local.w", "kind": "tensor", "dtype": "float32",
                                 "shape": [2, 3], "nbytes": 24}
    assert by_key["step"]["kind"] == "object" and by_key["step"]["type"] == "int"
    assert by_key["step"]["repr"] == "1234"
    assert [e["key"] for e in doc["replicated"]] == SHARED_KEYS
    assert doc["replicated_nbytes"] == 176
    assert doc["suggested_shared"] == ["shared"]
    assert doc["manifest"]["world_size"] == WORLD and doc["manifest"]["metadata"] == {"step": 1234}

    rc, out, _ = _run(capsys, "inspect", str(ckpt), "--json", "--rank", "0", "--keys", "local")
    doc = json.loads(out)
    assert [e["key"] for e in doc["ranks"][0]["entries"]] == ["local.w", "local.ids"]
    assert doc["replicated"] is None


def test_inspect_suggests_the_shortest_replicated_prefixes(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    for r in range(2):
        torch.save({"model": {"tied": {"a": torch.zeros(2), "b": torch.zeros(3)}, "mine": torch.zeros(r + 1),
                              "layers": [{"w": torch.zeros(4), "b": torch.zeros(r + 1)}]}},
                   tmp_path / f"checkpoint_{r}.pt")
    rc, out, _ = _run(capsys, "inspect", str(tmp_path), "--json")
    assert rc == 0
    assert json.loads(out)["suggested_shared"] == ["model.tied", "model.layers[0].w"]


def test_inspect_reads_no_tensor_data(ckpt: Path, capsys: pytest.CaptureFixture[str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    def no_load(*a: object, **k: object) -> None:
        raise AssertionError("inspect must not torch.load")

    monkeypatch.setattr(torch, "load", no_load)
    assert main(["inspect", str(ckpt)]) == 0
    capsys.readouterr()


def test_inspect_unreadable_rank_and_usage_errors(ckpt: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    f = ckpt / "checkpoint_1.pt"
    f.write_bytes(f.read_bytes()[:100])
    rc, out, err = _run(capsys, "inspect", str(ckpt))
    assert rc == 1
    assert "rank 1: checkpoint_1.pt" in err and "rank 0:" in out  # the others are still listed
    assert "replicated: not computed (a rank file is unreadable)" in out

    assert _run(capsys, "inspect", str(tmp_path / "nope"))[0] == 2
    assert _run(capsys, "inspect", str(ckpt), "--rank", "-1")[0] == 2
    assert _run(capsys, "frobnicate", str(ckpt))[0] == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, _, err = _run(capsys, "inspect", str(empty))
    assert rc == 1 and "no rank files" in err


def test_python_m_inspect_subprocess(ckpt: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(cli.__file__).parents[1])}
    proc = subprocess.run([sys.executable, "-m", "dist_restore", "inspect", str(ckpt), "--keys", "shared"],
                          capture_output=True, text=True, timeout=50, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "replicated across all 3 rank files" in proc.stdout
    assert "shared.emb" in proc.stdout and "local.w" not in proc.stdout


# ----------------------------------------------------------------------------------- verify


def test_verify_good_without_manifest(ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = _run(capsys, "verify", str(ckpt))
    assert rc == 0, out
    assert "manifest: none" in out and "world size inferred from the rank files (3)" in out
    assert "verify: OK, 3 rank files" in out
    assert len(_lines_with(out, "checkpoint_", "ok (8 entries)")) == WORLD
    assert "\r" not in err  # no progress bar: stderr is not a terminal


def test_verify_good_with_manifest(ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _commit(ckpt)
    rc, out, _ = _run(capsys, "verify", str(ckpt))
    assert rc == 0, out
    assert f"manifest: {MANIFEST_NAME} (format 1, world size 3" in out
    assert len(_lines_with(out, "checkpoint_", "ok", "ok", "ok (8 entries)")) == WORLD


def test_verify_truncated_rank_file(ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = ckpt / "checkpoint_1.pt"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    rc, out, _ = _run(capsys, "verify", str(ckpt))
    assert rc == 1
    problems = _lines_with(out, "rank 1: checkpoint_1.pt: parse:")
    assert len(problems) == 1, out
    assert "verify: FAILED, 1 problem" in out


def test_verify_reports_every_problem(ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _commit(ckpt)
    (ckpt / "checkpoint_2.pt").unlink()
    f = ckpt / "checkpoint_0.pt"
    f.write_bytes(f.read_bytes()[:-10])
    (ckpt / ".checkpoint_1.pt.123.abcdef01.tmp").write_bytes(b"x")
    (ckpt / "checkpoint_5.pt").write_bytes((ckpt / "checkpoint_1.pt").read_bytes())
    rc, out, _ = _run(capsys, "verify", str(ckpt))
    assert rc == 1
    assert _lines_with(out, "rank 2: checkpoint_2.pt: missing:")
    assert _lines_with(out, "rank 0: checkpoint_0.pt: size:", "the manifest says")
    assert _lines_with(out, "rank 0: checkpoint_0.pt: parse:")
    assert "verify: FAILED, 3 problems" in out
    # with a manifest the checkpoint is committed: a leftover temp file or a rank file
    # beyond its world size is only a note
    notes = out[out.index("notes (2):"):out.index("problems")]
    assert _lines_with(notes, "-: .checkpoint_1.pt.123.abcdef01.tmp: temp:")
    assert _lines_with(notes, "rank 5: checkpoint_5.pt: extra:")


def test_verify_missing_rank_with_manifest_json(ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _commit(ckpt)
    (ckpt / "checkpoint_1.pt").unlink()
    rc, out, _ = _run(capsys, "verify", str(ckpt), "--json")
    assert rc == 1
    doc = json.loads(out)
    assert doc["ok"] is False and doc["world_size"] == WORLD
    assert doc["problems"] == [{"rank": 1, "file": "checkpoint_1.pt", "check": "missing",
                                "message": "rank file not found (listed in the manifest)"}]
    assert [(r["rank"], r["exists"], r["checksum"], r["parse"]) for r in doc["ranks"]] == [
        (0, True, "ok", "ok"), (1, False, "n/a", "n/a"), (2, True, "ok", "ok")]
    assert doc["manifest"]["world_size"] == WORLD


def test_verify_without_manifest_missing_rank_and_temp_file(ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (ckpt / "checkpoint_1.pt").unlink()
    (ckpt / ".checkpoint_1.pt.99.0badf00d.tmp").write_bytes(b"")
    rc, out, _ = _run(capsys, "verify", str(ckpt))
    assert rc == 1
    assert _lines_with(out, "rank 1: checkpoint_1.pt: missing:")
    assert _lines_with(out, "-: .checkpoint_1.pt.99.0badf00d.tmp: temp:")


def test_verify_flipped_bit(ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _commit(ckpt)
    f = ckpt / "checkpoint_2.pt"
    off = read_index(f)["shared.emb"].file_offset
    assert off is not None
    data = bytearray(f.read_bytes())
    data[off + 5] ^= 0x10  # inside the tensor's bytes: the size does not change
    f.write_bytes(bytes(data))

    rc, out, _ = _run(capsys, "verify", str(ckpt))
    assert rc == 1
    assert _lines_with(out, "rank 2: checkpoint_2.pt: checksum:", "checksum mismatch")
    assert "verify: FAILED, 1 problem" in out  # the file still parses: only the checksum fails

    # Documented limitation: without the checksum only the structure is checked (zip
    # directory, data.pkl CRC, unpickle), and tensor bytes are not read: verify passes.
    rc, out, _ = _run(capsys, "verify", str(ckpt), "--no-checksum")
    assert rc == 0, out
    assert "checksums: skipped (--no-checksum)" in out
    assert len(_lines_with(out, "checkpoint_", "ok", "skipped", "ok (8 entries)")) == WORLD


def test_verify_json_good(ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = _run(capsys, "verify", str(ckpt), "--json")
    assert rc == 0
    doc = json.loads(out)
    assert doc["ok"] is True and doc["problems"] == [] and doc["manifest"] is None
    assert [(r["rank"], r["parse"], r["entries"]) for r in doc["ranks"]] == [(r, "ok", 8) for r in range(WORLD)]


def test_verify_bad_manifest_and_empty_dir(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (ckpt / MANIFEST_NAME).write_text("{not json")
    rc, out, _ = _run(capsys, "verify", str(ckpt))
    assert rc == 1 and _lines_with(out, f"-: {MANIFEST_NAME}: manifest:", "not JSON")
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, out, _ = _run(capsys, "verify", str(empty))
    assert rc == 1 and "no rank files" in out


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_verify_progress_only_on_a_terminal(ckpt: Path, capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    _commit(ckpt)
    tty = _Tty()
    monkeypatch.setattr(sys, "stderr", tty)
    monkeypatch.setattr(_cli_verify._Progress, "DELAY", 0.0)
    assert main(["verify", str(ckpt)]) == 0
    text = tty.getvalue()
    assert "\r" in text and "verify [" in text and "checksum rank 2" in text
    assert "3/3 " in text
    assert text.endswith("\r") and "\n" not in text  # the line is cleared, nothing else printed
    capsys.readouterr()


def test_inspect_says_which_ranks_were_indexed_by_an_index_file(tmp_path: Path, ckpt: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    from dist_restore import CheckpointWriter, RankInfo

    CheckpointWriter(RankInfo(0, 1)).write(tmp_path / "own", {"w": torch.ones(2, 3), "step": 5})
    rc, out, _ = _run(capsys, "inspect", str(tmp_path / "own"))
    assert rc == 0 and "2 entries, indexed by its index file)" in out
    rc, out, _ = _run(capsys, "inspect", str(tmp_path / "own"), "--json")
    assert json.loads(out)["ranks"][0]["index_source"] == "index file"
    rc, out, _ = _run(capsys, "inspect", str(ckpt), "--json")  # plain torch.save files
    assert {rd["index_source"] for rd in json.loads(out)["ranks"]} == {"pickle"}


def test_safetensors_file_and_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """One ``.safetensors`` file is a checkpoint too (inspect, verify); verify of a directory of
    shards parses every header, reporting each damaged file, then the index against them."""
    save_file = pytest.importorskip("safetensors.torch").save_file
    d = tmp_path / "hf"
    d.mkdir()
    save_file({"a": torch.randn(4, 3), "b": torch.arange(5)}, d / "model-00001-of-00002.safetensors")
    save_file({"c": torch.ones(2, dtype=torch.bfloat16)}, d / "model-00002-of-00002.safetensors")
    wm = {"a": "model-00001-of-00002.safetensors", "b": "model-00001-of-00002.safetensors",
          "c": "model-00002-of-00002.safetensors"}
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    one = d / "model-00002-of-00002.safetensors"
    rc, out, err = _run(capsys, "inspect", str(one))
    assert rc == 0 and f"safetensors checkpoint {one}: 1 file(s), 1 tensors" in out, err
    rc, out, err = _run(capsys, "verify", str(one))
    assert rc == 0 and "verify: OK, 1 file, 1 tensors" in out, out + err
    rc, out, err = _run(capsys, "verify", str(d), "--json")
    doc = json.loads(out)
    assert rc == 0 and doc["ok"] and doc["format"] == "safetensors" and (doc["files"], doc["tensors"]) == (2, 3)
    assert _run(capsys, "inspect", str(d / "nope.safetensors"))[0] == 2
    assert _run(capsys, "inspect", str(d / "model.safetensors.index.json"))[0] == 2  # a file, not a checkpoint
    # the index names a key its file lacks: an index problem naming the key
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {**wm, "z": wm["c"]}}))
    rc, out, _ = _run(capsys, "verify", str(d))
    assert rc == 1 and _lines_with(out, "model-00002-of-00002.safetensors: index:", "'z'"), out
    # both files damaged: both reported
    for f in sorted(d.glob("*.safetensors")):
        f.write_bytes(f.read_bytes()[:-3])
    rc, out, _ = _run(capsys, "verify", str(d))
    assert rc == 1 and "verify: FAILED, 2 problems" in out
    assert all(_lines_with(out, f"-: {f.name}: parse:") for f in d.glob("*.safetensors")), out
