"""Dense GEMV for decode: ``y[m, :] = x[m, :] @ W.T (+ b)`` with fp16/bf16 ``W`` [N, K], M <= 4.

A decode step reads every weight once, so the kernel is a pure stream: each program owns
``BLOCK_N`` output rows, loads ``[BLOCK_N, BLOCK_K]`` weight tiles in 16-byte vectors (the row
stride is a kernel argument so Triton can prove the alignment), multiplies by x in fp32 into a
2-D accumulator and reduces once at the end.

Why not cuBLAS: at M = 1 cuBLAS leaves part of the bandwidth unused on the smaller Llama-3-8B
shapes (measurements in ``docs/perf_notes.md``); ``benchmarks/bench_dense_gemv.py`` decides where
this kernel is used (:data:`tinyq.kernels.dense_gemv.USE_ON`).

Tensors: ``x`` [M, K] (row stride ``stride_xm``); ``w`` [N, K] (row stride ``stride_wn``);
``bias`` [N] or none; ``y`` [M, N] (row stride ``stride_ym``); all one dtype, fp16 or bf16.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tinyq.backend import check_kernel_device

MAX_M = 4
DEFAULT_CONFIG = dict(block_n=4, block_k=2048, num_warps=4, num_stages=1)
# Architectures where the benchmark measured this kernel faster than cuBLAS at M <= MAX_M, with
# the winning configs as ``(max_k, config)`` by increasing K (None: any K; docs/perf_notes.md).
# sm90: 1.10x cuBLAS over the four Llama-3-8B linears; for K <= 1024 (SmolLM2's and Qwen2-0.5B's
# output heads) 2048-wide steps left most lanes idle, and 32 rows x 128 took 35.3 -> 17.2 us and
# 110.2 -> 68.5 us (bench_dense_gemv.py --sweep-heads). Elsewhere F.linear (cuBLAS) is used.
USE_ON: dict = {"sm90": [(1024, dict(block_n=32, block_k=128, num_warps=4, num_stages=1)), (None, DEFAULT_CONFIG)]}


def config_for(arch: str, k: int) -> dict:
    """The :data:`USE_ON` config of ``arch`` for inputs of ``k`` features."""
    return next(cfg for max_k, cfg in USE_ON[arch] if max_k is None or k <= max_k)


@triton.jit
def _dense_gemv_kernel(
    x_ptr, w_ptr, bias_ptr, y_ptr,
    M, N, K,
    stride_xm, stride_wn, stride_ym,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    m = pid % M
    offs_n = (pid // M) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    w_rows = w_ptr + offs_n[:, None] * stride_wn
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + offs_k) < K
        w = tl.load(w_rows + (k0 + offs_k)[None, :], mask=n_mask[:, None] & k_ok[None, :], other=0.0)
        x = tl.load(x_ptr + m * stride_xm + k0 + offs_k, mask=k_ok, other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    out = tl.sum(acc, axis=1)
    if HAS_BIAS:
        out += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + m * stride_ym + offs_n, out.to(y_ptr.dtype.element_ty), mask=n_mask)


def dense_gemv(x: torch.Tensor, w: torch.Tensor, bias=None, *, config: dict | None = None) -> torch.Tensor:
    """``x`` [M, K] @ ``w`` [N, K].T (+ ``bias``) -> [M, N], for M <= 4."""
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"dense_gemv: expected x [M, K] and w [N, K], got {tuple(x.shape)} and {tuple(w.shape)}")
    if x.shape[0] > MAX_M:
        raise ValueError(f"dense_gemv is for M <= {MAX_M} rows, got M={x.shape[0]}")
    if x.dtype not in (torch.float16, torch.bfloat16) or w.dtype != x.dtype:
        raise ValueError(f"dense_gemv takes fp16/bf16 x and w of one dtype, got {x.dtype} and {w.dtype}")
    if bias is not None and bias.shape != (w.shape[0],):
        raise ValueError(f"bias must have shape ({w.shape[0]},), got {tuple(bias.shape)}")
    if x.stride(1) != 1 or w.stride(1) != 1:
        raise ValueError("x and w must be contiguous along K")
    check_kernel_device("dense_gemv", x, w, *([bias] if bias is not None else []))
    cfg = dict(DEFAULT_CONFIG if config is None else config)
    m, k = x.shape
    n = w.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    grid = (m * triton.cdiv(n, cfg["block_n"]),)
    _dense_gemv_kernel[grid](
        x, w, bias if bias is not None else y, y, m, n, k, x.stride(0), w.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, BLOCK_N=cfg["block_n"], BLOCK_K=cfg["block_k"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return y


def dense_gemv_reference(x, w, bias=None):
    """Float32 reference in x's dtype."""
    y = x.float() @ w.float().t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
