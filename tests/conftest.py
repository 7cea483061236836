"""Test setup: interpret Triton kernels on the CPU when no GPU is present.

``TRITON_INTERPRET`` must be set before ``triton`` is imported, which is why it happens here,
at collection time, ahead of every test module.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# With `pytest -n 2` on a 2-core machine, two workers with 2 torch threads each make every op
# wait for a descheduled thread (measured: 1 s/token instead of 80 ms for the default model).
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (scripts/gpu_check.sh runs these on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
