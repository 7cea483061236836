"""The W4A16 op: ``y = x @ W.T (+ b)`` with ``x`` [M, K] and ``W`` in tinyq int4
(:mod:`tinyq.quant.format`), its argument checks, its launcher and its float32 reference.

The launcher dispatches on M (callers never choose a kernel), with the configs and crossovers of
:mod:`tinyq.kernels.w4a16_configs`:

- ``gemv``: one row, CUDA cores (:mod:`tinyq.kernels.w4a16_gemv`). Inside a CUDA-graph capture,
  where :func:`~tinyq.kernels.w4a16_configs.paired_decode` says so, one or two rows are first
  rewritten in the GEMV's paired layout (:mod:`tinyq.kernels.pair_rows`; bf16 as fp16 over a power
  of two per row) and go to the paired GEMV, two rows a program for M = 2. That path sums in another
  order, and for bf16 rounds each product to fp16 (below bf16's own output rounding), so a replay
  can differ from an eager call by an ulp of the output; so can the first eager call of a shape,
  which runs the paired path to compile it;
- ``gemm``: the fused-dequant tensor-core GEMM, split along K for skinny M
  (:mod:`tinyq.kernels.w4a16_gemm`);
- ``dequant``: large M is compute-bound, so the weight is dequantized into a reusable scratch
  buffer (:mod:`tinyq.kernels.w4a16_dequant`) and multiplied by cuBLAS.
"""
from __future__ import annotations

from typing import Optional

import torch

from tinyq.backend import check_kernel_device
from tinyq.kernels import w4a16_configs
from tinyq.kernels.pair_rows import SCALED_MAX_K, pair_rows
from tinyq.kernels.w4a16_configs import PAIRED_GEMV_ROWS, launch_plan, paired_decode, paired_gemv_plan
from tinyq.kernels.w4a16_dequant import launch_w4a16_dequant, scratch
from tinyq.kernels.w4a16_gemm import launch_w4a16_gemm
from tinyq.kernels.w4a16_gemv import launch_w4a16_gemv
from tinyq.quant.format import GROUP_SIZES, PACK, SCALE_DTYPES, dequantize_weight

ACT_DTYPES = (torch.float16, torch.bfloat16)


def check_w4a16_weight(qweight, scales, zeros, bias) -> None:
    """Validate the weight tensors once (a module does this when its weights are set)."""
    if qweight.dtype != torch.int32 or qweight.dim() != 2:
        raise ValueError(f"qweight must be a 2-D int32 tensor [N, K/8], got {qweight.dtype} {tuple(qweight.shape)}")
    n, k = qweight.shape[0], qweight.shape[1] * PACK
    if scales.dim() != 2 or scales.shape[0] != n or scales.shape[1] == 0:
        raise ValueError(f"scales must be [N={n}, K/G], got {tuple(scales.shape)}")
    if k % scales.shape[1] != 0 or (k // scales.shape[1]) not in GROUP_SIZES:
        raise ValueError(
            f"K={k} and scales {tuple(scales.shape)} imply group size {k / scales.shape[1]:g}; "
            f"supported group sizes are {GROUP_SIZES}"
        )
    if scales.dtype not in SCALE_DTYPES:
        raise ValueError(f"scales must be fp16 or bf16, got {scales.dtype}")
    if zeros.shape != scales.shape or zeros.dtype != scales.dtype:
        raise ValueError(f"zeros must match scales ({tuple(scales.shape)}, {scales.dtype}), got {tuple(zeros.shape)}, {zeros.dtype}")
    if bias is not None and (bias.shape != (n,)):
        raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
    if bias is not None and not bias.is_floating_point():
        raise ValueError(f"bias must be a float tensor, got {bias.dtype}")
    devs = {t.device for t in (qweight, scales, zeros) + ((bias,) if bias is not None else ())}
    if len(devs) != 1:
        raise ValueError(f"w4a16: weight tensors on different devices: {sorted(map(str, devs))}")
    for name, t in (("qweight", qweight), ("scales", scales), ("zeros", zeros), ("bias", bias)):
        if t is not None and not t.is_contiguous():  # the kernels read them at unit stride
            raise ValueError(f"{name} must be contiguous (got strides {t.stride()})")


def check_w4a16_input(x, qweight, scales) -> None:
    """Validate the activations against already-validated weights (cheap: a few attribute reads)."""
    if x.dim() == 0:
        raise ValueError("w4a16: x must be [..., K], got a 0-d tensor")
    k = qweight.shape[1] * PACK
    if x.shape[-1] != k:
        raise ValueError(f"input has {x.shape[-1]} features but the weight expects K={k} (x shape {tuple(x.shape)})")
    if x.device != qweight.device:
        raise ValueError(f"w4a16: input on {x.device} but the weight on {qweight.device}")
    if x.dtype not in ACT_DTYPES and not (x.dtype == torch.float32 and x.device.type == "cpu"):
        allowed = ACT_DTYPES + ((torch.float32,) if x.device.type == "cpu" else ())
        raise ValueError(f"activations must be one of {allowed} on {x.device.type}, got {x.dtype}")


def check_w4a16_args(x, qweight, scales, zeros, bias) -> None:
    """Validate every argument, naming the offending one (never a CUDA fault later)."""
    check_w4a16_weight(qweight, scales, zeros, bias)
    check_w4a16_input(x, qweight, scales)


def w4a16_linear_reference(x, qweight, scales, zeros, bias=None):
    """Float32 reference: dequantize, matmul, add bias; returns ``x.dtype``."""
    w = dequantize_weight(qweight, scales, zeros)  # [N, K] fp32
    y = x.float() @ w.t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def w4a16_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    acc_fp16: Optional[bool] = None,
    config: Optional[tuple] = None,
) -> torch.Tensor:
    """Triton W4A16 matmul of a 2-D ``x`` [M, K] (fp16/bf16) -> ``[M, N]``, every argument checked.

    ``acc_fp16=None`` picks the device default; ``config`` = ``(kind, kwargs)`` overrides the
    shipped plan (the benchmark sweep uses it).
    """
    if x.dim() != 2:
        raise ValueError(f"w4a16_matmul expects a 2-D input [M, K], got shape {tuple(x.shape)}")
    check_w4a16_args(x, qweight, scales, zeros, bias)
    check_kernel_device("w4a16_matmul", x, qweight, scales, zeros, *([bias] if bias is not None else []))
    if x.dtype not in ACT_DTYPES:
        raise ValueError(f"the Triton W4A16 kernels take fp16 or bf16 activations, got {x.dtype}")
    if scales.dtype != x.dtype:
        raise ValueError(f"scales dtype {scales.dtype} must match the activation dtype {x.dtype}")
    if x.stride(1) != 1:
        raise ValueError(f"input must be contiguous along K (got strides {x.stride()})")
    return w4a16_matmul_checked(x, qweight, scales, zeros, bias, acc_fp16=acc_fp16, config=config)


def capturing(x: torch.Tensor) -> bool:
    """Whether ``x`` is on CUDA and the current stream is capturing a graph (a function, so CPU
    tests can set it; a CPU-only torch has no capture query)."""
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


# (device index, dtype, M, K, N, groups, bias?, scaled?) of the plain calls whose paired path ran once eagerly
_PAIRED_WARM: set = set()


def _scaled_pairs(x) -> bool:
    """Whether ``x``'s rows are paired as fp16 over a power of two (bf16, where the table says so)."""
    return x.dtype == torch.bfloat16 and w4a16_configs.PAIRED_BF16_AS_FP16 and x.shape[1] <= SCALED_MAX_K


def pair_for_gemv(x):
    """``(paired rows, GEMV plan)``: ``x`` (1 or 2 rows) paired as a CUDA-graph capture pairs it for
    the paired GEMV, and that GEMV's launch kwargs."""
    xp = pair_rows(x, scaled=_scaled_pairs(x))
    return xp, paired_gemv_plan(x.shape[0], xp.data.dtype, x.get_device())


def _paired_gemv(x, qweight, scales, zeros, bias, y):
    xp, plan = pair_for_gemv(x)
    return launch_w4a16_gemv(xp, qweight, scales, zeros, bias, y, **plan)


def w4a16_matmul_checked(x, qweight, scales, zeros, bias=None, *, acc_fp16=None, config=None):
    """:func:`w4a16_matmul` for arguments already checked (x 2-D, unit stride along K, dtype of the
    scales, on the weights' device): allocate, look up the plan, launch. The per-call path."""
    m = x.shape[0]
    n = qweight.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    dev = x.get_device()
    if config is None and m in PAIRED_GEMV_ROWS and paired_decode(dev):
        # In a graph the pairing kernel's launch is free and the paired GEMV gains more than the pass
        # costs (w4a16_configs.PAIRED_GEMV_ROWS); eager calls are host-bound, so they keep the plan of
        # their M, except the first of each shape: it runs the paired path, so that its kernels are
        # compiled and loaded by the eager warm-up a capture needs, never inside the capture.
        if capturing(x):
            return _paired_gemv(x, qweight, scales, zeros, bias, y)
        key = (dev, x.dtype, m, x.shape[1], qweight.shape[0], scales.shape[1], bias is None, _scaled_pairs(x))
        if key not in _PAIRED_WARM:
            _PAIRED_WARM.add(key)
            return _paired_gemv(x, qweight, scales, zeros, bias, y)
    kind, cfg = config if config is not None else launch_plan(m, x.dtype, dev)
    if kind == "gemv":
        return launch_w4a16_gemv(x, qweight, scales, zeros, bias, y, **cfg)
    if kind == "dequant":
        k = x.shape[1]
        w = scratch(n * k, x.dtype, x.device, capturing(x)).view(n, k)
        launch_w4a16_dequant(qweight, scales, zeros, w, **cfg)
        if bias is None:
            return torch.mm(x, w.t(), out=y)
        # the GEMV/GEMM kernels take a bias of any float dtype (converted as loaded); addmm takes x's only
        return torch.addmm(bias if bias.dtype == x.dtype else bias.to(x.dtype), x, w.t(), out=y)
    if acc_fp16 is not None:
        cfg = dict(cfg, acc_fp16=acc_fp16)
    return launch_w4a16_gemm(x, qweight, scales, zeros, bias, y, **cfg)
