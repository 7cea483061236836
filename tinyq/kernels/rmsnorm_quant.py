"""RMSNorm (optionally after the residual add) fused with per-token int8 quantization.

Math, per row of ``K`` features (float32; :mod:`tinyq.kernels.rmsnorm` without the rounding of its
output)::

    h   = x + residual                    (when a residual is given; stored back in x.dtype)
    v   = (h * weight) / sqrt(mean(h^2) + eps)
    xq, scale = quantize(v)               (dynamic per token, or one static scale; int8_quant.py)

The normalized row is quantized straight from float32 registers: it never goes to memory in fp16,
so a decoder layer's norm writes K int8 + 4 bytes per row instead of 2K and the next linear reads
half the bytes. ``h`` is rounded to ``x.dtype`` before it is normalized, as the unfused model does.

Tensors: ``x``/``residual`` ``[M, K]`` (leading dims flattened) fp16/bf16/fp32, last dim contiguous;
``weight`` ``[K]``; ``static_scale`` float32 ``[1]`` or None. Outputs ``xq`` int8 ``[M, K]``,
``scale`` float32 ``[M]`` and, with a residual, ``h`` ``[M, K]`` in ``x.dtype``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tinyq.backend import check_kernel_device
from tinyq.kernels.int8_quant import (
    check_static_scale,
    int8_row_outputs,
    quantize_with_absmax,
    sum_and_max,
)
from tinyq.kernels.residual import as_rows, check_norm_args, load_row_add_residual, row_warps
from tinyq.kernels.rmsnorm import MAX_N
from tinyq.quant.int8_format import MIN_ABSMAX, quantize_rows_reference


@triton.jit
def _rmsnorm_quant_kernel(
    X, RES, W, Q, SCALE, H_OUT, STATIC_S,
    N, eps,
    stride_x, stride_r, stride_q, stride_h,
    HAS_RESIDUAL: tl.constexpr, STATIC: tl.constexpr, MIN_AMAX: tl.constexpr, BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    # the weight is loaded first: after the store of h the compiler may not move it up, and its
    # round trip then sat between the row's arrival and the reduction (sm90 SASS, docs/perf_notes.md)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    hf = load_row_add_residual(X, RES, H_OUT, row, cols, mask, stride_x, stride_r, stride_h, HAS_RESIDUAL)
    hw = hf * w
    # one block reduction for both: max|hw * rstd| = max|hw| * rstd exactly (rstd > 0, rounding is monotonic)
    sum_sq, amax_hw = tl.reduce((hf * hf, tl.abs(hw)), 0, sum_and_max)
    rstd = 1.0 / tl.sqrt(sum_sq / N + eps)
    q, scale = quantize_with_absmax(hw * rstd, amax_hw * rstd, STATIC_S, STATIC, MIN_AMAX)
    tl.store(Q + row * stride_q + cols, q, mask=mask)
    tl.store(SCALE + row, scale + sum_sq * 0.0)  # NaN iff h holds inf/NaN (fp16/bf16 squares cannot overflow)


def _check(x, weight, residual, static_scale):
    check_norm_args("rmsnorm_quant", x, residual, MAX_N, weight=weight)
    check_static_scale(static_scale, x.device)


def rmsnorm_quant(x, weight, eps: float, residual=None, static_scale=None):
    """Triton launcher. Returns ``(xq, scale)``, or ``(xq, scale, h)`` with a residual."""
    _check(x, weight, residual, static_scale)
    extra = tuple(t for t in (residual, static_scale) if t is not None)
    check_kernel_device("rmsnorm_quant", x, weight, *extra)
    weight = weight if weight.stride(0) == 1 else weight.contiguous()  # the kernel reads it at unit stride
    shape = x.shape
    n = shape[-1]
    x2 = as_rows(x, n)
    m = x2.shape[0]
    r2 = None if residual is None else residual.reshape(m, n).contiguous()  # (not -1: n may be 0)
    q, scale = int8_row_outputs(m, n, x.device, static_scale)
    h = torch.empty_like(x2) if residual is not None else x2  # unused without a residual
    if m > 0 and n > 0:  # rows of no features: int8_row_outputs set their scales
        block = triton.next_power_of_2(n)
        _rmsnorm_quant_kernel[(m,)](
            x2, r2 if r2 is not None else x2, weight, q, scale, h, static_scale if static_scale is not None else scale,
            n, float(eps),
            x2.stride(0), r2.stride(0) if r2 is not None else 0, q.stride(0), h.stride(0),
            HAS_RESIDUAL=residual is not None, STATIC=static_scale is not None, MIN_AMAX=MIN_ABSMAX,
            BLOCK_N=block, num_warps=row_warps(block),
        )
    out = (q.reshape(shape), scale.reshape(shape[:-1]))
    return out if residual is None else out + (h.reshape(shape),)


def rmsnorm_quant_reference(x, weight, eps: float, residual=None, static_scale=None):
    """Plain torch (float32 math); same returns as :func:`rmsnorm_quant`."""
    _check(x, weight, residual, static_scale)
    h = x if residual is None else (x.float() + residual.float()).to(x.dtype)
    hf = h.float()
    v = (hf * weight.float()) * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    n = x.shape[-1]
    q, scale = quantize_rows_reference(as_rows(v, n), static_scale)
    out = (q.reshape(x.shape), scale.reshape(x.shape[:-1]))
    return out if residual is None else out + (h,)
