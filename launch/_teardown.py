"""How the launch scripts leave: shared by ``restore.py`` and ``train.py``."""

from __future__ import annotations

import logging
import os
import sys


def exit_now(code: int) -> None:
    """Leave without the interpreter's teardown: a process group that a DeviceMesh (FSDP2,
    DTensor targets) still references outlives ``destroy_process_group`` and would be freed
    during finalization, where gloo's worker threads abort the process now and then
    ("terminate called without an active exception"; pytorch/pytorch#179291)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
