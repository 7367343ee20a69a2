"""GPU tests: the CUDA (and NCCL) restore path. Skipped where CUDA is not available.

Run on a machine with a GPU: ``python3 -m pytest tests_gpu -q``. ``DR_GPU_DEVICE=cpu`` runs the
same tests on the CPU with gloo (a dry run of the test code itself, not a GPU check).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

_HERE = Path(__file__).parent

#: The device the tests restore onto.
DEVICE = os.environ.get("DR_GPU_DEVICE", "cuda")
#: The backend of the one-rank group in the NCCL tests.
BACKEND = "nccl" if DEVICE == "cuda" else "gloo"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if DEVICE == "cuda" and not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="CUDA is not available")
        for item in items:
            if _HERE in item.path.parents:
                item.add_marker(skip)
