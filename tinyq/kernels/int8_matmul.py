"""The W8A8 matmul launcher: validates, allocates and dispatches on M (callers never choose a kernel).

``y = (xq @ wq.T) * s_x[:, None] * s_w[None, :] (+ bias)`` with int8 ``xq`` [M, K] and ``wq`` [N, K]
(:mod:`tinyq.quant.int8_format`). The shipped configs (:mod:`tinyq.kernels.int8_configs`) pick the
kernel by M: one row runs the GEMV (:mod:`tinyq.kernels.int8_gemv`), more rows the tensor-core GEMM,
with pointer loads (:mod:`tinyq.kernels.int8_gemm`) or, where the operands are 16-byte aligned,
tensor descriptors (:mod:`tinyq.kernels.int8_gemm_tma`). ``out_dtype=torch.int32`` returns the exact integer product.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from tinyq.backend import check_kernel_device
from tinyq.kernels.int8_configs import select_config
from tinyq.kernels.int8_gemm import launch_int8_gemm
from tinyq.kernels.int8_gemm_tma import launch_int8_gemm_tma
from tinyq.kernels.int8_gemv import launch_int8_gemv
from tinyq.kernels.tiling import tma_eligible
from tinyq.quant.int8_format import MAX_K

OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.int32)


def check_int8_weight_args(wq, s_w, bias) -> None:
    """Validate the weight side of an int8 matmul: int8 ``wq [N, K]`` with ``K <= MAX_K``, float32
    ``s_w [N]``, a float ``bias [N]`` (contiguous: the kernels read it at unit stride) or none, all
    on one device."""
    if wq.dtype != torch.int8 or wq.dim() != 2:
        raise ValueError(f"int8 matmul: weight must be a 2-D int8 tensor [N, K], got {wq.dtype} {tuple(wq.shape)}")
    n, k = wq.shape
    if k > MAX_K:
        raise ValueError(f"int8 matmul: K={k} exceeds {MAX_K}, where the int32 accumulator could overflow")
    if s_w.dtype != torch.float32 or tuple(s_w.shape) != (n,):
        raise ValueError(f"weight scale must be float32 [{n}], got {s_w.dtype} {tuple(s_w.shape)}")
    if bias is not None and (tuple(bias.shape) != (n,) or not bias.is_floating_point()):
        raise ValueError(f"bias must be a float tensor of shape ({n},), got {bias.dtype} {tuple(bias.shape)}")
    if bias is not None and bias.stride(0) != 1:
        raise ValueError(f"bias must be contiguous (got strides {bias.stride()})")
    devs = {t.device for t in (wq, s_w) + ((bias,) if bias is not None else ())}
    if len(devs) != 1:
        raise ValueError(f"int8 matmul: weight tensors on different devices: {sorted(map(str, devs))}")


def check_int8_matmul_args(xq, wq, s_x, s_w, bias, out_dtype) -> None:
    """Validate every argument, naming the offending one (never a device fault later)."""
    check_int8_weight_args(wq, s_w, bias)
    n, k = wq.shape
    if xq.dtype != torch.int8:
        raise ValueError(f"int8 matmul: activations must be int8 (quantize them first), got {xq.dtype}")
    if xq.shape[-1] != k:
        raise ValueError(f"int8 matmul: input has {xq.shape[-1]} features but the weight expects K={k} "
                         f"(x {tuple(xq.shape)}, weight {tuple(wq.shape)})")
    if s_x.dtype != torch.float32 or tuple(s_x.shape) != tuple(xq.shape[:-1]):
        raise ValueError(f"activation scale must be float32 {list(xq.shape[:-1])} (one per row), got "
                         f"{s_x.dtype} {tuple(s_x.shape)}")
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"int8 matmul: out_dtype must be one of {OUT_DTYPES}, got {out_dtype}")
    devs = {t.device for t in (xq, wq, s_x, s_w) + ((bias,) if bias is not None else ())}
    if len(devs) != 1:
        raise ValueError(f"int8 matmul: tensors on different devices: {sorted(map(str, devs))}")


def int8_matmul(xq, wq, s_x, s_w, bias: Optional[torch.Tensor] = None, out_dtype=torch.float16, *,
                config: Optional[dict] = None) -> torch.Tensor:
    """Triton W8A8 matmul of a 2-D ``xq`` [M, K] -> ``[M, N]`` in ``out_dtype``. ``config``
    overrides the shipped launch config (the benchmark sweep uses it)."""
    if xq.dim() != 2:
        raise ValueError(f"int8_matmul expects a 2-D input [M, K], got shape {tuple(xq.shape)}")
    check_int8_matmul_args(xq, wq, s_x, s_w, bias, out_dtype)
    return int8_matmul_checked(xq, wq, s_x, s_w, bias, out_dtype, config=config)


def int8_matmul_checked(xq, wq, s_x, s_w, bias=None, out_dtype=torch.float16, *, config=None):
    """:func:`int8_matmul` for arguments that passed ``check_int8_matmul_args`` (the custom op's path)."""
    check_kernel_device("int8_matmul", xq, wq, s_x, s_w, *([bias] if bias is not None else []))
    if xq.stride(1) != 1:
        raise ValueError(f"int8 matmul: input must be contiguous along K (got strides {xq.stride()})")
    if not (wq.is_contiguous() and s_w.is_contiguous() and s_x.is_contiguous()):
        raise ValueError("int8 matmul: weight and scales must be contiguous")
    m = xq.shape[0]
    n = wq.shape[0]
    y = torch.empty((m, n), dtype=out_dtype, device=xq.device)
    if m == 0 or n == 0:
        return y
    if xq.shape[1] == 0:
        return y.zero_() if bias is None or out_dtype == torch.int32 else y.copy_(bias.expand(m, n))
    cfg = dict(config) if config is not None else select_config(m, xq.device)
    kind = cfg.pop("kernel")
    if kind == "gemv":
        return launch_int8_gemv(xq, wq, s_x, s_w, bias, y, **cfg)
    if kind == "tma":
        if tma_eligible(xq, wq):
            return launch_int8_gemm_tma(xq, wq, s_x, s_w, bias, y, **cfg)
        cfg.pop("programs_per_sm", None)  # misaligned operands: the pointer GEMM with the same tiles
    return launch_int8_gemm(xq, wq, s_x, s_w, bias, y, **cfg)


def int8_matmul_reference(xq, wq, s_x, s_w, bias=None, out_dtype=torch.float16) -> torch.Tensor:
    """Exact integer product (int32 accumulation by ``torch._int_mm`` on the CPU) and the float32
    epilogue; ``out_dtype=torch.int32`` returns the accumulator. This is also the CPU path of the ops."""
    check_int8_matmul_args(xq, wq, s_x, s_w, bias, out_dtype)
    lead = xq.shape[:-1]
    x2 = xq.reshape(math.prod(lead), xq.shape[-1])  # (not -1: K may be 0)
    if x2.shape[0] > 0 and x2.shape[1] > 0:
        # exact int32 accumulation on the CPU (~5x an fp32 matmul there); CUDA's _int_mm has shape limits
        acc = torch._int_mm(x2.cpu().contiguous(), wq.cpu().t()).to(xq.device)
    else:
        acc = torch.zeros(x2.shape[0], wq.shape[0], dtype=torch.int32, device=xq.device)
    n = wq.shape[0]  # (not -1: a batch of no rows has no size to infer from)
    if out_dtype == torch.int32:
        return acc.reshape(*lead, n)
    y = acc.float() * s_x.reshape(-1, 1) * s_w[None, :]
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype).reshape(*lead, n)
