"""Test setup: interpret Triton kernels on the CPU when no GPU is present.

``TRITON_INTERPRET`` must be set before ``triton`` is imported, which is why it happens here,
at collection time, ahead of every test module.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensor  # noqa: E402

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


_POISON = {torch.int8: -128, torch.int16: -32768, torch.int32: -(2**31), torch.int64: -(2**62), torch.uint8: 255}
_real_empty, _real_empty_like = torch.empty, torch.empty_like


def _poisoned(t: torch.Tensor) -> torch.Tensor:
    # Tensors of a compiler's tracing (inductor's fake tensors, dynamo's graphs) are not memory.
    if t.is_meta or t.numel() == 0 or isinstance(t, FakeTensor) or torch.compiler.is_compiling():
        return t
    with torch.no_grad():  # a leaf created with requires_grad=True is filled too
        if t.is_floating_point():
            return t.fill_(float("nan"))
        return t.fill_(_POISON[t.dtype]) if t.dtype in _POISON else t


@pytest.fixture(autouse=True)
def _poison_uninitialized_memory(monkeypatch):
    """Every ``torch.empty`` / ``torch.empty_like`` a test causes (kernel launchers' outputs, caches,
    buffers) starts as NaN (floats) or the most negative integer (int8's -128 is outside the
    symmetric range tinyq writes), so a region a kernel forgets to write, or a read of memory never
    written, shows instead of passing on whatever the allocator left there."""
    monkeypatch.setattr(torch, "empty", lambda *a, **k: _poisoned(_real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: _poisoned(_real_empty_like(*a, **k)))
