"""Functional W4A16 linear: ``y = x @ W.T + b`` with ``W`` in tinyq's int4 format.

Registered as the torch custom op ``tinyq::w4a16_linear`` (with a fake implementation), so a
model using it works under ``torch.compile`` and CUDA-graph capture. CUDA tensors run the Triton
kernels (:mod:`tinyq.kernels.w4a16_gemv` for one row, :mod:`tinyq.kernels.w4a16_gemm` otherwise);
CPU tensors run the float32 reference.
"""
from __future__ import annotations

from typing import Optional

import torch

from tinyq.backend import use_triton
from tinyq.quant.format import GROUP_SIZES, PACK, SCALE_DTYPES

ACT_DTYPES = (torch.float16, torch.bfloat16)


def check_w4a16_args(x, qweight, scales, zeros, bias) -> None:
    """Validate every argument, naming the offending one (never a CUDA fault later)."""
    if qweight.dtype != torch.int32 or qweight.dim() != 2:
        raise ValueError(f"qweight must be a 2-D int32 tensor [N, K/8], got {qweight.dtype} {tuple(qweight.shape)}")
    n, k = qweight.shape[0], qweight.shape[1] * PACK
    if scales.dim() != 2 or scales.shape[0] != n or scales.shape[1] == 0:
        raise ValueError(f"scales must be [N={n}, K/G], got {tuple(scales.shape)}")
    if k % scales.shape[1] != 0 or (k // scales.shape[1]) not in GROUP_SIZES:
        raise ValueError(
            f"K={k} and scales {tuple(scales.shape)} imply group size {k / scales.shape[1]:g}; "
            f"supported group sizes are {GROUP_SIZES}"
        )
    if scales.dtype not in SCALE_DTYPES:
        raise ValueError(f"scales must be fp16 or bf16, got {scales.dtype}")
    if zeros.shape != scales.shape or zeros.dtype != scales.dtype:
        raise ValueError(f"zeros must match scales ({tuple(scales.shape)}, {scales.dtype}), got {tuple(zeros.shape)}, {zeros.dtype}")
    if x.shape[-1] != k:
        raise ValueError(f"input has {x.shape[-1]} features but the weight expects K={k} (x shape {tuple(x.shape)})")
    allowed = ACT_DTYPES if x.is_cuda else ACT_DTYPES + (torch.float32,)
    if x.dtype not in allowed:
        raise ValueError(f"activations must be one of {allowed} on {x.device.type}, got {x.dtype}")
    if bias is not None and (bias.shape != (n,)):
        raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
    devs = {t.device for t in (x, qweight, scales, zeros) + ((bias,) if bias is not None else ())}
    if len(devs) != 1:
        raise ValueError(f"w4a16_linear: tensors on different devices: {sorted(map(str, devs))}")


def w4a16_linear_reference(x, qweight, scales, zeros, bias=None):
    """Float32 reference: dequantize, matmul, add bias; returns ``x.dtype``."""
    from tinyq.quant.format import dequantize_weight

    w = dequantize_weight(qweight, scales, zeros)  # [N, K] fp32
    y = x.float() @ w.t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


@torch.library.custom_op("tinyq::w4a16_linear", mutates_args=())
def _w4a16_linear_op(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bias: Optional[torch.Tensor]
) -> torch.Tensor:
    if use_triton(x):
        from tinyq.kernels.w4a16_matmul import w4a16_matmul_checked

        # w4a16_linear has run check_w4a16_args already
        x2 = x.reshape(-1, x.shape[-1])
        y = w4a16_matmul_checked(x2, qweight, scales, zeros, bias)
        return y.reshape(*x.shape[:-1], qweight.shape[0])
    return w4a16_linear_reference(x, qweight, scales, zeros, bias)


@_w4a16_linear_op.register_fake
def _(x, qweight, scales, zeros, bias):
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


def w4a16_linear(x, qweight, scales, zeros, bias=None):
    """``x [..., K]`` (fp16/bf16; fp32 allowed on CPU) -> ``[..., N]`` in ``x.dtype``."""
    check_w4a16_args(x, qweight, scales, zeros, bias)
    if not x.is_contiguous():
        x = x.contiguous()
    return _w4a16_linear_op(x, qweight, scales, zeros, bias)
