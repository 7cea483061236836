"""int8 GEMV of a fused q/k/v projection with RoPE and the KV-cache write in its epilogue (W8A8 decode).

For one token's int8 row ``xq [K]`` with scale ``s_x`` and ``W = [W_q; W_k; W_v]`` int8 ``[(Hq + 2 Hkv) D, K]``
with per-row scales ``s_w``::

    qkv = round((xq @ W.T) * s_x * s_w (+ b))   int32 products (exact), float32 epilogue, rounded to q's dtype

then RoPE of q and k at ``seq_pos[0]`` and the cache write of k and v, with the rows each program
takes, as in :mod:`tinyq.kernels.qkv_rope`. The dot products are
:func:`tinyq.kernels.int8_gemv.int8_row_dots` (dp4a on the GPU). The unfused path writes the
projection in fp16 and runs a RoPE + cache-write kernel over it (4.1 us a layer on the H200);
here that launch is gone and the projection never reaches memory. It is still rounded to the
activation dtype before the rotation, as the unfused linear's output is: with int8 activations
downstream, a last-bit difference in k or v can flip a quantized integer, so decode keeps the exact
numbers of the unfused path (and of prefill).

Tensors: ``xq`` int8 ``[1, K]``, ``s_x`` float32 ``[1]``, ``wq`` int8 ``[(Hq + 2 Hkv) D, K]``,
``s_w`` float32 ``[(Hq + 2 Hkv) D]``, bias ``[(Hq + 2 Hkv) D]`` or none; ``q_out`` ``[Hq * D]``
(contiguous); one cache layer ``k_cache``/``v_cache`` ``[1, Hkv, max_seq_len, D]`` (last dim
contiguous); ``seq_pos`` int32 ``[1]``; ``inv_freq`` float32 ``[D/2]``.
"""
from __future__ import annotations

import triton
import triton.language as tl

from tinyq.kernels.int8_gemv import dp4a_operands, int8_row_dots
from tinyq.kernels.int8_matmul import int8_matmul_reference
from tinyq.kernels.qkv_rope import qkv_programs, qkv_rope_reference, qkv_rows, store_qkv_rope


@triton.jit
def _int8_gemv_rope_kernel(
    xq_ptr, sx_ptr, wq_ptr, sw_ptr, bias_ptr, q_ptr, kc_ptr, vc_ptr, seq_pos_ptr, inv_freq_ptr,
    HQ, HKV, K, MAX_SEQ, ROPE_PROGRAMS,
    stride_wn, stride_ch, stride_cn,
    HEAD_DIM: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, DP4A: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    pos = tl.load(seq_pos_ptr)
    rows, ok = qkv_rows(pid, ROPE_PROGRAMS, HQ, HKV, HEAD_DIM, BLOCK_N)
    rows = tl.where(ok, rows, 0)
    dots = int8_row_dots(xq_ptr, wq_ptr, rows, K, stride_wn, EVEN_K, DP4A, BLOCK_N, BLOCK_K)
    out = dots.to(tl.float32) * tl.load(sx_ptr) * tl.load(sw_ptr + rows, mask=ok, other=0.0)
    if HAS_BIAS:
        out += tl.load(bias_ptr + rows, mask=ok, other=0.0).to(tl.float32)
    out = out.to(q_ptr.dtype.element_ty).to(tl.float32)
    store_qkv_rope(out, ok, pid, ROPE_PROGRAMS, pos, q_ptr, kc_ptr, vc_ptr, inv_freq_ptr, HQ, HKV, MAX_SEQ,
                   stride_ch, stride_cn, HEAD_DIM, BLOCK_N)


def launch_int8_gemv_rope(xq, s_x, wq, s_w, bias, q_out, k_cache, v_cache, seq_pos, inv_freq, num_heads: int,
                          num_kv_heads: int, *, block_n: int, block_k: int, num_warps: int = 4, num_stages: int = 3,
                          dp4a: bool = True):
    """Launch on arguments already checked (see :func:`tinyq.ops.fused_w8a8.w8a8_qkv_attention`);
    takes the int8 GEMV's M=1 config (:mod:`tinyq.kernels.int8_configs`)."""
    d = k_cache.shape[-1]
    xq, wq, k, block_k, use_dp4a = dp4a_operands(xq, wq, block_k, dp4a)
    rope_programs, programs = qkv_programs(num_heads, num_kv_heads, d, block_n)
    _int8_gemv_rope_kernel[(programs,)](
        xq, s_x, wq, s_w, bias if bias is not None else s_w, q_out, k_cache, v_cache, seq_pos, inv_freq,
        num_heads, num_kv_heads, k, k_cache.shape[2], rope_programs,
        wq.stride(0), k_cache.stride(1), k_cache.stride(2),
        HEAD_DIM=d, HAS_BIAS=bias is not None, EVEN_K=k % block_k == 0, DP4A=use_dp4a,
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages,
    )
    return q_out


def int8_gemv_rope_reference(xq, s_x, wq, s_w, bias, k_cache, v_cache, pos: int, inv_freq, num_heads: int,
                             num_kv_heads: int):
    """The unfused math: the int8 linear (exact int32 products, float32 epilogue) rounded to
    ``k_cache``'s dtype, then RoPE in float32; writes k and v into the cache at ``pos``; returns
    rotated q ``[1, 1, Hq, D]`` (float32)."""
    qkv = int8_matmul_reference(xq, wq, s_x, s_w, bias, out_dtype=k_cache.dtype)
    return qkv_rope_reference(qkv, k_cache, v_cache, pos, inv_freq, num_heads, num_kv_heads)
