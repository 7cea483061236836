"""Functional W4A16 linear: ``y = x @ W.T + b`` with ``W`` in tinyq's int4 format.

Registered as the torch custom op ``tinyq::w4a16_linear`` (with a fake implementation), so a
model using it works under ``torch.compile`` and CUDA-graph capture. CUDA tensors run the Triton
kernels (:mod:`tinyq.kernels.w4a16_matmul` dispatches on M); CPU tensors run the float32 reference.

Two entry points: :func:`w4a16_linear` checks every argument; :func:`w4a16_linear_prechecked` is
for callers whose weights were checked once (``W4A16Linear``) and checks only the input. Outside
``torch.compile`` the latter calls the launcher directly: the custom-op dispatcher costs several
microseconds of host time per call, as much as the GPU time of a decode-sized linear.
"""
from __future__ import annotations

from typing import Optional

import torch

from tinyq.backend import use_triton
from tinyq.kernels.w4a16_matmul import (
    check_w4a16_args,
    check_w4a16_input,
    check_w4a16_weight,
    w4a16_linear_reference,
    w4a16_matmul_checked,
)

__all__ = ["check_w4a16_weight", "w4a16_linear", "w4a16_linear_prechecked", "w4a16_linear_reference"]


def _run(x, qweight, scales, zeros, bias):
    if use_triton(x):
        if x.dtype != scales.dtype:
            raise ValueError(f"activations ({x.dtype}) must have the scales' dtype ({scales.dtype}) on the Triton path")
        y = w4a16_matmul_checked(x.reshape(-1, x.shape[-1]), qweight, scales, zeros, bias)
        return y.view(*x.shape[:-1], qweight.shape[0])
    return w4a16_linear_reference(x, qweight, scales, zeros, bias)


@torch.library.custom_op("tinyq::w4a16_linear", mutates_args=())
def _w4a16_linear_op(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bias: Optional[torch.Tensor]
) -> torch.Tensor:
    return _run(x, qweight, scales, zeros, bias)


@_w4a16_linear_op.register_fake
def _(x, qweight, scales, zeros, bias):
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


def w4a16_linear_prechecked(x, qweight, scales, zeros, bias=None):
    """:func:`w4a16_linear` for weights that passed ``check_w4a16_weight`` already."""
    if torch.compiler.is_compiling():
        check_w4a16_input(x, qweight, scales)
        return _w4a16_linear_op(x.contiguous(), qweight, scales, zeros, bias)
    if x.is_cuda and use_triton(x):  # the hot path: a few attribute reads, then the launcher
        k = x.shape[-1]
        if k != qweight.shape[1] * 8 or x.dtype != scales.dtype or x.get_device() != qweight.get_device():
            check_w4a16_input(x, qweight, scales)
            raise ValueError(f"activations ({x.dtype}) must have the scales' dtype ({scales.dtype}) on the Triton path")
        x2 = x.reshape(-1, k)
        if x2.stride(1) != 1:
            x2 = x2.contiguous()
        return w4a16_matmul_checked(x2, qweight, scales, zeros, bias).view(*x.shape[:-1], qweight.shape[0])
    check_w4a16_input(x, qweight, scales)
    return _run(x.contiguous(), qweight, scales, zeros, bias)


def w4a16_linear(x, qweight, scales, zeros, bias=None):
    """``x [..., K]`` (fp16/bf16; fp32 allowed on CPU) -> ``[..., N]`` in ``x.dtype``."""
    check_w4a16_args(x, qweight, scales, zeros, bias)
    if not x.is_contiguous():
        x = x.contiguous()
    return _w4a16_linear_op(x, qweight, scales, zeros, bias)
