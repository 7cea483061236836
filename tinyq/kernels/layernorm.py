"""LayerNorm (with bias), optionally fused with the residual add before it (vision-tower layers).

Math, per row of ``N`` features (all in float32)::

    h    = x + residual                        (only when a residual is given; stored back in x.dtype)
    mean = sum(h) / N
    var  = sum((h - mean)^2) / N               (biased, as torch.nn.LayerNorm)
    out  = (h - mean) / sqrt(var + eps) * weight + bias

``h`` is rounded to ``x.dtype`` before it is normalized, as an unfused model that keeps its
residual stream in fp16/bf16 does, so fused and unfused runs see the same residual.

Tensors: ``x`` and ``residual`` ``[M, N]`` (leading dims flattened by the launcher),
fp16/bf16/fp32, last dim contiguous; ``weight`` and ``bias`` ``[N]`` (any float dtype). Outputs
``out`` and ``h`` are ``[M, N]`` in ``x.dtype``.

One program normalizes one row in a single pass over a ``BLOCK_N = next_pow2(N)`` register tile:
vision rows are 768-1152 wide (SigLIP so400m: 1152) and projector rows at most 13824 (NVILA's
``LayerNorm(4 x 3456)``), 27 KB in fp16, which still fits one program's registers at 16 warps.
A tower runs 2 norms per layer over ~1k tokens, so the fused add saves one read + write of the
residual stream per layer.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tinyq.backend import check_kernel_device
from tinyq.kernels.residual import as_rows, load_row_add_residual

MAX_N = 32768  # one row per program must fit a register tile


@triton.jit
def _layernorm_kernel(
    X, RES, W, B, OUT, H_OUT,
    N, eps,
    stride_x, stride_r, stride_o, stride_h,
    HAS_RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    hf = load_row_add_residual(X, RES, H_OUT, row, cols, mask, stride_x, stride_r, stride_h, HAS_RESIDUAL)
    mean = tl.sum(hf, axis=0) / N
    centered = tl.where(mask, hf - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=0) / N + eps)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + row * stride_o + cols, (centered * rstd * w + b).to(OUT.dtype.element_ty), mask=mask)


def _check(x, weight, bias, residual):
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"layernorm: x must be fp16/bf16/fp32, got {x.dtype}")
    n = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t.dim() != 1 or t.shape[0] != n:
            raise ValueError(f"layernorm: {name} must be [{n}], got {tuple(t.shape)}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(
            f"layernorm: residual must match x ({tuple(x.shape)}, {x.dtype}), "
            f"got {tuple(residual.shape)}, {residual.dtype}"
        )
    if n > MAX_N:
        raise ValueError(f"layernorm: rows of {n} features exceed the supported {MAX_N}")


def layernorm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
              residual: torch.Tensor = None):
    """Triton launcher. Returns ``out`` when ``residual`` is None, else ``(out, h)``."""
    _check(x, weight, bias, residual)
    check_kernel_device("layernorm", x, weight, bias, *(() if residual is None else (residual,)))
    shape, n = x.shape, x.shape[-1]
    x2 = as_rows(x, n)
    r2 = None if residual is None else residual.reshape(-1, n).contiguous()
    out = torch.empty_like(x2)
    h = torch.empty_like(x2) if residual is not None else out  # unused when no residual
    m = x2.shape[0]
    if m > 0:
        block = triton.next_power_of_2(n)
        _layernorm_kernel[(m,)](
            x2, r2 if r2 is not None else x2, weight, bias, out, h,
            n, float(eps),
            x2.stride(0), r2.stride(0) if r2 is not None else 0, out.stride(0), h.stride(0),
            HAS_RESIDUAL=residual is not None, BLOCK_N=block,
            num_warps=min(max(block // 256, 1), 16),  # 8 elements per thread up to N = 4096
        )
    if residual is None:
        return out.reshape(shape)
    return out.reshape(shape), h.reshape(shape)


def layernorm_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                        residual: torch.Tensor = None):
    """Plain torch (float32 math, outputs in ``x.dtype``); same returns as :func:`layernorm`."""
    _check(x, weight, bias, residual)
    h = x if residual is None else (x.float() + residual.float()).to(x.dtype)
    out = torch.nn.functional.layer_norm(h.float(), (x.shape[-1],), weight.float(), bias.float(), eps).to(x.dtype)
    return out if residual is None else (out, h)
