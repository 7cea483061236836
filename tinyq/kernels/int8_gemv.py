"""int8 GEMV for decode (a few rows): ``y[m, :] = (xq[m, :] @ wq.T) * s_x[m] * s_w (+ bias)``.

Same math as :mod:`tinyq.kernels.int8_gemm` (int32 products, exact; float32 epilogue), without the
tensor cores: at M = 1 the op is bound by reading the weight (N*K bytes), and an MMA tile would be
at least 16 rows of which 15 are padding (on the H200 the 16-row GEMM wins from M = 4 on). Each program multiplies one activation row with
``BLOCK_N`` weight rows, ``BLOCK_K`` int8 at a time (16-byte loads at ``BLOCK_K / 16`` threads per
row); products add into a ``[BLOCK_N, BLOCK_K]`` int32 accumulator reduced once at the end.

``DP4A`` (GPU only; the interpreter cannot run PTX): ``xq``/``wq`` arrive as int32 views holding 4
int8 each (K and BLOCK_K then count words) and ``dp4a.s32.s32`` multiplies and adds 4 pairs per
instruction. The plain path spends a sign-extending convert per int8 (two per product) and was
convert-bound on the H200: 3.05 TB/s of weights at M = 1 where a copy reaches ~4.3.

Work split: program p handles row ``m = p % M`` and columns ``BLOCK_N * (p // M) ...``; rows that
share a weight block are neighbours in launch order, so for M > 1 the re-read hits L2.

Tensors as in the GEMM: ``xq`` int8 [M, K], ``wq`` int8 [N, K], ``s_x`` float32 [M], ``s_w``
float32 [N], ``bias`` [N] or none, ``y`` [M, N] (int32 with ``RAW_INT32``: the raw accumulator).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tinyq.backend import interpreting


@triton.jit
def int8_row_dots(x_row_ptr, wq_ptr, rows, K, stride_wn, EVEN_K: tl.constexpr, DP4A: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """int32 ``x . wq[rows[i]]`` ``[BLOCK_N]`` for the int8 row at ``x_row_ptr`` (``rows`` in range:
    the caller maps rows it does not need to a valid one and masks their results)."""
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_row_ptr + offs_k
    w_ptrs = wq_ptr + rows.to(tl.int64)[:, None] * stride_wn + offs_k[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptrs)
            w = tl.load(w_ptrs)
        else:
            k_ok = (k0 + offs_k) < K
            x = tl.load(x_ptrs, mask=k_ok, other=0)
            w = tl.load(w_ptrs, mask=k_ok[None, :], other=0)
        if DP4A:
            acc = tl.inline_asm_elementwise("dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [w, x[None, :], acc],
                                            dtype=tl.int32, is_pure=True, pack=1)
        else:
            acc += w.to(tl.int32) * x.to(tl.int32)[None, :]
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    return tl.sum(acc, axis=1)


@triton.jit
def _int8_gemv_kernel(
    xq_ptr, wq_ptr, sx_ptr, sw_ptr, bias_ptr, y_ptr,
    M, N, K,
    stride_xm, stride_wn, stride_ym,
    HAS_BIAS: tl.constexpr,
    RAW_INT32: tl.constexpr,
    EVEN_K: tl.constexpr,
    DP4A: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    m = pid % M
    offs_n = (pid // M) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    dot = int8_row_dots(xq_ptr + m.to(tl.int64) * stride_xm, wq_ptr, tl.where(n_mask, offs_n, 0), K, stride_wn,
                        EVEN_K, DP4A, BLOCK_N, BLOCK_K)
    y_ptrs = y_ptr + m.to(tl.int64) * stride_ym + offs_n
    if RAW_INT32:
        tl.store(y_ptrs, dot, mask=n_mask)
    else:
        sw = tl.load(sw_ptr + offs_n, mask=n_mask, other=0.0)
        out = dot.to(tl.float32) * tl.load(sx_ptr + m) * sw
        if HAS_BIAS:
            out += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=n_mask)


def _word_aligned(t: torch.Tensor) -> bool:
    return t.data_ptr() % 4 == 0 and t.stride(0) % 4 == 0 and t.shape[1] % 4 == 0


def dp4a_operands(xq, wq, block_k: int, dp4a: bool):
    """``(xq, wq, K, block_k, DP4A)`` as the kernels take them: with dp4a (GPU, word-aligned rows)
    int32 views holding 4 int8 each, K and block_k then counted in words."""
    k = xq.shape[-1]
    if dp4a and not interpreting() and block_k % 4 == 0 and _word_aligned(xq) and _word_aligned(wq):
        return xq.view(torch.int32), wq.view(torch.int32), k // 4, block_k // 4, True
    return xq, wq, k, block_k, False


def launch_int8_gemv(xq, wq, s_x, s_w, bias, y, *, block_n: int, block_k: int, num_warps: int = 4,
                     num_stages: int = 3, dp4a: bool = True):
    """Launch on already-validated tensors (see :func:`tinyq.kernels.int8_matmul.int8_matmul`)."""
    m, n = xq.shape[0], wq.shape[0]
    xq, wq, k, block_k, use_dp4a = dp4a_operands(xq, wq, block_k, dp4a)
    grid = (m * triton.cdiv(n, block_n),)
    _int8_gemv_kernel[grid](
        xq, wq, s_x, s_w, bias if bias is not None else s_w, y,
        m, n, k,
        xq.stride(0), wq.stride(0), y.stride(0),
        HAS_BIAS=bias is not None,
        RAW_INT32=y.dtype == torch.int32,
        EVEN_K=k % block_k == 0,
        DP4A=use_dp4a,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return y
