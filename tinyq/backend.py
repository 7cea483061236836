"""Which implementation runs an op: the Triton kernel or the plain-torch reference.

CUDA tensors run the Triton kernels. CPU tensors run the torch reference path, so tinyq works
on a machine without a GPU. Under ``TRITON_INTERPRET=1`` (the CPU test suite) the Triton kernels
can also run on CPU tensors; tests select that with ``force_backend("triton")``.

``TINYQ_BACKEND=torch|triton|auto`` overrides the choice process-wide (default ``auto``).
"""
from __future__ import annotations

import contextlib
import functools
import os
import threading

import torch

_VALID = ("auto", "torch", "triton")
_state = threading.local()


def interpreting() -> bool:
    """True when Triton kernels execute in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _requested() -> str:
    forced = getattr(_state, "forced", None)
    if forced is not None:
        return forced
    env = os.environ.get("TINYQ_BACKEND", "auto")
    if env not in _VALID:
        raise ValueError(f"TINYQ_BACKEND={env!r} is not one of {_VALID}")
    return env


def use_triton(t: torch.Tensor) -> bool:
    """Whether an op on tensor ``t`` should launch the Triton kernel."""
    mode = _requested()
    if mode == "torch":
        return False
    if t.is_cuda:
        return True
    # CPU tensor: only the interpreter can run a Triton kernel on it.
    return mode == "triton" and interpreting()


def ptx_supported(device) -> bool:
    """Whether Triton kernels on ``device`` may contain inline PTX (``tl.inline_asm_elementwise``).

    Only NVIDIA GPUs under Triton's CUDA backend compile PTX. A ROCm build of torch also calls its
    GPU ``cuda`` (``tensor.is_cuda`` is True there), so the device type alone is not enough: the
    HIP build (``torch.version.hip``) and Triton's active target decide. The interpreter runs no PTX.
    """
    if torch.device(device).type != "cuda" or interpreting() or torch.version.hip is not None:
        return False
    return triton_target_backend() == "cuda"


def gpu_arch(device) -> str:
    """Key of the shipped config tables for ``device``: ``"sm<major><minor>"`` for an NVIDIA GPU
    (``"sm90"`` on H100/H200), ``"hip"`` for a ROCm GPU (whose capability numbers overlap NVIDIA's:
    an MI300 reports 9.4), ``"cpu"`` for anything else."""
    device = torch.device(device)
    if device.type != "cuda":
        return "cpu"
    if torch.version.hip is not None:
        return "hip"
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm{major}{minor}"


@functools.lru_cache(maxsize=None)
def triton_target_backend() -> str:
    """Triton's active GPU backend: ``"cuda"`` (NVIDIA), ``"hip"`` (AMD), ..."""
    from triton.runtime import driver

    return driver.active.get_current_target().backend


@contextlib.contextmanager
def force_backend(mode: str):
    """Run the enclosed ops on ``mode`` ("torch", "triton" or "auto")."""
    if mode not in _VALID:
        raise ValueError(f"backend {mode!r} is not one of {_VALID}")
    prev = getattr(_state, "forced", None)
    _state.forced = mode
    try:
        yield
    finally:
        _state.forced = prev


def check_kernel_device(name: str, *tensors: torch.Tensor) -> None:
    """Raise a clear error unless all tensors sit on one device a Triton kernel can use."""
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"{name}: tensors are on different devices: {sorted(map(str, devices))}")
    dev = devices.pop()
    if dev.type != "cuda" and not interpreting():
        raise ValueError(
            f"{name}: the Triton kernel needs CUDA tensors (got {dev}); CPU tensors go through the "
            "torch reference path, or set TRITON_INTERPRET=1 to interpret the kernel"
        )
