"""``dist-restore consolidate DIR OUT``: the full state dict of a sharded checkpoint as one file."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from dist_restore._base.source import is_url
from dist_restore._cli_util import _human
from dist_restore.consolidate import ConsolidateProgress, Format, consolidate
from dist_restore.errors import CheckpointError

CONSOLIDATE_HELP = """\
Writes the full (unsharded) state dict of a checkpoint directory as one file: every DTensor
entry (FSDP2, tensor parallel) becomes a plain tensor of its global shape, assembled from the
rank files that hold it; every other entry comes from rank 0's file. --format torch (the
default, or when OUT does not end in .safetensors) writes a torch.save file with the same
nesting, loadable by torch.load(weights_only=True); --format safetensors writes one tensor per
dotted key (model.up.weight, optim.state.0.exp_avg) and leaves non-tensor values out.
With --max-shard-size, OUT is a directory laid out as Hugging Face's save_pretrained writes
it (model-0000k-of-0000n.safetensors + model.safetensors.index.json, the index last):
add the model's config.json and from_pretrained loads it; --strip-prefix model. gives the
model's own key names.

It streams tensor by tensor: whole rows of shards are copied file to file by the kernel, other
tensors are assembled in memory a batch at a time, so memory stays near the largest tensor
whatever the checkpoint's size. The file is written under a temp name, synced and renamed:
a failed run leaves no partial OUT behind. DIR may be an object-store URL of a safetensors or DCP
checkpoint (s3://bucket/prefix); OUT is always written locally."""


def add_parser(sub: argparse._SubParsersAction, epilog: str, keys_arg: object,  # type: ignore[type-arg]
               source_arg: object = Path) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("consolidate", help="write the full state dict as one torch.save or safetensors file",
                       description=CONSOLIDATE_HELP, formatter_class=fmt, epilog=epilog)
    p.add_argument("dir", metavar="DIR", type=source_arg,
                   help="the checkpoint directory (or an s3://, gs://, az:// URL of a safetensors or DCP checkpoint)")
    p.add_argument("out", metavar="OUT", type=_local_out,
                   help="the file to write, locally (a directory with --max-shard-size)")
    p.add_argument("--format", choices=["torch", "safetensors"], default=None,
                   help="output format (default: safetensors when OUT ends in .safetensors, else torch)")
    p.add_argument("--keys", metavar="PATTERN", type=keys_arg, help="only keys matching this glob or prefix "
                   "(as inspect --keys)")
    p.add_argument("--max-shard-size", metavar="SIZE", default=None,
                   help="safetensors: OUT is a directory of Hugging Face shard files of at most SIZE each "
                        "(5GB, 500MiB, bytes) plus model.safetensors.index.json, as save_pretrained writes them")
    p.add_argument("--strip-prefix", metavar="PREFIX", default=None,
                   help="safetensors: remove PREFIX from the keys that start with it (model.: the names of "
                        "model.state_dict() for a checkpoint saved as {'model': ..., 'optim': ...})")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--no-verify", action="store_true", help="skip the CRC32 check of the records read whole")
    p.add_argument("--quiet", action="store_true", help="no progress line and no summary")
    p.set_defaults(func=run)


def _local_out(text: str) -> Path:
    """``OUT``: a local path (an object-store URL would become a local ``s3:/...`` directory)."""
    if is_url(text):
        raise argparse.ArgumentTypeError(f"OUT is written locally, not to an object store: {text!r} (write it to "
                                         "a local path, then upload it)")
    return Path(text)


def run(args: argparse.Namespace) -> int:
    out: Path = args.out
    format: Format = args.format or ("safetensors" if out.suffix == ".safetensors" or args.max_shard_size
                                     else "torch")
    show = not args.quiet and sys.stderr.isatty()
    progress = _Progress() if show else None
    try:
        res = consolidate(args.dir, out, format=format, keys=args.keys or None, force=args.force,
                          verify=not args.no_verify, progress=progress, max_shard_size=args.max_shard_size,
                          strip_prefix=args.strip_prefix)
    except Exception as e:  # noqa: BLE001 - any problem: one line, exit status 1
        if progress is not None:
            progress.clear()
        print(f"dist-restore: error: {_one_line(e)}", file=sys.stderr)
        return 1
    if progress is not None:
        progress.clear()
    if not args.quiet:
        rate = res.tensor_bytes / res.seconds / 2**20 if res.seconds else 0.0
        print(f"wrote {out} ({format}, {_human(res.file_bytes)}): {res.tensors} tensors, "
              f"{_human(res.tensor_bytes)} from {res.rank_files} rank file(s) in {res.seconds:.2f}s "
              f"({rate:.0f} MiB/s; {_human(res.bytes_copied)} copied file to file)")
        if res.skipped:
            shown = ", ".join(res.skipped[:3]) + (", ..." if len(res.skipped) > 3 else "")
            print(f"left out {len(res.skipped)} non-tensor value(s) (safetensors holds tensors only): {shown}")
    return 0


def _one_line(e: BaseException) -> str:
    """Our own messages as they are (they name file, rank and key); anything else with its type."""
    own = isinstance(e, (CheckpointError, ValueError)) or (isinstance(e, OSError) and e.errno is None)
    text = str(e) if own else f"{type(e).__name__}: {e}"
    return " ".join(text.split())


class _Progress:
    """One self-overwriting line on stderr (a terminal), at most ten updates a second."""

    def __init__(self) -> None:
        self._last = 0.0
        self._width = 0

    def __call__(self, p: ConsolidateProgress) -> None:
        now = time.monotonic()
        if now - self._last < 0.1 and p.done != p.total:
            return
        self._last = now
        pct = 100.0 * p.bytes_done / p.bytes_total if p.bytes_total else 100.0
        line = f"consolidate: {p.done}/{p.total} tensors, {_human(p.bytes_done)} / {_human(p.bytes_total)} " \
               f"({pct:.0f}%) {p.key}"
        line = line[:160]
        sys.stderr.write("\r" + line.ljust(self._width))
        sys.stderr.flush()
        self._width = len(line)

    def clear(self) -> None:
        if self._width:
            sys.stderr.write("\r" + " " * self._width + "\r")
            sys.stderr.flush()
