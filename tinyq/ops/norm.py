"""Functional RMSNorm (optionally fused with the residual add) and SiLU-gated product.

These are the small element-wise ops of a decoder layer. Each is registered as a torch custom op
(``tinyq::rms_norm``, ``tinyq::add_rms_norm``, ``tinyq::silu_mul``) with a fake implementation, so
a model using them works under ``torch.compile`` and CUDA-graph capture. CUDA tensors run the
Triton kernels (:mod:`tinyq.kernels.rmsnorm`, :mod:`tinyq.kernels.silu_mul`); CPU tensors call the
torch references. Outside ``torch.compile`` both call their function directly: the custom-op
dispatcher costs several microseconds of host time per call, more than these kernels take on a GPU.
"""
from __future__ import annotations

from typing import Tuple

import torch

from tinyq.backend import use_triton
from tinyq.kernels.rmsnorm import rmsnorm as _rmsnorm_triton
from tinyq.kernels.rmsnorm import rmsnorm_reference
from tinyq.kernels.silu_mul import silu_mul as _silu_mul_triton
from tinyq.kernels.silu_mul import silu_mul_reference


@torch.library.custom_op("tinyq::rms_norm", mutates_args=())
def _rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _rmsnorm_triton(x, weight, eps)


@_rms_norm_op.register_fake
def _(x, weight, eps):
    return torch.empty_like(x)


@torch.library.custom_op("tinyq::add_rms_norm", mutates_args=())
def _add_rms_norm_op(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    return _rmsnorm_triton(x, weight, eps, residual)


@_add_rms_norm_op.register_fake
def _(x, residual, weight, eps):
    return torch.empty_like(x), torch.empty_like(x)


@torch.library.custom_op("tinyq::silu_mul", mutates_args=())
def _silu_mul_op(x: torch.Tensor) -> torch.Tensor:
    return _silu_mul_triton(x)


@_silu_mul_op.register_fake
def _(x):
    return x.new_empty(*x.shape[:-1], x.shape[-1] // 2)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / sqrt(mean(x^2) + eps) * weight`` over the last dim; ``x [..., N]``, weight ``[N]``."""
    if use_triton(x):
        return _rms_norm_op(x, weight, float(eps)) if torch.compiler.is_compiling() else _rmsnorm_triton(x, weight, eps)
    return rmsnorm_reference(x, weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """``h = x + residual``; returns ``(rms_norm(h), h)``, both in ``x.dtype``."""
    if use_triton(x):
        return _add_rms_norm_op(x, residual, weight, float(eps)) if torch.compiler.is_compiling() else _rmsnorm_triton(x, weight, eps, residual)
    return rmsnorm_reference(x, weight, eps, residual)


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """``x [..., 2I] = [gate | up]`` -> ``silu(gate) * up`` ``[..., I]``."""
    if use_triton(x):
        return _silu_mul_op(x) if torch.compiler.is_compiling() else _silu_mul_triton(x)
    return silu_mul_reference(x)
