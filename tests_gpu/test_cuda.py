"""The CUDA restore path, checked against ``torch.load`` of the same files.

Reader: files saved from CUDA tensors, ``map_location``, in-place fills of CUDA targets (strided
ones too), CRC32 errors. Writer: CUDA state dicts. Coordinator: a one-rank NCCL group, two gloo
ranks sharing the GPU (broadcast and spread of shared entries), DTensor targets on a CUDA mesh,
and a real FSDP2 model on a CUDA mesh restored from a checkpoint of two CPU ranks.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from dist_restore import CheckpointReader, CheckpointWriter, CorruptCheckpointError, RankInfo
from tests._util import assert_same, assert_same_ties, oracle, record_name, save, tensor_bytes
from tests_gpu import _workers_gpu as W
from tests_gpu.conftest import BACKEND, DEVICE
from tests_multiprocess import _workers_dtensor as WD
from tests_multiprocess.harness import run_ranks

pytestmark = pytest.mark.timeout(240)

DEV = torch.device(DEVICE, 0) if DEVICE == "cuda" else torch.device("cpu")


def _sample(dev: torch.device) -> dict:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(300, 40, generator=g).to(dev)
    return {
        "base": base, "view": base[10:20], "t": base.t(),  # views of one storage
        "bf16": torch.randn(77, generator=g).bfloat16().to(dev), "i64": torch.arange(10, device=dev),
        "bool": torch.tensor([True, False, True], device=dev),
        "c64": torch.randn(5, dtype=torch.complex64, generator=g).to(dev),
        "scalar": torch.tensor(3.5, device=dev), "empty": torch.empty(0, 4, device=dev),
        "param": torch.nn.Parameter(torch.randn(8, 8, generator=g).to(dev)),
        "big": torch.randn(4 << 20, generator=g).to(dev),  # 16 MiB: the large-record path
        "meta": {"epoch": 2, "size": torch.Size([3, 4])},
    }


def _reader() -> CheckpointReader:
    return CheckpointReader(RankInfo(0, 1))


def test_file_saved_from_cuda_tensors_reads_like_torch_load(tmp_path: Path) -> None:
    f = save(_sample(DEV), tmp_path)
    got, missing = _reader().read(tmp_path)
    want = oracle(f)
    assert missing == []
    assert want["big"].device == DEV  # the oracle really is on the device
    assert_same(got, want)
    assert_same_ties(got, want)


@pytest.mark.parametrize("where", ["cpu", "device", "mapping"])
def test_map_location(tmp_path: Path, where: str) -> None:
    saved_on = torch.device("cpu") if where != "cpu" else DEV
    f = save(_sample(saved_on), tmp_path)
    ml = {"cpu": "cpu", "device": str(DEV), "mapping": {"cpu": str(DEV)}}[where]
    got, _ = _reader().read(tmp_path, map_location=ml)
    want = torch.load(f, weights_only=True, map_location=ml)
    assert_same(got, want)
    assert_same_ties(got, want)


def test_fills_device_targets_in_place(tmp_path: Path) -> None:
    f = save(_sample(torch.device("cpu")), tmp_path)
    want = oracle(f)
    tgt = {k: torch.zeros_like(v, device=DEV) for k, v in want.items()
           if isinstance(v, torch.Tensor) and k not in ("view", "t", "param")}
    tgt["t"] = torch.zeros(300, 40, device=DEV).t()  # strided target, as saved
    ptrs = {k: v.data_ptr() for k, v in tgt.items() if v is not None}
    res = _reader().load(tmp_path, tgt)
    assert res.missing_keys == []
    for k, p in ptrs.items():
        assert res.state_dict[k] is tgt[k] and tgt[k].data_ptr() == p, k
        assert tensor_bytes(tgt[k]) == tensor_bytes(want[k]), k
    assert res.bytes_verified > 0


def test_partial_read_into_device_targets(tmp_path: Path) -> None:
    f = save(_sample(torch.device("cpu")), tmp_path)
    want = oracle(f)
    tgt = {"big": torch.zeros(4 << 20, device=DEV), "bf16": None}
    res = _reader().load(tmp_path, tgt, map_location=str(DEV))
    assert tensor_bytes(tgt["big"]) == tensor_bytes(want["big"])
    assert res.state_dict["bf16"].device == DEV
    assert tensor_bytes(res.state_dict["bf16"]) == tensor_bytes(want["bf16"])
    assert res.bytes_read == want["big"].nbytes + want["bf16"].nbytes


def test_crc_mismatch_names_the_key_with_device_targets(tmp_path: Path) -> None:
    f = save({"big": torch.randn(4 << 20), "small": torch.randn(100)}, tmp_path)
    name = record_name(f, "data/0")
    import zipfile

    with zipfile.ZipFile(f) as z:
        info = z.getinfo(name)
    raw = bytearray(f.read_bytes())
    # data offset: local header (30 bytes) + name + extra
    n, e = int.from_bytes(raw[info.header_offset + 26:info.header_offset + 28], "little"), \
        int.from_bytes(raw[info.header_offset + 28:info.header_offset + 30], "little")
    raw[info.header_offset + 30 + n + e + 12345] ^= 0xFF
    f.write_bytes(bytes(raw))
    tgt = {"big": torch.zeros(4 << 20, device=DEV), "small": torch.zeros(100, device=DEV)}
    with pytest.raises(CorruptCheckpointError, match="big"):
        _reader().load(tmp_path, tgt)


def test_writer_round_trip_from_device_tensors(tmp_path: Path) -> None:
    sd = _sample(DEV)
    CheckpointWriter(RankInfo(0, 1)).write(tmp_path, sd)
    f = tmp_path / "checkpoint_0.pt"
    assert (tmp_path / "checkpoint_0.idx").exists()
    want = oracle(f)
    assert want["big"].device == DEV
    got, _ = _reader().read(tmp_path)
    assert_same(got, want)
    assert_same_ties(got, want)
    assert_same(got, sd)


def test_coordinator_one_rank_group(tmp_path: Path) -> None:
    """A one-rank group of the device's backend (NCCL on a GPU) restores in place."""
    run_ranks(W.save_plain, 1, args=(str(tmp_path),), timeout=120)
    for mode in ("broadcast", "spread"):
        out = run_ranks(W.restore_plain, 1, args=(str(tmp_path), mode), timeout=120, backend=BACKEND)
        assert out[0]["bad"] == [], (mode, out)


@pytest.mark.parametrize("mode", ["broadcast", "spread"])
def test_two_gloo_ranks_share_the_device(tmp_path: Path, mode: str) -> None:
    run_ranks(W.save_plain, 2, args=(str(tmp_path),), timeout=120)
    out = run_ranks(W.restore_plain, 2, args=(str(tmp_path), mode), timeout=120)
    assert [o["bad"] for o in out] == [[], []], out
    # the shared entries' bytes were read once in all (broadcast: by rank 0; spread: split)
    own = 64 * 33 * 4 + 33 * 2 + (3 << 20) * 4
    shared = 1000 * 17 * 4 + (2 << 20) * 4 + 8
    assert sum(o["bytes_read"] for o in out) == 2 * own + shared, out


def test_dtensor_targets_on_a_device_mesh(tmp_path: Path) -> None:
    run_ranks(W.save_plain, 2, args=(str(tmp_path),), timeout=120)
    out = run_ranks(W.restore_dtensor_handmade, 2, args=(str(tmp_path),), timeout=120)
    assert [o["bad"] for o in out] == [[], []], out


def test_fsdp2_on_a_device_mesh_from_two_cpu_ranks(tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    run_ranks(WD.save, 2, args=(str(ck), "fsdp"), timeout=120)
    out = run_ranks(W.restore_fsdp_one_rank, 1, args=(str(ck),), timeout=120, backend=BACKEND)
    assert out[0]["bad"] == [], out
    assert out[0]["files_opened"] <= 2 and out[0]["n"] > 10, out


def test_safetensors_into_cuda_targets_and_map_location(tmp_path: Path) -> None:
    """A safetensors file into preallocated CUDA targets (contiguous, strided, cast), and ``None``
    targets allocated on the device: equal to ``load_file`` of the same file."""
    from safetensors.torch import load_file, save_file

    from dist_restore import RestoreCoordinator

    g = torch.Generator().manual_seed(3)
    src = {"w": torch.randn(300, 129, generator=g), "h": torch.randn(33, generator=g).to(torch.bfloat16),
           "big": torch.randn(3 << 20, generator=g)}
    save_file(src, tmp_path / "model.safetensors")
    want = load_file(tmp_path / "model.safetensors")
    target = {"w": torch.zeros(129, 300, device=DEV).t(), "h": torch.zeros(33, device=DEV), "big": None}
    res = RestoreCoordinator().restore(tmp_path, target, cast=True, map_location=DEV)
    assert target["w"].device == DEV and torch.equal(target["w"].cpu(), want["w"])
    assert torch.equal(target["h"].cpu(), want["h"].float())
    assert res.state_dict["big"].device == DEV and torch.equal(res.state_dict["big"].cpu(), want["big"])
