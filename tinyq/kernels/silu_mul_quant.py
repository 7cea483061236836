"""SiLU-gated product fused with per-token int8 quantization (the input of a W8A8 ``down_proj``).

Math (float32), for ``x = [gate | up]`` of ``2I`` features per row (:mod:`tinyq.kernels.silu_mul`)::

    v[i] = gate[i] / (1 + exp(-gate[i])) * up[i],   i < I
    xq, scale = quantize(v)               (dynamic per token, or one static scale; int8_quant.py)

The per-token scale needs the whole row's max, so one program handles one row, held as two
power-of-two register blocks (:func:`tinyq.kernels.residual.row_blocks`; Llama-3-8B's I = 14336 is
8192 + 8192, Qwen2-7B's 18944 is 16384 + 4096 instead of 32768 lanes).

Tensors: ``x`` ``[M, 2I]`` (leading dims flattened) fp16/bf16/fp32, last dim contiguous;
``static_scale`` float32 ``[1]`` or None. Outputs ``xq`` int8 ``[M, I]``, ``scale`` float32 ``[M]``.
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


@triton.jit
def _silu_mul_part(X, row, stride_x, I, cols, mask):
    gate = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(X + row * stride_x + I + cols, mask=mask, other=0.0).to(tl.float32)
    return gate / (1.0 + tl.exp(-gate)) * up  # 0 on masked lanes


@triton.jit
def _silu_mul_quant_kernel(X, Q, SCALE, STATIC_S, I, stride_x, stride_q,
                           STATIC: tl.constexpr, MIN_AMAX: tl.constexpr, HEAD: tl.constexpr, TAIL: tl.constexpr):
    # the row of I products as two register blocks, [0, HEAD) and [HEAD, HEAD + TAIL) (residual.row_blocks)
    row = tl.program_id(0).to(tl.int64)
    ca, ma, cb, mb = row_columns(I, HEAD, TAIL)
    va = _silu_mul_part(X, row, stride_x, I, ca, ma)
    vb = va
    if TAIL > 0:
        vb = _silu_mul_part(X, row, stride_x, I, cb, mb)
    scale = quantize_store_row(va, ca, ma, vb, cb, mb, Q + row * stride_q, STATIC_S, STATIC, MIN_AMAX, TAIL)
    tl.store(SCALE + row, scale)


def _check(x, static_scale):
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"silu_mul_quant: x must be fp16/bf16/fp32, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] % 2 or x.shape[-1] // 2 > MAX_K:
        raise ValueError(f"silu_mul_quant: x must be [..., 2*I] with I <= {MAX_K}, got {tuple(x.shape)}")
    check_static_scale(static_scale, x.device)


def silu_mul_quant(x: torch.Tensor, static_scale=None):
    """Triton launcher: ``x [..., 2I]`` -> ``(xq int8 [..., I], scale float32 [...])``."""
    _check(x, static_scale)
    check_kernel_device("silu_mul_quant", x, *(() if static_scale is None else (static_scale,)))
    i = x.shape[-1] // 2
    x2 = as_rows(x, 2 * i)
    m = x2.shape[0]
    q, scale = int8_row_outputs(m, i, x.device, static_scale)
    if m > 0 and i > 0:
        head, tail = row_blocks(i)
        _silu_mul_quant_kernel[(m,)](
            x2, q, scale, static_scale if static_scale is not None else scale, i, x2.stride(0), q.stride(0),
            STATIC=static_scale is not None, MIN_AMAX=MIN_ABSMAX, HEAD=head, TAIL=tail,
            num_warps=row_warps(head, tail, m),
        )
    return q.reshape(*x.shape[:-1], i), scale.reshape(x.shape[:-1])


def silu_mul_quant_reference(x: torch.Tensor, static_scale=None):
    """Plain torch (float32 math); same returns as :func:`silu_mul_quant`."""
    _check(x, static_scale)
    gate, up = x.float().chunk(2, dim=-1)
    i = gate.shape[-1]
    q, scale = quantize_rows_reference(as_rows(torch.nn.functional.silu(gate) * up, i), static_scale)
    return q.reshape(*x.shape[:-1], i), scale.reshape(x.shape[:-1])
