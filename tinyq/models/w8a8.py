"""The W8A8 pieces of a Llama/Qwen2 decoder layer (``precision="w8a8"``), kept apart from
:mod:`tinyq.models.llama` so the fp16/W4A16 layers stay as they are.

Per layer, with W8A8 linears (:class:`tinyq.W8A8Linear`)::

    h, residual -> add+RMSNorm+quant -> int8 rows + scales -> qkv_proj (int8 GEMM) -> attention -> o_proj
                -> add+RMSNorm+quant -> int8 rows + scales -> gate_up_proj -> silu*up+quant -> down_proj

One token with a cache (decode) takes the int8 qkv GEMV with RoPE and the cache write in its
epilogue (:func:`tinyq.ops.fused_w8a8.w8a8_qkv_attention`): one launch less a layer.

Each norm quantizes once and its int8 rows feed the fused qkv (or gate_up) GEMM directly; the MLP's
activation quantizes inside the SiLU·mul kernel. o_proj quantizes its own input (per-token kernel).
With static activation scales (``act_quant="tensor"``) a norm uses the ``input_scale`` of the linear it
feeds. Decode and prefill use the same modules; nothing here synchronizes with the host, so the decode
step captures in a CUDA graph as before.
"""
from __future__ import annotations

import torch
from torch import nn

from tinyq.models.llama import Attention
from tinyq.nn.w8a8_linear import W8A8Linear
from tinyq.ops.fused_w8a8 import fused_w8a8_decode, w8a8_qkv_attention
from tinyq.ops.w8a8 import QuantizedActivation, add_rms_norm_quant, rms_norm_quant, silu_mul_quant


class W8A8RMSNorm(nn.Module):
    """RMSNorm (after the residual add, when given one) emitting int8 rows for the W8A8 linear it feeds."""

    def __init__(self, norm: nn.Module, consumer: W8A8Linear):
        super().__init__()
        self.weight, self.eps = norm.weight, norm.eps
        self._consumer = [consumer]  # a list, so the linear is not registered (and saved) twice

    @property
    def input_scale(self):
        return self._consumer[0].input_scale

    def forward(self, x, residual=None):
        if residual is None:
            return rms_norm_quant(x, self.weight, self.eps, self.input_scale)
        return add_rms_norm_quant(x, residual, self.weight, self.eps, self.input_scale)


class W8A8Attention(Attention):
    """The attention sublayer of a W8A8 layer (same parameters): one token with a cache runs the
    fused int8 qkv GEMV + RoPE + cache write, anything else :class:`Attention`'s path."""

    def __init__(self, attn: Attention):
        nn.Module.__init__(self)
        self.layer_idx, self.hq, self.hkv, self.d, self.rope = attn.layer_idx, attn.hq, attn.hkv, attn.d, attn.rope
        self.qkv_proj, self.o_proj = attn.qkv_proj, attn.o_proj

    def forward(self, x, cache=None):
        if cache is not None and isinstance(x, QuantizedActivation) and fused_w8a8_decode(x.q):
            qkv = self.qkv_proj
            out = w8a8_qkv_attention(x, qkv.qweight, qkv.weight_scale, qkv.bias, cache, self.layer_idx, self.rope,
                                     self.hq, self.hkv)
            return self.o_proj(out.reshape(1, 1, self.hq * self.d))
        return super().forward(x, cache)


class W8A8MLP(nn.Module):
    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.gate_up_proj, self.down_proj = mlp.gate_up_proj, mlp.down_proj

    def forward(self, x):
        return self.down_proj(silu_mul_quant(self.gate_up_proj(x), self.down_proj.input_scale))


def use_w8a8_layers(model: nn.Module) -> nn.Module:
    """Switch every decoder layer of a tinyq ``CausalLM`` whose linears are W8A8 to the fused-quant
    norms, attention and MLP above, in place (parameter names are unchanged)."""
    for i, layer in enumerate(model.model.layers):
        qkv, gate_up, down = layer.self_attn.qkv_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj
        for name, lin in (("qkv_proj", qkv), ("gate_up_proj", gate_up), ("down_proj", down)):
            if not isinstance(lin, W8A8Linear):
                raise ValueError(f"layer {i}: {name} is {type(lin).__name__}, not W8A8Linear")
        layer.input_layernorm = W8A8RMSNorm(layer.input_layernorm, qkv)
        layer.post_attention_layernorm = W8A8RMSNorm(layer.post_attention_layernorm, gate_up)
        layer.mlp = W8A8MLP(layer.mlp)
        layer.self_attn = W8A8Attention(layer.self_attn)
    return model


def _check_weight_scale(scale: torch.Tensor, name: str, where: str) -> None:
    """A NaN, inf, zero or negative per-row weight scale loads silently and poisons (or flips) every
    output of its row; one pass over a float32 ``[N]`` tensor rules it out."""
    bad = ~(torch.isfinite(scale) & (scale > 0))
    if bool(bad.any()):
        rows = bad.nonzero().flatten()
        raise ValueError(f"{where}: tensor {name!r} has {len(rows)} scale(s) that are not finite and "
                         f"positive (rows {rows[:5].tolist()}, first {float(scale[rows[0]])})")


def fused_w8a8_linear(src, names, bias, device, rows, k: int) -> W8A8Linear:
    """One W8A8Linear from checkpoint parts ``names`` of ``rows[i]`` outputs and ``k`` inputs each
    (q/k/v or gate/up, concatenated along N). Each tensor is read from ``src`` once.

    Parts that share an input share its static scale; the largest is kept (no part clips)."""
    qweights, weight_scales, input_scales = [], [], []
    for n, r in zip(names, rows, strict=True):
        q, ws = src.get(n + ".qweight"), src.get(n + ".weight_scale")
        for leaf, t, dtype, shape in ((".qweight", q, torch.int8, (r, k)), (".weight_scale", ws, torch.float32, (r,))):
            if t.dtype != dtype or tuple(t.shape) != shape:
                raise ValueError(f"checkpoint tensor {n + leaf!r} is {t.dtype} {tuple(t.shape)}, expected {dtype} {shape}")
        _check_weight_scale(ws, n + ".weight_scale", src.location(n + ".weight_scale"))
        if n + ".input_scale" in src:
            s = src.get(n + ".input_scale")
            if s.numel() != 1:
                raise ValueError(f"checkpoint tensor {n + '.input_scale'!r} has shape {tuple(s.shape)}, expected one element")
            input_scales.append(s)
        qweights.append(q)
        weight_scales.append(ws)
    if input_scales and len(input_scales) != len(names):
        first = next(n for n in names if n + ".input_scale" in src)
        raise ValueError(f"{src.location(first + '.input_scale')}: only some of {names} have an input_scale")
    qweight = torch.cat(qweights).to(device)
    weight_scale = torch.cat(weight_scales).to(device)
    input_scale = None
    if input_scales:
        input_scale = torch.stack([s.float().reshape(()) for s in input_scales]).amax().reshape(1).to(device)
    return W8A8Linear.from_quantized(qweight.contiguous(), weight_scale.contiguous(), bias, input_scale)
