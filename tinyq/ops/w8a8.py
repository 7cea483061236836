"""Functional W8A8 ops: activation quantization (alone or fused into a norm / activation) and the
int8 linear, with the quantized activation passed between them as a :class:`QuantizedActivation`.

Each kernel is a torch custom op (``tinyq::int8_linear``, ``tinyq::quantize_per_token``,
``tinyq::rms_norm_quant``, ``tinyq::add_rms_norm_quant``, ``tinyq::layer_norm_quant``,
``tinyq::add_layer_norm_quant``,
``tinyq::silu_mul_quant``, ``tinyq::gelu_quant``) with a fake implementation, so models using them
work under ``torch.compile`` and CUDA-graph capture (eager calls skip the dispatcher: see
:func:`_custom_op`). CUDA tensors run the Triton kernels; CPU tensors run the references directly: exact int8 math (int32 accumulation by ``torch._int_mm``), so the CPU
computes the GPU's integers.

Inf/NaN activations: every quantizer gives a row holding inf/NaN a NaN scale, so its output row is
NaN, never a plausible wrong number. On the CPU path the quantizers then raise ``ValueError`` (the
values are on the host anyway). On CUDA a check would cost a device->host sync per call (and cannot
run inside a CUDA graph), so it is opt-in: ``TINYQ_CHECK_FINITE=1`` checks every quantizer's scales
outside graph capture.
"""
from __future__ import annotations

import os
from typing import NamedTuple, Optional, Tuple

import torch

from tinyq.backend import use_triton
from tinyq.kernels import gelu_quant as _gq
from tinyq.kernels import int8_quant as _iq
from tinyq.kernels import layernorm_quant as _lq
from tinyq.kernels import rmsnorm_quant as _rq
from tinyq.kernels import silu_mul_quant as _sq
from tinyq.kernels.int8_matmul import check_int8_matmul_args, check_int8_weight_args, int8_matmul_reference
from tinyq.quant.int8_format import check_finite_scales

OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class QuantizedActivation(NamedTuple):
    """An int8 activation: ``q`` int8 ``[..., K]``, ``scale`` float32 ``[...]`` (one per row), and the
    float dtype of the tensor it stands for (the dtype the next linear outputs)."""

    q: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype

    @property
    def shape(self) -> torch.Size:
        return self.q.shape


def _checked(q, scale, dtype, what) -> QuantizedActivation:
    if scale.device.type == "cpu" or (
        os.environ.get("TINYQ_CHECK_FINITE") == "1" and not torch.cuda.is_current_stream_capturing()
    ):
        check_finite_scales(scale, what)
    return QuantizedActivation(q, scale, dtype)


def _fake_q(x, k=None):
    k = x.shape[-1] if k is None else k
    return x.new_empty(*x.shape[:-1], k, dtype=torch.int8), x.new_empty(x.shape[:-1], dtype=torch.float32)


def _custom_op(name: str, impl, fake):
    """Register ``impl`` as ``tinyq::<name>`` with a fake; returns ``run(*args)``: the custom op while
    ``torch.compile`` traces, ``impl`` itself in eager mode (the dispatcher cost ~150 us per call in
    torch 2.11, ~10 calls per decoder layer: it doubled a 256-token prefill; a CUDA graph captures the
    direct launches alike)."""
    op = torch.library.custom_op(f"tinyq::{name}", impl, mutates_args=())
    op.register_fake(fake)

    def run(*args):
        return op(*args) if torch.compiler.is_compiling() else impl(*args)

    run.op = op
    return run


# --- quantizers ----------------------------------------------------------------------------------

def _quantize_impl(x: torch.Tensor, static_scale: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    return _iq.quantize_per_token(x, static_scale)


def _rms_norm_quant_impl(x: torch.Tensor, weight: torch.Tensor, eps: float,
                         static_scale: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    return _rq.rmsnorm_quant(x, weight, eps, None, static_scale)


def _add_rms_norm_quant_impl(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                             static_scale: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _rq.rmsnorm_quant(x, weight, eps, residual, static_scale)


def _layer_norm_quant_impl(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], eps: float,
                           static_scale: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    return _lq.layernorm_quant(x, weight, bias, eps, static_scale)


def _add_layer_norm_quant_impl(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                               bias: Optional[torch.Tensor], eps: float,
                               static_scale: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _lq.layernorm_quant(x, weight, bias, eps, static_scale, residual)


def _silu_mul_quant_impl(x: torch.Tensor, static_scale: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    return _sq.silu_mul_quant(x, static_scale)


def _gelu_quant_impl(x: torch.Tensor, approximate: str,
                     static_scale: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    return _gq.gelu_quant(x, approximate, static_scale)


_quantize = _custom_op("quantize_per_token", _quantize_impl, lambda x, s: _fake_q(x))
_rms_norm_quant = _custom_op("rms_norm_quant", _rms_norm_quant_impl, lambda x, w, eps, s: _fake_q(x))
_add_rms_norm_quant = _custom_op("add_rms_norm_quant", _add_rms_norm_quant_impl,
                                 lambda x, r, w, eps, s: _fake_q(x) + (torch.empty_like(x),))
_layer_norm_quant = _custom_op("layer_norm_quant", _layer_norm_quant_impl, lambda x, w, b, eps, s: _fake_q(x))
_add_layer_norm_quant = _custom_op("add_layer_norm_quant", _add_layer_norm_quant_impl,
                                   lambda x, r, w, b, eps, s: _fake_q(x) + (torch.empty_like(x),))
_silu_mul_quant = _custom_op("silu_mul_quant", _silu_mul_quant_impl, lambda x, s: _fake_q(x, x.shape[-1] // 2))
_gelu_quant = _custom_op("gelu_quant", _gelu_quant_impl, lambda x, a, s: _fake_q(x))


def quantize_activation(x: torch.Tensor, static_scale: Optional[torch.Tensor] = None) -> QuantizedActivation:
    """Per-token int8 quantization of ``x [..., K]`` (or with one static float32 scale)."""
    fn = _quantize if use_triton(x) else _iq.quantize_per_token_reference
    return _checked(*fn(x, static_scale), x.dtype, "quantize_activation")


def rms_norm_quant(x, weight, eps: float, static_scale=None) -> QuantizedActivation:
    """int8 rows of ``rms_norm(x) * weight`` (see :mod:`tinyq.kernels.rmsnorm_quant`)."""
    if use_triton(x):
        out = _rms_norm_quant(x, weight, float(eps), static_scale)
    else:
        out = _rq.rmsnorm_quant_reference(x, weight, eps, None, static_scale)
    return _checked(*out, x.dtype, "rms_norm_quant")


def add_rms_norm_quant(x, residual, weight, eps: float, static_scale=None):
    """``h = x + residual``; returns ``(int8 rows of rms_norm(h) * weight, h)``."""
    if use_triton(x):
        q, scale, h = _add_rms_norm_quant(x, residual, weight, float(eps), static_scale)
    else:
        q, scale, h = _rq.rmsnorm_quant_reference(x, weight, eps, residual, static_scale)
    return _checked(q, scale, x.dtype, "add_rms_norm_quant"), h


def layer_norm_quant(x, weight, bias, eps: float, static_scale=None) -> QuantizedActivation:
    """int8 rows of ``layer_norm(x) * weight + bias`` (see :mod:`tinyq.kernels.layernorm_quant`)."""
    if use_triton(x):
        out = _layer_norm_quant(x, weight, bias, float(eps), static_scale)
    else:
        out = _lq.layernorm_quant_reference(x, weight, bias, eps, static_scale)
    return _checked(*out, x.dtype, "layer_norm_quant")


def add_layer_norm_quant(x, residual, weight, bias, eps: float, static_scale=None):
    """``h = x + residual``; returns ``(int8 rows of layer_norm(h) * weight + bias, h)``."""
    if use_triton(x):
        q, scale, h = _add_layer_norm_quant(x, residual, weight, bias, float(eps), static_scale)
    else:
        q, scale, h = _lq.layernorm_quant_reference(x, weight, bias, eps, static_scale, residual)
    return _checked(q, scale, x.dtype, "add_layer_norm_quant"), h


def silu_mul_quant(x, static_scale=None) -> QuantizedActivation:
    """int8 rows of ``silu(gate) * up`` for ``x = [gate | up]`` (see :mod:`tinyq.kernels.silu_mul_quant`)."""
    fn = _silu_mul_quant if use_triton(x) else _sq.silu_mul_quant_reference
    return _checked(*fn(x, static_scale), x.dtype, "silu_mul_quant")


def gelu_quant(x, approximate: str = "none", static_scale=None) -> QuantizedActivation:
    """int8 rows of ``gelu(x)`` (``approximate`` "none" = erf, or "tanh")."""
    fn = _gelu_quant if use_triton(x) else _gq.gelu_quant_reference
    return _checked(*fn(x, approximate, static_scale), x.dtype, "gelu_quant")


# --- the linear ----------------------------------------------------------------------------------

def _int8_linear_impl(xq: torch.Tensor, x_scale: torch.Tensor, qweight: torch.Tensor, weight_scale: torch.Tensor,
                      bias: Optional[torch.Tensor], out_dtype: torch.dtype) -> torch.Tensor:
    from tinyq.kernels.int8_matmul import int8_matmul_checked

    k = xq.shape[-1]
    m = x_scale.numel()  # the rows (not -1: a K of 0 leaves nothing to infer them from)
    y = int8_matmul_checked(xq.reshape(m, k), qweight, x_scale.reshape(m), weight_scale, bias, out_dtype)
    return y.reshape(*xq.shape[:-1], qweight.shape[0])


_int8_linear = _custom_op(
    "int8_linear", _int8_linear_impl,
    lambda xq, s, qw, ws, b, dt: xq.new_empty(*xq.shape[:-1], qw.shape[0], dtype=dt),
)


def check_w8a8_weight(qweight, weight_scale, bias=None, input_scale=None) -> None:
    """Validate a W8A8 linear's weight side once (``W8A8Linear.checked_weights``): the int8 matmul's
    weight arguments and the static activation scale, if any, on the weight's device."""
    check_int8_weight_args(qweight, weight_scale, bias)
    # once per tensor object: the one place a GPU scale's value is read (a device sync), except
    # while torch.compile traces or a CUDA graph captures (no sync allowed there)
    read = not torch.compiler.is_compiling() and not (qweight.is_cuda and torch.cuda.is_current_stream_capturing())
    _iq.check_static_scale(input_scale, qweight.device, check_value=read)


def w8a8_linear_prechecked(x, qweight, weight_scale, bias=None, input_scale=None) -> torch.Tensor:
    """:func:`w8a8_linear` for weights that passed ``check_int8_weight_args`` once (``W8A8Linear``).
    A float input on the Triton path is quantized and multiplied without validating again what
    the quantizer just produced; anything else takes :func:`w8a8_linear`'s checks."""
    if isinstance(x, QuantizedActivation) or not torch.is_tensor(x) or x.dtype not in OUT_DTYPES or not use_triton(x):
        return w8a8_linear(x, qweight, weight_scale, bias, input_scale)
    if x.shape[-1] != qweight.shape[1]:
        raise ValueError(f"w8a8_linear: input has {x.shape[-1]} features but the weight expects "
                         f"K={qweight.shape[1]} (x {tuple(x.shape)})")
    q, scale = _quantize(x, input_scale)
    _checked(q, scale, x.dtype, "quantize_activation")  # TINYQ_CHECK_FINITE's check, when asked for
    return _int8_linear(q, scale, qweight, weight_scale, bias, x.dtype)


def w8a8_linear(x, qweight, weight_scale, bias=None, input_scale=None) -> torch.Tensor:
    """``y = x @ W.T + b`` with int8 ``W = qweight * weight_scale[:, None]`` and int8 activations.

    ``x``: a float tensor ``[..., K]`` (quantized here, per token or with the static ``input_scale``)
    or a :class:`QuantizedActivation` from a fused quantizer. Output ``[..., N]`` in x's dtype.
    """
    if not isinstance(x, QuantizedActivation):
        if not torch.is_tensor(x) or not x.is_floating_point():
            raise ValueError(f"w8a8_linear: x must be a float tensor or a QuantizedActivation, got "
                             f"{getattr(x, 'dtype', type(x).__name__)}")
        if x.shape[-1] != qweight.shape[-1]:
            raise ValueError(f"w8a8_linear: input has {x.shape[-1]} features but the weight expects "
                             f"K={qweight.shape[-1]} (x {tuple(x.shape)})")
        x = quantize_activation(x, input_scale)
    if x.dtype not in OUT_DTYPES:
        raise ValueError(f"w8a8_linear: output dtype must be one of {OUT_DTYPES}, got {x.dtype}")
    xq = x.q if x.q.is_contiguous() else x.q.contiguous()
    check_int8_matmul_args(xq, qweight, x.scale, weight_scale, bias, x.dtype)
    if use_triton(xq):
        return _int8_linear(xq, x.scale, qweight, weight_scale, bias, x.dtype)
    return int8_matmul_reference(xq, qweight, x.scale, weight_scale, bias, x.dtype)
