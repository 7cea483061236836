"""W4A16 GEMV for decode: ``y[m, :] = x[m, :] @ W.T (+ b)`` for a few rows m, W in tinyq int4.

Math, per output column n and group g of G inputs (``W = (q - z) * s``)::

    y[n] = sum_g s[n, g] * sum_{k in g} x[k] * (q[n, k] - z[n, g])

so the inner loop is one unpack of ``q - z`` and one FMA per weight; the scale is applied once per
32-input block. Accumulation is fp32.

Unpacking follows tinyq's packing (:mod:`tinyq.quant.format`): a K step is a
``[BLOCK_N, BLOCK_K/32, 4]`` tile of words, 4 words (16 bytes, one load) per 32-input block.
Nibble ``i`` of those 4 words holds inputs ``32b + 4i .. 32b + 4i + 3``, so it meets x in one
contiguous 4-element load. Without the fp16 PTX path (bf16, the interpreter), each ``q - z`` becomes
an exact float32 from a mask-and-OR into the mantissa of a power of two and one subtract
(:func:`_nibble_minus_zero`), with no int-to-float convert. Products add into a 3-D fp32
accumulator that is reduced once at the end: no reshape, no layout shuffle.

Measured on the H100 (four Llama-3-8B linears, M=1): the plain nibble order ``8c + i`` needed 4
scalar x loads per nibble and left the kernel L1-bound (82% L1, 33% DRAM, 111 us); an
``[BN, BK/8, 8] -> [BN, BK]`` reshape unpack took 314 us.

Tensors: ``x`` [M, K] fp16/bf16 (row stride ``stride_xm``, unit column stride), or paired rows with
an optional float32 scale ``xs`` [M] (:class:`~tinyq.kernels.paired.PairedRows`); ``qweight`` int32
[N, K/8], contiguous, its row stride passed as ``stride_w16`` in 16-byte units (K/32); ``scales``/
``zeros`` [N, K/G]; ``bias`` [N] or none; ``y`` [M, N] in the activations' dtype (the scales').

The words, scales and zeros of step k + 1 are loaded before step k computes (register
double-buffering), two steps of weight bytes in flight per program.

Work split: with G = ceil(M / ROWS) groups of ``ROWS`` (1 or 2) activation rows, program p handles
rows ``ROWS * (p % G) ...`` and columns ``BLOCK_N * (p // G) ...``: each weight word it loads is
unpacked once and multiplied into its ROWS rows. Groups that share a column block are neighbours in
launch order, so for M > ROWS the second read of a weight block hits L2. No split-K: with
BLOCK_N = 8, N = 4096 already gives 512 programs (4 per SM on an H100), each streaming whole
contiguous weight rows (2 KB per row at K = 4096).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tinyq.backend import interpreting
from tinyq.kernels.int4_ptx import nibble_pairs_minus_zero
from tinyq.kernels.paired import PairedRows, x_operand
from tinyq.kernels.rmsnorm import inv_rms
from tinyq.quant.format import dequantize_weight


# Whether Triton's coalescing hands lanes to equally contiguous tile dims last dim first (3.7 and
# later) rather than first dim first (3.6 and earlier): read from the TTGIR of 3.6, 3.7.1, 3.8 and 3.9.
_TIES_LAST_FIRST = tl.constexpr(tuple(int(p) for p in triton.__version__.split(".")[:2]) >= (3, 7))


# One int32 word of 8 nibbles -> sum_i (q_i - z) * x_i, fp16 arithmetic inside, fp32 out.
# The fp16 pairs of (q - z) / 16 come from tinyq/kernels/int4_ptx.py (kind f16_div16, exact), so a
# product is at most 15/16 |x| and a sum of two at most 1.9 |x|: no fp16 overflow for |x| < 34,000,
# and x needs no scaling. The two fp16 pair sums are widened and added in fp32; the caller multiplies
# by 16 s. 22 instructions per 8 weights instead of ~40.
_DEQUANT_DOT_PTX = tl.constexpr(
    "{\n.reg .b32 t1, t2, t3, q0, q1, q2, q3, zz, h0, h1;\n.reg .f16 a, b, c, d;\n.reg .f32 fa, fb, fc, fd;\n"
    "mov.b32 zz, {$2, $2};\n"
    + nibble_pairs_minus_zero("$1", "zz", "f16_div16")
    + "\nmul.rn.f16x2 h0, q0, $3;\nfma.rn.f16x2 h0, q1, $4, h0;\n"
    "mul.rn.f16x2 h1, q2, $5;\nfma.rn.f16x2 h1, q3, $6, h1;\n"
    "mov.b32 {a, b}, h0;\nmov.b32 {c, d}, h1;\n"
    "cvt.f32.f16 fa, a;\ncvt.f32.f16 fb, b;\ncvt.f32.f16 fc, c;\ncvt.f32.f16 fd, d;\n"
    "add.f32 fa, fa, fb;\nadd.f32 fc, fc, fd;\nadd.f32 $0, fa, fc;\n}"
)


# ``lop3 (w & 0xF << 4j) | magic_j`` in one instruction: written as and + or, the compiler emits two
# LOP3s (SASS takes one immediate; the two-immediate PTX form gets its magic hoisted into a register).
def _nibble_float_ptx(j: int) -> tl.constexpr:
    return tl.constexpr(f"lop3.b32 $0, $1, {0xF << (4 * j):#x}, {(150 - 4 * j) << 23:#x}, 0xEA;")


_NIBBLE_FLOAT_PTX0 = _nibble_float_ptx(0)
_NIBBLE_FLOAT_PTX1 = _nibble_float_ptx(1)
_NIBBLE_FLOAT_PTX2 = _nibble_float_ptx(2)
_NIBBLE_FLOAT_PTX3 = _nibble_float_ptx(3)


@triton.jit
def _lop3(words, asm: tl.constexpr):
    return tl.inline_asm_elementwise(asm, "=r,r", [words], dtype=tl.uint32, is_pure=True, pack=1)


@triton.jit
def _nibble_minus_zero(words, j: tl.constexpr, z, PTX: tl.constexpr = False):
    """``q - z`` in exact float32 for nibble ``j`` (bits 4j..4j+3, j < 4) of uint32 ``words`` and
    integer zeros ``z``, without an int-to-float convert (quarter rate on sm90): OR-ed into the
    mantissa of ``2^(23 - 4j)``, whose last mantissa bit then weighs ``2^-4j``, the nibble reads as
    ``2^(23 - 4j) + q``; one float subtract of ``2^(23 - 4j) + z`` (exact: an integer below 2^24)
    leaves ``q - z``. ``PTX``: the mask-and-OR as one ``lop3`` (a real NVIDIA GPU only)."""
    magic: tl.constexpr = (150 - 4 * j) << 23
    if PTX and j == 0:
        bits = _lop3(words, _NIBBLE_FLOAT_PTX0)
    elif PTX and j == 1:
        bits = _lop3(words, _NIBBLE_FLOAT_PTX1)
    elif PTX and j == 2:
        bits = _lop3(words, _NIBBLE_FLOAT_PTX2)
    elif PTX:
        bits = _lop3(words, _NIBBLE_FLOAT_PTX3)
    else:
        bits = (words & (0xF << (4 * j))) | magic
    return bits.to(tl.float32, bitcast=True) - (z + 2.0 ** (23 - 4 * j))


@triton.jit
def _pack_half2(lo, hi):
    """Two fp16 tensors -> one int32 tensor holding the pair (lo in the low half)."""
    return tl.inline_asm_elementwise("mov.b32 $0, {$1, $2};", "=r,h,h", [lo, hi], dtype=tl.int32, is_pure=True,
                                     pack=1)


@triton.jit
def _load_step(qw_ptr, s_ptr, z_ptr, n3, ok3, blk, offs_w, k0, K, stride_w16, stride_sn,
               GROUP_SIZE: tl.constexpr):
    """The words (uint32, the 3-D tile of :func:`gemv_rows` x 4), scales and zeros (fp32, the tile)
    of the K step at ``k0``: ``n3`` / ``ok3`` hold the tile's rows and their mask, ``blk`` numbers
    the step's 32-input blocks (all masked to 0 past K); each is 1 along the dims it does not vary."""
    kb = k0 + 32 * blk  # first input of each block
    mask = ok3 & (kb < K)  # the 3-D tile
    # Each weight word is read once per call: evict_first lets the stream pass through L2 without
    # pushing out what is read again (activations, scales, the KV cache; measured in docs/perf_notes.md).
    words = tl.load(qw_ptr + (n3 * (4 * stride_w16) + k0 // 8 + 4 * blk)[:, :, :, None] + offs_w[None, None, None, :],
                    mask=mask[:, :, :, None], other=0, eviction_policy="evict_first")
    sz = n3 * stride_sn + kb // GROUP_SIZE
    s = tl.load(s_ptr + sz, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + sz, mask=mask, other=0.0).to(tl.float32)
    return words.to(tl.uint32, bitcast=True), s, z


@triton.jit
def _x_load(ptr, ok, EVEN_K: tl.constexpr):
    """x at ``ptr``, masked by ``ok`` unless every block of every step is inside K (``EVEN_K``):
    an unmasked load needs no zero-fill of its registers (10 fewer instructions a step at M = 1)."""
    if EVEN_K:
        return tl.load(ptr)
    return tl.load(ptr, mask=ok, other=0)


@triton.jit
def _half_pair_to_f32(pair, IS_BF16: tl.constexpr):
    """The two fp16/bf16 halves of int32 ``pair`` as float32 (low half first), exactly."""
    u = pair.to(tl.uint32, bitcast=True)
    if IS_BF16:  # a bf16 is the top half of the float32 with the same value
        return (u << 16).to(tl.float32, bitcast=True), ((u >> 16) << 16).to(tl.float32, bitcast=True)
    lo = (u & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    hi = (u >> 16).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    return lo, hi


# One int32 word -> its 4 fp16 pairs of (q - z) / 16 (as in _DEQUANT_DOT_PTX), for several rows of x
_DEQUANT_PAIRS_PTX = tl.constexpr(
    "{\n.reg .b32 t1, t2, t3, q0, q1, q2, q3, zz;\nmov.b32 zz, {$5, $5};\n"
    + nibble_pairs_minus_zero("$4", "zz", "f16_div16")
    + "\nmov.b32 $0, q0;\nmov.b32 $1, q1;\nmov.b32 $2, q2;\nmov.b32 $3, q3;\n}"
)
# Those 4 pairs dotted with 4 pairs of x, as the tail of _DEQUANT_DOT_PTX
_PAIRS_DOT_PTX = tl.constexpr(
    "{\n.reg .b32 h0, h1;\n.reg .f16 a, b, c, d;\n.reg .f32 fa, fb, fc, fd;\n"
    "mul.rn.f16x2 h0, $1, $5;\nfma.rn.f16x2 h0, $2, $6, h0;\n"
    "mul.rn.f16x2 h1, $3, $7;\nfma.rn.f16x2 h1, $4, $8, h1;\n"
    "mov.b32 {a, b}, h0;\nmov.b32 {c, d}, h1;\n"
    "cvt.f32.f16 fa, a;\ncvt.f32.f16 fb, b;\ncvt.f32.f16 fc, c;\ncvt.f32.f16 fd, d;\n"
    "add.f32 fa, fa, fb;\nadd.f32 fc, fc, fd;\nadd.f32 $0, fa, fc;\n}"
)


@triton.jit
def _x_pairs(x_blk, x_ok, x_plane, EVEN_K: tl.constexpr):
    """The 4 fp16 pairs (as int32) of one row's x that nibbles (j, j + 4) of each word meet:
    (x[.. + 4j], x[.. + 4j + 16]), from the paired layout (``x_plane`` > 0) or the natural one."""
    if x_plane > 0:
        xp0 = _x_load(x_blk, x_ok, EVEN_K)
        xp1 = _x_load(x_blk + x_plane, x_ok, EVEN_K)
        xp2 = _x_load(x_blk + 2 * x_plane, x_ok, EVEN_K)
        xp3 = _x_load(x_blk + 3 * x_plane, x_ok, EVEN_K)
    else:
        xp0 = _pack_half2(_x_load(x_blk, x_ok, EVEN_K), _x_load(x_blk + 16, x_ok, EVEN_K))
        xp1 = _pack_half2(_x_load(x_blk + 4, x_ok, EVEN_K), _x_load(x_blk + 20, x_ok, EVEN_K))
        xp2 = _pack_half2(_x_load(x_blk + 8, x_ok, EVEN_K), _x_load(x_blk + 24, x_ok, EVEN_K))
        xp3 = _pack_half2(_x_load(x_blk + 12, x_ok, EVEN_K), _x_load(x_blk + 28, x_ok, EVEN_K))
    return xp0, xp1, xp2, xp3


@triton.jit
def _pairs_dot(q0, q1, q2, q3, x_blk, x_ok, x_plane, EVEN_K: tl.constexpr):
    xp0, xp1, xp2, xp3 = _x_pairs(x_blk, x_ok, x_plane, EVEN_K)
    return tl.inline_asm_elementwise(_PAIRS_DOT_PTX, "=f,r,r,r,r,r,r,r,r", [q0, q1, q2, q3, xp0, xp1, xp2, xp3],
                                     dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _fma_pair(part, w_lo, w_hi, x_blk, j: tl.constexpr, x_ok, x_plane, EVEN_K: tl.constexpr, X_BF16: tl.constexpr):
    """``part + w_lo * x[.. + 4j] + w_hi * x[.. + 4j + 16]`` for one row's x (the portable path's pair j)
    as two separate updates: one FFMA each, where a + b*lo + c*hi costs an FMUL and an FADD more."""
    if x_plane > 0:
        lo, hi = _half_pair_to_f32(_x_load(x_blk + j * x_plane, x_ok, EVEN_K), X_BF16)
    else:
        lo = _x_load(x_blk + 4 * j, x_ok, EVEN_K).to(tl.float32)  # one row, x 4 inputs
        hi = _x_load(x_blk + 4 * j + 16, x_ok, EVEN_K).to(tl.float32)
    part += w_lo * lo
    part += w_hi * hi
    return part


@triton.jit
def _acc_sum(acc, ROWS_LAST: tl.constexpr):
    return tl.sum(tl.sum(tl.sum(acc, axis=3), axis=1 if ROWS_LAST else 2), axis=0)


@triton.jit
def gemv_rows_n(x_row0, x_row1, qw_ptr, s_ptr, z_ptr, rows, row_ok, K, x_plane, stride_w16,
                stride_sn, GROUP_SIZE: tl.constexpr, PTX_DEQUANT: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, WARP_BLOCKS: tl.constexpr, EVEN_K: tl.constexpr, X_FP16: tl.constexpr,
                ROWS: tl.constexpr):
    """float32 ``[BLOCK_N]`` each: the dot products of ``ROWS`` (1 or 2) activation rows at ``x_row0``
    and ``x_row1`` (unused for one row) with weight rows ``rows`` (any ``BLOCK_N`` row indices;
    ``row_ok`` masks the rest to 0), returned as 2 values (for one row, row 0's twice).
    The main loop of every W4A16 GEMV (the plain one here, and the fused ones that change only the
    rows and the epilogue; :func:`gemv_rows` is its one-row form).

    With several rows each weight word is loaded and dequantized once, and only the multiply-adds
    and the x loads are per row: the fp16 path splits its asm into the unpack (``q - z`` pairs) and
    one dot per row. (Three and four rows lost to the GEMM: docs/perf_notes.md, 2026-12-06.)

    A K step's ``BLOCK_K / 32`` blocks are split as ``[NBO, NBI]`` with ``NBI = WARP_BLOCKS``. Each
    thread loads a block's 4 words (16 bytes, the last tile dim). Triton's coalescing sees no
    contiguity across the other dims (blocks are 16 bytes apart, rows a row stride) and hands lanes
    to such ties in dim order up to Triton 3.6, in reverse dim order from 3.7 (:data:`_TIES_LAST_FIRST`).
    So the tile is ``[NBO, BLOCK_N, NBI, 4]`` or ``[NBO, NBI, BLOCK_N, 4]``, whichever gives, on the
    Triton at hand and with the shipped step (NBO = 1):

    - natural x: a warp over 8 rows x 4 blocks, rows fastest, so the 8 rows share each 8-byte x load
      (one line, not 8), which matters more than the weights' 8 rows a quarter-warp;
    - paired x: a warp's lanes along 32 blocks of one row, so each weight load and each x plane load
      is 512 contiguous bytes (4 L1 wavefronts, where 8 rows a quarter-warp took 8 each) and a warp's
      scales share one line.

    ``tests/test_sm90_compile.py`` checks both lane layouts in the compiled kernels.

    ``x_plane`` (a constexpr) > 0: ``x_row`` is an int32 pointer to the row in the paired layout
    (:class:`tinyq.kernels.paired.PairedRows`, planes ``x_plane`` words apart; a constant, so the
    four plane loads share one address). A lane's x for its 4 words then comes as 4 coalesced
    16-byte loads of ready (nibble j, nibble j + 4) pairs, where the natural layout (``x_plane`` 0)
    costs 8 loads of 8 bytes at a 64-byte lane stride and a pack per pair.

    ``EVEN_K``: ``K`` is a multiple of ``BLOCK_K``, so the x loads need no mask (:func:`even_k`).
    ``X_FP16``: paired x holds fp16 pairs whatever the scales' dtype (bf16 rows stored scaled,
    :func:`tinyq.kernels.pair_rows.pair_rows`); the caller applies the row's scale."""
    tl.static_assert(BLOCK_K % 32 == 0, "a K step is a whole number of 32-input blocks")
    tl.static_assert(GROUP_SIZE % 32 == 0, "groups hold whole 32-input blocks")
    tl.static_assert(ROWS == 1 or ROWS == 2, "1 or 2 activation rows")
    NB: tl.constexpr = BLOCK_K // 32
    tl.static_assert(NB % WARP_BLOCKS == 0, "WARP_BLOCKS divides the step's blocks")
    NBO: tl.constexpr = NB // WARP_BLOCKS
    X_BF16: tl.constexpr = s_ptr.dtype.element_ty == tl.bfloat16 and not X_FP16  # paired x's pair dtype
    X_PAIRED: tl.constexpr = x_plane > 0
    ROWS_LAST: tl.constexpr = X_PAIRED != _TIES_LAST_FIRST  # the tile's dim order (above)
    if ROWS_LAST:  # [NBO, NBI, BN]
        blk = tl.arange(0, NBO)[:, None, None] * WARP_BLOCKS + tl.arange(0, WARP_BLOCKS)[None, :, None]
        n3 = rows[None, None, :]
        ok3 = row_ok[None, None, :]
        acc0 = tl.zeros((NBO, WARP_BLOCKS, BLOCK_N, 4), dtype=tl.float32)
    else:  # [NBO, BN, NBI]
        blk = tl.arange(0, NBO)[:, None, None] * WARP_BLOCKS + tl.arange(0, WARP_BLOCKS)[None, None, :]
        n3 = rows[None, :, None]
        ok3 = row_ok[None, :, None]
        acc0 = tl.zeros((NBO, BLOCK_N, WARP_BLOCKS, 4), dtype=tl.float32)
    acc1 = tl.zeros_like(acc0)  # row 1's accumulator: untouched (and dropped) for one row
    offs_w = tl.arange(0, 4)
    # the weight words, scales and zeros of step k + 1 are loaded before step k computes (register
    # double-buffering), so each program keeps two steps of weight bytes in flight
    words_n, s_n, z_n = _load_step(qw_ptr, s_ptr, z_ptr, n3, ok3, blk, offs_w, 0, K, stride_w16, stride_sn,
                                   GROUP_SIZE)
    for k0 in range(0, K, BLOCK_K):
        x_ok = ((k0 + 32 * blk) < K)[:, :, :, None]  # the tile with one row, x 1
        words, s, z = words_n, s_n, z_n
        words_n, s_n, z_n = _load_step(qw_ptr, s_ptr, z_ptr, n3, ok3, blk, offs_w, k0 + BLOCK_K, K,
                                       stride_w16, stride_sn, GROUP_SIZE)
        if X_PAIRED:
            x_off = k0 // 8 + 4 * blk[:, :, :, None] + offs_w[None, None, None, :]  # one row, x 4 int32
        else:
            x_off = k0 + 32 * blk[:, :, :, None] + offs_w[None, None, None, :]  # one row, x 4 inputs
        if PTX_DEQUANT == 2:
            # fp16 only. Pair j = (nibble j, nibble j + 4) meets (x[.. + 4j], x[.. + 4j + 16]).
            z16 = (z * 0.0625 + 64.0).to(tl.float16)[:, :, :, None]  # exact: z is an integer 0..15
            s16 = (16.0 * s)[:, :, :, None]
            if ROWS == 1:  # unpack and dot in one asm (the tuned decode kernel)
                xp0, xp1, xp2, xp3 = _x_pairs(x_row0 + x_off, x_ok, x_plane, EVEN_K)
                dots = tl.inline_asm_elementwise(
                    _DEQUANT_DOT_PTX, "=f,r,h,r,r,r,r", [words, z16, xp0, xp1, xp2, xp3],
                    dtype=tl.float32, is_pure=True, pack=1,
                )
                acc0 += s16 * dots
            else:
                q0, q1, q2, q3 = tl.inline_asm_elementwise(
                    _DEQUANT_PAIRS_PTX, "=r,=r,=r,=r,r,h", [words, z16],
                    dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1,
                )
                acc0 += s16 * _pairs_dot(q0, q1, q2, q3, x_row0 + x_off, x_ok, x_plane, EVEN_K)
                acc1 += s16 * _pairs_dot(q0, q1, q2, q3, x_row1 + x_off, x_ok, x_plane, EVEN_K)
        else:
            part0 = tl.zeros_like(acc0)
            part1 = tl.zeros_like(acc0)
            high = words >> 16  # nibbles 4..7 at bits 0..15
            zz = z[:, :, :, None]
            for j in tl.static_range(4):
                w_lo = _nibble_minus_zero(words, j, zz, PTX_DEQUANT == 1)
                w_hi = _nibble_minus_zero(high, j, zz, PTX_DEQUANT == 1)
                part0 = _fma_pair(part0, w_lo, w_hi, x_row0 + x_off, j, x_ok, x_plane, EVEN_K, X_BF16)
                if ROWS == 2:
                    part1 = _fma_pair(part1, w_lo, w_hi, x_row1 + x_off, j, x_ok, x_plane, EVEN_K, X_BF16)
            s4 = s[:, :, :, None]
            acc0 += s4 * part0
            if ROWS == 2:
                acc1 += s4 * part1
    d0 = _acc_sum(acc0, ROWS_LAST)
    d1 = d0
    if ROWS == 2:
        d1 = _acc_sum(acc1, ROWS_LAST)
    return d0, d1


@triton.jit
def gemv_rows(x_row, qw_ptr, s_ptr, z_ptr, rows, row_ok, K, x_plane, stride_w16, stride_sn,
              GROUP_SIZE: tl.constexpr, PTX_DEQUANT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
              WARP_BLOCKS: tl.constexpr, EVEN_K: tl.constexpr):
    """:func:`gemv_rows_n` of one activation row at ``x_row`` (x paired in the scales' dtype, or
    natural): float32 ``[BLOCK_N]``."""
    d0, _ = gemv_rows_n(x_row, x_row, qw_ptr, s_ptr, z_ptr, rows, row_ok, K, x_plane, stride_w16, stride_sn,
                        GROUP_SIZE, PTX_DEQUANT, BLOCK_N, BLOCK_K, WARP_BLOCKS, EVEN_K, False, 1)
    return d0


@triton.jit
def gemv_rows_prenormed(x_row, qw_ptr, s_ptr, z_ptr, bias_ptr, h_row, rows, row_ok, K, x_plane, eps, stride_w16,
                        stride_sn, GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr, PRENORM: tl.constexpr,
                        PTX_DEQUANT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        WARP_BLOCKS: tl.constexpr, ROW: tl.constexpr, EVEN_K: tl.constexpr):
    """:func:`gemv_rows` plus the bias, for the fused GEMVs that may finish an RMSNorm: with
    ``PRENORM`` the row at ``x_row`` holds ``h * w`` of the norm and the dot products are scaled by
    ``1 / rms(h)`` of the row at ``h_row`` (``ROW`` = next_pow2(K) lanes)."""
    if PRENORM:
        rstd = inv_rms(h_row, K, eps, ROW)
    dots = gemv_rows(x_row, qw_ptr, s_ptr, z_ptr, rows, row_ok, K, x_plane, stride_w16, stride_sn,
                     GROUP_SIZE, PTX_DEQUANT, BLOCK_N, BLOCK_K, WARP_BLOCKS, EVEN_K)
    if PRENORM:
        dots = dots * rstd
    if HAS_BIAS:
        dots += tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    return dots


def gemv_rows_prenormed_reference(x, qweight, scales, zeros, bias=None, prenorm=None):
    """Float32 ``x @ W.T (+ b)`` of :func:`gemv_rows_prenormed`, nothing rounded: with
    ``prenorm = (h, eps)``, ``x`` is ``h * w`` of an RMSNorm and is first scaled by ``1 / rms(h)``."""
    x = x.float()
    if prenorm is not None:
        h, eps = prenorm
        x = x * torch.rsqrt(h.float().pow(2).mean(-1, keepdim=True) + eps)
    y = x @ dequantize_weight(qweight, scales, zeros).t()
    return y + bias.float() if bias is not None else y


@triton.jit
def _w4a16_gemv_kernel(
    x_ptr, xs_ptr, qw_ptr, s_ptr, z_ptr, bias_ptr, y_ptr,
    M, N, K,
    stride_xm, stride_ym, stride_w16, stride_sn,
    GROUP_SIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    PTX_DEQUANT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    WARP_BLOCKS: tl.constexpr,
    X_PLANE: tl.constexpr,
    X_SCALED: tl.constexpr,
    EVEN_K: tl.constexpr,
    ROWS: tl.constexpr,
):
    pid = tl.program_id(0)
    groups = tl.cdiv(M, ROWS)
    m0 = (pid % groups) * ROWS
    pid_n = pid // groups
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    # a row past M (a last group of one row) reads row M - 1 again; its store is masked
    m1 = tl.minimum(m0 + 1, M - 1)
    # The weight row stride comes in 16-byte units (K // 32, computed on the host) and is multiplied
    # by 4 words here, so Triton knows every row starts 16-byte aligned and loads a block's 4 words
    # in one access. Passed in words, it was proven aligned only where K // 8 is a multiple of 16
    # (Triton's argument specialization): SmolLM2's K = 576 and 1536 got 4-byte loads.
    d0, d1 = gemv_rows_n(x_ptr + m0 * stride_xm, x_ptr + m1 * stride_xm, qw_ptr, s_ptr, z_ptr, offs_n, n_mask, K,
                         X_PLANE, stride_w16, stride_sn, GROUP_SIZE, PTX_DEQUANT, BLOCK_N, BLOCK_K, WARP_BLOCKS,
                         EVEN_K, X_SCALED, ROWS)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    else:
        bias = 0.0
    _store_row(y_ptr, xs_ptr, m0, stride_ym, offs_n, N, d0, bias, X_SCALED)
    if ROWS == 2:  # a row past M stores nothing (no column is below 0)
        _store_row(y_ptr, xs_ptr, m1, stride_ym, offs_n, tl.where(m0 + 1 < M, N, 0), d1, bias, X_SCALED)


@triton.jit
def _store_row(y_ptr, xs_ptr, m, stride_ym, offs_n, n_end, dots, bias, X_SCALED: tl.constexpr):
    """Columns below ``n_end`` of row ``m`` of y: the dots, times the row's scale where x was stored
    scaled (fp16 over a power of two, ``pair_rows(scaled=True)``), plus the bias."""
    if X_SCALED:
        dots *= tl.load(xs_ptr + m)
    tl.store(y_ptr + m * stride_ym + offs_n, (dots + bias).to(y_ptr.dtype.element_ty), mask=offs_n < n_end)


def gemv_ptx(x) -> int:
    """The ``PTX_DEQUANT`` level of the GEMV main loop for activations ``x`` (a tensor or
    :class:`PairedRows`): 2, the fp16 PTX dot (fp16 on a real GPU); 1, the portable unpack with its
    mask-and-OR as one PTX ``lop3`` (bf16 on a real GPU); 0, plain Triton (the interpreter runs no PTX)."""
    if interpreting():
        return 0
    x = x.data if isinstance(x, PairedRows) else x
    return 2 if x.dtype == torch.float16 else 1


def even_k(k: int, block_k: int) -> bool:
    """The ``EVEN_K`` of :func:`gemv_rows`: every K step is whole."""
    return k % block_k == 0


def warp_blocks_of(block_k: int, warp_blocks=None) -> int:
    """The ``WARP_BLOCKS`` of :func:`gemv_rows`: a plan's ``warp_blocks``, else one row a warp."""
    return warp_blocks or block_k // 32


def launch_w4a16_gemv(x, qweight, scales, zeros, bias, y, *, block_n: int, block_k: int, num_warps: int,
                      num_stages: int, ptx_dequant: bool = False, warp_blocks=None, rows: int = 1):
    """Launch on already-validated tensors (see :func:`tinyq.kernels.w4a16_matmul.w4a16_matmul`);
    ``x`` ``[M, K]`` or :class:`PairedRows` of M rows (with or without a row scale). ``rows``
    (1 or 2): activation rows a program multiplies by each weight word it unpacks."""
    n, k = qweight.shape[0], qweight.shape[1] * 8
    x_arg, x_plane = x_operand(x, scaled_ok=True)
    x_scale = x.scale if isinstance(x, PairedRows) else None
    m = x_arg.shape[0]
    group_size = k // scales.shape[1]
    if rows not in (1, 2):
        raise ValueError(f"launch_w4a16_gemv: rows={rows}; a program takes 1 or 2 activation rows")
    rows = min(rows, m) or 1
    grid = (triton.cdiv(m, rows) * triton.cdiv(n, block_n),)
    _w4a16_gemv_kernel[grid](
        x_arg, x_scale if x_scale is not None else y, qweight, scales, zeros, bias if bias is not None else y, y,
        m, n, k,
        x_arg.stride(0), y.stride(0), qweight.stride(0) // 4, scales.stride(0),
        GROUP_SIZE=group_size,
        HAS_BIAS=bias is not None,
        PTX_DEQUANT=gemv_ptx(x) if ptx_dequant else 0,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        WARP_BLOCKS=warp_blocks_of(block_k, warp_blocks),
        X_PLANE=x_plane,
        X_SCALED=x_scale is not None,
        EVEN_K=even_k(k, block_k),
        ROWS=rows,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return y
