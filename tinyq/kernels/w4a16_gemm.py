"""W4A16 GEMM for prefill and skinny batches: ``y = x @ W.T (+ b)``, dequantization fused.

Each K step loads a ``[BLOCK_N, BLOCK_K/8]`` tile of packed words (contiguous along K), unpacks
it in registers to ``[BLOCK_N, BLOCK_K]`` int4 values, dequantizes ``(q - z) * s`` in the
activation dtype and feeds the tensor cores. No dequantized weight ever reaches memory.

``BLOCK_K`` divides ``GROUP_SIZE``, so a K step lies inside one group and needs one scale and
zero per column (a ``[BLOCK_N]`` load per step).

Flags:
- ``SWAP_AB``: compute ``y.T = W @ x.T`` so the dequantized weight tile is the MMA's first operand.
  On Hopper that operand may come from registers, which spares the dequantized tile a trip
  through shared memory, and for skinny M (≤ 16) it puts N, not M, on the MMA's 64-row side.
- ``SPLIT_K`` (> 1): program ``(tile, s)`` reduces inputs ``[s * K_SPLIT, (s + 1) * K_SPLIT)`` and
  writes its fp32 partial to ``partials[s]`` ([SPLIT_K, M, N]); :func:`_splitk_reduce_kernel` then
  sums the partials, adds the bias and casts. For skinny M the tile count alone (N / BLOCK_N) is too
  small to fill the GPU at N = 4096, and every program streams a long K loop one tile at a time.
- ``ACC_FP16``: the MMA accumulates each K step in fp16 (twice the tensor rate of fp32
  accumulation on GeForce/RTX parts, equal on H100/A100); the step's partial is then added into
  an fp32 accumulator. Overflow can only come from one step's partial sum of ``BLOCK_K`` products
  exceeding 65504, not from the whole K reduction. fp16 activations only.

Tensors: ``x`` [M, K] fp16/bf16 (row stride ``stride_xm``); ``qweight`` int32 [N, K/8];
``scales``/``zeros`` [N, K/G] (x's dtype); ``bias`` [N] or none; ``y`` [M, N] (row stride
``stride_ym``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tinyq.backend import interpreting
from tinyq.kernels.int4_ptx import nibble_pairs_minus_zero
from tinyq.kernels.tiling import grouped_pid


# One int32 word -> its 8 weights (q_i - z) * s in fp16, nibble order 0..7 (fp16 activations only);
# see tinyq/kernels/int4_ptx.py. The multiply by s rounds once, as in the plain path: ~2
# instructions per weight instead of shift, mask, convert, subtract, multiply.
_DEQUANT8_PTX = tl.constexpr(
    "{\n.reg .b32 t1, t2, t3, q0, q1, q2, q3, zz, ss;\n"
    "mov.b32 zz, {$9, $9};\nmov.b32 ss, {$10, $10};\n"
    + nibble_pairs_minus_zero("$8", "zz")
    + "\n" + "\n".join(f"mul.rn.f16x2 q{j}, q{j}, ss;" for j in range(4))
    + "\nmov.b32 {$0, $4}, q0;\nmov.b32 {$1, $5}, q1;\nmov.b32 {$2, $6}, q2;\nmov.b32 {$3, $7}, q3;\n}"
)



@triton.jit
def _mma(acc, x, w, SWAP_AB: tl.constexpr, ACC_FP16: tl.constexpr):
    """acc += x @ w.T ([BM, BN]), or w @ x.T ([BN, BM]) when SWAP_AB; fp16 partial per call if ACC_FP16."""
    if SWAP_AB:
        if ACC_FP16:
            acc += tl.dot(w, tl.trans(x), out_dtype=tl.float16).to(tl.float32)
        else:
            acc = tl.dot(w, tl.trans(x), acc)
    else:
        if ACC_FP16:
            acc += tl.dot(x, tl.trans(w), out_dtype=tl.float16).to(tl.float32)
        else:
            acc = tl.dot(x, tl.trans(w), acc)
    return acc


@triton.jit
def _dot_slice(acc, x_ptr, row_off, m_mask, x_cols, w, SWAP_AB: tl.constexpr, ACC_FP16: tl.constexpr):
    """acc += x[:, x_cols] @ w.T (or transposed) for one nibble slice ``w`` [BN, BK/8] (fp16)."""
    x = tl.load(x_ptr + row_off + x_cols[None, :], mask=m_mask[:, None], other=0.0)
    return _mma(acc, x, w, SWAP_AB, ACC_FP16)


@triton.jit
def _dequant_dot(acc, x, q, s, z, SWAP_AB: tl.constexpr, ACC_FP16: tl.constexpr, DOT_FP32: tl.constexpr):
    """acc += x @ ((q - z) * s).T  (or its transpose when SWAP_AB); q [BN, k], x [BM, k]."""
    if DOT_FP32:
        x = x.to(tl.float32)
        w = (q.to(tl.float32) - z.to(tl.float32)[:, None]) * s.to(tl.float32)[:, None]
    else:
        w = (q.to(x.dtype) - z[:, None]) * s[:, None]  # exact (q - z), one rounding
    return _mma(acc, x, w, SWAP_AB, ACC_FP16)


# tinyq packing: word c = 4b + w holds k = 32b + 4i + w in nibble i (tinyq/quant/format.py).
UNPACK_RESHAPE: tl.constexpr = tl.constexpr(0)  # [BN, BK/32, 4] words -> [BN, BK/32, 8, 4] nibbles -> [BN, BK]
UNPACK_GATHER: tl.constexpr = tl.constexpr(1)  # load the word of every k (8x L1 hits), shift out its nibble
UNPACK_SPLIT: tl.constexpr = tl.constexpr(2)  # 8 dots, one per nibble i, against x[:, 32b + 4i + w]
UNPACK_MODES = {"reshape": 0, "gather": 1, "split": 2}


@triton.jit
def _w4a16_gemm_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, bias_ptr, y_ptr,
    M, N, K, K_SPLIT,
    stride_xm, stride_ym, stride_wn, stride_sn,
    GROUP_SIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SPLIT_K: tl.constexpr,
    SWAP_AB: tl.constexpr,
    ACC_FP16: tl.constexpr,
    DOT_FP32: tl.constexpr,
    UNPACK: tl.constexpr,
    PTX_DEQUANT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    tl.static_assert(GROUP_SIZE % BLOCK_K == 0, "BLOCK_K must divide the quantization group")
    tl.static_assert(BLOCK_K % 32 == 0, "BLOCK_K must hold whole 32-input packing blocks")
    # Grouped launch order: GROUP_M row blocks share each weight tile while it sits in L2.
    pid_m, pid_n = grouped_pid(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    k_lo = pid_k * K_SPLIT  # a multiple of BLOCK_K (and of the group when BLOCK_K == GROUP_SIZE)
    k_hi = tl.minimum(k_lo + K_SPLIT, K)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_kw = tl.arange(0, BLOCK_K // 8)
    offs_b = tl.arange(0, BLOCK_K // 32)
    offs_w = tl.arange(0, 4)
    m_mask = offs_m < M
    n_mask = offs_n < N
    shifts = tl.arange(0, 8) * 4
    # row strides as arguments (not K // 8 here) let Triton prove 16-byte alignment and vectorize
    words_per_row = stride_wn
    groups_per_row = stride_sn

    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + (k_lo + offs_k)[None, :]  # [BM, BK]
    if UNPACK == UNPACK_GATHER:
        word_of_k = 4 * (offs_k // 32) + offs_k % 4
        w_ptrs = qw_ptr + offs_n[:, None] * words_per_row + (k_lo // 8 + word_of_k)[None, :]  # [BN, BK]
        k_shift = (4 * ((offs_k % 32) // 4))[None, :]
    elif UNPACK == UNPACK_RESHAPE:
        w_ptrs = (qw_ptr + offs_n[:, None, None] * words_per_row + k_lo // 8 + 4 * offs_b[None, :, None]
                  + offs_w[None, None, :])
    else:
        w_ptrs = qw_ptr + offs_n[:, None] * words_per_row + (k_lo // 8 + offs_kw)[None, :]  # [BN, BK/8]
        x_of_word = 32 * (offs_kw // 4) + offs_kw % 4  # input k of nibble 0 of word c
    sz_ptrs = offs_n * groups_per_row  # [BN]
    if SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):  # K % BLOCK_K == 0: BLOCK_K | GROUP_SIZE | K
        if UNPACK == UNPACK_RESHAPE:
            words = tl.load(w_ptrs, mask=n_mask[:, None, None], other=0)
        else:
            words = tl.load(w_ptrs, mask=n_mask[:, None], other=0)
        g = k0 // GROUP_SIZE
        s = tl.load(s_ptr + sz_ptrs + g, mask=n_mask, other=0.0)
        z = tl.load(z_ptr + sz_ptrs + g, mask=n_mask, other=0.0)
        if UNPACK == UNPACK_SPLIT and PTX_DEQUANT:
            w0, w1, w2, w3, w4, w5, w6, w7 = tl.inline_asm_elementwise(
                _DEQUANT8_PTX, "=h,=h,=h,=h,=h,=h,=h,=h,r,h,h",
                [words, (z.to(tl.float32) + 1024.0).to(tl.float16)[:, None], s[:, None]],
                dtype=(tl.float16, tl.float16, tl.float16, tl.float16, tl.float16, tl.float16, tl.float16,
                       tl.float16),
                is_pure=True, pack=1,
            )
            row_off = offs_m * stride_xm
            cols = k0 + x_of_word
            acc = _dot_slice(acc, x_ptr, row_off[:, None], m_mask, cols, w0, SWAP_AB, ACC_FP16)
            acc = _dot_slice(acc, x_ptr, row_off[:, None], m_mask, cols + 4, w1, SWAP_AB, ACC_FP16)
            acc = _dot_slice(acc, x_ptr, row_off[:, None], m_mask, cols + 8, w2, SWAP_AB, ACC_FP16)
            acc = _dot_slice(acc, x_ptr, row_off[:, None], m_mask, cols + 12, w3, SWAP_AB, ACC_FP16)
            acc = _dot_slice(acc, x_ptr, row_off[:, None], m_mask, cols + 16, w4, SWAP_AB, ACC_FP16)
            acc = _dot_slice(acc, x_ptr, row_off[:, None], m_mask, cols + 20, w5, SWAP_AB, ACC_FP16)
            acc = _dot_slice(acc, x_ptr, row_off[:, None], m_mask, cols + 24, w6, SWAP_AB, ACC_FP16)
            acc = _dot_slice(acc, x_ptr, row_off[:, None], m_mask, cols + 28, w7, SWAP_AB, ACC_FP16)
        elif UNPACK == UNPACK_SPLIT:
            for i in tl.static_range(8):
                # nibble i of word c holds k = k0 + x_of_word[c] + 4i
                x = tl.load(x_ptr + offs_m[:, None] * stride_xm + (k0 + x_of_word + 4 * i)[None, :],
                            mask=m_mask[:, None], other=0.0)
                q = (words >> (4 * i)) & 0xF
                acc = _dequant_dot(acc, x, q, s, z, SWAP_AB, ACC_FP16, DOT_FP32)
        else:
            x = tl.load(x_ptrs, mask=m_mask[:, None], other=0.0)
            if UNPACK == UNPACK_GATHER:
                q = (words >> k_shift) & 0xF
            else:
                q = (words[:, :, None, :] >> shifts[None, None, :, None]) & 0xF  # [BN, BK/32, 8, 4]
                q = tl.reshape(q, (BLOCK_N, BLOCK_K))  # position 32b + 4i + w is input k0 + 32b + 4i + w
            acc = _dequant_dot(acc, x, q, s, z, SWAP_AB, ACC_FP16, DOT_FP32)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K // 8

    # acc is [BM, BN], or [BN, BM] when SWAP_AB: index the output accordingly instead of transposing
    if SWAP_AB:
        rows, cols = offs_m[None, :], offs_n[:, None]
        mask = n_mask[:, None] & m_mask[None, :]
    else:
        rows, cols = offs_m[:, None], offs_n[None, :]
        mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K > 1:  # y_ptr holds the fp32 partials [SPLIT_K, M, N]
        tl.store(y_ptr + pid_k * M * N + rows * N + cols, acc, mask=mask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
        tl.store(y_ptr + rows * stride_ym + cols, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _splitk_reduce_kernel(part_ptr, bias_ptr, y_ptr, M, N, stride_ym,
                          SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """``y[m, n] = sum_s partials[s, m, n] (+ b[n])`` for a [M, N] output, partials fp32 [SPLIT_K, M, N]."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M * N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(part_ptr + s * M * N + offs, mask=mask, other=0.0)
    n = offs % N
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + (offs // N) * stride_ym + n, acc.to(y_ptr.dtype.element_ty), mask=mask)

def launch_w4a16_gemm(
    x, qweight, scales, zeros, bias, y, *,
    block_m: int, block_n: int, block_k: int, group_m: int = 8,
    swap_ab: bool = False, acc_fp16: bool = False, unpack: str = "reshape", ptx_dequant: bool = False,
    split_k: int = 1, num_warps: int = 4, num_stages: int = 3,
):
    """Launch on already-validated tensors (see :func:`tinyq.kernels.w4a16_matmul.w4a16_matmul`)."""
    m, k = x.shape
    n = qweight.shape[0]
    group_size = k // scales.shape[1]
    block_k = min(block_k, group_size)
    if acc_fp16 and x.dtype != torch.float16:
        raise ValueError(f"fp16 accumulation needs fp16 activations, got {x.dtype}")
    if unpack not in UNPACK_MODES:
        raise ValueError(f"unpack={unpack!r} is not one of {sorted(UNPACK_MODES)}")
    if unpack == "split" and block_k < 128:
        raise ValueError("unpack='split' needs block_k >= 128 (each of the 8 dots spans block_k/8 >= 16)")
    steps = k // block_k
    split_k = max(1, min(split_k, steps))
    k_split = triton.cdiv(steps, split_k) * block_k
    split_k = triton.cdiv(k, k_split)  # no empty split
    out = y if split_k == 1 else torch.empty((split_k, m, n), dtype=torch.float32, device=y.device)
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n), split_k)
    _w4a16_gemm_kernel[grid](
        x, qweight, scales, zeros, bias if bias is not None else y, out,
        m, n, k, k_split,
        x.stride(0), y.stride(0), qweight.stride(0), scales.stride(0),
        GROUP_SIZE=group_size,
        HAS_BIAS=bias is not None,
        SPLIT_K=split_k,
        SWAP_AB=swap_ab,
        ACC_FP16=acc_fp16,
        DOT_FP32=interpreting() and x.dtype == torch.bfloat16,
        UNPACK=UNPACK_MODES[unpack],
        # inline PTX needs a real GPU and fp16; only the 'split' unpack uses it
        PTX_DEQUANT=ptx_dequant and unpack == "split" and x.dtype == torch.float16 and not interpreting(),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        GROUP_M=group_m,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if split_k > 1:
        reduce_block = 1024
        _splitk_reduce_kernel[(triton.cdiv(m * n, reduce_block),)](
            out, bias if bias is not None else y, y, m, n, y.stride(0),
            SPLIT_K=split_k, HAS_BIAS=bias is not None, BLOCK=reduce_block, num_warps=4,
        )
    return y
