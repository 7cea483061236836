"""``W8A8Linear``: a drop-in ``nn.Linear`` with int8 weights and int8 activations (SmoothQuant W8A8)."""
from __future__ import annotations

import torch
from torch import nn

from tinyq.nn.checked import CheckedTensors, module_tensors
from tinyq.ops.w8a8 import QuantizedActivation, check_w8a8_weight, w8a8_linear_prechecked
from tinyq.quant.int8_format import MAX_K, dequantize_weight_int8, quantize_weight_int8

ACT_QUANT = ("token", "tensor")


def _static_scale(act_scale, device) -> torch.Tensor:
    # checked where it was given, then moved: a meta skeleton's device holds no value to read back
    s = torch.as_tensor(act_scale, dtype=torch.float32).reshape(-1)
    if s.numel() != 1 or not bool(torch.isfinite(s).all()) or float(s) <= 0:
        raise ValueError(f"act_scale must be one positive finite number (max|x| / 127), got {act_scale!r}")
    return s.to(device)


_WEIGHTS = ("qweight", "weight_scale", "bias", "input_scale")


class W8A8Linear(nn.Module):
    """``y = x @ W.T + b`` with ``W`` int8 per output channel and ``x`` quantized to int8 per token at
    run time (``act_quant="token"``) or with one calibrated static scale (``"tensor"``); see
    :mod:`tinyq.quant.int8_format`.

    Buffers: ``qweight`` int8 ``[N, K]``, ``weight_scale`` float32 ``[N]``, ``input_scale`` float32
    ``[1]`` (static activation quantization only), ``bias`` ``[N]`` or none. They are ordinary
    buffers, so ``state_dict`` / safetensors round-trip. The input may also be a
    :class:`tinyq.ops.w8a8.QuantizedActivation` from a fused norm/activation quantizer.
    """

    def __init__(self, in_features, out_features, bias=True, act_quant="token", dtype=torch.float16, device=None):
        super().__init__()
        if act_quant not in ACT_QUANT:
            raise ValueError(f"act_quant must be one of {ACT_QUANT}, got {act_quant!r}")
        if in_features > MAX_K:
            raise ValueError(f"in_features={in_features} exceeds {MAX_K}, where the int32 accumulator could overflow")
        self.in_features, self.out_features, self.act_quant = in_features, out_features, act_quant
        self._checked = CheckedTensors()
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        if act_quant == "tensor":
            self.register_buffer("input_scale", torch.ones(1, dtype=torch.float32, device=device))
        else:
            self.input_scale = None
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.bias = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, act_scale=None) -> "W8A8Linear":
        """Quantize ``linear``'s weight (symmetric int8 per output row). ``act_scale``: None for
        dynamic per-token activation scales, or the static per-tensor scale ``max|x| / 127`` from
        calibration (a float or one-element tensor)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects nn.Linear, got {type(linear).__name__}")
        qweight, weight_scale = quantize_weight_int8(linear.weight)
        bias = None if linear.bias is None else linear.bias.detach().clone()  # not shared with the source
        input_scale = None if act_scale is None else _static_scale(act_scale, qweight.device)
        return cls.from_quantized(qweight, weight_scale, bias, input_scale)

    @classmethod
    def from_quantized(cls, qweight, weight_scale, bias=None, input_scale=None) -> "W8A8Linear":
        """Wrap already-quantized tensors (tinyq W8A8 format) without copying them."""
        if qweight.dtype != torch.int8 or qweight.dim() != 2:
            raise ValueError(f"qweight must be a 2-D int8 tensor [N, K], got {qweight.dtype} {tuple(qweight.shape)}")
        n, k = qweight.shape
        if weight_scale.dtype != torch.float32 or tuple(weight_scale.shape) != (n,):
            raise ValueError(f"weight_scale must be float32 [{n}], got {weight_scale.dtype} {tuple(weight_scale.shape)}")
        if input_scale is not None and (input_scale.dtype != torch.float32 or input_scale.numel() != 1):
            raise ValueError(f"input_scale must be one float32 value, got {input_scale.dtype} {tuple(input_scale.shape)}")
        if bias is not None and tuple(bias.shape) != (n,):
            raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
        act_quant = "token" if input_scale is None else "tensor"
        mod = cls(k, n, bias is not None, act_quant, device="meta")
        mod.qweight, mod.weight_scale = qweight, weight_scale
        if input_scale is not None:
            mod.input_scale = input_scale.reshape(1)
        if bias is not None:
            mod.bias = bias
        return mod

    def dequantized_weight(self) -> torch.Tensor:
        """Float32 ``W [N, K]``."""
        return dequantize_weight_int8(self.qweight, self.weight_scale)

    def forward(self, x) -> torch.Tensor:
        qweight, weight_scale, bias, input_scale = self._checked_tensors()
        out_dtype = x.dtype
        if bias is not None and bias.dtype != out_dtype and out_dtype in (torch.float16, torch.bfloat16, torch.float32):
            bias = bias.to(out_dtype)
        if isinstance(x, QuantizedActivation) and x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, expected {self.in_features}")
        return w8a8_linear_prechecked(x, qweight, weight_scale, bias, input_scale)

    def checked_weights(self):
        """``(qweight, weight_scale, bias)``, validated once per tensor object: an eager call then
        checks only its input (the host cost of a decode-sized linear is mostly such Python)."""
        return self._checked_tensors()[:3]

    def _checked_tensors(self):
        """``(qweight, weight_scale, bias, input_scale)``, validated once per tensor object."""
        tensors = module_tensors(self, _WEIGHTS)
        if not self._checked.same(tensors):
            check_w8a8_weight(*tensors)
            self._checked.remember(tensors)
        return tensors

    def _apply(self, fn, recurse=True):
        """``.to(device)`` moves the scales; ``.half()`` / ``.to(dtype)`` leave them float32 (the
        epilogue's precision; rounding them to fp16 would change every output)."""
        scales = {n: self._buffers.pop(n) for n in ("weight_scale", "input_scale") if self._buffers.get(n) is not None}
        super()._apply(fn, recurse)
        for name, t in scales.items():
            moved = fn(t)
            self._buffers[name] = moved if moved.dtype == t.dtype else t.to(moved.device)
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"act_quant={self.act_quant}")
