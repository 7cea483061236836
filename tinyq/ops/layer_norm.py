"""Functional LayerNorm, optionally fused with the residual add (vision towers and projectors).

``tinyq::layer_norm`` and ``tinyq::add_layer_norm`` are torch custom ops with fake
implementations, for ``torch.compile``. CUDA tensors run the Triton kernel
(:mod:`tinyq.kernels.layernorm`); CPU tensors call the float32 torch reference directly. Outside
``torch.compile`` the launcher is called directly: the custom-op dispatcher (with its autograd
wrapper) cost more host time per call than the launch itself.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from tinyq.backend import use_triton
from tinyq.kernels.layernorm import layernorm as _layernorm_triton
from tinyq.kernels.layernorm import layernorm_reference


@torch.library.custom_op("tinyq::layer_norm", mutates_args=())
def _layer_norm_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    return _layernorm_triton(x, weight, bias, eps)


@_layer_norm_op.register_fake
def _(x, weight, bias, eps):
    return torch.empty_like(x)


@torch.library.custom_op("tinyq::add_layer_norm", mutates_args=())
def _add_layer_norm_op(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], eps: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    return _layernorm_triton(x, weight, bias, eps, residual)


@_add_layer_norm_op.register_fake
def _(x, residual, weight, bias, eps):
    return torch.empty_like(x), torch.empty_like(x)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps) * weight + bias`` over the last dim; ``x [..., N]``, ``bias``
    optional."""
    if use_triton(x):
        op = _layer_norm_op if torch.compiler.is_compiling() else _layernorm_triton
        return op(x, weight, bias, float(eps))
    return layernorm_reference(x, weight, bias, eps)


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                   eps: float):
    """``h = x + residual``; returns ``(layer_norm(h), h)``, both in ``x.dtype``."""
    if use_triton(x):
        if torch.compiler.is_compiling():
            return _add_layer_norm_op(x, residual, weight, bias, float(eps))
        return _layernorm_triton(x, weight, bias, eps, residual)
    return layernorm_reference(x, weight, bias, eps, residual)
