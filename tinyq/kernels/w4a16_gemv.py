"""W4A16 GEMV for decode: ``y[m, :] = x[m, :] @ W.T (+ b)`` for a few rows m, W in tinyq int4.

Math, per output column n and group g of G inputs (``W = (q - z) * s``)::

    y[n] = sum_g s[n, g] * ( sum_{k in g} x[k] * q[n, k]  -  z[n, g] * sum_{k in g} x[k] )

so the inner loop is one convert and one FMA per weight; scale and zero are applied once per
word column. Accumulation is fp32.

Unpacking: a ``[BLOCK_N, BLOCK_K/8]`` tile of words is loaded contiguously along K, then for
nibble ``i = 0..7`` the slice of nibble i holds ``k = 8c + i`` and meets ``x[k0 + 8c + i]`` (a
strided load of x, served by L1). Products add into a 2-D fp32 accumulator, reduced across the
tile once at the end: no reshape, no layout shuffle. (A ``[BN, BK/8, 8] -> [BN, BK]`` reshape
unpack measured 2.7x slower on the H100: 314 vs 117 us for the four Llama-3-8B linears at M=1.)
``SHIFT_FREE`` extracts nibble i as ``words & (0xF << 4i)`` and folds ``16^-i`` into x.

Tensors: ``x`` [M, K] fp16/bf16 (row stride ``stride_xm``, unit column stride); ``qweight`` int32
[N, K/8] (word c of row n holds k = 8c + i in bits 4i..4i+3); ``scales``/``zeros`` [N, K/G];
``bias`` [N] or none; ``y`` [M, N] in x's dtype.

Work split: program p handles row ``m = p % M`` and columns ``BLOCK_N * (p // M) ...``. Rows that
share a column block are neighbours in launch order, so for M > 1 the second read of a weight
block hits L2. No split-K: with BLOCK_N = 8, N = 4096 already gives 512 programs (4 per SM on an
H100), each streaming whole contiguous weight rows (2 KB per row at K = 4096).
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _w4a16_gemv_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, bias_ptr, y_ptr,
    M, N, K,
    stride_xm, stride_ym,
    GROUP_SIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SHIFT_FREE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    tl.static_assert(BLOCK_K % GROUP_SIZE == 0, "a K step must hold whole groups")
    BLOCK_KW: tl.constexpr = BLOCK_K // 8
    pid = tl.program_id(0)
    m = pid % M
    pid_n = pid // M
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_c = tl.arange(0, BLOCK_KW)
    words_per_row = K // 8
    groups_per_row = K // GROUP_SIZE
    x_row = x_ptr + m * stride_xm

    acc = tl.zeros((BLOCK_N, BLOCK_KW), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        c_ok = (k0 // 8 + offs_c) < words_per_row
        mask = n_mask[:, None] & c_ok[None, :]
        words = tl.load(qw_ptr + offs_n[:, None] * words_per_row + (k0 // 8 + offs_c)[None, :], mask=mask, other=0)
        words = words.to(tl.uint32, bitcast=True)
        # word c lies in group (k0 + 8c) // G; G/8 neighbouring words share a scale (L1 hit)
        sz = offs_n[:, None] * groups_per_row + ((k0 + 8 * offs_c) // GROUP_SIZE)[None, :]
        s = tl.load(s_ptr + sz, mask=mask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + sz, mask=mask, other=0.0).to(tl.float32)
        part = tl.zeros((BLOCK_N, BLOCK_KW), dtype=tl.float32)
        xsum = tl.zeros((BLOCK_KW,), dtype=tl.float32)
        for i in tl.static_range(8):
            xi = tl.load(x_row + k0 + 8 * offs_c + i, mask=c_ok, other=0.0).to(tl.float32)
            xsum += xi
            if SHIFT_FREE:
                # (words & 0xF << 4i) converts exactly to q * 16^i; x * 16^-i is exact too, so
                # the product is q * x with one instruction fewer per weight than shift-and-mask.
                part += (words & (0xF << (4 * i))).to(tl.float32) * (xi * (1.0 / (16**i)))[None, :]
            else:
                part += ((words >> (4 * i)) & 0xF).to(tl.float32) * xi[None, :]
        acc += s * (part - z * xsum[None, :])
    out = tl.sum(acc, axis=1)
    if HAS_BIAS:
        out += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + m * stride_ym + offs_n, out.to(y_ptr.dtype.element_ty), mask=n_mask)


def launch_w4a16_gemv(x, qweight, scales, zeros, bias, y, *, block_n: int, block_k: int, num_warps: int,
                      num_stages: int, shift_free: bool = True):
    """Launch on already-validated tensors (see :func:`tinyq.kernels.w4a16_matmul.w4a16_matmul`)."""
    m, k = x.shape
    n = qweight.shape[0]
    group_size = k // scales.shape[1]
    block_k = max(block_k, group_size)
    grid = (m * triton.cdiv(n, block_n),)
    _w4a16_gemv_kernel[grid](
        x, qweight, scales, zeros, bias if bias is not None else y, y,
        m, n, k,
        x.stride(0), y.stride(0),
        GROUP_SIZE=group_size,
        HAS_BIAS=bias is not None,
        SHIFT_FREE=shift_free,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return y
