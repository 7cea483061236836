"""A W8A8 SmoothQuant vision tower (CLIP / SigLIP), as TinyChat runs NVILA's tower, kept apart from
:mod:`tinyq.models.vision` so the fp16 tower stays as it is.

Per layer, with W8A8 linears (:class:`tinyq.W8A8Linear`, int8 weights per output channel, int8
activations per token, computed at run time)::

    h -> LayerNorm1+quant -> int8 rows + scales -> qkv_proj (int8 GEMM) -> attention -> out_proj
      -> add+LayerNorm2+quant -> fc1 -> GELU+quant -> fc2 -> + h

Each norm quantizes once and its int8 rows feed qkv_proj / fc1 directly; SigLIP's GELU (tanh) and
CLIP-style erf GELU quantize in their own kernel, CLIP's quick GELU runs in torch and fc2 quantizes
its input, as out_proj does.

SmoothQuant (Xiao et al. 2023): per input channel ``s_j = max|X_j|^α / max|W_j|^(1-α)`` is folded
into LayerNorm1's weight and bias (÷ s) and qkv_proj's weight columns (× s), and likewise
LayerNorm2 -> fc1; out_proj and fc2 have no norm in front to fold into. α = 0.3 by default for
towers (the value TinyChat's NVILA recipe uses; an LLM takes ~0.85): a ViT's activations have
milder outliers than an LLM's and its weights quantize worse when they take more of them.

Calibration records every linear input's per-channel ``max|x|`` while the tower runs on
calibration images (:func:`record_tower_inputs`); :func:`quantize_vlm_tower_` runs a VLM's own image
encoding (its preprocessing and tiling) for that.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tinyq.nn.w8a8_linear import W8A8Linear
from tinyq.ops.attention import flash_attention
from tinyq.ops.w8a8 import add_layer_norm_quant, gelu_quant, layer_norm_quant
from tinyq.quant.smoothquant import apply_smoothing, smoothing_scale

TOWER_ALPHA = 0.3
LINEARS = ("qkv_proj", "out_proj", "fc1", "fc2")
SMOOTH_PAIRS = (("layer_norm1", "qkv_proj"), ("layer_norm2", "fc1"))
GELU_KERNEL = {"gelu_pytorch_tanh": "tanh", "gelu": "none"}  # activations with a fused GELU + quant kernel


@contextlib.contextmanager
def record_tower_inputs(tower: nn.Module):
    """Inside the block, every run of ``tower`` updates the yielded dict: ``"layers.{i}.{linear}"`` ->
    float32 per-input-channel ``max|x|`` over all rows seen."""
    stats = {}

    def hook(name):
        def fn(_mod, args):
            a = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0).float()
            stats[name] = torch.maximum(stats[name], a) if name in stats else a
        return fn

    hooks = [getattr(layer, lin).register_forward_pre_hook(hook(f"layers.{i}.{lin}"))
             for i, layer in enumerate(tower.layers) for lin in LINEARS]
    graphs = getattr(tower, "use_graphs", None)
    if graphs is not None:
        tower.use_graphs = False  # a graph replay runs no Python: the hooks would see nothing
    try:
        yield stats
    finally:
        for h in hooks:
            h.remove()
        if graphs is not None:
            tower.use_graphs = graphs


@torch.no_grad()
def smooth_tower_(tower: nn.Module, act_scales: dict, alpha: float = TOWER_ALPHA,
                  skip_unused: bool = False) -> nn.Module:
    """Fold SmoothQuant scales into each layer's LayerNorm1 -> qkv_proj and LayerNorm2 -> fc1, in place
    (the tower computes the same function in exact arithmetic). Call it on the floating-point tower.
    ``skip_unused``: leave alone the layers calibration never ran (a VLM that takes
    ``hidden_states[-2]`` never runs the last one)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    folds = []  # every pair is checked and its scale computed before any is folded
    for i, layer in enumerate(tower.layers):
        if skip_unused and not any(f"layers.{i}.{n}" in act_scales for n in LINEARS):
            continue
        for norm_name, lin_name in SMOOTH_PAIRS:
            key = f"layers.{i}.{lin_name}"
            lin = getattr(layer, lin_name)
            if key not in act_scales:
                raise ValueError(f"act_scales has no statistics for {key!r} (calibrate this tower first)")
            if not isinstance(lin, nn.Linear):
                raise ValueError(f"{key} is a {type(lin).__name__}: smooth the floating-point tower, then quantize")
            if act_scales[key].shape != (lin.in_features,):
                raise ValueError(f"act_scales[{key!r}] has shape {tuple(act_scales[key].shape)}, "
                                 f"expected ({lin.in_features},)")
            norm = getattr(layer, norm_name)
            s = smoothing_scale(norm, [lin], act_scales[key], alpha, where=f"layers.{i}.{norm_name} -> {key}")
            folds.append((norm, lin, s))
    for norm, lin, s in folds:
        apply_smoothing(norm, [lin], s)
    if hasattr(tower, "drop_graphs"):
        tower.drop_graphs()
    return tower


class W8A8VisionLayer(nn.Module):
    """A :class:`tinyq.models.vision.VisionLayer` whose linears are W8A8 (parameter names kept)."""

    def __init__(self, layer: nn.Module, hidden_act: str):
        super().__init__()
        for name in LINEARS:
            if not isinstance(getattr(layer, name), W8A8Linear):
                raise ValueError(f"{name} is {type(getattr(layer, name)).__name__}, not W8A8Linear")
        self.heads, self.head_dim = layer.heads, layer.head_dim
        self.layer_norm1, self.layer_norm2 = layer.layer_norm1, layer.layer_norm2
        self.qkv_proj, self.out_proj, self.fc1, self.fc2 = layer.qkv_proj, layer.out_proj, layer.fc1, layer.fc2
        self.act = layer.act
        self.gelu = GELU_KERNEL.get(hidden_act)  # None: the activation runs in torch, fc2 quantizes

    def forward(self, h):
        b, n, c = h.shape
        ln1, ln2 = self.layer_norm1, self.layer_norm2
        qkv = self.qkv_proj(layer_norm_quant(h, ln1.weight, ln1.bias, ln1.eps)).view(b, n, 3, self.heads, self.head_dim)
        attn = flash_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], causal=False)  # [B, N, heads, D]
        xq, h = add_layer_norm_quant(self.out_proj(attn.reshape(b, n, c)), h, ln2.weight, ln2.bias, ln2.eps)
        f = self.fc1(xq)
        f = gelu_quant(f, self.gelu) if self.gelu is not None else self.act(f)
        return h + self.fc2(f)


def use_w8a8_tower_(tower: nn.Module) -> nn.Module:
    """Quantize every layer's four linears to W8A8 (per-token dynamic activations) and switch the
    layers to the fused-quant forward, in place."""
    for i, layer in enumerate(tower.layers):
        for name in LINEARS:
            lin = getattr(layer, name)
            if not isinstance(lin, W8A8Linear):
                setattr(layer, name, W8A8Linear.from_linear(lin))
        tower.layers[i] = W8A8VisionLayer(layer, tower.config.hidden_act)
    if hasattr(tower, "drop_graphs"):
        tower.drop_graphs()  # captured graphs would still run the floating-point layers
    return tower


def quantize_tower_w8a8_(tower: nn.Module, calibrate: Optional[Callable[[], object]] = None,
                         alpha: float = TOWER_ALPHA) -> nn.Module:
    """SmoothQuant W8A8 for a vision tower, in place: ``calibrate()`` runs the tower on calibration
    inputs (statistics recorded), the scales are folded in, the linears quantized. Without
    ``calibrate`` nothing is smoothed (plain W8A8 with per-token activations)."""
    if calibrate is not None:
        with torch.inference_mode(), record_tower_inputs(tower) as stats:
            calibrate()
        smooth_tower_(tower, stats, alpha, skip_unused=True)
    return use_w8a8_tower_(tower)


def quantize_vlm_tower_(vlm: nn.Module, calib_images: Sequence = (), alpha: float = TOWER_ALPHA) -> nn.Module:
    """W8A8 for a tinyq VLM's vision tower, calibrated on ``calib_images`` (PIL images, each encoded
    alone, as a single image in a chat is: for NVILA that is its dynamic-S2 tiling)."""
    images = list(calib_images)

    def calibrate():
        for image in images:
            vlm.encode_images([image])

    quantize_tower_w8a8_(vlm.vision_tower, calibrate if images else None, alpha)
    return vlm


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two tensors taken as flat vectors (float32): the tower accuracy measure."""
    return float(F.cosine_similarity(a.float().reshape(1, -1), b.float().reshape(1, -1)))
