"""RMSNorm, optionally fused with the residual add that precedes it in a decoder layer.

Math, per row of ``N`` features (all in float32)::

    h   = x + residual                      (only when a residual is given; stored back in x.dtype)
    out = h / sqrt(mean(h^2) + eps) * weight

``h`` is rounded to ``x.dtype`` before it is normalized, exactly as an unfused model that keeps its
residual stream in fp16/bf16 does, so fused and unfused runs see the same residual.

Tensors: ``x`` and ``residual`` ``[M, N]`` (any leading dims are flattened by the launcher),
fp16/bf16/fp32, last dim contiguous; ``weight`` ``[N]`` (any float dtype). Outputs ``out`` and
``h`` are ``[M, N]`` in ``x.dtype``; ``out`` may instead be written in a W4A16 GEMV's paired layout
(:mod:`tinyq.kernels.paired`), for the decode GEMV that reads it.

One program normalizes one row in a single pass over a ``BLOCK_N = next_pow2(N)`` tile: rows of
LLMs are at most 8192 wide (16 KB in fp16), which fits in registers, and a decode step has M = 1,
so the kernel's cost is its launch; fusing the add saves one launch and one read+write of ``h``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tinyq.backend import check_kernel_device
from tinyq.kernels.paired import empty_paired_rows, out_operand, store_paired_row
from tinyq.kernels.residual import as_rows, check_norm_args, load_row_add_residual, row_warps

MAX_N = 65536  # one row per program must fit a register tile


@triton.jit
def _rmsnorm_kernel(
    X, RES, W, OUT, H_OUT,
    N, eps,
    stride_x, stride_r, stride_o, stride_h,
    HAS_RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr, OUT_PLANE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    # the weight is loaded first, so its round trip overlaps the row's instead of following the reduction
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    hf = load_row_add_residual(X, RES, H_OUT, row, cols, mask, stride_x, stride_r, stride_h, HAS_RESIDUAL)
    rstd = 1.0 / tl.sqrt(tl.sum(hf * hf, axis=0) / N + eps)
    out = (hf * rstd * w).to(OUT.dtype.element_ty)
    if OUT_PLANE:  # a decode GEMV's paired input
        store_paired_row(OUT + row * stride_o, out, N, BLOCK_N, OUT_PLANE)
    else:
        tl.store(OUT + row * stride_o + cols, out, mask=mask)


@triton.jit
def inv_rms(row_ptr, n, eps, BLOCK: tl.constexpr):
    """``1 / sqrt(mean(h^2) + eps)`` of the row ``h = row_ptr[0:n]`` (float32), ``BLOCK >= n``: the
    norm that a fused GEMV applies to its dot products (:mod:`tinyq.kernels.w4a16_gemv_residual`)."""
    cols = tl.arange(0, BLOCK)
    h = tl.load(row_ptr + cols, mask=cols < n, other=0.0).to(tl.float32)
    return 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / n + eps)


def _check(x, residual, weight):
    check_norm_args("rmsnorm", x, residual, MAX_N, weight=weight)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor = None, paired: bool = False):
    """Triton launcher. Returns ``out`` when ``residual`` is None, else ``(out, h)``; with ``paired``,
    ``out`` is a :class:`tinyq.kernels.paired.PairedRows` of the ``[M, N]`` rows (N a multiple of 32)."""
    _check(x, residual, weight)
    check_kernel_device("rmsnorm", x, weight, *(() if residual is None else (residual,)))
    weight = weight if weight.stride(0) == 1 else weight.contiguous()  # the kernel reads it at unit stride
    shape = x.shape
    n = shape[-1]
    x2 = as_rows(x, n)
    m = x2.shape[0]
    r2 = None if residual is None else residual.reshape(m, n).contiguous()  # (not -1: n may be 0)
    out_rows = empty_paired_rows(m, n, x.dtype, x.device) if paired else torch.empty_like(x2)
    out, out_plane = out_operand(out_rows)
    h = torch.empty_like(x2) if residual is not None else out  # unused when no residual
    if m > 0 and n > 0:  # rows of no features: nothing to compute
        block = triton.next_power_of_2(n)
        _rmsnorm_kernel[(m,)](
            x2, r2 if r2 is not None else x2, weight, out, h,
            n, float(eps),
            x2.stride(0), r2.stride(0) if r2 is not None else 0, out.stride(0), h.stride(0),
            HAS_RESIDUAL=residual is not None, BLOCK_N=block, OUT_PLANE=out_plane,
            num_warps=row_warps(block),  # 8 elements per thread (16 B fp16 loads) up to N=4096
        )
    out = out_rows if paired else out.reshape(shape)
    return out if residual is None else (out, h.reshape(shape))


def rmsnorm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor = None):
    """Plain torch (float32 math, outputs in ``x.dtype``); same returns as :func:`rmsnorm`."""
    _check(x, residual, weight)
    h = x if residual is None else (x.float() + residual.float()).to(x.dtype)
    hf = h.float()
    out = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    out = out.to(x.dtype)
    return out if residual is None else (out, h)
