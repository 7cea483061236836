"""W4A16 GEMV of a fused gate/up projection with the SiLU-gated product in its epilogue (decode MLP).

Math, for one activation row ``x [K]`` and ``W = [W_gate; W_up]`` (``[2I, K]``, tinyq int4, the
order of the fused ``gate_up_proj``)::

    g = x @ W_gate.T (+ b_gate),  u = x @ W_up.T (+ b_up)          (float32, never rounded)
    out[i] = silu(g[i]) * u[i] = g[i] / (1 + exp(-g[i])) * u[i]

A program computes ``BLOCK_N / 2`` outputs: its ``BLOCK_N`` weight rows interleave gate row
``i`` and up row ``I + i``, so both factors of an output end in the same program and the
``[2I]`` intermediate never reaches memory. One launch instead of two per decoder layer and
token (the main loop is :func:`tinyq.kernels.w4a16_gemv.gemv_rows`).

``PRENORM``: ``x`` is ``h * w`` of the RMSNorm before this projection
(:mod:`tinyq.kernels.w4a16_gemv_residual`); every program computes ``1 / rms(h)`` from the row ``h``
(an L2-resident read overlapping its weight loads) and scales its dot products by it, so the norm
needs no kernel of its own.

Tensors: ``x`` ``[1, K]`` (fp16/bf16, unit stride) or its
:class:`~tinyq.kernels.paired.PairedRows`, ``qweight`` int32 ``[2I, K/8]``, ``scales``/``zeros``
``[2I, K/G]``, ``bias`` ``[2I]`` or none; ``h`` ``[K]`` (PRENORM); output ``[1, I]`` or paired
(for the down projection's GEMV) in x's dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tinyq.kernels.paired import out_operand, paired_offsets, x_operand
from tinyq.kernels.w4a16_gemv import (
    even_k, gemv_ptx, gemv_rows_prenormed, gemv_rows_prenormed_reference, warp_blocks_of,
)


@triton.jit
def _w4a16_gemv_silu_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, bias_ptr, y_ptr, h_ptr,
    I, K, eps, stride_w16, stride_sn,
    GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr, PRENORM: tl.constexpr, PTX_DEQUANT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, WARP_BLOCKS: tl.constexpr, ROW: tl.constexpr,
    X_PLANE: tl.constexpr, Y_PLANE: tl.constexpr, EVEN_K: tl.constexpr,
):
    HALF: tl.constexpr = BLOCK_N // 2
    r = tl.arange(0, BLOCK_N)
    i = tl.program_id(0) * HALF + r // 2
    rows = i + (r % 2) * I  # gate row i, then up row I + i
    ok = i < I
    # with PRENORM, x holds h * w of the preceding RMSNorm and 1 / rms(h) scales the dot products
    dots = gemv_rows_prenormed(x_ptr, qw_ptr, s_ptr, z_ptr, bias_ptr, h_ptr, rows, ok, K, X_PLANE, eps, stride_w16,
                               stride_sn, GROUP_SIZE, HAS_BIAS, PRENORM, PTX_DEQUANT, BLOCK_N, BLOCK_K, WARP_BLOCKS,
                               ROW, EVEN_K)
    gate, up = tl.split(tl.reshape(dots, (HALF, 2)))
    out = gate / (1.0 + tl.exp(-gate)) * up
    i_out = tl.program_id(0) * HALF + tl.arange(0, HALF)
    y_at = paired_offsets(i_out, Y_PLANE) if Y_PLANE else i_out  # Y_PLANE > 0: paired
    tl.store(y_ptr + y_at, out.to(y_ptr.dtype.element_ty), mask=i_out < I)


def w4a16_gemv_silu_reference(x, qweight, scales, zeros, bias=None, prenorm=None):
    """Float32 ``[M, I]``: the W4A16 linear and the SiLU-gated product, nothing rounded in between.
    ``prenorm = (h, eps)``: ``x`` is ``h * w`` of an RMSNorm, normalized by ``1 / rms(h)`` first."""
    gate, up = gemv_rows_prenormed_reference(x, qweight, scales, zeros, bias, prenorm).chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def launch_w4a16_gemv_silu(x, qweight, scales, zeros, bias, y, *, block_n: int, block_k: int, num_warps: int,
                           num_stages: int, ptx_dequant: bool = False, warp_blocks=None, prenorm=None):
    """Launch on arguments already checked (x ``[1, K]`` or :class:`PairedRows`; the weight a
    checked W4A16 ``[2I, K]``; ``prenorm = (h [K], eps)`` when x is ``h * w`` of an RMSNorm still to
    be normalized); writes ``y``, a ``[1, I]`` tensor or :class:`PairedRows`."""
    n, k = qweight.shape[0], qweight.shape[1] * 8
    inter = n // 2
    x_arg, x_plane = x_operand(x)
    y_arg, y_plane = out_operand(y)
    h, eps = prenorm if prenorm is not None else (y_arg, 0.0)
    _w4a16_gemv_silu_kernel[(triton.cdiv(inter, block_n // 2),)](
        x_arg, qweight, scales, zeros, bias if bias is not None else y_arg, y_arg, h,
        inter, k, float(eps), qweight.stride(0) // 4, scales.stride(0),
        GROUP_SIZE=k // scales.shape[1], HAS_BIAS=bias is not None, PRENORM=prenorm is not None,
        PTX_DEQUANT=gemv_ptx(x) if ptx_dequant else 0, BLOCK_N=block_n, BLOCK_K=block_k,
        WARP_BLOCKS=warp_blocks_of(block_k, warp_blocks), ROW=triton.next_power_of_2(k),
        X_PLANE=x_plane, Y_PLANE=y_plane, EVEN_K=even_k(k, block_k),
        num_warps=num_warps, num_stages=num_stages,
    )
    return y
