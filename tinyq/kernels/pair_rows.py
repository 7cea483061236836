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

import torch
import triton
import triton.language as tl

from tinyq.kernels.paired import PairedRows, empty_paired_rows, pair_rows_reference, store_paired_row

BLOCK = 1024  # inputs per program


@triton.jit
def _pair_rows_kernel(X, OUT, K, stride_x, stride_o, PLANE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    cols = c * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(X + row * stride_x + cols, mask=cols < K, other=0.0)
    store_paired_row(OUT + row * stride_o + c * (BLOCK // 4), v, K - c * BLOCK, BLOCK, PLANE)


def pair_rows(x: torch.Tensor, out: PairedRows = None) -> PairedRows:
    """``x [M, K]`` in the paired layout (into ``out`` when given: the caller validated its shape).
    Triton launcher; x must be fp16/bf16 with K a multiple of 32 and a unit column stride."""
    m, k = x.shape
    if out is None:
        out = empty_paired_rows(m, k, x.dtype, x.device)
    if m and k:
        _pair_rows_kernel[(m, triton.cdiv(k, BLOCK))](
            x, out.data, k, x.stride(0), out.data.stride(0),
            PLANE=out.data.shape[1] // 4, BLOCK=BLOCK, num_warps=4,
        )
    return out


__all__ = ["BLOCK", "pair_rows", "pair_rows_reference"]  # the reference lives beside the layout's definition
