"""W4A16 GEMV of a fused q/k/v projection with RoPE and the KV-cache write in its epilogue (decode).

For one token ``x [K]`` at position ``seq_pos[0]`` and ``W = [W_q; W_k; W_v]`` (``[(Hq + 2 Hkv) D,
K]``, tinyq int4): the math and the rows each program takes are those of
:mod:`tinyq.kernels.qkv_rope`; the dot products are :func:`tinyq.kernels.w4a16_gemv.gemv_rows`.
So the ``[(Hq + 2 Hkv) D]`` projection never reaches memory and the separate RoPE + cache-write
launch goes away (one launch less per layer and token). ``PRENORM`` folds in the RMSNorm before
the projection as in :mod:`tinyq.kernels.w4a16_gemv_silu`.

Tensors: ``x`` ``[1, K]`` (fp16/bf16) or its :class:`~tinyq.kernels.paired.PairedRows`, weight
``[(Hq + 2 Hkv) D, K/8]`` with scales/zeros, bias ``[(Hq + 2 Hkv) D]`` or none; ``q_out`` ``[Hq * D]`` (contiguous) in x's dtype; one cache layer
``k_cache``/``v_cache`` ``[1, Hkv, max_seq_len, D]`` (last dim contiguous); ``seq_pos`` int32 ``[1]``;
``inv_freq`` float32 ``[D/2]``; ``h`` ``[K]`` (PRENORM).
"""
from __future__ import annotations

import triton
import triton.language as tl

from tinyq.kernels.paired import x_operand
from tinyq.kernels.qkv_rope import qkv_programs, qkv_rope_reference, qkv_rows, store_qkv_rope
from tinyq.kernels.w4a16_gemv import (
    even_k, gemv_ptx, gemv_rows_prenormed, gemv_rows_prenormed_reference, warp_blocks_of,
)


@triton.jit
def _w4a16_gemv_rope_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, bias_ptr, q_ptr, kc_ptr, vc_ptr, seq_pos_ptr, inv_freq_ptr, h_ptr,
    HQ, HKV, K, MAX_SEQ, ROPE_PROGRAMS, eps,
    stride_w16, stride_sn, stride_ch, stride_cn,
    HEAD_DIM: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr, PRENORM: tl.constexpr,
    PTX_DEQUANT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, WARP_BLOCKS: tl.constexpr,
    ROW: tl.constexpr, X_PLANE: tl.constexpr, EVEN_K: tl.constexpr,
):
    pid = tl.program_id(0)
    pos = tl.load(seq_pos_ptr)
    rows, ok = qkv_rows(pid, ROPE_PROGRAMS, HQ, HKV, HEAD_DIM, BLOCK_N)
    # with PRENORM, x holds h * w of the preceding RMSNorm and 1 / rms(h) scales the dot products
    dots = gemv_rows_prenormed(x_ptr, qw_ptr, s_ptr, z_ptr, bias_ptr, h_ptr, rows, ok, K, X_PLANE, eps, stride_w16,
                               stride_sn, GROUP_SIZE, HAS_BIAS, PRENORM, PTX_DEQUANT, BLOCK_N, BLOCK_K, WARP_BLOCKS,
                               ROW, EVEN_K)
    store_qkv_rope(dots, ok, pid, ROPE_PROGRAMS, pos, q_ptr, kc_ptr, vc_ptr, inv_freq_ptr, HQ, HKV, MAX_SEQ,
                   stride_ch, stride_cn, HEAD_DIM, BLOCK_N)


def launch_w4a16_gemv_rope(x, qweight, scales, zeros, bias, q_out, k_cache, v_cache, seq_pos, inv_freq,
                           num_heads: int, num_kv_heads: int, *, block_n: int, block_k: int, num_warps: int,
                           num_stages: int, ptx_dequant: bool = False, warp_blocks=None, prenorm=None):
    """Launch on arguments already checked (see :func:`tinyq.ops.fused.w4a16_qkv_attention`);
    ``prenorm = (h [K], eps)`` when x is ``h * w`` of an RMSNorm still to be normalized."""
    x_arg, x_plane = x_operand(x)
    h, eps = prenorm if prenorm is not None else (q_out, 0.0)
    k = qweight.shape[1] * 8
    d = k_cache.shape[-1]
    rope_programs, programs = qkv_programs(num_heads, num_kv_heads, d, block_n)
    _w4a16_gemv_rope_kernel[(programs,)](
        x_arg, qweight, scales, zeros, bias if bias is not None else q_out, q_out, k_cache, v_cache, seq_pos, inv_freq,
        h, num_heads, num_kv_heads, k, k_cache.shape[2], rope_programs, float(eps),
        qweight.stride(0) // 4, scales.stride(0), k_cache.stride(1), k_cache.stride(2),
        HEAD_DIM=d, GROUP_SIZE=k // scales.shape[1], HAS_BIAS=bias is not None, PRENORM=prenorm is not None,
        PTX_DEQUANT=gemv_ptx(x) if ptx_dequant else 0, BLOCK_N=block_n, BLOCK_K=block_k,
        WARP_BLOCKS=warp_blocks_of(block_k, warp_blocks), ROW=triton.next_power_of_2(k),
        X_PLANE=x_plane, EVEN_K=even_k(k, block_k),
        num_warps=num_warps, num_stages=num_stages,
    )
    return q_out


def w4a16_gemv_rope_reference(x, qweight, scales, zeros, bias, k_cache, v_cache, pos: int, inv_freq,
                              num_heads: int, num_kv_heads: int, prenorm=None):
    """Float32 math on a ``[1, K]`` row, nothing rounded before the outputs: the W4A16 linear, RoPE of
    q and k at ``pos``; writes k and v into the cache at ``pos``; returns rotated q ``[1, 1, Hq, D]``.
    ``prenorm = (h, eps)``: ``x`` is ``h * w`` of an RMSNorm, normalized by ``1 / rms(h)`` first."""
    qkv = gemv_rows_prenormed_reference(x, qweight, scales, zeros, bias, prenorm)
    return qkv_rope_reference(qkv, k_cache, v_cache, pos, inv_freq, num_heads, num_kv_heads)
