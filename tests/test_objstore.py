"""Checkpoints in an object store, against a real S3 server: moto's ``ThreadedMotoServer`` on
127.0.0.1 in this process (``tests/_s3.py``), spoken to over HTTP by obstore. Nothing here mocks
the client; a few tests wrap :meth:`ObjectFile._get` to see (or time) the range requests it sends.

- Restores are bit-exact against the local copy (the oracles: ``safetensors.torch.load_file``,
  ``dcp.load``, ``torch.load`` of ``dcp_to_torch_save``) for one ``.safetensors`` file, a
  directory of shards with ``model.safetensors.index.json`` (written by ``huggingface_hub``'s
  ``save_torch_state_dict``, the sharding ``save_pretrained`` uses) and a DCP checkpoint of a
  model and its optimizer, through ``CheckpointReader.load`` and ``RestoreCoordinator.restore``
  (single process, no group); a partial target reads only its files and bytes.
- Faults give an error naming the URL (and the key) within the configured timeouts, never a
  hang: a missing bucket, missing objects, 403s, an object replaced after planning or between
  two range requests (the ETag pin: never bytes of two versions), a server stopped, a server
  that stops answering, obstore not installed.
- :meth:`ObjectFile.read_runs` merges close runs and splits large ones (small ``PART`` and
  ``MERGE_GAP``), checked against the object's bytes.
- The CLI (``inspect``, ``verify``, ``consolidate``) on URLs.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
import zipfile
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from dist_restore import (
    CheckpointReader,
    CorruptCheckpointError,
    RankInfo,
    RestoreCoordinator,
    RestoreError,
)
from dist_restore._base import objstore
from dist_restore._base.objstore import ObjectFile, configure_object_store
from dist_restore._sources import plan_source, read_source
from dist_restore.cli import main
from tests._s3 import S3, s3_server
from tests._util import assert_same

pytest.importorskip("obstore")
pytest.importorskip("moto.server")
st = pytest.importorskip("safetensors.torch")
dcp = pytest.importorskip("torch.distributed.checkpoint")

pytestmark = [pytest.mark.timeout(60), pytest.mark.filterwarnings("ignore:.*torch.distributed is disabled")]

READER = CheckpointReader(RankInfo(0, 1))
ROOT = Path(__file__).resolve().parents[1]

#: Client options that make a dead or stalled server an error within seconds: each request
#: times out after 1 s, retried once.
FAST = {"client_options": {"timeout": "1s", "connect_timeout": "1s", "allow_http": True},
        "retry_config": {"max_retries": 1, "retry_timeout": timedelta(seconds=3),
                         "backoff": {"init_backoff": timedelta(milliseconds=50),
                                     "max_backoff": timedelta(milliseconds=100), "base": 2}}}
#: What FAST allows at most (two 1 s attempts and a backoff), with ample slack for a busy machine.
FAST_BOUND_S = 10.0


# -- checkpoints --------------------------------------------------------------------------------


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(60, 33, generator=g), "bf": torch.randn(17, 5, generator=g).bfloat16(),
            "ids": torch.randint(-5, 5, (300,), generator=g, dtype=torch.int64),
            "scalar": torch.tensor(1.5, dtype=torch.float64), "empty": torch.empty(0, 4),
            "mask": torch.tensor([True, False, True])}


def _model_sd() -> dict[str, torch.Tensor]:
    """A small Llama-like state dict, sharded by size into several files."""
    g = torch.Generator().manual_seed(1)
    sd = {"model.embed_tokens.weight": torch.randn(64, 32, generator=g)}
    for i in range(3):
        p = f"model.layers.{i}."
        sd |= {p + "self_attn.q_proj.weight": torch.randn(32, 32, generator=g),
               p + "mlp.up_proj.weight": torch.randn(48, 32, generator=g).bfloat16(),
               p + "input_layernorm.weight": torch.randn(32, generator=g)}
    sd["lm_head.weight"] = torch.randn(64, 32, generator=g)
    return sd


def _train_state(seed: int) -> dict[str, Any]:
    """A model and its Adam state after one step (what a training job saves with ``dcp.save``)."""
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    opt = torch.optim.Adam(m.parameters(), lr=1e-3 * seed)
    m(torch.randn(5, 8)).sum().backward()
    opt.step()
    return {"model": m.state_dict(), "optim": opt.state_dict(), "train": {"step": seed, "tag": f"run-{seed}"}}


def _blank(v: Any) -> Any:
    """The same structure, tensors zeroed (a target nothing in it already equals)."""
    if isinstance(v, torch.Tensor):
        return torch.zeros_like(v)
    if isinstance(v, dict):
        return {k: _blank(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_blank(x) for x in v]
    return v


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8) if a.dtype == torch.bool
                                                                      else a, b.view(torch.uint8)
                                                                      if b.dtype == torch.bool else b)


def _load_dir(d: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        out |= st.load_file(f)
    return out


@pytest.fixture(scope="module")
def s3() -> Iterator[S3]:
    with s3_server() as server:
        yield server


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    save_torch_state_dict = pytest.importorskip("huggingface_hub").save_torch_state_dict

    root = tmp_path_factory.mktemp("objstore")
    (root / "one").mkdir()
    st.save_file(_tensors(), root / "one" / "model.safetensors", metadata={"format": "pt"})
    (root / "shards").mkdir()
    save_torch_state_dict(_model_sd(), root / "shards", max_shard_size="12KB")
    dcp.save(_train_state(1), checkpoint_id=str(root / "dcp"))
    return {"one": root / "one", "shards": root / "shards", "dcp": root / "dcp"}


@pytest.fixture(scope="module")
def urls(s3: S3, local: dict[str, Path]) -> dict[str, str]:
    return {k: s3.upload_dir(p, f"ck/{k}") for k, p in local.items()}


def _fresh(s3: S3, local: Path) -> str:
    """A private copy of a checkpoint (a test that damages it)."""
    return s3.upload_dir(local, f"tmp/{uuid.uuid4().hex[:8]}")


@pytest.fixture()
def gets(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int, int]]:
    """Every range request sent, as ``(object URL, first byte, end)``."""
    seen: list[tuple[str, int, int]] = []
    get = ObjectFile._get

    def spy(self: ObjectFile, lo: int, hi: int, key: str | None) -> Any:
        seen.append((self.name, lo, hi))
        return get(self, lo, hi, key)

    monkeypatch.setattr(ObjectFile, "_get", spy)
    return seen


@contextlib.contextmanager
def _configured(url: str, **options: Any) -> Iterator[None]:
    configure_object_store(url, **options)
    try:
        yield
    finally:
        with objstore._lock:
            objstore._options.pop(url.rstrip("/"), None)
            objstore._stores.clear()


@contextlib.contextmanager
def _auth_enforced() -> Iterator[None]:
    """moto checks every request's credentials from now on: ours (``testing``) are unknown to
    its IAM, so every request gets ``403 InvalidAccessKeyId``."""
    from moto import settings

    old = settings.INITIAL_NO_AUTH_ACTION_COUNT
    settings.INITIAL_NO_AUTH_ACTION_COUNT = 0
    try:
        yield
    finally:
        settings.INITIAL_NO_AUTH_ACTION_COUNT = old


# -- bit-exact restores -------------------------------------------------------------------------


def test_safetensors_file_url(urls: dict[str, str], local: dict[str, Path]) -> None:
    want = st.load_file(local["one"] / "model.safetensors")
    url = urls["one"] + "/model.safetensors"
    for path in (url, urls["one"], urls["one"] + "/"):  # the file, its prefix, with a trailing slash
        got = READER.load(path).state_dict
        assert list(got) == list(want) and all(_same(got[k], want[k]) for k in want), path
    tgt = _blank(want)
    ptrs = {k: v.data_ptr() for k, v in tgt.items()}
    res = READER.load(url, tgt, strict=True)
    assert res.state_dict is tgt and all(tgt[k].data_ptr() == ptrs[k] for k in tgt)  # filled in place
    assert all(_same(tgt[k], want[k]) for k in want)
    assert res.bytes_read == sum(v.nbytes for v in want.values())
    tgt = _blank(want)
    res = RestoreCoordinator().restore(url, tgt, strict=True)
    assert all(_same(tgt[k], want[k]) for k in want)
    assert res.stats.bytes_read == sum(v.nbytes for v in want.values()) and res.stats.files_opened == 1


def test_safetensors_directory_with_index(urls: dict[str, str], local: dict[str, Path],
                                          gets: list[tuple[str, int, int]]) -> None:
    index = json.loads((local["shards"] / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) >= 3  # several shards
    want = _load_dir(local["shards"])
    got = READER.load(urls["shards"]).state_dict
    assert set(got) == set(want) and all(_same(got[k], want[k]) for k in want)
    tgt = _blank(want)
    res = RestoreCoordinator().restore(urls["shards"], tgt, strict=True)
    assert all(_same(tgt[k], want[k]) for k in want)
    assert res.missing_keys == [] and res.unexpected_keys == []
    assert res.stats.bytes_read == sum(v.nbytes for v in want.values())
    # every byte fetched lies inside its object, and no object was fetched twice over
    sizes = {f"{urls['shards']}/{p.name}": p.stat().st_size for p in local["shards"].iterdir()}
    assert all(0 <= lo < hi <= sizes[u] for u, lo, hi in gets)


def test_partial_target_reads_only_its_files(urls: dict[str, str], local: dict[str, Path],
                                             gets: list[tuple[str, int, int]]) -> None:
    index = json.loads((local["shards"] / "model.safetensors.index.json").read_text())["weight_map"]
    want = _load_dir(local["shards"])
    shard = index["model.layers.1.self_attn.q_proj.weight"]
    keys = [k for k, f in index.items() if f == shard][:2]
    tgt = {k: torch.zeros_like(want[k]) for k in keys}
    res = READER.load(urls["shards"], tgt)
    assert all(_same(tgt[k], want[k]) for k in keys)
    nbytes = sum(want[k].nbytes for k in keys)
    assert res.bytes_read == nbytes
    # the index, then that one shard: its header and the two tensors' bytes; no other object
    touched = {u.rsplit("/", 1)[-1] for u, _lo, _hi in gets}
    assert touched == {"model.safetensors.index.json", shard}, touched
    header = 8 + int.from_bytes((local["shards"] / shard).read_bytes()[:8], "little")
    fetched = sum(hi - lo for u, lo, hi in gets if u.endswith(shard))
    # (runs less than MERGE_GAP apart share a request: the gap between them is read and dropped)
    assert fetched <= header + nbytes + objstore.MERGE_GAP, (fetched, header, nbytes)
    gets.clear()
    res = RestoreCoordinator().restore(urls["shards"], {k: torch.zeros_like(want[k]) for k in keys})
    assert res.stats.bytes_read == nbytes and res.stats.files_opened == 1
    assert {u.rsplit("/", 1)[-1] for u, _lo, _hi in gets} == {"model.safetensors.index.json", shard}


def test_dcp_model_and_optimizer(urls: dict[str, str], local: dict[str, Path], tmp_path: Path) -> None:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    want = _blank(_train_state(2))  # another run's structure: same keys, other values
    dcp.load(want, checkpoint_id=str(local["dcp"]))
    assert want["train"] == {"step": 1, "tag": "run-1"}
    for restore in (lambda t: READER.load(urls["dcp"], t, strict=True),
                    lambda t: RestoreCoordinator().restore(urls["dcp"], t, strict=True)):
        tgt = _blank(_train_state(2))
        w = tgt["optim"]["state"][0]["exp_avg"]
        res = restore(tgt)
        assert res.missing_keys == [] and res.unexpected_keys == []
        assert tgt["optim"]["state"][0]["exp_avg"] is w  # filled in place
        assert_same(tgt, want)
    # no target: everything, nested as saved (the oracle: dcp_to_torch_save of the local copy)
    dcp_to_torch_save(str(local["dcp"]), str(tmp_path / "all.pt"))
    assert_same(READER.load(urls["dcp"]).state_dict, torch.load(tmp_path / "all.pt", weights_only=False))
    # a nested partial target: only its tensor's bytes
    tgt = {"optim": {"state": {0: {"exp_avg_sq": torch.zeros(16, 8)}}}}
    res = READER.load(urls["dcp"], tgt)
    assert torch.equal(tgt["optim"]["state"][0]["exp_avg_sq"], want["optim"]["state"][0]["exp_avg_sq"])
    assert res.bytes_read == 16 * 8 * 4


# -- faults -------------------------------------------------------------------------------------


def test_missing_bucket(s3: S3) -> None:
    url = f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/ck"
    with pytest.raises(FileNotFoundError, match="no such bucket") as e:
        READER.load(url)
    assert url in str(e.value) and "NoSuchBucket" in str(e.value)
    with pytest.raises(RestoreError, match="no such bucket") as e:
        RestoreCoordinator().restore(url, {"w": torch.zeros(2)})
    assert url in str(e.value) and e.value.phase == "plan"
    with pytest.raises(FileNotFoundError, match="no checkpoint at") as e:  # a bucket, nothing under the prefix
        READER.load(s3.url("nothing-here"))
    assert s3.url("nothing-here") in str(e.value)


def test_missing_objects(s3: S3, local: dict[str, Path]) -> None:
    # the index names a shard that is not there: the index and a key in that shard
    url = _fresh(s3, local["shards"])
    index = json.loads((local["shards"] / "model.safetensors.index.json").read_text())["weight_map"]
    gone = sorted(set(index.values()))[1]
    s3.delete(url.split(f"s3://{s3.bucket}/")[1] + "/" + gone)
    with pytest.raises(CorruptCheckpointError, match="does not exist") as e:
        READER.load(url)
    assert e.value.file == f"{url}/model.safetensors.index.json" and index[e.value.key] == gone
    assert gone in str(e.value)
    # a .distcp deleted after the upload
    url = _fresh(s3, local["dcp"])
    prefix = url.split(f"s3://{s3.bucket}/")[1]
    distcp = [k for k in s3.keys(prefix) if k.endswith(".distcp")]
    s3.delete(distcp[0])
    with pytest.raises(CorruptCheckpointError) as e:
        READER.load(url, _blank(_train_state(2)))
    assert distcp[0].rsplit("/", 1)[-1] in str(e.value) and url in str(e.value)
    # a shard deleted after planning, before reading: the URL and the key
    url = _fresh(s3, local["shards"])
    want = _load_dir(local["shards"])
    plan = plan_source(url, _blank(want))
    key = "model.layers.2.input_layernorm.weight"
    s3.delete(url.split(f"s3://{s3.bucket}/")[1] + "/" + index[key])
    with pytest.raises(FileNotFoundError) as e:
        read_source(plan)
    assert f"{url}/{index[key]}" in str(e.value) and "key '" in str(e.value)


def test_403_when_listing_and_mid_restore(urls: dict[str, str], local: dict[str, Path],
                                          capsys: pytest.CaptureFixture[str]) -> None:
    with _auth_enforced():
        with pytest.raises(PermissionError, match="403") as e:
            READER.load(urls["shards"])
        assert urls["shards"] in str(e.value) and "InvalidAccessKeyId" in str(e.value)
        with pytest.raises(RestoreError, match="PermissionError") as e2:
            RestoreCoordinator().restore(urls["dcp"], _blank(_train_state(2)))
        assert urls["dcp"] in str(e2.value)
        rc, _out, err = _cli(capsys, "inspect", urls["dcp"])
        assert rc == 1 and "PermissionError" in err and urls["dcp"] in err
    # planned with access, refused while reading: the object's URL and the key
    want = st.load_file(local["one"] / "model.safetensors")
    tgt = _blank(want)
    plan = plan_source(urls["one"], tgt)
    with _auth_enforced(), pytest.raises(PermissionError, match="403") as e:
        read_source(plan)
    assert f"{urls['one']}/model.safetensors" in str(e.value) and "key '" in str(e.value)


def _new_version(old: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Other values of the same shapes and dtypes: a file of exactly the same size."""
    g = torch.Generator().manual_seed(7)
    return {k: (torch.randn(v.shape, generator=g) * 3 + 11).to(v.dtype) if v.is_floating_point()
            else ~v if v.dtype == torch.bool else v + 1 for k, v in old.items()}


def _old_or_untouched(tgt: dict[str, torch.Tensor], old: dict[str, torch.Tensor]) -> bool:
    """Every element of the target is the old version's or still zero: no byte of the new one."""
    return all(bool(((t == old[k]) | (t == 0)).all()) for k, t in tgt.items())


def test_object_replaced_after_planning(s3: S3, local: dict[str, Path]) -> None:
    url = _fresh(s3, local["one"])
    key = url.split(f"s3://{s3.bucket}/")[1] + "/model.safetensors"
    old = st.load_file(local["one"] / "model.safetensors")
    new = st.save(_new_version(old), metadata={"format": "pt"})
    assert len(new) == (local["one"] / "model.safetensors").stat().st_size  # same size: only the ETag tells
    tgt = _blank(old)
    plan = plan_source(url, tgt)
    s3.put(key, new)
    with pytest.raises(CorruptCheckpointError, match="changed since the restore was planned") as e:
        read_source(plan)
    assert e.value.file == f"{url}/model.safetensors" and e.value.key in old
    assert _old_or_untouched(tgt, old)
    # a DCP file replaced (here: by another checkpoint's) between plan and read
    url = _fresh(s3, local["dcp"])
    prefix = url.split(f"s3://{s3.bucket}/")[1]
    tgt = _blank(_train_state(2))
    plan = plan_source(url, tgt)
    distcp = next(k for k in s3.keys(prefix) if k.endswith(".distcp"))
    raw = bytearray(s3.get(distcp))
    raw[-100] ^= 0xFF
    s3.put(distcp, bytes(raw))
    with pytest.raises(CorruptCheckpointError, match="changed since the restore was planned") as e:
        read_source(plan)
    assert url in str(e.value)


def test_object_replaced_between_two_range_requests(s3: S3, local: dict[str, Path],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The object is replaced once the first range request has landed: the next ones fail on
    their If-Match; what the target holds is the old version's bytes or untouched, never the new."""
    url = _fresh(s3, local["one"])
    key = url.split(f"s3://{s3.bucket}/")[1] + "/model.safetensors"
    old = st.load_file(local["one"] / "model.safetensors")
    new = st.save(_new_version(old), metadata={"format": "pt"})
    tgt = _blank(old)
    plan = plan_source(url, tgt)
    get, calls, lock = ObjectFile._get, [], threading.Lock()

    replaced = threading.Event()

    def replace_after_first(self: ObjectFile, lo: int, hi: int, k: str | None) -> Any:
        with lock:
            first = not calls
            calls.append(k)
        if not first:  # (requests run concurrently: the others wait for the replacement)
            replaced.wait(30)
            return get(self, lo, hi, k)
        out = get(self, lo, hi, k)
        calls.append("replaced")
        s3.put(key, new)
        replaced.set()
        return out

    monkeypatch.setattr(ObjectFile, "_get", replace_after_first)
    monkeypatch.setattr(objstore, "MERGE_GAP", -1)  # one request per tensor (none merged)
    with pytest.raises(CorruptCheckpointError, match="changed since the restore was planned"):
        read_source(plan)
    assert len(calls) >= 3 and _old_or_untouched(tgt, old)  # a request, the replacement, more requests
    assert any(bool((tgt[k] == old[k]).all()) and old[k].numel() and bool((old[k] != 0).any()) for k in old)


def test_server_stopped_mid_restore(local: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    want = _load_dir(local["shards"])
    with s3_server() as own:
        url = own.upload_dir(local["shards"], "ck")
        with _configured(own.url(), **FAST):
            # stopped between plan and read
            plan = plan_source(url, _blank(want))
            own.server.stop()
            t0 = time.monotonic()
            with pytest.raises(OSError) as e:
                read_source(plan)
            assert time.monotonic() - t0 < FAST_BOUND_S
            assert url in str(e.value) and "key '" in str(e.value)
    with s3_server() as own:
        url = own.upload_dir(local["shards"], "ck")
        with _configured(own.url(), **FAST):
            # stopped from another thread once the first range request is answered
            get, stopper = ObjectFile._get, []

            def stop_after_first(self: ObjectFile, lo: int, hi: int, k: str | None) -> Any:
                out = get(self, lo, hi, k)
                if not stopper:
                    stopper.append(threading.Thread(target=own.server.stop))
                    stopper[0].start()
                    stopper[0].join()
                return out

            monkeypatch.setattr(ObjectFile, "_get", stop_after_first)
            t0 = time.monotonic()
            with pytest.raises(RestoreError) as e2:
                RestoreCoordinator().restore(url, _blank(want))
            assert time.monotonic() - t0 < FAST_BOUND_S
            assert url in str(e2.value)


class _Proxy:
    """A TCP relay to the S3 server that can freeze: it then forwards nothing more while its
    connections stay open, as a stalled server or network does (nothing is refused, nothing
    answers)."""

    def __init__(self, port: int) -> None:
        self.port, self.frozen, self.closed = port, threading.Event(), threading.Event()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.conns: list[socket.socket] = []
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            u = socket.create_connection(("127.0.0.1", self.port))
            self.conns += [c, u]
            for a, b in ((c, u), (u, c)):
                t = threading.Thread(target=self._pump, args=(a, b), daemon=True)
                self.threads.append(t)
                t.start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := a.recv(1 << 16):
                while self.frozen.is_set() and not self.closed.is_set():
                    time.sleep(0.02)
                if self.closed.is_set():
                    return
                b.sendall(data)

    def close(self) -> None:
        self.closed.set()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # (close alone does not wake a blocked accept on Linux)
        self.sock.close()
        for c in self.conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            c.close()
        for t in self.threads:
            t.join(5)


def test_stalled_server_times_out(s3: S3, local: dict[str, Path]) -> None:
    url = _fresh(s3, local["dcp"])
    proxy = _Proxy(int(s3.endpoint.rsplit(":", 1)[1]))
    try:
        with _configured(s3.url(), config={"endpoint": proxy.url}, **FAST):
            plan = plan_source(url, _blank(_train_state(2)))  # through the relay, while it forwards
            proxy.frozen.set()
            t0 = time.monotonic()
            with pytest.raises(OSError) as e:
                read_source(plan)
            assert time.monotonic() - t0 < FAST_BOUND_S
            assert url in str(e.value) and "key '" in str(e.value)
            t0 = time.monotonic()
            with pytest.raises(RestoreError) as e2:  # a fresh restore: listing times out
                RestoreCoordinator().restore(url, _blank(_train_state(2)))
            assert time.monotonic() - t0 < FAST_BOUND_S and url in str(e2.value)
    finally:
        proxy.close()


def test_without_obstore_the_error_names_the_extra(urls: dict[str, str], monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str], local: dict[str, Path]) -> None:
    monkeypatch.setitem(sys.modules, "obstore", None)  # `import obstore` raises ImportError
    monkeypatch.setattr(objstore, "_stores", {})
    with pytest.raises(ImportError, match=r'dist_restore\[s3\]'):
        READER.load(urls["one"])
    with pytest.raises(RestoreError, match=r'dist_restore\[s3\]'):
        RestoreCoordinator().restore(urls["dcp"], _blank(_train_state(2)))
    assert main(["inspect", urls["shards"]]) == 1
    assert 'dist_restore[s3]' in capsys.readouterr().err
    # local paths need no obstore: a fresh interpreter without it restores, and never imports our client
    code = ("import sys; sys.modules['obstore'] = None\n"
            "from dist_restore import CheckpointReader, RankInfo\n"
            f"sd = CheckpointReader(RankInfo(0, 1)).load({str(local['one'])!r}).state_dict\n"
            "assert 'dist_restore._base.objstore' not in sys.modules, 'imported for a local path'\n"
            "print(sorted(sd))\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=50, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == str(sorted(_tensors()))


# -- ObjectFile.read_runs -----------------------------------------------------------------------


def test_read_runs_merges_close_runs_and_splits_large_ones(s3: S3, monkeypatch: pytest.MonkeyPatch,
                                                           gets: list[tuple[str, int, int]]) -> None:
    data = np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    s3.put("runs/blob", data)
    url = s3.url("runs/blob")
    monkeypatch.setattr(objstore, "PART", 256)
    monkeypatch.setattr(objstore, "MERGE_GAP", 32)
    f = ObjectFile.open(url)
    assert f.size == len(data) and f.etag

    def read(offs: list[int], run: int) -> list[tuple[int, int]]:
        out = np.zeros(len(offs) * run, dtype=np.uint8)
        gets.clear()
        f.read_runs([out.ctypes.data + i * run for i in range(len(offs))], offs, run, "k")
        assert out.tobytes() == b"".join(data[o:o + run] for o in offs), (offs, run)
        return sorted((lo, hi) for _u, lo, hi in gets)

    # close runs merged into one request (a gap of exactly MERGE_GAP too); far ones apart
    assert read([0, 60, 120, 300, 1000], 50) == [(0, 170), (300, 350), (1000, 1050)]
    assert read([0, 82], 50) == [(0, 132)]  # gap 32: merged
    assert read([0, 83], 50) == [(0, 50), (83, 133)]  # gap 33: apart
    # a merged request stays within PART: the run that would pass it starts a new one
    assert read([0, 60, 120, 180, 240], 50) == [(0, 230), (240, 290)]
    # one large run split into PART-sized requests (fetched concurrently), reassembled in place
    assert read([100], 700) == [(100, 356), (356, 612), (612, 800)]
    assert read([10, 1200], 600) == [(10, 266), (266, 522), (522, 610), (1200, 1456), (1456, 1712), (1712, 1800)]
    # many runs at once (several requests in flight), the last byte of the object included
    offs = list(range(0, 4990, 30))
    spans = read(offs, 10)
    assert all(hi - lo <= 256 for lo, hi in spans) and len(spans) < len(offs)
    assert read([4990], 10) == [(4990, 5000)]
    # read_into and pread go the same way
    buf = np.zeros(600, dtype=np.uint8)
    gets.clear()
    f.read_into(buf.ctypes.data, 600, 4000, "k")
    assert buf.tobytes() == data[4000:4600] and len(gets) == 3
    assert f.pread(20, 4980) == data[4980:]
    with pytest.raises(CorruptCheckpointError, match="short"):
        f.pread(30, 4980)
    # the ETag pinned at open: a replaced object fails every read, naming it
    s3.put("runs/blob", data[::-1])
    with pytest.raises(CorruptCheckpointError, match="changed since") as e:
        read([0, 2000], 100)
    assert e.value.file == url and e.value.key == "k"


# -- the command line ---------------------------------------------------------------------------


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_inspect_and_verify_urls(urls: dict[str, str], local: dict[str, Path],
                                     capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("shards", "dcp", "one"):
        rc, out, err = _cli(capsys, "inspect", urls[name], "--json")
        assert rc == 0, err
        rc, ref, err = _cli(capsys, "inspect", str(local[name]), "--json")
        doc, want = json.loads(out), json.loads(ref)
        assert doc["path"] == urls[name] and doc["format"] == want["format"]
        assert doc["entries"] == want["entries"] and doc.get("values") == want.get("values"), name
    rc, out, err = _cli(capsys, "inspect", urls["one"] + "/model.safetensors")
    assert rc == 0 and f"safetensors checkpoint {urls['one']}/model.safetensors" in out and "ids" in out
    rc, out, err = _cli(capsys, "inspect", urls["dcp"], "--keys", "optim.state")
    assert rc == 0 and "optim.state.0.exp_avg" in out and "model.0.weight" not in out
    rc, out, err = _cli(capsys, "verify", urls["dcp"])
    assert rc == 0 and "verify: OK" in out, out + err
    rc, out, err = _cli(capsys, "verify", urls["shards"], "--json")
    doc = json.loads(out)
    assert rc == 0 and doc["ok"] and doc["tensors"] == len(_model_sd()) and doc["format"] == "safetensors"


def test_cli_verify_damaged_and_missing_urls(s3: S3, local: dict[str, Path], tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    # a flipped byte in a DCP tensor record: verify names the key and the file
    bad = tmp_path / "bad"
    shutil.copytree(local["dcp"], bad)
    distcp = next(bad.glob("*.distcp"))
    md = dcp.FileSystemReader(str(bad)).read_metadata()
    fqn = "model.0.weight"
    item = md.storage_data[next(i for i in md.storage_data if i.fqn == fqn)]
    raw = bytearray(distcp.read_bytes())
    blob = bytes(raw[item.offset:item.offset + item.length])  # the item: a torch.save archive
    rec = next(i for i in zipfile.ZipFile(io.BytesIO(blob)).infolist() if i.filename.endswith("/data/0"))
    n, m = struct.unpack("<HH", blob[rec.header_offset + 26:rec.header_offset + 30])
    raw[item.offset + rec.header_offset + 30 + n + m + 100] ^= 1  # a byte of the tensor's record
    distcp.write_bytes(bytes(raw))
    url = s3.upload_dir(bad, f"tmp/{uuid.uuid4().hex[:8]}")
    rc, out, err = _cli(capsys, "verify", url)
    assert rc == 1 and fqn in out and distcp.name in out and "checksum" in out, out
    # a safetensors shard with a broken header, another truncated: both reported
    shards = tmp_path / "shards"
    shutil.copytree(local["shards"], shards)
    files = sorted(shards.glob("*.safetensors"))
    files[0].write_bytes(b"\xff" * 8 + files[0].read_bytes()[8:])
    files[1].write_bytes(files[1].read_bytes()[:-10])
    url = s3.upload_dir(shards, f"tmp/{uuid.uuid4().hex[:8]}")
    rc, out, err = _cli(capsys, "verify", url)
    assert rc == 1 and "2 problems" in out and "header length" in out, out
    assert files[0].name in out and files[1].name in out
    # nothing at the URL, no such bucket: usage errors naming the URL
    rc, out, err = _cli(capsys, "verify", s3.url("nothing"))
    assert rc == 2 and s3.url("nothing") in err
    rc, out, err = _cli(capsys, "inspect", "s3://no-such-bucket-zz9/x")
    assert rc == 2 and "no such bucket" in err and "s3://no-such-bucket-zz9/x" in err


def test_cli_consolidate_urls_to_local_files(urls: dict[str, str], local: dict[str, Path], tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = _cli(capsys, "consolidate", urls["dcp"], str(tmp_path / "all.pt"), "--quiet")
    assert rc == 0, err
    rc, out, err = _cli(capsys, "consolidate", str(local["dcp"]), str(tmp_path / "ref.pt"), "--quiet")
    assert rc == 0, err
    assert_same(torch.load(tmp_path / "all.pt", weights_only=True), torch.load(tmp_path / "ref.pt", weights_only=True))
    rc, out, err = _cli(capsys, "consolidate", urls["shards"], str(tmp_path / "one.safetensors"))
    assert rc == 0 and "wrote" in out, err
    got, want = st.load_file(tmp_path / "one.safetensors"), _load_dir(local["shards"])
    assert set(got) == set(want) and all(_same(got[k], want[k]) for k in want)
    rc, out, err = _cli(capsys, "consolidate", urls["dcp"], str(tmp_path / "hf"), "--max-shard-size", "2KB",
                        "--strip-prefix", "model.", "--quiet")
    assert rc == 0, err
    got = _load_dir(tmp_path / "hf")
    assert len(list((tmp_path / "hf").glob("*.safetensors"))) > 1
    assert all(_same(got[k], v) for k, v in _train_state(1)["model"].items())
    # an output file already there: refused, nothing read; an output URL: a usage error
    rc, out, err = _cli(capsys, "consolidate", urls["dcp"], str(tmp_path / "all.pt"))
    assert rc == 1 and "exists" in err
    rc, out, err = _cli(capsys, "consolidate", urls["dcp"], urls["dcp"] + "/all.pt")
    assert rc == 2 and "written locally" in err
    # the library function takes the URL too
    from dist_restore import consolidate

    res = consolidate(urls["one"] + "/model.safetensors", tmp_path / "o.pt")
    got, want = torch.load(tmp_path / "o.pt", weights_only=True), st.load_file(local["one"] / "model.safetensors")
    assert set(got) == set(want) and all(_same(got[k], want[k]) for k in want)
    assert res.tensors == len(_tensors())
