"""W4A16 GEMV for decode: ``y[m, :] = x[m, :] @ W.T (+ b)`` for a few rows m, W in tinyq int4.

Math, per output column n and group g of G inputs (``W = (q - z) * s``)::

    y[n] = sum_g s[n, g] * ( sum_{k in g} x[k] * q[n, k]  -  z[n, g] * sum_{k in g} x[k] )

so the inner loop is one convert and one FMA per weight; scale and zero are applied once per
word column. Accumulation is fp32.

Unpacking (``SPLIT_NIBBLES=True``, the shipped path): a ``[BLOCK_N, BLOCK_K/8]`` tile of words is
loaded contiguously along K, then for nibble ``i = 0..7`` the slice ``(words >> 4i) & 0xF`` holds
``k = 8c + i`` and meets ``x[k0 + 8c + i]`` (a strided load of x, served by L1). Products add into
a 2-D fp32 accumulator, reduced across the tile once at the end: no reshape, no layout shuffle.
``SPLIT_NIBBLES=False`` unpacks with a ``[BN, BK/8, 8] -> [BN, BK]`` reshape instead (kept for
the benchmark's comparison; 2-5x slower on the H100).

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
    SPLIT_NIBBLES: tl.constexpr,
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

    if SPLIT_NIBBLES:
        acc = tl.zeros((BLOCK_N, BLOCK_KW), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            c_ok = (k0 // 8 + offs_c) < words_per_row
            mask = n_mask[:, None] & c_ok[None, :]
            words = tl.load(qw_ptr + offs_n[:, None] * words_per_row + (k0 // 8 + offs_c)[None, :], mask=mask, other=0)
            # word c lies in group (k0 + 8c) // G; G/8 neighbouring words share a scale (L1 hit)
            sz = offs_n[:, None] * groups_per_row + ((k0 + 8 * offs_c) // GROUP_SIZE)[None, :]
            s = tl.load(s_ptr + sz, mask=mask, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + sz, mask=mask, other=0.0).to(tl.float32)
            part = tl.zeros((BLOCK_N, BLOCK_KW), dtype=tl.float32)
            xsum = tl.zeros((BLOCK_KW,), dtype=tl.float32)
            for i in tl.static_range(8):
                xi = tl.load(x_row + k0 + 8 * offs_c + i, mask=c_ok, other=0.0).to(tl.float32)
                qi = ((words >> (4 * i)) & 0xF).to(tl.float32)
                part += qi * xi[None, :]
                xsum += xi
            acc += s * (part - z * xsum[None, :])
        out = tl.sum(acc, axis=1)
    else:
        GROUPS_PER_STEP: tl.constexpr = BLOCK_K // GROUP_SIZE
        offs_k = tl.arange(0, BLOCK_K)
        offs_g = tl.arange(0, GROUPS_PER_STEP)
        shifts = tl.arange(0, 8) * 4
        out = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x = tl.load(x_row + k0 + offs_k, mask=(k0 + offs_k) < K, other=0.0).to(tl.float32)
            x = tl.reshape(x, (GROUPS_PER_STEP, GROUP_SIZE))
            w_mask = n_mask[:, None] & ((k0 // 8 + offs_c) < words_per_row)[None, :]
            words = tl.load(qw_ptr + offs_n[:, None] * words_per_row + (k0 // 8 + offs_c)[None, :], mask=w_mask, other=0)
            q = (words[:, :, None] >> shifts[None, None, :]) & 0xF  # [BN, BK/8, 8]
            q = tl.reshape(q, (BLOCK_N, GROUPS_PER_STEP, GROUP_SIZE)).to(tl.float32)
            g_mask = n_mask[:, None] & ((k0 // GROUP_SIZE + offs_g) < groups_per_row)[None, :]
            sz = offs_n[:, None] * groups_per_row + (k0 // GROUP_SIZE + offs_g)[None, :]
            s = tl.load(s_ptr + sz, mask=g_mask, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + sz, mask=g_mask, other=0.0).to(tl.float32)
            dots = tl.sum(q * x[None, :, :], axis=2)
            out += tl.sum(s * (dots - z * tl.sum(x, axis=1)[None, :]), axis=1)
    if HAS_BIAS:
        out += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + m * stride_ym + offs_n, out.to(y_ptr.dtype.element_ty), mask=n_mask)


def launch_w4a16_gemv(x, qweight, scales, zeros, bias, y, *, block_n: int, block_k: int, num_warps: int,
                      num_stages: int, split_nibbles: bool = True):
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
        SPLIT_NIBBLES=split_nibbles,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return y
