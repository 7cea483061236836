"""LayerNorm fused with per-token int8 quantization (the norm before a vision tower's qkv / fc1).

Math, per row of ``K`` features (float32)::

    mu  = mean(x);  var = mean((x - mu)^2)
    v   = (x - mu) / sqrt(var + eps) * weight + bias
    xq, scale = quantize_row(v)           (dynamic per token, or one static scale; int8_quant.py)

Tensors: ``x`` ``[M, K]`` (leading dims flattened) fp16/bf16/fp32, last dim contiguous; ``weight``
and ``bias`` ``[K]`` (bias optional); ``static_scale`` float32 ``[1]`` or None. Outputs ``xq`` int8
``[M, K]`` and ``scale`` float32 ``[M]``. One program per row, two passes over registers.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tinyq.backend import check_kernel_device
from tinyq.kernels.int8_quant import check_static_scale, int8_row_outputs, quantize_row, row_num_warps
from tinyq.kernels.residual import as_rows
from tinyq.kernels.rmsnorm import MAX_N
from tinyq.quant.int8_format import MIN_ABSMAX, quantize_rows_reference


@triton.jit
def _layernorm_quant_kernel(
    X, W, B, Q, SCALE, STATIC_S,
    N, eps,
    stride_x, stride_q,
    HAS_BIAS: tl.constexpr, STATIC: tl.constexpr, MIN_AMAX: tl.constexpr, BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / N
    d = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=0) / N + eps)
    v = d * rstd * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        v += tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    q, scale = quantize_row(v, mask, STATIC_S, STATIC, MIN_AMAX)
    tl.store(Q + row * stride_q + cols, q, mask=mask)
    tl.store(SCALE + row, scale)


def _check(x, weight, bias, static_scale):
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"layernorm_quant: x must be fp16/bf16/fp32, got {x.dtype}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (t.dim() != 1 or t.shape[0] != x.shape[-1]):
            raise ValueError(f"layernorm_quant: {name} must be [{x.shape[-1]}], got {tuple(t.shape)}")
    if x.shape[-1] > MAX_N:
        raise ValueError(f"layernorm_quant: rows of {x.shape[-1]} features exceed the supported {MAX_N}")
    check_static_scale(static_scale, x.device)


def layernorm_quant(x, weight, bias, eps: float, static_scale=None):
    """Triton launcher: ``x [..., K]`` -> ``(xq int8 [..., K], scale float32 [...])``."""
    _check(x, weight, bias, static_scale)
    check_kernel_device("layernorm_quant", x, weight, *(t for t in (bias, static_scale) if t is not None))
    shape = x.shape
    n = shape[-1]
    x2 = as_rows(x, n)
    m = x2.shape[0]
    q, scale = int8_row_outputs(m, n, x.device)
    if m > 0:
        block = triton.next_power_of_2(n)
        _layernorm_quant_kernel[(m,)](
            x2, weight, bias if bias is not None else weight, q, scale,
            static_scale if static_scale is not None else scale,
            n, float(eps), x2.stride(0), q.stride(0),
            HAS_BIAS=bias is not None, STATIC=static_scale is not None, MIN_AMAX=MIN_ABSMAX,
            BLOCK_N=block, num_warps=row_num_warps(block),
        )
    return q.reshape(shape), scale.reshape(shape[:-1])


def layernorm_quant_reference(x, weight, bias, eps: float, static_scale=None):
    """Plain torch (float32 math); same returns as :func:`layernorm_quant`."""
    _check(x, weight, bias, static_scale)
    n = x.shape[-1]
    v = torch.nn.functional.layer_norm(x.float(), (n,), weight.float(), None if bias is None else bias.float(), eps)
    q, scale = quantize_rows_reference(v.reshape(-1, n), static_scale)
    return q.reshape(x.shape), scale.reshape(x.shape[:-1])
