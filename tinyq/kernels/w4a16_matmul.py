"""The W4A16 launcher: validates, allocates and dispatches on M (callers never choose a kernel).

``y = x @ W.T (+ b)`` with ``x`` [M, K] and ``W`` in tinyq int4 (:mod:`tinyq.quant.format`).
M ≤ 4 runs the GEMV (:mod:`tinyq.kernels.w4a16_gemv`); larger M the fused-dequant GEMM
(:mod:`tinyq.kernels.w4a16_gemm`) with block sizes from :mod:`tinyq.kernels.w4a16_configs`.
"""
from __future__ import annotations

from typing import Optional

import torch

from tinyq.backend import check_kernel_device
from tinyq.kernels.w4a16_configs import fp16_accumulate_default, select_config
from tinyq.kernels.w4a16_gemm import launch_w4a16_gemm
from tinyq.kernels.w4a16_gemv import launch_w4a16_gemv
from tinyq.ops.linear import check_w4a16_args, w4a16_linear_reference


def w4a16_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    acc_fp16: Optional[bool] = None,
    config: Optional[dict] = None,
) -> torch.Tensor:
    """Triton W4A16 matmul of a 2-D ``x`` [M, K] (fp16/bf16) -> ``[M, N]``.

    ``acc_fp16=None`` picks the device default (see ``fp16_accumulate_default``); ``config``
    overrides the shipped launch config (used by the benchmark sweep).
    """
    if x.dim() != 2:
        raise ValueError(f"w4a16_matmul expects a 2-D input [M, K], got shape {tuple(x.shape)}")
    check_w4a16_args(x, qweight, scales, zeros, bias)
    return w4a16_matmul_checked(x, qweight, scales, zeros, bias, acc_fp16=acc_fp16, config=config)


def w4a16_matmul_checked(x, qweight, scales, zeros, bias=None, *, acc_fp16=None, config=None):
    """:func:`w4a16_matmul` for arguments that already passed ``check_w4a16_args`` (the custom op's
    path): only the kernel's own requirements are checked here, so a call validates once."""
    check_kernel_device("w4a16_matmul", x, qweight, scales, zeros, *([bias] if bias is not None else []))
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"the Triton W4A16 kernels take fp16 or bf16 activations, got {x.dtype}")
    if scales.dtype != x.dtype:
        raise ValueError(f"scales dtype {scales.dtype} must match the activation dtype {x.dtype}")
    if x.stride(1) != 1:
        raise ValueError(f"input must be contiguous along K (got strides {x.stride()})")
    for name, t in (("qweight", qweight), ("scales", scales), ("zeros", zeros)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (got strides {t.stride()})")
    m, k = x.shape
    n = qweight.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    cfg = dict(config) if config is not None else select_config(m, x.device)
    kind = cfg.pop("kernel")
    if kind == "gemv":
        return launch_w4a16_gemv(x, qweight, scales, zeros, bias, y, **cfg)
    if cfg.get("unpack") == "split" and k // scales.shape[1] < 128:
        # 'split' needs BLOCK_K >= 128 and BLOCK_K must divide the group: groups of 32/64 unpack by reshape
        cfg["unpack"] = "reshape"
    if acc_fp16 is None:
        acc_fp16 = x.dtype == torch.float16 and fp16_accumulate_default(x.device)
    return launch_w4a16_gemm(x, qweight, scales, zeros, bias, y, acc_fp16=acc_fp16, **cfg)


w4a16_matmul_reference = w4a16_linear_reference
