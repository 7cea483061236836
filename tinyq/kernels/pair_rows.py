"""Rows of activations rewritten in a W4A16 GEMV's paired layout (:mod:`tinyq.kernels.paired`).

For a GEMV whose input comes from no fused producer (a plain ``W4A16Linear`` at M = 1): the paired
GEMV reads x in 16-byte coalesced pieces where the natural one reads 8 bytes at a 64-byte lane
stride, and this pass costs one read and one write of x (8 KB at K = 4096).

Tensors: ``x`` [M, K] fp16/bf16 (K a multiple of 32, unit column stride, row stride ``stride_x``);
out: :class:`~tinyq.kernels.paired.PairedRows`. Program (row, c) rewrites inputs
``c * BLOCK .. (c + 1) * BLOCK`` of one row: whole 32-input blocks, so its pairs land in one
contiguous run of each plane (``BLOCK / 4`` entries from ``c * BLOCK / 4``).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from tinyq.kernels.paired import PairedRows, empty_paired_rows, pair_rows_reference, store_paired_row

# Inputs per program: one 32-block group of a GEMV step (2 KB of fp16), so K = 4096 gives 4 programs
# a row and the pass stays a launch's worth of time; 4 warps hold it at 8 inputs a thread.
BLOCK = 1024


@triton.jit
def _pair_rows_kernel(X, OUT, K, stride_x, stride_o, PLANE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    cols = c * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(X + row * stride_x + cols, mask=cols < K, other=0.0)
    store_paired_row(OUT + row * stride_o + c * (BLOCK // 4), v, K - c * BLOCK, BLOCK, PLANE)


def pair_rows(x: torch.Tensor, out: Optional[PairedRows] = None) -> PairedRows:
    """``x [M, K]`` (fp16/bf16, K a multiple of 32, unit stride along K) in the paired layout,
    written into ``out`` when given (its K, dtype and at least M rows are checked)."""
    m, k = x.shape
    if x.stride(1) != 1:
        raise ValueError(f"pair_rows: x must have unit stride along K (strides {x.stride()})")
    if out is None:
        out = empty_paired_rows(m, k, x.dtype, x.device)
    elif out.k != k or out.data.dtype != x.dtype or out.data.shape[0] < m or out.data.device != x.device:
        raise ValueError(f"pair_rows: out holds {out.data.shape[0]} rows of {out.k} inputs, {out.data.dtype} on "
                         f"{out.data.device}; x is {m} rows of {k}, {x.dtype} on {x.device}")
    if m and k:
        _pair_rows_kernel[(m, triton.cdiv(k, BLOCK))](
            x, out.data, k, x.stride(0), out.data.stride(0),
            PLANE=out.data.shape[1] // 4, BLOCK=BLOCK, num_warps=4,
        )
    return out


__all__ = ["BLOCK", "pair_rows", "pair_rows_reference"]  # the reference lives beside the layout's definition
