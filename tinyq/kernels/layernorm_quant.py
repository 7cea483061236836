"""LayerNorm (optionally after a residual add) fused with per-token int8 quantization: the norms
before a vision tower's qkv / fc1 in a W8A8 tower.

Math, per row of ``K`` features (float32)::

    h   = x (+ residual, rounded to x's dtype and stored: the next residual)
    mu  = mean(h);  var = mean((h - mu)^2)
    v   = (h - mu) / sqrt(var + eps) * weight + bias
    xq, scale = quantize(v)               (dynamic per token, or one static scale; int8_quant.py)

Tensors: ``x`` (and ``residual``) ``[M, K]`` (leading dims flattened) fp16/bf16/fp32, last dim
contiguous; ``weight`` and ``bias`` ``[K]`` (bias optional); ``static_scale`` float32 ``[1]`` or
None. Outputs ``xq`` int8 ``[M, K]``, ``scale`` float32 ``[M]`` and, with a residual, ``h`` like
``x``. One program per row, two passes over registers holding the row as two power-of-two blocks
(:func:`tinyq.kernels.residual.row_blocks`).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tinyq.backend import check_kernel_device
from tinyq.kernels.int8_quant import check_static_scale, int8_row_outputs, quantize_store_row
from tinyq.kernels.layernorm import load_row_stats, normalize
from tinyq.kernels.residual import as_rows, check_norm_args, row_blocks, row_warps, unit_stride
from tinyq.kernels.rmsnorm import MAX_N
from tinyq.quant.int8_format import MIN_ABSMAX, quantize_rows_reference


@triton.jit
def _layernorm_quant_kernel(
    X, RES, W, B, Q, SCALE, H_OUT, STATIC_S,
    N, eps,
    stride_x, stride_r, stride_q, stride_h,
    HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr, STATIC: tl.constexpr, MIN_AMAX: tl.constexpr,
    HEAD: tl.constexpr, TAIL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    ha, ca, ma, hb, cb, mb, mean, rstd = load_row_stats(X, RES, H_OUT, row, N, eps, stride_x, stride_r, stride_h,
                                                        HAS_RESIDUAL, HEAD, TAIL)
    va = normalize(ha, ca, ma, mean, rstd, W, B, HAS_BIAS)
    vb = va
    if TAIL > 0:
        vb = normalize(hb, cb, mb, mean, rstd, W, B, HAS_BIAS)
    scale = quantize_store_row(va, ca, ma, vb, cb, mb, Q + row * stride_q, STATIC_S, STATIC, MIN_AMAX, TAIL)
    tl.store(SCALE + row, scale)


def _check(x, weight, bias, static_scale, residual=None):
    check_norm_args("layernorm_quant", x, residual, MAX_N, weight=weight, bias=bias)
    check_static_scale(static_scale, x.device)


def layernorm_quant(x, weight, bias, eps: float, static_scale=None, residual=None):
    """Triton launcher: ``x [..., K]`` -> ``(xq int8 [..., K], scale float32 [...])``, or
    ``(xq, scale, h)`` with a residual (``h = x + residual``)."""
    _check(x, weight, bias, static_scale, residual)
    extra = tuple(t for t in (bias, static_scale, residual) if t is not None)
    check_kernel_device("layernorm_quant", x, weight, *extra)
    weight, bias = (unit_stride(t) for t in (weight, bias))
    shape = x.shape
    n = shape[-1]
    x2 = as_rows(x, n)
    m = x2.shape[0]
    r2 = None if residual is None else residual.reshape(m, n).contiguous()  # (not -1: n may be 0)
    q, scale = int8_row_outputs(m, n, x.device, static_scale)
    h = torch.empty_like(x2) if residual is not None else x2  # unused without a residual
    if m > 0 and n > 0:  # rows of no features: int8_row_outputs set their scales
        head, tail = row_blocks(n)
        _layernorm_quant_kernel[(m,)](
            x2, r2 if r2 is not None else x2, weight, bias if bias is not None else weight, q, scale, h,
            static_scale if static_scale is not None else scale,
            n, float(eps), x2.stride(0), r2.stride(0) if r2 is not None else 0, q.stride(0), h.stride(0),
            HAS_RESIDUAL=residual is not None, HAS_BIAS=bias is not None, STATIC=static_scale is not None,
            MIN_AMAX=MIN_ABSMAX, HEAD=head, TAIL=tail, num_warps=row_warps(head, tail, m),
        )
    out = (q.reshape(shape), scale.reshape(shape[:-1]))
    return out if residual is None else out + (h.reshape(shape),)


def layernorm_quant_reference(x, weight, bias, eps: float, static_scale=None, residual=None):
    """Plain torch (float32 math); same returns as :func:`layernorm_quant`."""
    _check(x, weight, bias, static_scale, residual)
    h = x if residual is None else (x.float() + residual.float()).to(x.dtype)
    n = x.shape[-1]
    v = torch.nn.functional.layer_norm(h.float(), (n,), weight.float(), None if bias is None else bias.float(), eps)
    q, scale = quantize_rows_reference(as_rows(v, n), static_scale)
    out = (q.reshape(x.shape), scale.reshape(x.shape[:-1]))
    return out if residual is None else out + (h,)
