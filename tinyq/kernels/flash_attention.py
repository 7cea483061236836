"""Flash attention for prefill and chunked prefill (Triton), with its float32 reference.

Math: for query row ``i`` of ``Lq`` queries and keys ``j < kv_len`` of the matching kv head
(q head ``h`` reads kv head ``h // (Hq / Hkv)``: MHA, GQA and MQA alike)::

    out[i] = softmax_j(scale * q[i] . k[j] + mask[i, j]) @ v
    mask[i, j] = -inf if CAUSAL and j > (kv_len - Lq) + i   (bottom-right aligned causality)

With ``kv_len == Lq`` this is plain causal prefill; with a cache holding ``p`` earlier tokens,
``kv_len = p + Lq`` and the chunk's query ``i`` sits at absolute position ``p + i``: chunked
prefill ("context streaming") attends to the whole history plus its own causal prefix.

Tensors: ``q [B, Lq, Hq, D]`` and the output ``[B, Lq, Hq, D]`` (fp16/bf16, last dim contiguous);
``k, v [B, Hkv, S, D]`` heads-first (a cache layer ``[B, Hkv, max_seq_len, D]``, or a transposed
view of ``[B, S, Hkv, D]``). ``kv_len`` is ``S``, or ``seq_pos[0] + Lq`` read on the device when
``seq_pos`` (int32 ``[1]``) is given, so a CUDA graph replay sees the current cache fill.

Kernel: one program per (BLOCK_M query rows, q head); online softmax in the exp2 domain
(``log2(e)`` folded into the scale), fp32 accumulation. A head_dim that is not a power of two is
split into two power-of-two column blocks with their own dots and accumulators
(:func:`head_dim_split`: 72 -> 64 + 16, the SigLIP towers' head, so 80 columns of work rather than
128 padded). ``DOT_FP32`` (interpreter + bf16 only: the
Triton 3.9 interpreter's bf16 ``tl.dot`` returns garbage) runs the products in float32.
Key blocks that no row masks run a mask-free loop; only the causal diagonal and the ragged tail
pay for masking.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from tinyq.backend import check_kernel_device, interpreting
from tinyq.kernels.attention_configs import flash_config

LOG2E = 1.4426950408889634
KERNEL_DTYPES = (torch.float16, torch.bfloat16)
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256


def check_head_dim(head_dim: int, where: str) -> None:
    if head_dim % 8 or not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(
            f"{where}: head_dim {head_dim} is not supported (need a multiple of 8 in "
            f"[{MIN_HEAD_DIM}, {MAX_HEAD_DIM}], e.g. 64, 72, 80, 96, 128)"
        )


def check_attention_args(where: str, q, k, v, dtypes=KERNEL_DTYPES) -> None:
    """The checks every attention entry point shares (the ops and the launchers): q
    ``[B, Lq, Hq, D]`` with ``Lq > 0``; k and v ``[B, Hkv, S, D]`` heads-first, alike; one dtype of
    ``dtypes``; ``Hq`` a multiple of ``Hkv``; a supported head_dim. Devices and strides are the
    callers' (the ops take CPU tensors, the launchers need unit-stride rows)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"{where}: q, k, v must be 4-D, got {q.dim()}-D, {k.dim()}-D, {v.dim()}-D")
    if q.dtype not in dtypes or k.dtype != q.dtype or v.dtype != q.dtype:
        names = " or ".join(str(d).replace("torch.float", "fp").replace("torch.bfloat", "bf") for d in dtypes)
        raise ValueError(f"{where}: q, k, v must share one dtype of {names}, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"{where}: k {tuple(k.shape)} and v {tuple(v.shape)} differ")
    B, LQ, HQ, D = q.shape
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"{where}: k/v {tuple(k.shape)} do not match q {tuple(q.shape)} in batch or head_dim")
    if LQ == 0:
        raise ValueError(f"{where}: zero tokens")
    if k.shape[1] == 0 or HQ % k.shape[1]:
        raise ValueError(f"{where}: {HQ} query heads are not a multiple of {k.shape[1]} kv heads")
    check_head_dim(D, where)


def check_unit_stride(where: str, **tensors) -> None:
    """The kernels index head_dim with unit stride."""
    for name, t in tensors.items():
        if t.stride(-1) != 1:
            raise ValueError(f"{where}: {name} needs a contiguous last dimension")


def check_out(where: str, out, like: torch.Tensor, shape, name: str = "out") -> None:
    """A caller's output buffer: exactly ``shape`` in ``like``'s dtype and on its device, unit
    stride along head_dim. The kernels write the whole ``shape`` through its strides, so a smaller
    buffer would be written out of bounds and another dtype silently rounded to."""
    if not torch.is_tensor(out):
        raise ValueError(f"{where}: {name} must be a tensor, got {type(out).__name__}")
    if tuple(out.shape) != tuple(shape) or out.dtype != like.dtype or out.device != like.device:
        raise ValueError(f"{where}: {name} must be {like.dtype} {tuple(shape)} on {like.device}, got "
                         f"{out.dtype} {tuple(out.shape)} on {out.device}")
    if out.stride(-1) != 1:
        raise ValueError(f"{where}: {name} needs a contiguous last dimension (got strides {out.stride()})")


def check_seq_pos(where: str, seq_pos: torch.Tensor) -> None:
    """The cache fill the kernels read on the device: one integer (int32 as the cache keeps it;
    int64 loads alike). A float one fails deep in the compiler."""
    if seq_pos.dtype not in (torch.int32, torch.int64) or seq_pos.numel() != 1:
        raise ValueError(f"{where}: seq_pos must hold one int32 (or int64) value, got "
                         f"{seq_pos.dtype} {tuple(seq_pos.shape)}")


def attention_reference(q, k, v, causal: bool = True, scale: Optional[float] = None, kv_len: Optional[int] = None):
    """Float32 reference. ``q [B, Lq, Hq, D]``, ``k, v [B, Hkv, S, D]`` (heads-first); attends to
    keys ``[0, kv_len)`` (default ``S``) with bottom-right causality; returns ``[B, Lq, Hq, D]`` in
    q's dtype. Grouped heads run as one batched matmul per kv head, without repeating K/V."""
    B, Lq, Hq, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    kv_len = k.shape[2] if kv_len is None else kv_len
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    kf = k[:, :, :kv_len].float()  # [B, Hkv, S, D]; no copy when the cache is fp32
    vf = v[:, :, :kv_len].float()
    qf = q.float().permute(0, 2, 1, 3).reshape(B, Hkv, G * Lq, D)  # rows (g, i)
    s = torch.matmul(qf, kf.transpose(-1, -2)) * scale  # [B, Hkv, G*Lq, S]
    if causal and Lq > 1:
        i = torch.arange(Lq, device=q.device).repeat(G)[:, None]
        j = torch.arange(kv_len, device=q.device)[None, :]
        s = s.masked_fill(j > (kv_len - Lq) + i, float("-inf"))
    o = torch.matmul(torch.softmax(s, dim=-1), vf)  # [B, Hkv, G*Lq, D]
    return o.view(B, Hkv, G, Lq, D).permute(0, 3, 1, 2, 4).reshape(B, Lq, Hq, D).to(q.dtype)


def head_dim_split(head_dim: int):
    """``(D_HI, D_LO)``: the two power-of-two column blocks that cover ``head_dim``. A power of two
    (or a dim whose split saves nothing) is one block, padded: ``(max(16, next_pow2(D)), 0)``.
    Otherwise the largest power of two below ``D`` plus the rest padded to a power of two >= 16:
    72 -> 64 + 16 and 80 -> 64 + 16 (80 columns of work instead of 128), 96 -> 64 + 32, 40 -> 32 + 16."""
    whole = max(16, triton.next_power_of_2(head_dim))
    hi = whole // 2
    if head_dim <= hi or head_dim <= 16:
        return whole, 0
    lo = max(16, triton.next_power_of_2(head_dim - hi))
    return (hi, lo) if hi + lo < whole else (whole, 0)


@triton.jit
def _load_kv_cols(k_base, v_base, stride_kn, stride_vn, n, offs_d, kv_len, HEAD_DIM: tl.constexpr,
                  COL_END: tl.constexpr, MASKED: tl.constexpr, DOT_FP32: tl.constexpr):
    """``K^T [D, BLOCK_N]`` and ``V [BLOCK_N, D]`` of keys ``n`` for one power-of-two block of
    head-dim columns ``offs_d`` (ending at ``COL_END``). Masks only what can be out of range: keys
    past ``kv_len`` when ``MASKED``, and columns past ``HEAD_DIM`` when the block reaches beyond it."""
    k_ptrs = k_base + n[None, :] * stride_kn + offs_d[:, None]
    v_ptrs = v_base + n[:, None] * stride_vn + offs_d[None, :]
    mask_d = offs_d < HEAD_DIM
    if MASKED:
        k = tl.load(k_ptrs, mask=mask_d[:, None] & (n[None, :] < kv_len), other=0.0)
        v = tl.load(v_ptrs, mask=(n[:, None] < kv_len) & mask_d[None, :], other=0.0)
    elif HEAD_DIM >= COL_END:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    else:
        k = tl.load(k_ptrs, mask=mask_d[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=mask_d[None, :], other=0.0)
    if DOT_FP32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    return k, v


@triton.jit
def _attn_blocks(
    acc_h, acc_l, l_i, m_i, q_h, q_l, k_base, v_base, stride_kn, stride_vn, lo, hi, q_pos, kv_len, qk_scale,
    offs_n, offs_dh, offs_dl,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, D_HI: tl.constexpr, D_LO: tl.constexpr,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, DOT_FP32: tl.constexpr, MAX_FIRST: tl.constexpr,
):
    """Online-softmax update of (acc_h, acc_l, l_i, m_i) over key blocks [lo, hi). Columns
    ``[0, D_HI)`` go through ``*_h``, columns ``[D_HI, D_HI + D_LO)`` through ``*_l`` (only when
    ``D_LO > 0``; then all D_HI columns are real). With ``MAX_FIRST`` (a positive scale) ``m_i``
    holds unscaled row maxima: see :func:`online_softmax_weights_unscaled`."""
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        n = start_n + offs_n
        k_h, v_h = _load_kv_cols(k_base, v_base, stride_kn, stride_vn, n, offs_dh, kv_len, HEAD_DIM, D_HI,
                                 MASKED, DOT_FP32)
        qk = tl.dot(q_h, k_h)
        if D_LO > 0:
            k_l, v_l = _load_kv_cols(k_base, v_base, stride_kn, stride_vn, n, offs_dl, kv_len, HEAD_DIM,
                                     D_HI + D_LO, MASKED, DOT_FP32)
            qk = tl.dot(q_l, k_l, qk)
        if not MAX_FIRST:
            qk = qk * qk_scale  # [BLOCK_M, BLOCK_N], log2 domain
        if MASKED:
            keep = n[None, :] < kv_len
            if CAUSAL:
                keep = keep & (n[None, :] <= q_pos[:, None])
            qk = tl.where(keep, qk, float("-inf"))
        if MAX_FIRST:
            p, alpha, l_i, m_i = online_softmax_weights_unscaled(l_i, m_i, qk, qk_scale)
        else:
            p, alpha, l_i, m_i = online_softmax_weights(l_i, m_i, qk)
        acc_h = tl.dot(p.to(v_h.dtype), v_h, acc_h * alpha[:, None])
        if D_LO > 0:
            acc_l = tl.dot(p.to(v_l.dtype), v_l, acc_l * alpha[:, None])
    return acc_h, acc_l, l_i, m_i


@triton.jit
def online_softmax_weights(l_i, m_i, qk):
    """One key block's step of the online softmax (exp2 domain): ``qk [M, N]`` scores in log2 units
    (masked: -inf), running row max ``m_i [M]`` and row sum ``l_i [M]``; returns the block's
    weights ``p``, the factor ``alpha`` that rescales the running sums, and the new ``l``, ``m``::

        m' = max(m, max_j qk);  p = exp2(qk - m');  alpha = exp2(m - m');  l' = l * alpha + sum_j p

    after which each accumulator becomes ``acc * alpha + p @ v``. A row with no visible key so far
    (m' = -inf) uses 0 in place of m', so it stays at l = acc = 0 instead of turning into NaN."""
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(qk - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    return p, alpha, l_i, m_new


@triton.jit
def online_softmax_weights_unscaled(l_i, m_i, qk, qk_scale):
    """:func:`online_softmax_weights` on unscaled scores ``qk = q . k`` with a scale ``s > 0``
    (log2 units). Since ``max_j(s * qk) = s * max_j qk`` for ``s >= 0``, the running max ``m_i``
    is kept unscaled and the scale folds into the exponent: ``p = exp2(qk * s - m' * s)`` is one
    fused multiply-add a score where scaling first costs a multiply, then a subtract."""
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_scaled = tl.where(m_new == float("-inf"), 0.0, m_new) * qk_scale
    p = tl.math.exp2(qk * qk_scale - m_scaled[:, None])
    alpha = tl.math.exp2(m_i * qk_scale - m_scaled)
    l_i = l_i * alpha + tl.sum(p, 1)
    return p, alpha, l_i, m_new


@triton.jit
def online_softmax_update(acc, l_i, m_i, qk, v):
    """:func:`online_softmax_weights` with one accumulator ``acc [M, D]`` (fp32) and ``v [N, D]``
    (shared with the decode kernel)."""
    p, alpha, l_i, m_new = online_softmax_weights(l_i, m_i, qk)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return acc, l_i, m_new


@triton.jit
def _flash_attention_kernel(
    Q, K, V, O, SEQ_POS,
    qk_scale, LQ, KV_LEN, HQ, GROUP,
    stride_qb, stride_ql, stride_qh,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_ol, stride_oh,
    HEAD_DIM: tl.constexpr, D_HI: tl.constexpr, D_LO: tl.constexpr, CAUSAL: tl.constexpr,
    KV_LEN_FROM_DEVICE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_FP32: tl.constexpr,
    STRIDE_UNIT: tl.constexpr, MAX_FIRST: tl.constexpr,
):
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16)
    # The JIT marks an integer argument divisible by 16 or not at all; a head_dim of 72 makes the
    # head strides multiples of 8 only, and unmarked strides compile to 2-byte loads. The launcher
    # then passes the strides divided by STRIDE_UNIT = 8, so the products below carry the factor 8
    # and every row load is 16 bytes wide (and goes through cp.async).
    stride_qb, stride_ql, stride_qh = stride_qb * STRIDE_UNIT, stride_ql * STRIDE_UNIT, stride_qh * STRIDE_UNIT
    stride_kb, stride_kh, stride_kn = stride_kb * STRIDE_UNIT, stride_kh * STRIDE_UNIT, stride_kn * STRIDE_UNIT
    stride_vb, stride_vh, stride_vn = stride_vb * STRIDE_UNIT, stride_vh * STRIDE_UNIT, stride_vn * STRIDE_UNIT
    stride_ob, stride_ol, stride_oh = stride_ob * STRIDE_UNIT, stride_ol * STRIDE_UNIT, stride_oh * STRIDE_UNIT
    # Causal row blocks near the end have the most keys: launch them first (less tail idling).
    if CAUSAL:
        pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    else:
        pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HQ
    h = pid_bh % HQ
    hk = h // GROUP
    if KV_LEN_FROM_DEVICE:
        kv_len = tl.load(SEQ_POS) + LQ
    else:
        kv_len = KV_LEN
    q_off = kv_len - LQ  # absolute position of query row 0

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_dh = tl.arange(0, D_HI)
    row_ok = offs_m < LQ
    q_rows = Q + b * stride_qb + offs_m[:, None] * stride_ql + h * stride_qh
    o_rows = O + b * stride_ob + offs_m[:, None] * stride_ol + h * stride_oh
    io_mask_h = row_ok[:, None] & (offs_dh < HEAD_DIM)[None, :]
    q_h = tl.load(q_rows + offs_dh[None, :], mask=io_mask_h, other=0.0)
    if DOT_FP32:
        q_h = q_h.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc_h = tl.zeros([BLOCK_M, D_HI], dtype=tl.float32)
    if D_LO > 0:
        offs_dl = D_HI + tl.arange(0, D_LO)
        io_mask_l = row_ok[:, None] & (offs_dl < HEAD_DIM)[None, :]
        q_l = tl.load(q_rows + offs_dl[None, :], mask=io_mask_l, other=0.0)
        if DOT_FP32:
            q_l = q_l.to(tl.float32)
        acc_l = tl.zeros([BLOCK_M, D_LO], dtype=tl.float32)
    else:  # placeholders the blocks never touch
        offs_dl, q_l, acc_l = offs_dh, q_h, acc_h
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    q_pos = q_off + offs_m

    if CAUSAL:
        hi = tl.minimum(kv_len, q_off + pid_m * BLOCK_M + BLOCK_M)
        full = tl.minimum(kv_len, q_off + pid_m * BLOCK_M + 1)  # keys every row of the block sees
    else:
        hi = kv_len
        full = kv_len
    full = (full // BLOCK_N) * BLOCK_N
    acc_h, acc_l, l_i, m_i = _attn_blocks(
        acc_h, acc_l, l_i, m_i, q_h, q_l, k_base, v_base, stride_kn, stride_vn, 0, full, q_pos, kv_len, qk_scale,
        offs_n, offs_dh, offs_dl, BLOCK_N, HEAD_DIM, D_HI, D_LO, False, CAUSAL, DOT_FP32, MAX_FIRST)
    acc_h, acc_l, l_i, m_i = _attn_blocks(
        acc_h, acc_l, l_i, m_i, q_h, q_l, k_base, v_base, stride_kn, stride_vn, full, hi, q_pos, kv_len, qk_scale,
        offs_n, offs_dh, offs_dl, BLOCK_N, HEAD_DIM, D_HI, D_LO, True, CAUSAL, DOT_FP32, MAX_FIRST)
    inv_l = 1.0 / l_i[:, None]
    tl.store(o_rows + offs_dh[None, :], (acc_h * inv_l).to(O.dtype.element_ty), mask=io_mask_h)
    if D_LO > 0:
        tl.store(o_rows + offs_dl[None, :], (acc_l * inv_l).to(O.dtype.element_ty), mask=io_mask_l)


def flash_attention_fwd(q, k, v, causal: bool = True, scale: Optional[float] = None,
                        seq_pos: Optional[torch.Tensor] = None, config=None, out=None) -> torch.Tensor:
    """Launch the kernel. ``q [B, Lq, Hq, D]``; ``k, v [B, Hkv, S, D]`` heads-first; with
    ``seq_pos`` the keys are a cache of capacity ``S`` filled to ``seq_pos[0] + Lq`` (the new
    tokens already written). ``config`` = (BLOCK_M, BLOCK_N, num_warps, num_stages) overrides the
    shipped table (used by the benchmark sweep). Returns ``out`` (allocated if None)
    ``[B, Lq, Hq, D]`` in q's dtype."""
    tensors = (q, k, v) + ((seq_pos,) if seq_pos is not None else ())
    check_kernel_device("flash_attention", *tensors)
    check_attention_args("flash_attention", q, k, v)
    B, LQ, HQ, D = q.shape
    _, HKV, S, _ = k.shape
    if seq_pos is None and LQ > S:
        raise ValueError(f"flash_attention: {LQ} queries but only {S} keys")
    if seq_pos is not None:
        check_seq_pos("flash_attention", seq_pos)
    check_unit_stride("flash_attention", q=q, k=k, v=v)
    if out is not None:
        check_out("flash_attention", out, q, (B, LQ, HQ, D))
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    d_hi, d_lo = head_dim_split(D)
    block_m, block_n, num_warps, num_stages = config or flash_config(triton.next_power_of_2(d_hi + d_lo), q.device, D)
    if out is None:
        out = torch.empty((B, LQ, HQ, D), dtype=q.dtype, device=q.device)
    grid = (triton.cdiv(LQ, block_m), B * HQ)
    strides = q.stride()[:3] + k.stride()[:3] + v.stride()[:3] + out.stride()[:3]
    unit = 8 if any(st % 16 for st in strides) and all(st % 8 == 0 for st in strides) else 1
    _flash_attention_kernel[grid](
        q, k, v, out, seq_pos if seq_pos is not None else q,
        scale * LOG2E, LQ, S, HQ, HQ // HKV,
        *(st // unit for st in strides),
        HEAD_DIM=D, D_HI=d_hi, D_LO=d_lo, CAUSAL=bool(causal), KV_LEN_FROM_DEVICE=seq_pos is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, DOT_FP32=interpreting() and q.dtype == torch.bfloat16,
        STRIDE_UNIT=unit, MAX_FIRST=scale > 0,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out
