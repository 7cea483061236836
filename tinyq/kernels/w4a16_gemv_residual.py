"""W4A16 GEMV closing a sublayer (decode): the residual add, and the next RMSNorm's weight applied
ahead of its normalization.

Math, for one activation row ``x [K]``, the residual stream ``r [N]`` and the next norm's weight
``w [N]``::

    h  = round(round(x @ W.T (+ b)) + r)        the new residual stream (as linear + add would round it)
    hw = round(h * w)                           optional

The next norm, ``rms_norm(h) = h * w / rms(h)``, needs the whole row, which no GEMV program
owns. So each program writes its rows of ``h`` and ``h * w``, and the GEMV that consumes them
computes ``1 / rms(h)`` itself and scales its dot products by it (``PRENORM`` in
:mod:`tinyq.kernels.w4a16_gemv_rope` and :mod:`tinyq.kernels.w4a16_gemv_silu`): the residual add
and the norm cost no launch and no serialized tail. (A last-program norm, tried first, ran as long
as a separate norm kernel: the tail is serial either way; docs/perf_notes.md.)

Tensors: ``x`` ``[1, K]`` (fp16/bf16) or its :class:`~tinyq.kernels.paired.PairedRows`, weight
``[N, K/8]`` with scales/zeros, bias ``[N]`` or none; ``residual``, ``norm_weight`` ``[N]``; ``h``
``[N]`` and ``hw`` ``[N]`` or paired (``[4 paired_plane(N)]``, for the next GEMV) in x's dtype.
"""
from __future__ import annotations

import triton
import triton.language as tl

from tinyq.kernels.paired import out_operand, paired_offsets, x_operand
from tinyq.kernels.w4a16_gemv import even_k, gemv_ptx, gemv_rows, warp_blocks_of
from tinyq.kernels.w4a16_matmul import w4a16_linear_reference


@triton.jit
def _w4a16_gemv_residual_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, bias_ptr, res_ptr, w_ptr, h_ptr, hw_ptr,
    N, K, stride_w16, stride_sn,
    GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_NORM: tl.constexpr, PTX_DEQUANT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, WARP_BLOCKS: tl.constexpr, X_PLANE: tl.constexpr,
    HW_PLANE: tl.constexpr, EVEN_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = rows < N
    dots = gemv_rows(x_ptr, qw_ptr, s_ptr, z_ptr, rows, ok, K, X_PLANE, stride_w16, stride_sn,
                     GROUP_SIZE, PTX_DEQUANT, BLOCK_N, BLOCK_K, WARP_BLOCKS, EVEN_K)
    if HAS_BIAS:
        dots += tl.load(bias_ptr + rows, mask=ok, other=0.0).to(tl.float32)
    y = dots.to(h_ptr.dtype.element_ty).to(tl.float32)
    h = (y + tl.load(res_ptr + rows, mask=ok, other=0.0).to(tl.float32)).to(h_ptr.dtype.element_ty)
    tl.store(h_ptr + rows, h, mask=ok)
    if HAS_NORM:
        w = tl.load(w_ptr + rows, mask=ok, other=0.0).to(tl.float32)
        hw_at = paired_offsets(rows, HW_PLANE) if HW_PLANE else rows  # HW_PLANE > 0: paired
        tl.store(hw_ptr + hw_at, (h.to(tl.float32) * w).to(hw_ptr.dtype.element_ty), mask=ok)


def w4a16_gemv_residual_reference(x, qweight, scales, zeros, bias, residual, norm_weight=None):
    """``(h, h * w)`` (the second None without ``norm_weight``) in x's dtype, by the unfused math."""
    h = (w4a16_linear_reference(x, qweight, scales, zeros, bias).float() + residual.float()).to(x.dtype)
    return h, None if norm_weight is None else (h.float() * norm_weight.float()).to(x.dtype)


def launch_w4a16_gemv_residual(x, qweight, scales, zeros, bias, residual, norm_weight, h, hw, *, block_n: int,
                               block_k: int, num_warps: int, num_stages: int, ptx_dequant: bool = False,
                               warp_blocks=None):
    """Launch on arguments already checked (see :func:`tinyq.ops.fused.w4a16_linear_residual`);
    writes ``h`` (and ``hw`` when ``norm_weight`` is given: a ``[N]`` tensor or
    :class:`PairedRows`)."""
    n, k = qweight.shape[0], qweight.shape[1] * 8
    x_arg, x_plane = x_operand(x)
    hw_arg, hw_plane = out_operand(hw)
    _w4a16_gemv_residual_kernel[(triton.cdiv(n, block_n),)](
        x_arg, qweight, scales, zeros, bias if bias is not None else h, residual,
        norm_weight if norm_weight is not None else h, h, hw_arg if hw is not None else h,
        n, k, qweight.stride(0) // 4, scales.stride(0),
        GROUP_SIZE=k // scales.shape[1], HAS_BIAS=bias is not None, HAS_NORM=norm_weight is not None,
        PTX_DEQUANT=gemv_ptx(x) if ptx_dequant else 0, BLOCK_N=block_n, BLOCK_K=block_k,
        WARP_BLOCKS=warp_blocks_of(block_k, warp_blocks), X_PLANE=x_plane, HW_PLANE=hw_plane,
        EVEN_K=even_k(k, block_k),
        num_warps=num_warps, num_stages=num_stages,
    )
    return h, hw
