"""SiLU-gated product of a fused gate/up projection (the Llama / Qwen2 MLP activation).

Math (float32), for ``x = [gate | up]`` of ``2I`` features per row::

    out[i] = silu(gate[i]) * up[i] = gate[i] / (1 + exp(-gate[i])) * up[i],   i < I

Tensors: ``x`` ``[M, 2I]`` (leading dims flattened by the launcher), fp16/bf16/fp32, last dim
contiguous, gate in columns ``[0, I)`` and up in ``[I, 2I)`` (the order of the fused
``gate_up_proj`` the loader builds); output ``[M, I]`` in ``x.dtype``.

Grid: (rows, column blocks of ``BLOCK``); ``BLOCK = 1024`` keeps 8 fp16 values per thread at 4
warps; at M = 1 and I = 14336 (Llama-3-8B) that is 14 programs, enough for a ~60 KB op whose
cost is the launch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tinyq.backend import check_kernel_device
from tinyq.kernels.residual import as_rows

BLOCK = 1024


@triton.jit
def _silu_mul_kernel(X, OUT, I, stride_x, stride_o, BLOCK_I: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    mask = cols < I
    gate = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(X + row * stride_x + I + cols, mask=mask, other=0.0).to(tl.float32)
    out = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(OUT + row * stride_o + cols, out.to(OUT.dtype.element_ty), mask=mask)


def _check(x):
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"silu_mul: x must be fp16/bf16/fp32, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] % 2:
        raise ValueError(f"silu_mul: x must have an even last dim [.., 2*I], got {tuple(x.shape)}")


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """Triton launcher: ``x [..., 2I]`` -> ``[..., I]``."""
    _check(x)
    check_kernel_device("silu_mul", x)
    i = x.shape[-1] // 2
    x2 = as_rows(x, 2 * i)
    out = torch.empty(x2.shape[0], i, dtype=x.dtype, device=x.device)
    if x2.shape[0] > 0 and i > 0:
        grid = (x2.shape[0], triton.cdiv(i, BLOCK))
        _silu_mul_kernel[grid](x2, out, i, x2.stride(0), out.stride(0), BLOCK_I=BLOCK, num_warps=4)
    return out.reshape(*x.shape[:-1], i)


def silu_mul_reference(x: torch.Tensor) -> torch.Tensor:
    """Plain torch, float32 math, output in ``x.dtype``."""
    _check(x)
    gate, up = x.float().chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up).to(x.dtype)
