"""W4A16 GEMM for prefill and skinny batches: ``y = x @ W.T (+ b)``, dequantization fused.

Each K step loads a ``[BLOCK_N, BLOCK_K/8]`` tile of packed words (asynchronously, ``num_stages``
deep), unpacks every word's 8 nibbles in the registers of the thread that loaded it, dequantizes
``(q - z) * s`` in the activation dtype (an inline-PTX magic-number path on NVIDIA, ~2 instructions
per weight) and feeds the tensor cores. No dequantized weight ever reaches memory.

``BLOCK_K`` divides ``GROUP_SIZE``, so a K step lies inside one group and needs one scale and
zero per column (a ``[BLOCK_N]`` load, issued one step ahead).

Unpack orders (``UNPACK``), made of register-local joins and permutes:
- ``frag``: the weights land in the order the MMA's register operand wants them
  (:func:`_frag_weights`), so Triton loads every word straight into the thread that feeds its
  nibbles to the MMA; the activations are permuted to match (through shared memory).
- ``natural``: the weights are put back in input order, so the activation tile goes from its
  asynchronous copy straight to the MMA and one MMA stays in flight while the next step
  dequantizes; the weights cross lanes instead.
Which one wins depends on M (``tinyq.kernels.w4a16_configs``; measurements in docs/perf_notes.md).

Flags:
- ``SWAP_AB``: compute ``y.T = W @ x.T`` so the dequantized weight tile is the MMA's first operand,
  which on Hopper comes from registers, and for skinny M puts N, not M, on the MMA's 64-row side.
- ``SPLIT_K`` (> 1): program ``(tile, s)`` reduces inputs ``[s * K_SPLIT, (s + 1) * K_SPLIT)`` and
  writes its fp32 partial to ``partials[s]`` ([SPLIT_K, M, N]). With ``FUSED_REDUCE`` the tile's
  last program to finish sums the partials (still in L2) and writes ``y``
  (:mod:`tinyq.kernels.semaphore`); otherwise :func:`_splitk_reduce_kernel` then
  sums the partials, adds the bias and casts. For skinny M the tile count alone (N / BLOCK_N) is too
  small to fill the GPU at N = 4096, and every program streams a long K loop one tile at a time.
- ``TMA``: ``x_ptr`` and ``qw_ptr`` are tensor descriptors of ``x`` [M, K] and ``qweight`` [N, K/8]:
  one thread issues each tile's copy (Hopper's tensor memory accelerator) instead of every thread
  computing addresses and issuing 16-byte ``cp.async``; rows past M or N arrive as zeros. A flag here,
  not a kernel of its own: only the two loads differ, and the dequantization, split-K and epilogue
  must stay the same code. Used with ``natural`` unpacking (x goes from the copy to the MMA).
- ``ACC_FP16``: the MMA accumulates each K step in fp16 (twice the tensor rate of fp32
  accumulation on GeForce/RTX parts, equal on H100/A100); the step's partial is then added into
  an fp32 accumulator. Overflow can only come from one step's partial sum of ``BLOCK_K`` products
  exceeding 65504, not from the whole K reduction. fp16 activations only.

Tensors: ``x`` [M, K] fp16/bf16 (row stride ``stride_xm``); ``qweight`` int32 [N, K/8] in tinyq's
packing (:mod:`tinyq.quant.format`: word ``4b + w`` holds input ``32b + 4i + w`` in nibble ``i``);
``scales``/``zeros`` [N, K/G] (x's dtype); ``bias`` [N] or none; ``y`` [M, N] (row stride ``stride_ym``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from tinyq.backend import interpreting
from tinyq.kernels.int4_ptx import dequant8
from tinyq.kernels.semaphore import MIN_COUNTERS, arrive, counters
from tinyq.kernels.tiling import grouped_pid, tma_eligible


# One int32 word -> its 8 weights (q_i - z) * s, nibble order 0..7 (tinyq/kernels/int4_ptx.py).
_DEQUANT8_F16 = tl.constexpr(dequant8("f16"))
_DEQUANT8_BF16 = tl.constexpr(dequant8("bf16"))


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
def _join8(o0, o1, o2, o3, o4, o5, o6, o7):
    """Eight equal tensors -> one with three new minor dims ``[..., 2, 2, 2]``; element
    ``[..., x, y, z]`` is ``o[x + 2y + 4z]``. A join stays in the registers of the thread that
    holds its inputs, so a word's 8 nibbles stay with the thread that loaded the word."""
    return tl.join(tl.join(tl.join(o0, o1), tl.join(o2, o3)), tl.join(tl.join(o4, o5), tl.join(o6, o7)))


@triton.jit
def _frag_weights(words, s, z, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PTX_DEQUANT: tl.constexpr):
    """Packed words ``[BN, BK/8]`` -> dequantized ``[BN, BK]`` in *fragment order*: word
    ``c = 4b + w``'s nibble ``i = s2 + 2 s1 + 4 s0`` goes to position ``32b + 16 s2 + 8 s1 + 2w + s0``.

    Why that order: it is where the tensor cores' register operand (Hopper wgmma, Ampere mma,
    16-bit, k-width 2) wants the 8 weights a thread owns: lane ``w`` of a quad holds k offsets
    ``2w, 2w+1, 2w+8, 2w+9`` of each 16-wide k step. Triton then finds a load layout in which every
    thread loads exactly the words whose nibbles it feeds to the MMA, and the dequantized tile
    never goes through shared memory. The activations are permuted to match (:func:`_frag_x`).
    The result has the scales' dtype (fp16 or bf16)."""
    NB: tl.constexpr = BLOCK_K // 32
    DTYPE = s.dtype
    if PTX_DEQUANT:
        if DTYPE == tl.float16:
            o0, o1, o2, o3, o4, o5, o6, o7 = tl.inline_asm_elementwise(
                _DEQUANT8_F16, "=h,=h,=h,=h,=h,=h,=h,=h,r,h,h",
                [words, (z.to(tl.float32) + 1024.0).to(DTYPE)[:, None], s[:, None]],
                dtype=(DTYPE, DTYPE, DTYPE, DTYPE, DTYPE, DTYPE, DTYPE, DTYPE), is_pure=True, pack=1,
            )
        else:
            o0, o1, o2, o3, o4, o5, o6, o7 = tl.inline_asm_elementwise(
                _DEQUANT8_BF16, "=h,=h,=h,=h,=h,=h,=h,=h,r,h,h",
                [words, (z.to(tl.float32) + 128.0).to(DTYPE)[:, None], s[:, None]],
                dtype=(DTYPE, DTYPE, DTYPE, DTYPE, DTYPE, DTYPE, DTYPE, DTYPE), is_pure=True, pack=1,
            )
    else:
        zz = z.to(tl.float32)[:, None]
        ss = s.to(tl.float32)[:, None]
        # (q - z) * s in fp32 is exact; one rounding to DTYPE, as the PTX path
        o0 = (((words >> 0) & 0xF).to(tl.float32) - zz) * ss
        o1 = (((words >> 4) & 0xF).to(tl.float32) - zz) * ss
        o2 = (((words >> 8) & 0xF).to(tl.float32) - zz) * ss
        o3 = (((words >> 12) & 0xF).to(tl.float32) - zz) * ss
        o4 = (((words >> 16) & 0xF).to(tl.float32) - zz) * ss
        o5 = (((words >> 20) & 0xF).to(tl.float32) - zz) * ss
        o6 = (((words >> 24) & 0xF).to(tl.float32) - zz) * ss
        o7 = (((words >> 28) & 0xF).to(tl.float32) - zz) * ss
        o0, o1, o2, o3 = o0.to(DTYPE), o1.to(DTYPE), o2.to(DTYPE), o3.to(DTYPE)
        o4, o5, o6, o7 = o4.to(DTYPE), o5.to(DTYPE), o6.to(DTYPE), o7.to(DTYPE)
    w = tl.reshape(_join8(o0, o1, o2, o3, o4, o5, o6, o7), (BLOCK_N, NB, 4, 2, 2, 2))  # [n, b, w, s2, s1, s0]
    return tl.reshape(tl.permute(w, (0, 1, 3, 4, 2, 5)), (BLOCK_N, BLOCK_K))  # [n, b, s2, s1, w, s0]


@triton.jit
def _natural_weights(words, s, z, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PTX_DEQUANT: tl.constexpr):
    """:func:`_frag_weights` put back in input order: ``[BN, BK]`` with column ``k`` = input ``k0 + k``."""
    w = _frag_weights(words, s, z, BLOCK_N, BLOCK_K, PTX_DEQUANT)  # fragment order [n, b, s2, s1, w, s0]
    w = tl.reshape(w, (BLOCK_N, BLOCK_K // 32, 2, 2, 4, 2))
    # natural k = 32b + 16 s0 + 8 s1 + 4 s2 + w
    return tl.reshape(tl.permute(w, (0, 1, 5, 3, 2, 4)), (BLOCK_N, BLOCK_K))


@triton.jit
def _frag_x(x, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Activations ``[BM, BK]`` (natural k = 32b + 16 s0 + 8 s1 + 4 s2 + w) -> the fragment order of
    :func:`_frag_weights` (position 32b + 16 s2 + 8 s1 + 2w + s0), so the dot pairs each weight with its input."""
    xv = tl.reshape(x, (BLOCK_M, BLOCK_K // 32, 2, 2, 2, 4))  # [m, b, s0, s1, s2, w]
    return tl.reshape(tl.permute(xv, (0, 1, 4, 3, 5, 2)), (BLOCK_M, BLOCK_K))  # [m, b, s2, s1, w, s0]


UNPACK_FRAG: tl.constexpr = tl.constexpr(0)
UNPACK_NATURAL: tl.constexpr = tl.constexpr(1)
UNPACK_MODES = {"frag": 0, "natural": 1}


@triton.jit
def _w4a16_gemm_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, bias_ptr, y_ptr, out_ptr, counters_ptr,
    M, N, K, K_SPLIT, K_SPLIT_WORDS,
    stride_xm, stride_ym, stride_wn, stride_sn,
    GROUP_SIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SPLIT_K: tl.constexpr,
    FUSED_REDUCE: tl.constexpr,
    SWAP_AB: tl.constexpr,
    ACC_FP16: tl.constexpr,
    DOT_FP32: tl.constexpr,
    UNPACK: tl.constexpr,
    PTX_DEQUANT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    TMA: tl.constexpr,
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
    m_mask = offs_m < M
    n_mask = offs_n < N
    if not TMA:
        # row strides come in as arguments (not K // 8 here): Triton can then prove 16-byte alignment
        x_ptrs = x_ptr + offs_m[:, None] * stride_xm + (k_lo + tl.arange(0, BLOCK_K))[None, :]  # [BM, BK]
        # the split's first word from its own argument (K_SPLIT // 8): the compiler sees 16-divisibility
        # there and issues 16-byte copies, where k_lo // 8 would only be known to be even (8-byte copies)
        w_ptrs = qw_ptr + offs_n[:, None] * stride_wn + (pid_k * K_SPLIT_WORDS + tl.arange(0, BLOCK_K // 8))[None, :]
    sz_ptrs = offs_n * stride_sn  # [BN]
    if SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # Scales and zeros of the next K step are loaded one step ahead: a [BN] row of 2-byte values is
    # too narrow for Triton's asynchronous copies, so loaded in place it would stall every step.
    s_next = tl.load(s_ptr + sz_ptrs + k_lo // GROUP_SIZE, mask=n_mask, other=0.0)
    z_next = tl.load(z_ptr + sz_ptrs + k_lo // GROUP_SIZE, mask=n_mask, other=0.0)
    for k0 in range(k_lo, k_hi, BLOCK_K):  # K % BLOCK_K == 0: BLOCK_K | GROUP_SIZE | K
        if TMA:  # descriptors: rows past N and M read as zeros
            words = qw_ptr.load([pid_n * BLOCK_N, k0 // 8])
        else:
            words = tl.load(w_ptrs, mask=n_mask[:, None], other=0)
        s, z = s_next, z_next
        g_next = tl.minimum(k0 + BLOCK_K, K - 1) // GROUP_SIZE  # the last step re-reads its own group
        s_next = tl.load(s_ptr + sz_ptrs + g_next, mask=n_mask, other=0.0)
        z_next = tl.load(z_ptr + sz_ptrs + g_next, mask=n_mask, other=0.0)
        if TMA:
            x = x_ptr.load([pid_m * BLOCK_M, k0])
        else:
            x = tl.load(x_ptrs, mask=m_mask[:, None], other=0.0)
        if UNPACK == UNPACK_NATURAL:
            w = _natural_weights(words, s, z, BLOCK_N, BLOCK_K, PTX_DEQUANT)
        else:
            w = _frag_weights(words, s, z, BLOCK_N, BLOCK_K, PTX_DEQUANT)
            x = _frag_x(x, BLOCK_M, BLOCK_K)
        if DOT_FP32:  # the interpreter's bf16 tl.dot is broken (CPU tests only)
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = _mma(acc, x, w, SWAP_AB, ACC_FP16)
        if not TMA:
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K // 8

    # acc is [BM, BN], or [BN, BM] when SWAP_AB: index the output accordingly instead of transposing
    if SWAP_AB:
        rows, cols = offs_m[None, :], offs_n[:, None]
        mask = n_mask[:, None] & m_mask[None, :]
    else:
        rows, cols = offs_m[:, None], offs_n[None, :]
        mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K > 1:  # y_ptr holds the fp32 partials [SPLIT_K, M, N]; out_ptr the output
        tl.store(y_ptr + pid_k * M * N + rows * N + cols, acc, mask=mask)
        if FUSED_REDUCE:
            if arrive(counters_ptr + tl.program_id(0), SPLIT_K):
                total = tl.zeros_like(acc)
                for s in tl.static_range(SPLIT_K):  # in split order: the sum of the two-launch path
                    total += tl.load(y_ptr + s * M * N + rows * N + cols, mask=mask, other=0.0,
                                     cache_modifier=".cg")
                if HAS_BIAS:
                    total += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
                tl.store(out_ptr + rows * stride_ym + cols, total.to(out_ptr.dtype.element_ty), mask=mask)
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
    swap_ab: bool = False, acc_fp16: bool = False, unpack: str = "frag", ptx_dequant: bool = False,
    split_k: int = 1, split_below_tiles: int = 0, fused_reduce: bool = False, tma: bool = False,
    num_warps: int = 4, num_stages: int = 3,
):
    """Launch on already-validated tensors (see :func:`tinyq.kernels.w4a16_matmul.w4a16_matmul`);
    ``fused_reduce`` sums split-K partials in the GEMM's last program per tile instead of a second
    launch; ``tma`` loads x and the packed words through tensor descriptors where both are 16-byte
    aligned (pointer loads otherwise). With ``split_below_tiles`` > 0, K is split only while the
    output has fewer tiles than that (the shipped plans give the SM count: a layer with a tile per
    SM already fills the GPU, and splitting it only shortens each program's K loop and adds fp32
    partials)."""
    m, k = x.shape
    n = qweight.shape[0]
    if split_below_tiles and triton.cdiv(m, block_m) * triton.cdiv(n, block_n) >= split_below_tiles:
        split_k = 1
    group_size = k // scales.shape[1]
    block_k = min(block_k, group_size)
    if acc_fp16 and x.dtype != torch.float16:
        raise ValueError(f"fp16 accumulation needs fp16 activations, got {x.dtype}")
    if unpack not in UNPACK_MODES:
        raise ValueError(f"unpack={unpack!r} is not one of {sorted(UNPACK_MODES)}")
    steps = k // block_k
    split_k = max(1, min(split_k, steps))
    k_split = triton.cdiv(steps, split_k) * block_k
    split_k = triton.cdiv(k, k_split)  # no empty split
    out = y if split_k == 1 else torch.empty((split_k, m, n), dtype=torch.float32, device=y.device)
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n), split_k)
    # more tiles than the first counter buffer holds would grow it, which a captured graph must not see
    fused_reduce = fused_reduce and split_k > 1 and grid[0] <= MIN_COUNTERS
    if tma and unpack != "natural":
        raise ValueError("tma=True loads x straight into the MMA: it needs unpack='natural'")
    tma = tma and tma_eligible(x, qweight)
    x_arg, w_arg = x, qweight
    if tma:
        x_arg = TensorDescriptor(x, [m, k], [x.stride(0), 1], [block_m, block_k])
        w_arg = TensorDescriptor(qweight, [n, k // 8], [qweight.stride(0), 1], [block_n, block_k // 8])
    _w4a16_gemm_kernel[grid](
        x_arg, w_arg, scales, zeros, bias if bias is not None else y, out, y,
        counters(y.device, grid[0]) if fused_reduce else y,
        m, n, k, k_split, k_split // 8,
        x.stride(0), y.stride(0), qweight.stride(0), scales.stride(0),
        GROUP_SIZE=group_size,
        HAS_BIAS=bias is not None,
        SPLIT_K=split_k,
        FUSED_REDUCE=fused_reduce,
        SWAP_AB=swap_ab,
        ACC_FP16=acc_fp16,
        DOT_FP32=interpreting() and x.dtype == torch.bfloat16,
        UNPACK=UNPACK_MODES[unpack],
        PTX_DEQUANT=ptx_dequant and not interpreting(),  # inline PTX needs a real GPU
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        GROUP_M=group_m,
        TMA=tma,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if split_k > 1 and not fused_reduce:
        reduce_block = 1024
        _splitk_reduce_kernel[(triton.cdiv(m * n, reduce_block),)](
            out, bias if bias is not None else y, y, m, n, y.stride(0),
            SPLIT_K=split_k, HAS_BIAS=bias is not None, BLOCK=reduce_block, num_warps=4,
        )
    return y
