"""SmoothQuant (Xiao et al. 2023): move activation outliers into the weights, then quantize both to int8.

1. :func:`calibrate` runs a transformers Llama/Qwen2 model over calibration blocks one decoder layer
   at a time (only that layer and its activations on the device, as AWQ's search does) and records
   every linear input's per-channel ``max|X_j|`` over all tokens.
2. :func:`smooth_` folds, per group of linears sharing one input, ``s_j = max|X_j|^α / max|W_j|^(1-α)``
   (both maxima clamped at 1e-5; ``max|W_j|`` over every row of every linear in the group) into the
   norm feeding them: norm weight (and bias) ``÷ s``, linear weight columns ``× s``. The product is
   unchanged in exact arithmetic; the activations' outlier channels shrink by ``s``.

   ==========================  ==========================================================
   norm                        linears (transformers layout / tinyq's fused layout)
   ==========================  ==========================================================
   input_layernorm             q_proj, k_proj, v_proj  /  qkv_proj
   post_attention_layernorm    gate_proj, up_proj      /  gate_up_proj
   ==========================  ==========================================================

   o_proj and down_proj are not smoothed: no norm feeds them to fold into.
3. :func:`tinyq.quantize_` with :class:`tinyq.W8A8Config` quantizes (per-token activations, or static
   per-tensor scales from the smoothed statistics :func:`smooth_` returns).

α = 0.85 is the SmoothQuant repository's setting for Llama-2/3 (0.8 for Mistral); benchmarks/
eval_w8a8_ppl.py measures it on SmolLM2.
"""
from __future__ import annotations

import torch
from torch import nn

from tinyq.quant.arch import decoder_of, layer_kwargs, run_module

DEFAULT_ALPHA = 0.85
CLAMP = 1e-5
SMOOTH_GROUPS = (
    ("input_layernorm", (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.qkv_proj",))),
    ("post_attention_layernorm", (("mlp.gate_proj", "mlp.up_proj"), ("mlp.gate_up_proj",))),
)


@torch.no_grad()
def calibrate(model: nn.Module, blocks: torch.Tensor, device=None, batch_blocks: int = 8,
              progress: bool = True) -> dict:
    """Per-input-channel ``max|x|`` (float32 ``[in_features]``) of every linear in the decoder layers
    of a transformers Llama/Qwen2 ``model``, by full module name, over token ``blocks [n, L]``.

    Layer by layer: the inputs of layer i+1 are layer i's outputs; each layer visits ``device``
    (default: where the model is) and returns home afterwards.
    """
    from tinyq.quant.awq import Progress

    dec = decoder_of(model)
    prefix = next(name for name, mod in model.named_modules() if mod is dec)
    home = next(model.parameters()).device
    device = torch.device(device) if device is not None else home
    x = dec.embed_tokens(blocks.to(dec.embed_tokens.weight.device)).to(device)  # [n, L, H]
    rotary_home = next(dec.rotary_emb.buffers()).device
    dec.rotary_emb.to(device)
    kw = layer_kwargs(dec, x[:1])
    stats = {}
    bar = Progress(len(dec.layers), "SmoothQuant calibration layers", progress)

    def hook(name):
        def fn(_mod, args):
            a = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0).float()
            stats[name] = torch.maximum(stats[name], a) if name in stats else a
        return fn

    try:
        for i, layer in enumerate(dec.layers):
            layer.to(device)
            linears = {f"{prefix}.layers.{i}.{name}": mod for name, mod in layer.named_modules()
                       if isinstance(mod, nn.Linear)}
            hooks = [lin.register_forward_pre_hook(hook(name)) for name, lin in linears.items()]
            try:
                x = torch.cat([run_module(layer, x[lo:lo + batch_blocks], kw) for lo in range(0, x.shape[0], batch_blocks)])
            finally:
                for h in hooks:
                    h.remove()
                layer.to(home)
            _check_finite_stats(stats, linears, i, x.dtype)
            bar.step()
    finally:
        dec.rotary_emb.to(rotary_home)
    return {k: v.cpu() for k, v in stats.items()}


def _check_finite_stats(stats: dict, names, layer_index: int, dtype: torch.dtype) -> None:
    """Refuse layer ``layer_index``'s statistics if any holds inf/NaN: a NaN ``max|x|`` passes every
    clamp of :func:`smooth_` (``NaN > CLAMP`` is False, so it reads as "never active") and would be
    written as a NaN static input scale. The rest of the model would only see NaN too, so stop here."""
    from tinyq.quant.awq import overflow_error

    for name in names:
        if name in stats and not torch.isfinite(stats[name]).all():
            raise overflow_error(f"layer {layer_index}", f"the inputs of {name}", dtype,
                                 step="SmoothQuant calibration")


@torch.no_grad()
def smoothing_scale(norm: nn.Module, linears, x_max: torch.Tensor, alpha: float,
                    where: str = "smoothing") -> torch.Tensor:
    """``s`` of :func:`fold_smoothing` (float32 ``[in_features]``), computed without changing anything.

    A channel calibration never saw active (``max|X|`` at most the clamp) keeps ``s = 1``: its clamped
    ``s`` would be ~1e-5 and its norm weight ``/ s`` would overflow fp16, turning ``0 * inf`` into NaN.
    ``s`` is also kept where every folded value stays finite in the weights' own dtype. Statistics
    or weights holding inf/NaN are a ValueError naming ``where``: NaN would slip through the clamps."""
    x_max = x_max.float().to(norm.weight.device)
    bad = ~torch.isfinite(x_max)
    if bad.any():
        raise ValueError(f"{where}: the activation statistics hold inf/NaN in {int(bad.sum())} of {x_max.numel()} "
                         "channels (calibration overflowed), so no smoothing scale can be chosen")
    w_max = torch.cat([lin.weight.abs().float() for lin in linears]).amax(0).clamp(min=CLAMP)
    s = x_max.clamp(min=CLAMP).pow(alpha) / w_max.pow(1 - alpha)
    s = torch.where(x_max > CLAMP, s, torch.ones_like(s))
    room = torch.finfo(norm.weight.dtype).max / 4  # headroom for the norm's own products
    folded = norm.weight.abs().float()
    if getattr(norm, "bias", None) is not None:
        folded = torch.maximum(folded, norm.bias.abs().float())
    s = torch.maximum(s, folded / room)
    s = torch.minimum(s, torch.finfo(linears[0].weight.dtype).max / 4 / w_max)
    bad = ~(torch.isfinite(s) & (s > 0))
    if bad.any():  # only inf/NaN weights get here
        raise ValueError(f"{where}: the smoothing scale is not finite and positive in {int(bad.sum())} channels; "
                         "the norm's or the linears' weights hold inf/NaN")
    return s


@torch.no_grad()
def fold_smoothing(norm: nn.Module, linears, x_max: torch.Tensor, alpha: float,
                   where: str = "smoothing") -> torch.Tensor:
    """Fold ``s = max|X|^alpha / max|W|^(1 - alpha)`` (per input channel, both clamped at
    :data:`CLAMP`; ``max|W|`` over every row of every linear in ``linears``) into ``norm``'s weight
    (and bias) ``/ s`` and the linears' weight columns ``* s``, in place. Returns ``s`` (float32).
    The rules and errors are :func:`smoothing_scale`'s; an error leaves the modules unchanged."""
    s = smoothing_scale(norm, linears, x_max, alpha, where)
    apply_smoothing(norm, linears, s)
    return s


def apply_smoothing(norm: nn.Module, linears, s: torch.Tensor) -> None:
    """Divide ``norm``'s weight (and bias) by ``s`` and multiply the linears' weight columns by it,
    in place: ``s`` from :func:`smoothing_scale`, which checked it."""
    norm.weight.div_(s.to(norm.weight.dtype))
    if getattr(norm, "bias", None) is not None:
        norm.bias.div_(s.to(norm.bias.dtype))
    for lin in linears:
        lin.weight.mul_(s.to(lin.weight.dtype)[None, :])


def _decoder_layers(model: nn.Module):
    """``(name, layer)`` of every module with both decoder-layer norms (transformers' or tinyq's)."""
    return [(name, mod) for name, mod in model.named_modules()
            if hasattr(mod, "input_layernorm") and hasattr(mod, "post_attention_layernorm")]


def _group_linears(layer: nn.Module, layouts):
    for names in layouts:
        try:
            return names, [layer.get_submodule(n) for n in names]
        except AttributeError:
            continue
    raise ValueError(f"{type(layer).__name__}: none of the linear layouts {layouts} found; smooth_ supports "
                     "Llama/Qwen2 decoder layers (transformers or tinyq)")


@torch.no_grad()
def smooth_(model: nn.Module, act_scales: dict, alpha: float = DEFAULT_ALPHA) -> dict:
    """Fold SmoothQuant scales into ``model``'s norms and the linears they feed, in place.

    ``act_scales``: per-channel ``max|x|`` by full linear name (:func:`calibrate`). Returns the
    statistics of the smoothed inputs (``act_scales[name] / s``; the others unchanged), which is what
    static per-tensor activation scales must come from. Call it on the floating-point model, before
    :func:`tinyq.quantize_`. Every group's statistics (present, of the norm's width, finite) and scale
    are checked before the first fold: a ValueError leaves the model untouched.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    layers = _decoder_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__}: no Llama/Qwen2 decoder layers (input_layernorm + "
                         "post_attention_layernorm) to smooth")
    for name, stat in act_scales.items():  # all of them: the unsmoothed ones are returned for static scales too
        if not torch.isfinite(torch.as_tensor(stat)).all():
            raise ValueError(f"act_scales[{name!r}] holds inf/NaN (its calibration overflowed); no smoothing or "
                             "activation scale can come from it")
    folds = [_plan_fold(lname, layer, norm_name, layouts, act_scales, alpha)
             for lname, layer in layers for norm_name, layouts in SMOOTH_GROUPS]
    out = dict(act_scales)
    for norm, linears, full, s in folds:  # every check passed: nothing below raises
        apply_smoothing(norm, linears, s)
        for name in full:
            if name in out:
                out[name] = (out[name].float().to(s.device) / s).cpu()
    return out


def _plan_fold(lname: str, layer: nn.Module, norm_name: str, layouts, act_scales: dict, alpha: float):
    """``(norm, linears, full linear names, s)`` of one smoothing group of decoder layer ``lname``,
    checked and computed without changing the model."""
    names, linears = _group_linears(layer, layouts)
    full = [f"{lname}.{n}" for n in names]
    stats = [act_scales[n] for n in full if n in act_scales]
    if not stats:
        raise ValueError(f"act_scales has no statistics for {full[0]!r} (calibrate the same model layout)")
    for name, lin in zip(full, linears):
        if not isinstance(lin, nn.Linear):
            raise ValueError(f"{name} is a {type(lin).__name__}: smooth_ the floating-point model, then quantize")
    norm = layer.get_submodule(norm_name)
    k = norm.weight.shape[0]
    for name in full:
        if name in act_scales and tuple(act_scales[name].shape) != (k,):
            raise ValueError(f"act_scales for {name!r}: shape {tuple(act_scales[name].shape)}, expected ({k},)")
    x_max = torch.stack([s.float() for s in stats]).amax(0)
    s = smoothing_scale(norm, linears, x_max, alpha, where=f"{lname}.{norm_name} -> {', '.join(names)}")
    return norm, linears, full, s
