"""What AWQ needs to know about a model family, in one small table per family.

AWQ folds a per-input-channel scale ``s`` into the op that feeds a group of linears (the previous
op's output is divided by ``s``, the linears' weight columns multiplied by ``s``) and judges each
candidate ``s`` by the error at the output of an "inspected" module. For the Llama/Qwen2 decoder
layer (transformers layout: ``self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj``,
``input_layernorm``, ``post_attention_layernorm``) the four groups are:

=========================  ===========================  ==========================  ====================
previous op                scaled linears               loss measured at            input captured at
=========================  ===========================  ==========================  ====================
input_layernorm            q_proj, k_proj, v_proj       self_attn output            q_proj input
self_attn.v_proj           o_proj                       o_proj output               o_proj input
post_attention_layernorm   gate_proj, up_proj           mlp output                  gate_proj input
mlp.up_proj                down_proj                    down_proj output            down_proj input
=========================  ===========================  ==========================  ====================

v→o under grouped-query attention (fewer v channels than o inputs): one scale per v output
channel, repeated over the query heads that share it (see :func:`expand_v_to_o`).
"""
from __future__ import annotations

import inspect

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ScaleGroup:
    prev: str  # module (relative to the decoder layer) whose output feeds ``linears``
    linears: tuple  # linears whose input channels get multiplied by s
    inspect: str  # module whose output the loss compares ("" = the single linear itself)

    @property
    def name(self) -> str:
        return f"{self.prev}->{'+'.join(n.rsplit('.', 1)[-1] for n in self.linears)}"


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple  # config.model_type values
    groups: tuple  # ScaleGroup, in search order
    linears: tuple  # every quantized linear of a decoder layer
    no_clip: tuple  # linears whose clip search is skipped (q/k: their error is softmax-amplified)


_LLAMA_GROUPS = (
    ScaleGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
    ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",), ""),
    ScaleGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
    ScaleGroup("mlp.up_proj", ("mlp.down_proj",), ""),
)
_LLAMA_LINEARS = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
)

FAMILIES = (
    Family("llama", ("llama",), _LLAMA_GROUPS, _LLAMA_LINEARS, ("self_attn.q_proj", "self_attn.k_proj")),
    Family("qwen2", ("qwen2",), _LLAMA_GROUPS, _LLAMA_LINEARS, ("self_attn.q_proj", "self_attn.k_proj")),
)
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM")


def _text_config(config):
    return getattr(config, "text_config", None) or config


def family_for(config) -> Family:
    """The :class:`Family` of a transformers config (a VLM's ``text_config`` is used when present)."""
    cfg = _text_config(config)
    model_type = cfg.get("model_type") if isinstance(cfg, dict) else getattr(cfg, "model_type", None)
    for fam in FAMILIES:
        if model_type in fam.model_types:
            return fam
    archs = config.get("architectures") if isinstance(config, dict) else getattr(config, "architectures", None)
    raise ValueError(
        f"unsupported architecture {archs or model_type!r} (model_type {model_type!r}); AWQ in tinyq supports "
        f"{', '.join(SUPPORTED_ARCHITECTURES)} and the Llama/Qwen2 language model inside a VLM"
    )


def decoder_of(model: nn.Module) -> nn.Module:
    """The module holding ``layers``, ``embed_tokens``, ``rotary_emb`` (``model.model`` for a causal
    LM, ``model.model.language_model`` for a transformers VLM)."""
    for path in ("model", "model.language_model", "language_model.model", "language_model"):
        try:
            mod = model.get_submodule(path)
        except AttributeError:
            continue
        if all(hasattr(mod, a) for a in ("layers", "embed_tokens", "rotary_emb")):
            return mod
    raise ValueError(
        f"{type(model).__name__}: no decoder with layers/embed_tokens/rotary_emb found; "
        f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
    )


def layer_kwargs(decoder: nn.Module, hidden: torch.Tensor) -> dict:
    """Keyword arguments a transformers 5.x decoder layer (and its ``self_attn``) needs for a
    full causal forward over ``hidden [B, L, H]`` without a cache: rotary ``position_embeddings``
    and the causal mask built exactly as the model itself builds it (None for SDPA, which then
    runs with ``is_causal``; an explicit mask for eager attention)."""
    from transformers.masking_utils import create_causal_mask

    seq = hidden.shape[1]
    position_ids = torch.arange(seq, device=hidden.device).unsqueeze(0)
    # transformers < 5.x (before the rename) calls the embeddings ``input_embeds`` and needs ``cache_position``
    params = inspect.signature(create_causal_mask).parameters
    kw = {"inputs_embeds" if "inputs_embeds" in params else "input_embeds": hidden}
    if "cache_position" in params:
        kw["cache_position"] = position_ids[0]
    kw["cache" if "cache" in params else "past_key_values"] = None  # renamed in transformers 5.x
    mask = create_causal_mask(config=decoder.config, attention_mask=None, position_ids=position_ids, **kw)
    return {
        "attention_mask": mask,
        "position_ids": position_ids,
        "position_embeddings": decoder.rotary_emb(hidden, position_ids=position_ids),
    }


def run_module(module: nn.Module, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """Call a decoder layer, its ``self_attn``, its ``mlp`` or a linear on ``x``; return the tensor."""
    if hasattr(module, "q_proj") and hasattr(module, "o_proj"):  # attention
        out = module(hidden_states=x, **kwargs)
    elif hasattr(module, "self_attn"):  # whole decoder layer
        out = module(x, **kwargs)
    else:  # mlp or linear
        out = module(x)
    return out[0] if isinstance(out, tuple) else out


def _gqa_geometry(attn: nn.Module):
    """(v channels, o inputs, head_dim, query heads per kv head) of an attention module."""
    n_v = attn.v_proj.out_features
    n_o = attn.o_proj.in_features
    head_dim = getattr(attn, "head_dim", None) or n_o // attn.config.num_attention_heads
    return n_v, n_o, head_dim, n_o // n_v


def expand_v_to_o(scale_v: torch.Tensor, attn: nn.Module) -> torch.Tensor:
    """Repeat a per-v-channel scale ``[Hkv*D]`` to o_proj's inputs ``[Hq*D]`` (query head h reads
    kv head ``h // (Hq/Hkv)``)."""
    n_v, n_o, head_dim, rep = _gqa_geometry(attn)
    if rep == 1:
        return scale_v
    return scale_v.view(n_v // head_dim, 1, head_dim).expand(-1, rep, -1).reshape(n_o)


def reduce_o_to_v(stat_o: torch.Tensor, attn: nn.Module) -> torch.Tensor:
    """Average a per-o-input statistic ``[Hq*D]`` over the query heads sharing each v channel."""
    n_v, n_o, head_dim, rep = _gqa_geometry(attn)
    if rep == 1:
        return stat_o
    return stat_o.view(n_v // head_dim, rep, head_dim).mean(dim=1).reshape(n_v)


def expected_linear_shapes(config: dict) -> dict:
    """``{suffix: (out_features, in_features)}`` of a decoder layer's linears, from an HF config dict."""
    cfg = config.get("text_config") or config
    hidden = cfg["hidden_size"]
    heads = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or hidden // heads
    inter = cfg["intermediate_size"]
    return {
        "self_attn.q_proj": (heads * head_dim, hidden),
        "self_attn.k_proj": (kv * head_dim, hidden),
        "self_attn.v_proj": (kv * head_dim, hidden),
        "self_attn.o_proj": (hidden, heads * head_dim),
        "mlp.gate_proj": (inter, hidden),
        "mlp.up_proj": (inter, hidden),
        "mlp.down_proj": (hidden, inter),
    }
