"""``W4A16Linear``: a drop-in ``nn.Linear`` with int4 weights and fp16/bf16 activations."""
from __future__ import annotations

import torch
from torch import nn

from tinyq.backend import use_triton
from tinyq.nn.checked import CheckedTensors, module_tensors
from tinyq.ops.linear import check_w4a16_weight, w4a16_linear_prechecked
from tinyq.quant.format import PACK, check_group_size, dequantize_weight, quantize_weight

_WEIGHTS = ("qweight", "scales", "zeros", "bias")


class W4A16Linear(nn.Module):
    """``y = x @ W.T + b`` with ``W`` stored in tinyq's int4 format (see :mod:`tinyq.quant.format`).

    Buffers: ``qweight`` int32 ``[N, K/8]``, ``scales`` and ``zeros`` ``[N, K/G]`` (fp16 or bf16),
    optional ``bias`` ``[N]``. They are ordinary buffers, so ``state_dict`` / safetensors round-trip.

    On CPU the module keeps a dequantized copy of its weight after the first call (the reference
    path would otherwise unpack every weight on every token); it is rebuilt when the weights change.

    The weight tensors are validated once per tensor object (a new ``.to()`` copy or an assigned
    buffer is checked again at its first call); a call then checks only its input.
    """

    def __init__(self, in_features, out_features, bias=True, group_size=128, dtype=torch.float16, device=None):
        super().__init__()
        check_group_size(group_size, in_features, "W4A16Linear")
        if in_features % PACK != 0:
            raise ValueError(f"in_features={in_features} must be a multiple of {PACK}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = in_features // group_size
        self.register_buffer("qweight", torch.zeros(out_features, in_features // PACK, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=dtype, device=device))
        self.register_buffer("zeros", torch.zeros(out_features, groups, dtype=dtype, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.bias = None
        self._dense = None  # (key, tensor) cache for the CPU path
        self._checked = CheckedTensors()

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 128, dtype=None) -> "W4A16Linear":
        """Round-to-nearest quantization of ``linear`` (scales in ``dtype``, default the weight's
        dtype when it is fp16/bf16, else fp16)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach()
        if dtype is None:
            dtype = w.dtype if w.dtype in (torch.float16, torch.bfloat16) else torch.float16
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size, dtype, device=w.device)
        qweight, scales, zeros = quantize_weight(w, group_size, dtype)
        mod.qweight.copy_(qweight)
        mod.scales.copy_(scales)
        mod.zeros.copy_(zeros)
        if linear.bias is not None:
            mod.bias.copy_(linear.bias.detach().to(dtype))
        return mod

    @classmethod
    def from_quantized(cls, qweight, scales, zeros, bias=None) -> "W4A16Linear":
        """Wrap already-quantized tensors (tinyq format) without copying them."""
        n, k = qweight.shape[0], qweight.shape[1] * PACK
        mod = cls.__new__(cls)
        nn.Module.__init__(mod)
        mod.in_features, mod.out_features = k, n
        mod.group_size = k // scales.shape[1]
        check_group_size(mod.group_size, k, "W4A16Linear")
        mod.register_buffer("qweight", qweight)
        mod.register_buffer("scales", scales)
        mod.register_buffer("zeros", zeros)
        if bias is not None:
            mod.register_buffer("bias", bias)
        else:
            mod.bias = None
        mod._dense = None
        mod._checked = CheckedTensors()
        return mod

    def dequantized_weight(self) -> torch.Tensor:
        """Float32 ``W [N, K]``."""
        return dequantize_weight(self.qweight, self.scales, self.zeros)

    def _cpu_forward(self, x):
        # the tensors themselves (held, so a replaced buffer is never mistaken for a new one that got
        # its address) and their in-place versions
        sources = (self.qweight, self.scales, self.zeros)
        # inference tensors have no version counter: one changed in place inside inference mode goes
        # unnoticed unless it comes through load_state_dict (which drops the cache)
        key = (x.dtype, *(None if t.is_inference() else t._version for t in sources))
        cached = self._dense
        if cached is None or cached[0] != key or any(a is not b for a, b in zip(cached[1], sources)):
            self._dense = cached = (key, sources, self.dequantized_weight().to(x.dtype))
        b = None if self.bias is None else self.bias.to(x.dtype)
        return torch.nn.functional.linear(x, cached[2], b)

    def forward(self, x):
        if not x.is_cuda and not use_triton(x) and not torch.compiler.is_compiling():
            if x.dim() == 0 or x.shape[-1] != self.in_features:
                raise ValueError(f"input has shape {tuple(x.shape)}; its last dimension must be the "
                                 f"{self.in_features} input features")
            if not x.is_floating_point():
                raise ValueError(f"W4A16Linear takes float activations, got {x.dtype}")
            self.checked_weights()  # the same weight checks as on the GPU (once per tensor object)
            return self._cpu_forward(x)
        return w4a16_linear_prechecked(x, *self.checked_weights())

    def checked_weights(self):
        """``(qweight, scales, zeros, bias)``, validated once per tensor object (for the fused ops
        that take the weights directly)."""
        tensors = module_tensors(self, _WEIGHTS)
        if not self._checked.same(tensors):
            check_w4a16_weight(*tensors)
            self._checked.remember(tensors)
        return tensors

    def _load_from_state_dict(self, *args, **kwargs):
        self._dense = None  # an in-place load into inference tensors leaves no version trace
        return super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, recurse=True):
        """``.to(device)`` moves everything; ``.half()`` / ``.to(torch.bfloat16)`` convert the scales
        and zeros (the kernels take activations of the scales' dtype); ``.float()`` leaves them in
        fp16/bf16, the only dtypes the format has (fp32 activations run on the CPU path)."""
        self._dense = None
        grid = {n: self._buffers.pop(n) for n in ("scales", "zeros") if self._buffers.get(n) is not None}
        super()._apply(fn, recurse)
        for name, t in grid.items():
            moved = fn(t)
            self._buffers[name] = moved if moved.dtype in (torch.float16, torch.bfloat16) else t.to(moved.device)
        return self

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"group_size={self.group_size}, dtype={self.scales.dtype}"
        )
