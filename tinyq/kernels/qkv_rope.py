"""The row layout and epilogue shared by the fused q/k/v GEMVs of decode (W4A16 in
:mod:`tinyq.kernels.w4a16_gemv_rope`, int8 in :mod:`tinyq.kernels.int8_gemv_rope`): RoPE and the
KV-cache write applied to the projection's float32 dot products before anything is rounded.

Math, for one token at position ``p`` and ``qkv = x @ [W_q; W_k; W_v].T`` (``[(Hq + 2 Hkv) D]``,
the order of the fused ``qkv_proj``)::

    q_out[h]       = rope(qkv_q[h], p)            h < Hq         (:mod:`tinyq.kernels.rope`)
    k_cache[j, p]  = rope(qkv_k[j], p)            j < Hkv
    v_cache[j, p]  = qkv_v[j]

Programs take their ``BLOCK_N`` weight rows from two regions:

- rotary (q and k heads, the first ``rope_programs`` programs): ``BLOCK_N / 2`` rotation pairs
  each, rows interleaved as ``h D + i``, ``h D + i + D/2``, so both halves of a rotation end in
  the same program;
- v: plain consecutive rows, written to the cache.

Tensors: ``q_out`` ``[Hq * D]`` (contiguous); one cache layer ``k_cache``/``v_cache``
``[1, Hkv, max_seq_len, D]`` (last dim contiguous, strides ``stride_ch``, ``stride_cn``);
``inv_freq`` float32 ``[D/2]``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tinyq.kernels.rope import apply_rope_reference, cos_sin, rotate


def qkv_programs(num_heads: int, num_kv_heads: int, head_dim: int, block_n: int) -> tuple[int, int]:
    """``(rotary programs, all programs)`` of a fused qkv GEMV with ``block_n`` rows a program."""
    if block_n % 2:
        raise ValueError(f"the fused qkv GEMV needs an even block_n (rotation pairs), got {block_n}")
    rope = triton.cdiv((num_heads + num_kv_heads) * (head_dim // 2), block_n // 2)
    return rope, rope + triton.cdiv(num_kv_heads * head_dim, block_n)


@triton.jit
def qkv_rows(pid, ROPE_PROGRAMS, HQ, HKV, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program ``pid``'s weight rows ``[BLOCK_N]`` and their validity."""
    HALF: tl.constexpr = HEAD_DIM // 2
    r = tl.arange(0, BLOCK_N)
    rotary = pid < ROPE_PROGRAMS
    # rotary region: pair P = (head, i) -> rows head*D + i and head*D + i + D/2, interleaved
    p_r = pid * (BLOCK_N // 2) + r // 2
    rows_rot = (p_r // HALF) * HEAD_DIM + p_r % HALF + (r % 2) * HALF
    # v region: consecutive rows after the q and k heads
    v_r = (pid - ROPE_PROGRAMS) * BLOCK_N + r
    rows = tl.where(rotary, rows_rot, (HQ + HKV) * HEAD_DIM + v_r)
    ok = tl.where(rotary, (p_r < (HQ + HKV) * HALF).to(tl.int32), (v_r < HKV * HEAD_DIM).to(tl.int32)) != 0
    return rows, ok


@triton.jit
def store_qkv_rope(dots, ok, pid, ROPE_PROGRAMS, pos, q_ptr, kc_ptr, vc_ptr, inv_freq_ptr, HQ, HKV, MAX_SEQ,
                   stride_ch, stride_cn, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr):
    """Rotate and store program ``pid``'s float32 ``dots`` (its :func:`qkv_rows`) at position ``pos``."""
    HALF: tl.constexpr = HEAD_DIM // 2
    PAIRS: tl.constexpr = BLOCK_N // 2
    if pid < ROPE_PROGRAMS:
        x1, x2 = tl.split(tl.reshape(dots, (PAIRS, 2)))
        p = pid * PAIRS + tl.arange(0, PAIRS)
        head, i = p // HALF, p % HALF
        cos, sin = cos_sin(pos, tl.load(inv_freq_ptr + i))
        r1, r2 = rotate(x1, x2, cos, sin)
        is_q = head < HQ
        q_off = head * HEAD_DIM + i
        tl.store(q_ptr + q_off, r1.to(q_ptr.dtype.element_ty), mask=is_q)
        tl.store(q_ptr + q_off + HALF, r2.to(q_ptr.dtype.element_ty), mask=is_q)
        # the host checked the room; the position test only guards memory on a stale replay
        is_k = (head >= HQ) & (p < (HQ + HKV) * HALF) & ((i * 0 + pos) < MAX_SEQ)
        k_off = (head - HQ) * stride_ch + pos * stride_cn + i
        tl.store(kc_ptr + k_off, r1.to(kc_ptr.dtype.element_ty), mask=is_k)
        tl.store(kc_ptr + k_off + HALF, r2.to(kc_ptr.dtype.element_ty), mask=is_k)
    else:
        v_r = (pid - ROPE_PROGRAMS) * BLOCK_N + tl.arange(0, BLOCK_N)
        v_off = (v_r // HEAD_DIM) * stride_ch + pos * stride_cn + v_r % HEAD_DIM
        tl.store(vc_ptr + v_off, dots.to(vc_ptr.dtype.element_ty), mask=ok & ((v_r * 0 + pos) < MAX_SEQ))


def qkv_rope_reference(qkv: torch.Tensor, k_cache, v_cache, pos: int, inv_freq, num_heads: int, num_kv_heads: int):
    """Float32 epilogue of one token's projection ``qkv`` ``[1, (Hq + 2 Hkv) D]``: writes rotated k
    and v into the cache at ``pos``; returns rotated q ``[1, 1, Hq, D]`` (float32)."""
    d = k_cache.shape[-1]
    q, k, v = qkv.float().view(1, 1, num_heads + 2 * num_kv_heads, d).split([num_heads, num_kv_heads, num_kv_heads],
                                                                             dim=2)
    positions = torch.tensor([pos], device=qkv.device)
    k_cache[0, :, pos] = apply_rope_reference(k, positions, inv_freq)[0, 0].to(k_cache.dtype)
    v_cache[0, :, pos] = v[0, 0].to(v_cache.dtype)
    return apply_rope_reference(q, positions, inv_freq)
