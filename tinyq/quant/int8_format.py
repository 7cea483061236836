"""tinyq's W8A8 format (SmoothQuant-style int8 weights and activations), defined here and nowhere else.

A linear layer ``y = x @ W.T + b`` with ``W`` of shape ``[N, K]`` is stored as

============  =========  =======  ==========================================================
name          shape      dtype    meaning
============  =========  =======  ==========================================================
qweight       ``[N, K]`` int8     ``q[n, k]`` in -127..127, row-major like ``nn.Linear.weight``
weight_scale  ``[N]``    float32  ``W[n, k] ≈ q[n, k] * weight_scale[n]`` (absmax / 127 per row)
input_scale   ``[1]``    float32  optional static per-tensor activation scale (SmoothQuant O3)
============  =========  =======  ==========================================================

Activations are quantized per row (per token) at run time: ``s_x[m] = max_k |x[m, k]| / 127`` and
``xq[m, k] = round(x[m, k] * (127 / max_k |x[m, k]|))`` clamped to -127..127, or with the static
scale ``s``: ``xq = round(x * (1 / s))`` clamped. Rounding is half away from zero, computed in
float32 exactly as the Triton kernels do (``trunc(v + copysign(0.5, v))``), so the CPU reference and
the kernels produce the same integers. ``-128`` is never produced (symmetric range).

The product is then exact in int32: ``acc[m, n] = sum_k xq[m, k] * q[n, k]`` and
``y[m, n] = acc[m, n] * s_x[m] * weight_scale[n] (+ b[n])`` in float32, rounded to the output dtype.
``|acc| <= 127 * 127 * K`` fits int32 for ``K <= MAX_K``.
"""
from __future__ import annotations

import torch

QMAX = 127
MAX_K = (2**31 - 1) // (QMAX * QMAX)  # 133,144: the int32 accumulator cannot overflow below this
MIN_ABSMAX = 1e-10  # an all-zero row gets this absmax: scale ~8e-13, q = 0, no 0/0


def quantize_weight_int8(w: torch.Tensor):
    """``w [N, K]`` (any float dtype) -> ``(qweight int8 [N, K], weight_scale float32 [N])``, symmetric
    per output row, round-to-nearest-even."""
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight [N, K], got shape {tuple(w.shape)}")
    if not w.is_floating_point():
        raise ValueError(f"weight must be a floating-point tensor to quantize, got {w.dtype}")
    wf = w.detach().float()
    if not wf.is_meta and not torch.isfinite(wf).all():  # meta: a skeleton's shapes, no values to check
        raise ValueError(f"weight {tuple(w.shape)} has inf/NaN entries; cannot quantize it")
    scale = wf.abs().amax(dim=1).clamp(min=1e-8) / QMAX
    q = torch.round(wf / scale[:, None]).clamp(-QMAX, QMAX).to(torch.int8)
    return q, scale


def dequantize_weight_int8(qweight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """float32 ``W [N, K] = qweight * weight_scale[:, None]``."""
    return qweight.float() * weight_scale.float()[:, None]


def round_half_away(v: torch.Tensor) -> torch.Tensor:
    """float32 ``trunc(v + copysign(0.5, v))``: the kernels' rounding (see the module docstring)."""
    half = torch.where(v >= 0, torch.full_like(v, 0.5), torch.full_like(v, -0.5))
    return (v + half).trunc()


def quantize_rows_reference(v: torch.Tensor, static_scale: torch.Tensor | None = None):
    """Per-row (or static per-tensor) int8 quantization of float32 ``v [M, K]`` (``K`` may be 0), the
    math every quantizing kernel implements. Returns ``(q int8 [M, K], scale float32 [M])``.

    A row holding inf or NaN gets a NaN scale (and q = 0 there), so a product using it is NaN
    rather than a silently wrong number; callers on the CPU raise on it (:func:`check_finite_scales`).
    """
    v = v.float()
    finite = torch.isfinite(v)
    row_ok = finite.all(dim=-1)
    if static_scale is None:
        mag = torch.where(finite, v.abs(), torch.zeros_like(v))
        # rows of no features: max |x| over no values is 0 (torch has no max of an empty dim)
        absmax = (mag.amax(dim=-1) if v.shape[-1] else mag.new_zeros(v.shape[:-1])).clamp(min=MIN_ABSMAX)
        # tensor by tensor, both ways: torch computes ``127 / absmax`` as ``absmax.reciprocal() * 127``
        # and (on CUDA) ``absmax / 127`` as a multiply by the reciprocal; either differs from the
        # kernels' correctly rounded quotient in the last bit for about one row in four
        inv = torch.full_like(absmax, QMAX) / absmax
        scale = absmax / torch.full_like(absmax, QMAX)
    else:
        s = static_scale.float().reshape(())
        inv = (1.0 / s).expand(v.shape[0])
        scale = s.expand(v.shape[0]).clone()
    q = round_half_away(v * inv[:, None]).clamp(-QMAX, QMAX)
    q = torch.where(finite, q, torch.zeros_like(q)).to(torch.int8)
    scale = torch.where(row_ok, scale, torch.full_like(scale, float("nan")))
    return q, scale


def check_finite_scales(scale: torch.Tensor, what: str) -> None:
    """Raise ``ValueError`` if any activation row was non-finite (its scale is NaN). Syncs with the
    device: called on the CPU path always, on CUDA only when asked (see :mod:`tinyq.ops.w8a8`)."""
    bad = ~torch.isfinite(scale)
    if bool(bad.any()):
        rows = bad.reshape(-1).nonzero().flatten()[:5].tolist()  # flat row numbers ([B, S] scales too)
        raise ValueError(f"{what}: activations contain inf/NaN (rows {rows}{'...' if int(bad.sum()) > 5 else ''}); "
                         "int8 quantization cannot represent them")

