"""Plain fp16 GEMM ``y = x @ W.T`` with fp16 tensor-core accumulation (TinyChat 2.0's prefill trick).

On GeForce parts the fp16-accumulate MMA runs at twice the fp32-accumulate rate; on H100/A100
both rates are equal, so there this kernel only matters as the measured comparison
(``benchmarks/bench_w4a16.py`` runs it next to cuBLAS). Overflow guard: each K step of
``BLOCK_K`` products is accumulated in fp16 by the MMA, then added into an fp32 accumulator, so
only a single step's partial sum (64 products by default) has to stay under 65504, not the
whole reduction. ``ACC_FP16=False`` gives the same kernel with fp32 accumulation.

Tensors: ``x`` [M, K] fp16 (row stride ``stride_xm``), ``w`` [N, K] fp16 (row stride
``stride_wn``, like ``nn.Linear.weight``), ``y`` [M, N] fp16.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tinyq.backend import check_kernel_device
from tinyq.kernels.tiling import grouped_pid


@triton.jit
def _fp16acc_gemm_kernel(
    x_ptr, w_ptr, y_ptr,
    M, N, K,
    stride_xm, stride_wn, stride_ym,
    ACC_FP16: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_pid(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = (k0 + offs_k) < K
        x = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        if ACC_FP16:
            acc += tl.dot(x, tl.trans(w), out_dtype=tl.float16).to(tl.float32)
        else:
            acc = tl.dot(x, tl.trans(w), acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def fp16acc_gemm(x: torch.Tensor, w: torch.Tensor, *, acc_fp16: bool = True, block_m: int = 128, block_n: int = 128,
                 block_k: int = 64, group_m: int = 8, num_warps: int = 8, num_stages: int = 3) -> torch.Tensor:
    """``x`` [M, K] fp16 @ ``w`` [N, K].T fp16 -> ``[M, N]`` fp16."""
    if x.dim() != 2 or w.dim() != 2:
        raise ValueError(f"expected 2-D x [M, K] and w [N, K], got {tuple(x.shape)} and {tuple(w.shape)}")
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"K mismatch: x {tuple(x.shape)} vs w {tuple(w.shape)}")
    if x.dtype != torch.float16 or w.dtype != torch.float16:
        raise ValueError(f"fp16acc_gemm takes fp16 x and w, got {x.dtype} and {w.dtype}")
    if x.stride(1) != 1 or w.stride(1) != 1:
        raise ValueError("x and w must be contiguous along K")
    check_kernel_device("fp16acc_gemm", x, w)
    m, k = x.shape
    n = w.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
    _fp16acc_gemm_kernel[grid](
        x, w, y, m, n, k, x.stride(0), w.stride(0), y.stride(0),
        ACC_FP16=acc_fp16, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m,
        num_warps=num_warps, num_stages=num_stages,
    )
    return y


def fp16acc_gemm_reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Float32 reference, returned in fp16."""
    return (x.float() @ w.float().t()).to(x.dtype)
