"""Per-token int8 quantization of activations: ``x [M, K] -> (xq int8 [M, K], scale float32 [M])``.

Math, per row, in float32 (:func:`tinyq.quant.int8_format.quantize_rows_reference` is the reference)::

    dynamic:  a = max(max_k |x[k]|, 1e-10);  inv = 127 / a;  scale = a / 127
    static:   inv = 1 / s;                   scale = s          (s: one float32 for the tensor)
    xq[k] = clamp(trunc(x[k] * inv + copysign(0.5, x[k] * inv)), -127, 127)

The divisions are correctly rounded (``div_rn``; Triton's default fp32 ``/`` is approximate) and
max/abs/trunc are exact, so the kernel's integers equal the reference's bit for bit.

Non-finite input: ``sum_k x[k] * 0`` is 0 for a finite row and NaN otherwise; it is added to the
scale, so a row holding inf/NaN gets a NaN scale and every product using it is NaN (not a silent
wrong number). One multiply-add per element and one reduction; no host synchronization.

:func:`quantize_store_row` and :func:`quantize_with_absmax` are the ``@triton.jit`` building blocks the
fused norm/activation + quant kernels share. Tensors: ``x`` fp16/bf16/fp32 ``[M, K]`` (leading dims flattened), last dim contiguous;
``static_scale`` float32 ``[1]`` or None. One program per row, the whole row in registers as two
power-of-two blocks (:func:`tinyq.kernels.residual.row_blocks`; K <= 65536).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from tinyq.backend import check_kernel_device
from tinyq.kernels.residual import as_rows, row_blocks, row_columns, row_warps
from tinyq.quant.int8_format import MIN_ABSMAX, quantize_rows_reference

MAX_K = 65536  # one row per program must fit a register tile
ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def quantize_with_absmax(v, amax, static_scale_ptr, STATIC: tl.constexpr, MIN_AMAX: tl.constexpr):
    """float32 row ``v`` whose ``max|v|`` is ``amax`` (unused when STATIC) -> (int8 row, float32 scale).
    A kernel that finds ``amax`` in a reduction it runs anyway (a norm's) saves one block reduction."""
    if STATIC:
        s = tl.load(static_scale_ptr).to(tl.float32)
        inv = tl.math.div_rn(1.0, s)
        scale = s
    else:
        amax = tl.maximum(amax, MIN_AMAX)
        inv = tl.math.div_rn(127.0, amax)
        scale = tl.math.div_rn(amax, 127.0)
    t = v * inv
    # NaN -> 0 (its row's scale is NaN, see quantize_store_row). The select and the clamp also stand
    # between the product and the +-0.5: added to the product itself, the GPU compiler contracts the
    # two into one fma that rounds once, and ties then break unlike the float32 reference.
    t = tl.where(t == t, t, 0.0)
    t = tl.minimum(tl.maximum(t, -127.0), 127.0)
    t = t + tl.where(t >= 0, 0.5, -0.5)
    return t.to(tl.int32).to(tl.int8), scale


@triton.jit
def nan_probe_and_absmax(v, mask):
    """``(sum(v * 0), max|v|)`` over the lanes of ``mask``, in one block reduction (each reduction is
    a cross-warp round trip through shared memory). The first is 0 for finite values and NaN when
    any is inf/NaN: added to a scale, it marks the row."""
    v = tl.where(mask, v, 0.0)
    return tl.reduce((v * 0.0, tl.abs(v)), 0, sum_and_max)


@triton.jit
def quantize_store_row(va, ca, ma, vb, cb, mb, q_row_ptr, static_scale_ptr,
                       STATIC: tl.constexpr, MIN_AMAX: tl.constexpr, TAIL: tl.constexpr):
    """A float32 row held as two register blocks (head ``va`` at columns ``ca`` where ``ma``; tail
    ``vb`` at ``cb`` where ``mb``, used only when ``TAIL > 0``; masked lanes hold 0): store its int8
    values at ``q_row_ptr + column`` and return its float32 scale, NaN when the row holds inf/NaN."""
    probe, amax = nan_probe_and_absmax(va, ma)
    if TAIL > 0:
        probe_b, amax_b = nan_probe_and_absmax(vb, mb)
        probe += probe_b
        amax = tl.maximum(amax, amax_b)
        qb, _ = quantize_with_absmax(vb, amax, static_scale_ptr, STATIC, MIN_AMAX)
        tl.store(q_row_ptr + cb, qb, mask=mb)
    qa, scale = quantize_with_absmax(va, amax, static_scale_ptr, STATIC, MIN_AMAX)
    tl.store(q_row_ptr + ca, qa, mask=ma)
    return scale + probe


@triton.jit
def sum_and_max(s1, m1, s2, m2):
    """Combine function of a ``tl.reduce`` computing a sum and a max in one pass."""
    return s1 + s2, tl.maximum(m1, m2)


@triton.jit
def _quant_rows_kernel(X, Q, SCALE, STATIC_S, K, stride_x, stride_q,
                       STATIC: tl.constexpr, MIN_AMAX: tl.constexpr, HEAD: tl.constexpr, TAIL: tl.constexpr):
    # the row as two register blocks, [0, HEAD) and [HEAD, HEAD + TAIL) (residual.row_blocks)
    row = tl.program_id(0).to(tl.int64)
    ca, ma, cb, mb = row_columns(K, HEAD, TAIL)
    va = tl.load(X + row * stride_x + ca, mask=ma, other=0.0).to(tl.float32)
    vb = va
    if TAIL > 0:
        vb = tl.load(X + row * stride_x + cb, mask=mb, other=0.0).to(tl.float32)
    scale = quantize_store_row(va, ca, ma, vb, cb, mb, Q + row * stride_q, STATIC_S, STATIC, MIN_AMAX, TAIL)
    tl.store(SCALE + row, scale)


def int8_row_outputs(m: int, k: int, device, static_scale=None):
    """The outputs of a row quantizer: int8 rows ``[m, k]`` and their float32 scales ``[m]``. Rows
    of no features (``k == 0``) launch no kernel, so their scales are the reference's, set here;
    otherwise the kernel writes every one."""
    if k == 0:
        return quantize_rows_reference(torch.empty((m, 0), device=device), static_scale)
    return torch.empty((m, k), dtype=torch.int8, device=device), torch.empty((m,), dtype=torch.float32, device=device)


def check_static_scale(static_scale, device, check_value: bool = False) -> None:
    """One float32 scale on the activations' ``device``, positive and finite (a scale <= 0 makes
    every quantized row garbage, an inf or NaN one every row NaN). The value is read only where
    that costs no device sync: a CPU tensor, or ``check_value`` (once, where a module validates its
    weights); never on a GPU hot path, nor while ``torch.compile`` traces."""
    if static_scale is None:
        return
    if static_scale.dtype != torch.float32 or static_scale.numel() != 1:
        raise ValueError(f"static activation scale must be one float32 value, got {static_scale.dtype} "
                         f"{tuple(static_scale.shape)}")
    if static_scale.device != device:
        raise ValueError(f"static activation scale is on {static_scale.device}, the activations on {device}")
    if (check_value or static_scale.device.type == "cpu") and not torch.compiler.is_compiling():
        s = float(static_scale.reshape(()))
        if not (math.isfinite(s) and s > 0):
            raise ValueError(f"static activation scale must be positive and finite (max|x| / 127), got {s}")


def _check(x, static_scale):
    if x.dtype not in ACT_DTYPES:
        raise ValueError(f"quantize_per_token: x must be fp16/bf16/fp32, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] > MAX_K:
        raise ValueError(f"quantize_per_token: x must be [..., K] with K <= {MAX_K}, got {tuple(x.shape)}")
    check_static_scale(static_scale, x.device)


def quantize_per_token(x: torch.Tensor, static_scale: torch.Tensor | None = None):
    """Triton launcher: ``x [..., K]`` -> ``(xq int8 [..., K], scale float32 [...])``."""
    _check(x, static_scale)
    check_kernel_device("quantize_per_token", x, *(() if static_scale is None else (static_scale,)))
    k = x.shape[-1]
    x2 = as_rows(x, k)
    m = x2.shape[0]
    q, scale = int8_row_outputs(m, k, x.device, static_scale)
    if m > 0 and k > 0:
        head, tail = row_blocks(k)
        _quant_rows_kernel[(m,)](
            x2, q, scale, static_scale if static_scale is not None else scale, k, x2.stride(0), q.stride(0),
            STATIC=static_scale is not None, MIN_AMAX=MIN_ABSMAX, HEAD=head, TAIL=tail,
            num_warps=row_warps(head, tail, m),
        )
    return q.reshape(x.shape), scale.reshape(x.shape[:-1])


def quantize_per_token_reference(x: torch.Tensor, static_scale: torch.Tensor | None = None):
    """Plain torch (float32 math); same returns as :func:`quantize_per_token`."""
    _check(x, static_scale)
    k = x.shape[-1]
    q, scale = quantize_rows_reference(as_rows(x, k).float(), static_scale)
    return q.reshape(x.shape), scale.reshape(x.shape[:-1])
