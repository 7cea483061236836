"""int8 x int8 GEMM with an int32 accumulator and a float32 scale epilogue (W8A8, prefill / batches).

Math::

    acc[m, n] = sum_k xq[m, k] * wq[n, k]                       (int32, exact for K <= 133,144)
    y[m, n]   = acc[m, n] * s_x[m] * s_w[n] (+ bias[n])          (float32, stored in y's dtype)

With ``RAW_INT32`` the epilogue is skipped and ``acc`` itself is stored (an int32 ``y``): the tests
compare it exactly with an integer matmul.

Flags:
- ``SWAP_AB``: compute ``y.T = W @ x.T`` so N, not M, lies on the MMA's 64-row side; for skinny M.
- ``EVEN_K``: ``K % BLOCK_K == 0``, so the K loop needs no mask (the common case: hidden sizes are
  multiples of 128); otherwise the last K step is masked with zeros, which add nothing to ``acc``.

Tensors: ``xq`` int8 [M, K] (row stride ``stride_xm``, unit column stride); ``wq`` int8 [N, K]
(row stride ``stride_wn``); ``s_x`` float32 [M]; ``s_w`` float32 [N]; ``bias`` [N] (any float dtype)
or none; ``y`` [M, N] fp16/bf16/fp32 (row stride ``stride_ym``), or int32 with ``RAW_INT32``.
"""
from __future__ import annotations

import triton
import triton.language as tl

from tinyq.kernels.tiling import grouped_pid


@triton.jit
def _int8_gemm_kernel(
    xq_ptr, wq_ptr, sx_ptr, sw_ptr, bias_ptr, y_ptr,
    M, N, K,
    stride_xm, stride_wn, stride_ym,
    HAS_BIAS: tl.constexpr,
    RAW_INT32: tl.constexpr,
    SWAP_AB: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    tl.static_assert(BLOCK_K >= 32, "int8 MMA consumes K in steps of 32")
    pid_m, pid_n = grouped_pid(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    # Out-of-range rows/columns read row 0 instead of being masked: their results are never stored,
    # and unmasked loads stay vectorized.
    x_ptrs = xq_ptr + tl.where(m_mask, offs_m, 0).to(tl.int64)[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = wq_ptr + tl.where(n_mask, offs_n, 0).to(tl.int64)[:, None] * stride_wn + offs_k[None, :]
    if SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptrs)
            w = tl.load(w_ptrs)
        else:
            k_ok = (k0 + offs_k) < K
            x = tl.load(x_ptrs, mask=k_ok[None, :], other=0)
            w = tl.load(w_ptrs, mask=k_ok[None, :], other=0)
        if SWAP_AB:
            acc = tl.dot(w, tl.trans(x), acc, out_dtype=tl.int32)
        else:
            acc = tl.dot(x, tl.trans(w), acc, out_dtype=tl.int32)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    if SWAP_AB:
        acc = tl.trans(acc)  # [BM, BN]
    store_scaled(acc, offs_m, offs_n, M, N, sx_ptr, sw_ptr, bias_ptr, y_ptr, stride_ym, HAS_BIAS, RAW_INT32)


@triton.jit
def store_scaled(acc, offs_m, offs_n, M, N, sx_ptr, sw_ptr, bias_ptr, y_ptr, stride_ym,
                 HAS_BIAS: tl.constexpr, RAW_INT32: tl.constexpr):
    """The epilogue of an int32 tile ``acc`` [BM, BN] at rows ``offs_m``, columns ``offs_n``:
    ``acc * s_x * s_w (+ bias)`` in float32, stored in y's dtype, or ``acc`` itself when RAW_INT32."""
    m_mask = offs_m < M
    n_mask = offs_n < N
    out_mask = m_mask[:, None] & n_mask[None, :]
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    if RAW_INT32:
        tl.store(y_ptrs, acc, mask=out_mask)
    else:
        sx = tl.load(sx_ptr + offs_m, mask=m_mask, other=0.0)
        sw = tl.load(sw_ptr + offs_n, mask=n_mask, other=0.0)
        out = acc.to(tl.float32) * sx[:, None] * sw[None, :]
        if HAS_BIAS:
            out += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=out_mask)


def launch_int8_gemm(xq, wq, s_x, s_w, bias, y, *, block_m: int, block_n: int, block_k: int, group_m: int = 8,
                     swap_ab: bool = False, num_warps: int = 4, num_stages: int = 3):
    """Launch on already-validated tensors (see :func:`tinyq.kernels.int8_matmul.int8_matmul`);
    an int32 ``y`` receives the raw accumulator."""
    import torch

    m, k = xq.shape
    n = wq.shape[0]
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
    _int8_gemm_kernel[grid](
        xq, wq, s_x, s_w, bias if bias is not None else s_w, y,
        m, n, k,
        xq.stride(0), wq.stride(0), y.stride(0),
        HAS_BIAS=bias is not None,
        RAW_INT32=y.dtype == torch.int32,
        SWAP_AB=swap_ab,
        EVEN_K=k % block_k == 0,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        GROUP_M=group_m,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return y
