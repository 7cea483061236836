"""Attention of a short query block over the KV cache: split-KV ("flash-decoding"), one launch for decode.

Used for decode (``L = 1``) and for short prefill chunks (a chat turn), as long as the ``L * G``
query rows of one kv group fit one MMA tile (``MAX_DECODE_ROWS``).

Math: ``L`` new query tokens, already in the cache, at positions ``kv_len - L + t``::

    out[t, h] = softmax_j(scale * q[t, h] . k[j, h // G] ; j <= kv_len - L + t) @ v[:, h // G]

with ``kv_len = seq_pos[0] + L`` read on the device and ``G = Hq / Hkv``.

One launch, grid ``(B * Hkv, NUM_SPLITS)``. A program owns one kv head and one slice of
``SPLIT`` cache positions; it loads each K/V block once and serves the ``L * G`` query rows of its
kv group with one MMA tile (GQA sharing: Llama-3-8B reads K/V once for 4 heads). Slices starting
past ``kv_len`` return at once (an early exit on the device value), so the grid can be sized from
the capacity ``max_seq_len``, known when a CUDA graph is captured, and never from the current
length: no host logic depends on how full the cache is. Of the ``n = cdiv(kv_len, SPLIT)`` slices
that run:

- ``n = 1`` (a context shorter than one slice): the program normalizes and writes the output;
- else each writes its un-normalized partial output plus the running max ``m`` and sum ``l``
  (float32, log2 domain), merged as ``out = sum_s 2^(m_s - M) o_s / sum_s 2^(m_s - M) l_s`` with
  ``M = max_s m_s``: for up to ``MERGE_MAX_ROWS`` query rows (decode) by the last of the ``n``
  programs to finish (:mod:`tinyq.kernels.semaphore`), which saves a launch per layer and token,
  what a small model's decode step is made of; for more rows (a chunk) by a second launch with a
  program per row (``_decode_combine_kernel``).

Why split-KV for a chunk too: the flash kernel gives a 32-token chunk one program per (row block,
q head), 32 programs for Llama-3-8B, each streaming the whole history: at 4k history that is
4.5x its time at 16 (H200, docs/perf_notes.md). Split-KV with GQA-packed rows reads K/V once per
kv group and fills every SM.

Tensors: q ``[B, L, Hq, D]`` (rotated), k/v cache layer ``[B, Hkv, max_seq_len, D]`` (last dim
contiguous), seq_pos int32 ``[1]``; partials float32 ``[B, Hq, L, NUM_SPLITS, D]`` and
``[B, Hq, L, NUM_SPLITS]``; one arrival counter per (batch, kv head); output ``[B, L, Hq, D]`` in
q's dtype.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from tinyq.backend import check_kernel_device, interpreting
from tinyq.kernels.attention_configs import decode_config, sm_count
from tinyq.kernels.flash_attention import (
    LOG2E, attention_reference, check_attention_args, check_out, check_seq_pos, check_unit_stride,
    online_softmax_update,
)
from tinyq.kernels.paired import PairedRows, out_operand, paired_offsets, paired_plane
from tinyq.kernels.semaphore import arrive, counters

MAX_DECODE_ROWS = 128  # L * G rows in one MMA tile (e.g. a 32-token chunk of Llama-3's 4-head groups)
# Slices per (batch, kv head): about 2 programs per SM, each at least 256 keys long. The H200
# sweep's best at one sequence of 8 kv heads: 16 slices at a 4k cache (11.4 vs 16.9 us with 4
# programs per SM and 128-key slices), 33 at 32k (42.2 vs 48.4 us); docs/perf_notes.md.
PROGRAMS_PER_SM = 2
MIN_SPLIT = 256  # shorter slices: the partial writes and the merge cost more than they hide
# Up to this many query rows (decode: one token of a kv group) the last program merges the slices;
# a chunk's 128 rows x 33 slices x D (2 MB at a 4k history) would go through one SM per kv head,
# so chunks merge in a second launch with a program per row (H200: 82 vs 26 us, docs/perf_notes.md).
MERGE_MAX_ROWS = 16


def decode_attention_reference(q, k_cache, v_cache, kv_len: int, scale: Optional[float] = None):
    """Float32 reference: the last ``L`` rows of causal attention over ``cache[:kv_len]``."""
    return attention_reference(q, k_cache, v_cache, causal=True, scale=scale, kv_len=kv_len)


def num_splits_for(batch_heads: int, max_seq_len: int, block_n: int, device: torch.device) -> int:
    """Slices per (batch, kv head), from the capacity (a host int fixed at graph capture)."""
    want = max(1, triton.cdiv(PROGRAMS_PER_SM * sm_count(device), batch_heads))
    # The interpreter (CPU tests) cuts one-block slices so that short caches exercise the merge.
    min_split = MIN_SPLIT if device.type == "cuda" else block_n
    most = max(1, triton.cdiv(max_seq_len, max(min_split, block_n)))
    return min(want, most)


@triton.jit
def _decode_attention_kernel(
    Q, K, V, O_PART, M_PART, L_PART, OUT, COUNTERS, SEQ_POS,
    qk_scale, LQ, HKV, GROUP, SPLIT, NUM_SPLITS,
    stride_qb, stride_ql, stride_qh,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_ol, stride_oh,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MERGE: tl.constexpr, SPLITS_PAD: tl.constexpr, MERGE_UNROLL: tl.constexpr, DOT_FP32: tl.constexpr,
    OUT_PLANE: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = pid_bh // HKV
    hk = pid_bh % HKV
    kv_len = tl.load(SEQ_POS) + LQ
    q_off = kv_len - LQ
    start = split * SPLIT
    if start >= kv_len:  # a slice past the fill level: it neither counts nor writes
        return
    end = tl.minimum(start + SPLIT, kv_len)

    rows = tl.arange(0, BLOCK_M)  # row r = (token t, group member g), r = t * GROUP + g
    t = rows // GROUP
    h = hk * GROUP + rows % GROUP
    row_ok = rows < LQ * GROUP
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    mask_d = offs_d < HEAD_DIM
    offs_n = tl.arange(0, BLOCK_N)
    q = tl.load(Q + b * stride_qb + t[:, None] * stride_ql + h[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None] & mask_d[None, :], other=0.0)
    if DOT_FP32:  # interpreter + bf16 only (its bf16 tl.dot is broken)
        q = q.to(tl.float32)
    q_pos = q_off + t
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    for start_n in range(start, end, BLOCK_N):
        n = start_n + offs_n
        n_ok = n < end
        k = tl.load(k_base + n[None, :] * stride_kn + offs_d[:, None], mask=mask_d[:, None] & n_ok[None, :], other=0.0)
        v = tl.load(v_base + n[:, None] * stride_vn + offs_d[None, :], mask=n_ok[:, None] & mask_d[None, :], other=0.0)
        if DOT_FP32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        qk = tl.dot(q, k) * qk_scale
        qk = tl.where(n_ok[None, :] & (n[None, :] <= q_pos[:, None]), qk, float("-inf"))
        # A row can have no visible key in this slice (token t < L-1 near the end): the update keeps it at 0.
        acc, l_i, m_i = online_softmax_update(acc, l_i, m_i, qk, v)

    if OUT_PLANE:  # paired: one token of one sequence, as the o_proj GEMV reads it (tinyq.kernels.paired)
        out_ptr = OUT + paired_offsets(h[:, None] * HEAD_DIM + offs_d[None, :], OUT_PLANE)
    else:
        out_ptr = OUT + b * stride_ob + t[:, None] * stride_ol + h[:, None] * stride_oh + offs_d[None, :]
    out_mask = row_ok[:, None] & mask_d[None, :]
    used = tl.minimum(tl.cdiv(kv_len, SPLIT), NUM_SPLITS)  # the slices that run
    if used == 1:
        tl.store(out_ptr, (acc / l_i[:, None]).to(OUT.dtype.element_ty), mask=out_mask)
    else:
        # partial index ((b * HQ + h) * LQ + t) * NUM_SPLITS + split, HQ = HKV * GROUP
        base = ((b * HKV * GROUP + h) * LQ + t) * NUM_SPLITS
        tl.store(M_PART + base + split, m_i, mask=row_ok)
        tl.store(L_PART + base + split, l_i, mask=row_ok)
        tl.store(O_PART + (base + split)[:, None] * HEAD_DIM_PAD + offs_d[None, :], acc, mask=row_ok[:, None])
        if MERGE:
            if arrive(COUNTERS + pid_bh, used):
                out = _merge_splits(O_PART, M_PART, L_PART, base, row_ok, offs_d, used, HEAD_DIM_PAD, BLOCK_M,
                                    SPLITS_PAD, MERGE_UNROLL)
                tl.store(out_ptr, out.to(OUT.dtype.element_ty), mask=out_mask)


@triton.jit
def _merge_splits(O_PART, M_PART, L_PART, base, row_ok, offs_d, used, HEAD_DIM_PAD: tl.constexpr,
                  BLOCK_M: tl.constexpr, SPLITS_PAD: tl.constexpr, UNROLL: tl.constexpr):
    """``sum_s 2^(m_s - M) o_s / sum_s 2^(m_s - M) l_s`` over the ``used`` partials of rows
    ``base + s``. The max ``M`` comes first, from one ``[rows, splits]`` load, so the partial
    outputs have no running-max dependency and ``UNROLL`` of them are in flight at a time (a loop
    that waited for each one in turn cost ~0.25 us per slice: 8 us at a 4k context). Other SMs wrote
    the partials: every load reads past L1."""
    offs_s = tl.arange(0, SPLITS_PAD)
    s_ok = row_ok[:, None] & (offs_s[None, :] < used)
    m_all = tl.load(M_PART + base[:, None] + offs_s[None, :], mask=s_ok, other=float("-inf"), cache_modifier=".cg")
    l_all = tl.load(L_PART + base[:, None] + offs_s[None, :], mask=s_ok, other=0.0, cache_modifier=".cg")
    m_max = tl.max(m_all, 1)  # finite for a real row: slice 0 holds position 0, visible to every row
    m_max = tl.where(row_ok, m_max, 0.0)
    # a row with no visible key in a slice has m = -inf there: weight 0, never NaN
    l_sum = tl.sum(tl.where(m_all == float("-inf"), 0.0, tl.math.exp2(m_all - m_max[:, None])) * l_all, 1)
    o = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    for s0 in range(0, used, UNROLL):
        for j in tl.static_range(UNROLL):
            ok = row_ok & ((base * 0 + s0 + j) < used)  # a row vector: the interpreter wants tensor masks
            m_s = tl.load(M_PART + base + s0 + j, mask=ok, other=float("-inf"), cache_modifier=".cg")
            o_s = tl.load(O_PART + (base + s0 + j)[:, None] * HEAD_DIM_PAD + offs_d[None, :], mask=ok[:, None],
                          other=0.0, cache_modifier=".cg")
            o += tl.where(m_s == float("-inf"), 0.0, tl.math.exp2(m_s - m_max))[:, None] * o_s
    return o / tl.where(row_ok, l_sum, 1.0)[:, None]


@triton.jit
def _decode_combine_kernel(
    O_PART, M_PART, L_PART, OUT, SEQ_POS,
    LQ, HQ, NUM_SPLITS, SPLIT,
    stride_ob, stride_ol, stride_oh,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr, OUT_PLANE: tl.constexpr,
):
    """The merge as a second launch, one program per (batch, q head, token) row: for query
    chunks, whose partials (``L * G`` rows x slices x D) are too much for one program per kv head."""
    pid = tl.program_id(0)  # (b * HQ + h) * LQ + t
    used = tl.cdiv(tl.load(SEQ_POS) + LQ, SPLIT)
    if used == 1:  # the one slice wrote the output itself
        return
    t = pid % LQ
    h = (pid // LQ) % HQ
    b = pid // (LQ * HQ)
    offs_s = tl.arange(0, SPLITS_PAD)
    s_ok = offs_s < tl.minimum(used, NUM_SPLITS)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    m = tl.load(M_PART + pid * NUM_SPLITS + offs_s, mask=s_ok, other=float("-inf"))
    l = tl.load(L_PART + pid * NUM_SPLITS + offs_s, mask=s_ok, other=0.0)
    o = tl.load(O_PART + (pid * NUM_SPLITS + offs_s)[:, None] * HEAD_DIM_PAD + offs_d[None, :],
                mask=s_ok[:, None], other=0.0)
    m_max = tl.max(m, 0)  # finite: slice 0 always holds position 0, visible to every row
    w = tl.where(m == float("-inf"), 0.0, tl.math.exp2(m - m_max))
    out = tl.sum(w[:, None] * o, 0) / tl.sum(w * l, 0)
    if OUT_PLANE:
        out_at = paired_offsets(h * HEAD_DIM + offs_d, OUT_PLANE)
    else:
        out_at = b * stride_ob + t * stride_ol + h * stride_oh + offs_d
    tl.store(OUT + out_at, out.to(OUT.dtype.element_ty), mask=offs_d < HEAD_DIM)


def _partials(shape, device) -> torch.Tensor:
    """A float32 partials buffer. Under the interpreter (CPU tests) it starts as NaN, so a read of a
    slice that wrote nothing shows in the output."""
    if interpreting():
        return torch.full(shape, float("nan"), device=device)
    return torch.empty(shape, dtype=torch.float32, device=device)


def decode_attention(q, k_cache, v_cache, seq_pos, scale: Optional[float] = None,
                     num_splits: Optional[int] = None, block_n: Optional[int] = None,
                     num_warps: Optional[int] = None, num_stages: Optional[int] = None, out=None):
    """Attention of ``L`` queries (``L * Hq / Hkv <= MAX_DECODE_ROWS``), already written to the
    cache, over ``[0, seq_pos + L)``.

    q ``[B, L, Hq, D]`` fp16/bf16; k_cache/v_cache one layer ``[B, Hkv, max_seq_len, D]``;
    seq_pos int32 ``[1]``. The keyword overrides (splits, tile, warps, stages) are for tests and the
    benchmark sweep; by default they come from :mod:`tinyq.kernels.attention_configs`.
    Returns ``out`` (allocated if None) ``[B, L, Hq, D]`` in q's dtype; for one token of one sequence
    ``out`` may be a :class:`~tinyq.kernels.paired.PairedRows` of ``Hq * D`` inputs, written for the
    o_proj GEMV.
    """
    check_kernel_device("decode_attention", q, k_cache, v_cache, seq_pos)
    check_attention_args("decode_attention", q, k_cache, v_cache)
    B, LQ, HQ, D = q.shape
    HKV, MAX_SEQ = k_cache.shape[1], k_cache.shape[2]
    group = HQ // HKV
    if LQ * group > MAX_DECODE_ROWS:
        raise ValueError(f"decode_attention: {LQ} tokens x {group} heads per kv head > {MAX_DECODE_ROWS} rows")
    check_unit_stride("decode_attention", q=q, k_cache=k_cache, v_cache=v_cache)
    check_seq_pos("decode_attention", seq_pos)
    if out is not None and not isinstance(out, PairedRows):  # a paired out is checked below
        check_out("decode_attention", out, q, (B, LQ, HQ, D))
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    d_pad = max(16, triton.next_power_of_2(D))
    cfg_n, cfg_warps, cfg_stages = decode_config(d_pad, q.device)
    block_n = block_n or cfg_n
    num_splits = num_splits or num_splits_for(B * HKV, MAX_SEQ, block_n, q.device)
    split = triton.cdiv(triton.cdiv(MAX_SEQ, num_splits), block_n) * block_n
    num_splits = triton.cdiv(MAX_SEQ, split)
    block_m = max(16, triton.next_power_of_2(LQ * group))
    # a 128-row tile (a chunk) keeps its fp32 accumulator at 64 registers a thread with 8 warps
    warps = num_warps or cfg_warps * max(1, block_m // 64)

    o_part = _partials((B, HQ, LQ, num_splits, d_pad), q.device)
    m_part, l_part = _partials((2, B, HQ, LQ, num_splits), q.device)  # running max and sum, one allocation
    if out is None:
        out = torch.empty((B, LQ, HQ, D), dtype=q.dtype, device=q.device)
    merge = block_m <= MERGE_MAX_ROWS
    paired = isinstance(out, PairedRows)
    if paired and (B != 1 or LQ != 1 or out.k != HQ * D or out.data.shape != (1, 4 * paired_plane(HQ * D))
                   or out.data.dtype != q.dtype or out.data.device != q.device or not out.data.is_contiguous()):
        raise ValueError(f"decode_attention: a paired output holds one token of one sequence (q {tuple(q.shape)}, "
                         f"{q.dtype} on {q.device}), got one of {out.k} {out.data.dtype} inputs on {out.data.device}, "
                         f"data {tuple(out.data.shape)}")
    out_t, out_plane = out_operand(out)
    out_strides = (0, 0, 0) if paired else (out.stride(0), out.stride(1), out.stride(2))
    splits_pad = max(2, triton.next_power_of_2(num_splits))
    _decode_attention_kernel[(B * HKV, num_splits)](
        q, k_cache, v_cache, o_part, m_part, l_part, out_t, counters(q.device, B * HKV), seq_pos,
        scale * LOG2E, LQ, HKV, group, split, num_splits,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        *out_strides,
        HEAD_DIM=D, HEAD_DIM_PAD=d_pad, BLOCK_M=block_m, BLOCK_N=block_n,
        MERGE=merge, SPLITS_PAD=splits_pad, MERGE_UNROLL=8,
        DOT_FP32=interpreting() and q.dtype == torch.bfloat16, OUT_PLANE=out_plane,
        num_warps=warps, num_stages=num_stages or cfg_stages,
    )
    if not merge:
        _decode_combine_kernel[(B * HQ * LQ,)](
            o_part, m_part, l_part, out_t, seq_pos, LQ, HQ, num_splits, split, *out_strides,
            HEAD_DIM=D, HEAD_DIM_PAD=d_pad, SPLITS_PAD=splits_pad, OUT_PLANE=out_plane, num_warps=4,
        )
    return out
