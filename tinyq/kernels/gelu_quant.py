"""GELU fused with per-token int8 quantization (the input of a vision tower's W8A8 ``fc2``).

Math, per row of ``K`` features (float32)::

    erf:   v = 0.5 * x * (1 + erf(x / sqrt(2)))
    tanh:  v = 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3)))
    xq, scale = quantize(v)               (dynamic per token, or one static scale; int8_quant.py)

``tanh(u)`` is computed as ``1 - 2 / (exp(2u) + 1)`` (exact at both tails: exp overflow gives 1,
underflow -1), which also runs in the CPU interpreter (no libdevice there).

Tensors: ``x`` ``[M, K]`` (leading dims flattened) fp16/bf16/fp32, last dim contiguous;
``static_scale`` float32 ``[1]`` or None. Outputs ``xq`` int8 ``[M, K]`` and ``scale`` float32 ``[M]``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tinyq.backend import check_kernel_device
from tinyq.kernels.int8_quant import (
    MAX_K, check_static_scale, int8_row_outputs, quantize_store_row,
)
from tinyq.kernels.residual import as_rows, row_blocks, row_columns, row_warps
from tinyq.quant.int8_format import MIN_ABSMAX, quantize_rows_reference

APPROXIMATIONS = ("none", "tanh")  # torch.nn.functional.gelu's names: "none" is the exact erf form


@triton.jit
def _gelu(x, TANH: tl.constexpr):
    if TANH:
        u = 0.7978845608028654 * (x + 0.044715 * x * x * x)  # sqrt(2 / pi)
        v = 0.5 * x * (2.0 - 2.0 / (tl.exp(2.0 * u) + 1.0))
    else:
        v = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    return v


@triton.jit
def _gelu_quant_kernel(X, Q, SCALE, STATIC_S, K, stride_x, stride_q,
                       TANH: tl.constexpr, STATIC: tl.constexpr, MIN_AMAX: tl.constexpr,
                       HEAD: tl.constexpr, TAIL: tl.constexpr):
    # the row as two register blocks, [0, HEAD) and [HEAD, HEAD + TAIL) (residual.row_blocks)
    row = tl.program_id(0).to(tl.int64)
    ca, ma, cb, mb = row_columns(K, HEAD, TAIL)
    va = _gelu(tl.load(X + row * stride_x + ca, mask=ma, other=0.0).to(tl.float32), TANH)  # gelu(0) = 0
    vb = va
    if TAIL > 0:
        vb = _gelu(tl.load(X + row * stride_x + cb, mask=mb, other=0.0).to(tl.float32), TANH)
    scale = quantize_store_row(va, ca, ma, vb, cb, mb, Q + row * stride_q, STATIC_S, STATIC, MIN_AMAX, TAIL)
    tl.store(SCALE + row, scale)


def _check(x, approximate, static_scale):
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"gelu_quant: x must be fp16/bf16/fp32, got {x.dtype}")
    if approximate not in APPROXIMATIONS:
        raise ValueError(f"gelu_quant: approximate must be one of {APPROXIMATIONS}, got {approximate!r}")
    if x.dim() < 1 or x.shape[-1] > MAX_K:
        raise ValueError(f"gelu_quant: x must be [..., K] with K <= {MAX_K}, got {tuple(x.shape)}")
    check_static_scale(static_scale, x.device)


def gelu_quant(x: torch.Tensor, approximate: str = "none", static_scale=None):
    """Triton launcher: ``x [..., K]`` -> ``(xq int8 [..., K], scale float32 [...])``."""
    _check(x, approximate, static_scale)
    check_kernel_device("gelu_quant", x, *(() if static_scale is None else (static_scale,)))
    k = x.shape[-1]
    x2 = as_rows(x, k)
    m = x2.shape[0]
    q, scale = int8_row_outputs(m, k, x.device, static_scale)
    if m > 0 and k > 0:
        head, tail = row_blocks(k)
        _gelu_quant_kernel[(m,)](
            x2, q, scale, static_scale if static_scale is not None else scale, k, x2.stride(0), q.stride(0),
            TANH=approximate == "tanh", STATIC=static_scale is not None, MIN_AMAX=MIN_ABSMAX, HEAD=head, TAIL=tail,
            num_warps=row_warps(head, tail, m),
        )
    return q.reshape(x.shape), scale.reshape(x.shape[:-1])


def gelu_quant_reference(x: torch.Tensor, approximate: str = "none", static_scale=None):
    """Plain torch (float32 math); same returns as :func:`gelu_quant`."""
    _check(x, approximate, static_scale)
    k = x.shape[-1]
    v = torch.nn.functional.gelu(x.float(), approximate=approximate)
    q, scale = quantize_rows_reference(as_rows(v, k), static_scale)
    return q.reshape(x.shape), scale.reshape(x.shape[:-1])

