"""LayerNorm (with bias), optionally fused with the residual add before it (vision-tower layers).

Math, per row of ``N`` features (all in float32)::

    h    = x + residual                        (only when a residual is given; stored back in x.dtype)
    mean = sum(h) / N
    var  = sum((h - mean)^2) / N               (biased, as torch.nn.LayerNorm)
    out  = (h - mean) / sqrt(var + eps) * weight + bias

``h`` is rounded to ``x.dtype`` before it is normalized, as an unfused model that keeps its
residual stream in fp16/bf16 does, so fused and unfused runs see the same residual.

Tensors: ``x`` and ``residual`` ``[M, N]`` (leading dims flattened by the launcher),
fp16/bf16/fp32, last dim contiguous; ``weight`` and ``bias`` ``[N]`` (any float dtype; bias optional,
as in ``torch.nn.functional.layer_norm``). Outputs
``out`` and ``h`` are ``[M, N]`` in ``x.dtype``.

One program normalizes one row held in registers as two power-of-two blocks
(:func:`tinyq.kernels.residual.row_blocks`: SigLIP so400m's 1152 is 1024 + 128): vision rows are
768-1152 wide and projector rows at most 13824 (NVILA's ``LayerNorm(4 x 3456)``, 8192 + 8192),
27 KB in fp16, which still fits one program's registers at 16 warps.
A tower runs 2 norms per layer over ~1k tokens, so the fused add saves one read + write of the
residual stream per layer.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from tinyq.backend import check_kernel_device
from tinyq.kernels.residual import (
    as_rows, check_norm_args, load_row_add_residual, row_blocks, row_columns, row_warps, unit_stride,
)

MAX_N = 32768  # one row per program must fit a register tile


@triton.jit
def load_row_stats(X, RES, H_OUT, row, N, eps, stride_x, stride_r, stride_h,
                   HAS_RESIDUAL: tl.constexpr, HEAD: tl.constexpr, TAIL: tl.constexpr):
    """Row ``row`` of ``x`` (+ the residual, stored as the next one) as two float32 register blocks,
    head ``[0, HEAD)`` and tail ``[HEAD, HEAD + TAIL)`` (:func:`tinyq.kernels.residual.row_blocks`;
    masked lanes hold 0; with ``TAIL == 0`` the tail repeats the head and must not be used), with
    its mean and ``1/sqrt(var + eps)`` in two passes: ``(ha, ca, ma, hb, cb, mb, mean, rstd)``."""
    ca, ma, cb, mb = row_columns(N, HEAD, TAIL)
    ha = load_row_add_residual(X, RES, H_OUT, row, ca, ma, stride_x, stride_r, stride_h, HAS_RESIDUAL)
    total = tl.sum(ha, axis=0)
    hb = ha
    if TAIL > 0:
        hb = load_row_add_residual(X, RES, H_OUT, row, cb, mb, stride_x, stride_r, stride_h, HAS_RESIDUAL)
        total += tl.sum(hb, axis=0)
    mean = total / N
    da = tl.where(ma, ha - mean, 0.0)
    sq = tl.sum(da * da, axis=0)
    if TAIL > 0:
        db = tl.where(mb, hb - mean, 0.0)
        sq += tl.sum(db * db, axis=0)
    return ha, ca, ma, hb, cb, mb, mean, 1.0 / tl.sqrt(sq / N + eps)


@triton.jit
def normalize(h, cols, mask, mean, rstd, W, B, HAS_BIAS: tl.constexpr):
    """``(h - mean) * rstd * weight (+ bias)`` in float32 for one register block (masked lanes: weight
    and bias load as 0, so 0 for a finite row; the quantizer masks them anyway)."""
    v = (h - mean) * rstd * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        v += tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    return v


@triton.jit
def _layernorm_kernel(
    X, RES, W, B, OUT, H_OUT,
    N, eps,
    stride_x, stride_r, stride_o, stride_h,
    HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr, HEAD: tl.constexpr, TAIL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    ha, ca, ma, hb, cb, mb, mean, rstd = load_row_stats(X, RES, H_OUT, row, N, eps, stride_x, stride_r, stride_h,
                                                        HAS_RESIDUAL, HEAD, TAIL)
    out = OUT + row * stride_o
    tl.store(out + ca, normalize(ha, ca, ma, mean, rstd, W, B, HAS_BIAS).to(OUT.dtype.element_ty), mask=ma)
    if TAIL > 0:
        tl.store(out + cb, normalize(hb, cb, mb, mean, rstd, W, B, HAS_BIAS).to(OUT.dtype.element_ty), mask=mb)


def _check(x, weight, bias, residual):
    check_norm_args("layernorm", x, residual, MAX_N, weight=weight, bias=bias)


def layernorm(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], eps: float,
              residual: torch.Tensor = None):
    """Triton launcher. Returns ``out`` when ``residual`` is None, else ``(out, h)``."""
    _check(x, weight, bias, residual)
    check_kernel_device("layernorm", x, weight, *(t for t in (bias, residual) if t is not None))
    weight, bias = (unit_stride(t) for t in (weight, bias))
    shape, n = x.shape, x.shape[-1]
    x2 = as_rows(x, n)
    m = x2.shape[0]
    r2 = None if residual is None else residual.reshape(m, n).contiguous()
    out = torch.empty_like(x2)
    h = torch.empty_like(x2) if residual is not None else out  # unused when no residual
    if m > 0 and n > 0:  # rows of no features: nothing to compute
        head, tail = row_blocks(n)
        _layernorm_kernel[(m,)](
            x2, r2 if r2 is not None else x2, weight, bias if bias is not None else weight, out, h,
            n, float(eps),
            x2.stride(0), r2.stride(0) if r2 is not None else 0, out.stride(0), h.stride(0),
            HAS_RESIDUAL=residual is not None, HAS_BIAS=bias is not None, HEAD=head, TAIL=tail,
            num_warps=row_warps(head, tail, m),
        )
    if residual is None:
        return out.reshape(shape)
    return out.reshape(shape), h.reshape(shape)


def layernorm_reference(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], eps: float,
                        residual: torch.Tensor = None):
    """Plain torch (float32 math, outputs in ``x.dtype``); same returns as :func:`layernorm`."""
    _check(x, weight, bias, residual)
    h = x if residual is None else (x.float() + residual.float()).to(x.dtype)
    b = None if bias is None else bias.float()
    out = torch.nn.functional.layer_norm(h.float(), (x.shape[-1],), weight.float(), b, eps).to(x.dtype)
    return out if residual is None else (out, h)
