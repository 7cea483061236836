"""The Llama family (Llama-2/3/3.1, Vicuna, SmolLM2, DeepSeek-R1-Distill-Llama) and Qwen2 (Qwen2/2.5,
DeepSeek-R1-Distill-Qwen): one decoder, two small differences (Qwen2 has q/k/v biases and often tied
embeddings).

Layer shapes (H hidden, Hq/Hkv heads, D head dim, I intermediate)::

    x [B, S, H] -> add+RMSNorm -> qkv_proj [H -> (Hq + 2 Hkv) D] -> RoPE + cached attention -> o_proj
                -> add+RMSNorm -> gate_up_proj [H -> 2I] -> silu(gate) * up -> down_proj [I -> H]

q/k/v and gate/up are fused into one linear each at load time (see :mod:`tinyq.models.loader`), so a
decode step runs 4 GEMVs per layer instead of 7. Linears are :class:`tinyq.nn.DenseLinear` (fp16/bf16/fp32) or
:class:`tinyq.W4A16Linear`. The residual stream is carried beside the hidden state so that each
residual add is fused into the following RMSNorm.

One token through an all-W4A16 model takes a fused path (:meth:`CausalLM.forward` ->
``_one_token_w4a16``, ops in :mod:`tinyq.ops.fused`): per layer the qkv GEMV with RoPE and the cache
write, the attention, o_proj with the residual add, gate/up with silu(gate) * up, down_proj with the
residual add; each norm is finished inside the GEMV after it. 5 launches a layer instead of 10.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from tinyq.cache import StaticKVCache
from tinyq.generate import generate
from tinyq.kernels.flash_attention import check_head_dim
from tinyq.kernels.rope import RopeConfig, apply_rope_reference
from tinyq.nn.dense_linear import DenseLinear
from tinyq.nn.w4a16_linear import W4A16Linear
from tinyq.ops.attention import attention_with_cache
from tinyq.ops.fused import (
    fused_decode, gemv_paired, rms_norm_paired, w4a16_gate_up_silu, w4a16_linear_residual, w4a16_qkv_attention,
)
from tinyq.ops.norm import add_rms_norm, rms_norm, silu_mul

# The one-token path finishes each RMSNorm inside the next GEMV (every program recomputes 1/rms of
# the row) up to this hidden size; above it a norm kernel is cheaper (H200: SmolLM2 hidden 576
# gained 26 us a token, Llama-3-8B hidden 4096 lost 130 us; docs/perf_notes.md).
PRENORM_MAX_HIDDEN = 1024

# HF architectures -> family flavour; the loader lists these in its "unsupported" error.
ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "MistralForCausalLM": "llama"}
MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "mistral": "llama"}
# transformers' ACT2FN maps both names to SiLU, the activation of tinyq's MLP (silu(gate) * up)
SILU_ACTS = ("silu", "swish")
# transformers' MistralConfig.sliding_window and Qwen2Config.sliding_window when config.json has no such key
DEFAULT_WINDOW = 4096
# transformers' Qwen2Config.max_window_layers when config.json has no such key
QWEN2_DEFAULT_MAX_WINDOW_LAYERS = 28


@dataclass
class ModelConfig:
    """What the decoder needs from an HF ``config.json``."""

    arch: str  # "llama" | "qwen2"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    qkv_bias: bool = False
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    bos_token_id: Optional[int] = None
    eos_token_ids: list = field(default_factory=list)
    # Mistral's sliding-window attention: tinyq runs full attention, which is the same computation
    # for sequences of at most this many tokens, and refuses longer ones.
    sliding_window: Optional[int] = None

    @classmethod
    def from_hf(cls, hf: dict) -> "ModelConfig":
        """From a ``config.json`` dict, read as transformers reads it. Raises ValueError for an
        unsupported architecture or a setting tinyq's decoder would silently compute differently."""
        archs = hf.get("architectures") or []
        arch = next((ARCHITECTURES[a] for a in archs if a in ARCHITECTURES), None)
        arch = arch or MODEL_TYPES.get(hf.get("model_type"))
        if arch is None:
            raise ValueError(
                f"unsupported architecture {archs or hf.get('model_type')!r}; supported: {sorted(ARCHITECTURES)}"
            )
        mistral = "MistralForCausalLM" in archs or hf.get("model_type") == "mistral"
        family = "mistral" if mistral else arch
        check_mlp_activation(hf)
        check_biases(hf, family)
        heads = int(hf["num_attention_heads"])
        head_dim = int(hf.get("head_dim") or hf["hidden_size"] // heads)
        check_head_dim(head_dim, "model config")  # the attention kernels' (and the CPU path's) limits
        eos = hf.get("eos_token_id")
        eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        return cls(
            arch=arch,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=int(hf["hidden_size"]),
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=head_dim,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope=RopeConfig.from_hf(hf, head_dim=head_dim),
            qkv_bias=arch == "qwen2",  # transformers' Qwen2 always has them (it reads no attention_bias)
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos,
            sliding_window=sliding_window(hf, family),
        )

    def check_window(self, n_tokens: int) -> None:
        """Raise ValueError if a sequence of ``n_tokens`` needs sliding-window attention."""
        if self.sliding_window is not None and n_tokens > self.sliding_window:
            raise ValueError(
                f"{n_tokens} tokens exceed the model's sliding_window={self.sliding_window}: tinyq runs full "
                f"attention, which matches the windowed model only up to {self.sliding_window} tokens (a Mistral "
                f"config.json without sliding_window gets transformers' default, {DEFAULT_WINDOW}; null "
                "means no window)"
            )


def check_mlp_activation(hf: dict) -> None:
    """transformers applies ``ACT2FN[hidden_act]`` to the gate; tinyq's MLP computes silu(gate) * up."""
    act = hf.get("hidden_act", "silu")
    if act not in SILU_ACTS:
        raise ValueError(f"hidden_act={act!r} is not supported: tinyq's MLP computes silu(gate) * up "
                         f"(hidden_act one of {SILU_ACTS})")


def check_biases(hf: dict, family: str) -> None:
    """transformers' Llama puts attention_bias on q/k/v and o_proj, and mlp_bias on gate/up/down; tinyq's
    decoder has biases on q/k/v only (Qwen2's), so such a checkpoint would lose some. transformers'
    Qwen2 and Mistral hard-code their biases and read neither key, so neither does tinyq there."""
    if family != "llama":
        return
    for key, where in (("attention_bias", "on q/k/v and o_proj"), ("mlp_bias", "on the MLP's linears")):
        if hf.get(key):
            raise ValueError(f"{key}={hf[key]!r} (biases {where}) is not supported for Llama models; "
                             "Qwen2's q/k/v biases are")


def sliding_window(hf: dict, family: str) -> Optional[int]:
    """The attention window transformers applies to this config (None: full attention everywhere).

    Mistral windows every layer with ``sliding_window``, 4096 when the key is absent (only an explicit
    null turns it off). Qwen2 windows only when ``use_sliding_window``, and only the layers that
    ``layer_types`` marks (by default those from ``max_window_layers`` on): tinyq refuses those. Llama
    has no window."""
    if family == "mistral":
        window = hf.get("sliding_window", DEFAULT_WINDOW)
        if window is None:
            return None
        if int(window) <= 0:
            raise ValueError(f"sliding_window={window!r} must be a positive number of tokens or null")
        return int(window)
    qwen2_window = hf.get("sliding_window", DEFAULT_WINDOW)
    if family == "qwen2" and hf.get("use_sliding_window") and qwen2_window is not None:
        windowed = qwen2_windowed_layers(hf)
        if windowed:
            source = ("layer_types" if hf.get("layer_types") else
                      f"max_window_layers={hf.get('max_window_layers', QWEN2_DEFAULT_MAX_WINDOW_LAYERS)}")
            raise ValueError(
                f"use_sliding_window=True with sliding_window={qwen2_window} windows the attention of "
                f"layers {windowed} ({source}); Qwen2's per-layer sliding-window attention is not supported"
            )
    return None


def qwen2_windowed_layers(hf: dict) -> list:
    """The layers transformers' Qwen2Config marks ``sliding_attention``: from ``layer_types`` when given,
    else layer i >= max_window_layers (all full attention when max_window_layers >= num_hidden_layers)."""
    n = int(hf["num_hidden_layers"])
    first = int(hf.get("max_window_layers", QWEN2_DEFAULT_MAX_WINDOW_LAYERS))
    types = hf.get("layer_types") or ["sliding_attention" if i >= first else "full_attention" for i in range(n)]
    return [i for i, t in enumerate(types) if t == "sliding_attention"]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x, residual=None):
        """Without ``residual``: the norm of ``x``. With it: ``(norm(x + residual), x + residual)``."""
        if residual is None:
            return rms_norm(x, self.weight, self.eps)
        return add_rms_norm(x, residual, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.hq, self.hkv, self.d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.rope = cfg.rope
        self.qkv_proj = DenseLinear(cfg.hidden_size, (self.hq + 2 * self.hkv) * self.d, bias=cfg.qkv_bias)
        self.o_proj = DenseLinear(self.hq * self.d, cfg.hidden_size, bias=False)

    def forward(self, x, cache=None):
        b, s, _ = x.shape
        qkv = self.qkv_proj(x)  # [B, S, (Hq + 2 Hkv) D]
        q, k, v = qkv.split([self.hq * self.d, self.hkv * self.d, self.hkv * self.d], dim=-1)
        q = q.view(b, s, self.hq, self.d)
        k = k.view(b, s, self.hkv, self.d)
        v = v.view(b, s, self.hkv, self.d)
        if cache is not None:
            out = attention_with_cache(q, k, v, cache, self.layer_idx, self.rope)  # [B, S, Hq, D]
        else:
            out = self._uncached(q, k, v)
        return self.o_proj(out.reshape(b, s, self.hq * self.d))

    def _uncached(self, q, k, v):
        """Whole-sequence causal attention from position 0 (no cache): torch SDPA."""
        pos = torch.arange(q.shape[1], device=q.device)
        q = apply_rope_reference(q, pos, self.rope).to(q.dtype).transpose(1, 2)  # [B, Hq, S, D]
        k = apply_rope_reference(k, pos, self.rope).to(k.dtype).transpose(1, 2)
        v = v.transpose(1, 2)
        if self.hkv != self.hq:
            k = k.repeat_interleave(self.hq // self.hkv, dim=1)
            v = v.repeat_interleave(self.hq // self.hkv, dim=1)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up_proj = DenseLinear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = DenseLinear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(silu_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, h, residual, cache=None):
        """``h`` the previous sublayer's output, ``residual`` the stream before it (None at layer 0)."""
        if residual is None:
            x, residual = self.input_layernorm(h), h
        else:
            x, residual = self.input_layernorm(h, residual)
        h = self.self_attn(x, cache)
        x, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(x), residual


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class CausalLM(nn.Module):
    """Parameter names follow HF's ``LlamaForCausalLM`` except the fused ``qkv_proj`` / ``gate_up_proj``.

    Build it on the ``meta`` device and let the loader assign weights (``tinyq.models.load_model``).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Decoder(cfg)
        self.lm_head = DenseLinear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.max_seq_len = min(cfg.max_position_embeddings, cfg.sliding_window or cfg.max_position_embeddings)

    def tie_weights(self):
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The activation dtype (that of the embeddings)."""
        return self.model.embed_tokens.weight.dtype

    def new_cache(self, max_seq_len: Optional[int] = None, batch_size: int = 1):
        """A :class:`tinyq.cache.StaticKVCache` sized for this model, on its device, in its dtype."""
        c = self.config
        c.check_window(int(max_seq_len or self.max_seq_len))
        return StaticKVCache(
            c.num_layers, c.num_kv_heads, c.head_dim, int(max_seq_len or self.max_seq_len), batch_size,
            dtype=self.dtype, device=self.device,
        )

    def generate(self, tokenizer, prompt, **settings):
        """Generate from ``prompt`` (string or ids): see :func:`tinyq.generate.generate`."""
        return generate(self, tokenizer, prompt, **settings)

    def forward(self, input_ids: Optional[torch.Tensor], cache=None, last_only: bool = False,
                inputs_embeds: Optional[torch.Tensor] = None, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``input_ids`` int ``[B, S]`` -> logits ``[B, S, vocab]`` (``[B, 1, vocab]`` if ``last_only``).

        With a cache the tokens sit at positions ``cache.length ..`` and the cache advances by S;
        without one they are a whole sequence from position 0. ``inputs_embeds`` ``[B, S, hidden]``
        replaces ``input_ids`` (pass ``None`` for it): the embeddings with image features spliced in.

        ``valid`` (an integer tensor ``[1]`` on the device, with a cache): only the first ``valid``
        of the S rows are real, the rest padding (a CUDA graph captured for a chunk length S serves
        every shorter chunk). Causality keeps the real rows blind to the padding; the logits are
        those of row ``valid - 1`` (``[B, 1, vocab]``), and only the cache's device counter
        advances, by ``valid``: the padding's keys/values lie past the fill level, stale. The
        caller advances ``cache.length``.
        """
        if inputs_embeds is not None:
            if input_ids is not None or inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.hidden_size:
                raise ValueError(f"inputs_embeds must be [B, S, {self.config.hidden_size}] and input_ids None, got "
                                 f"{tuple(inputs_embeds.shape)} and {type(input_ids).__name__}")
            h = inputs_embeds.to(self.dtype)
        elif input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, S], got shape {tuple(input_ids.shape)}")
        else:
            h = self.model.embed_tokens(input_ids)
        n = h.shape[1]
        if cache is not None:
            cache.check_room(n)
        if self.config.sliding_window is not None:
            self.config.check_window((cache.length if cache is not None else 0) + n)
        if cache is not None and valid is None and self._w4a16_token(h):
            x = self._one_token_w4a16(h, cache)
        else:
            x = self._layers(h, cache, valid, last_only)
        if cache is not None:
            if valid is not None:
                cache.advance_on_device(valid)
            else:
                cache.advance(n)
        return self.lm_head(x)

    def _layers(self, h, cache, valid, last_only):
        """The decoder stack, any number of tokens; returns the final norm's output (of the rows kept)."""
        residual = None
        for layer in self.model.layers:
            h, residual = layer(h, residual, cache)
        if valid is not None:
            last = (valid - 1).to(torch.long)  # on the device: no host read
            h, residual = h.index_select(1, last), residual.index_select(1, last)
        elif last_only:
            h, residual = h[:, -1:], residual[:, -1:]
        return self.model.norm(h, residual)[0]

    def _w4a16_token(self, h) -> bool:
        """Whether ``h [1, 1, hidden]`` can take the fused one-token path: every linear of every layer
        a W4A16Linear in h's dtype and every norm a plain RMSNorm."""
        if not (h.shape[0] == h.shape[1] == 1 and fused_decode(h, h)):
            return False
        for layer in self.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            for lin in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj):
                if type(lin) is not W4A16Linear or lin.scales.dtype != h.dtype:
                    return False
            if type(layer.input_layernorm) is not RMSNorm or type(layer.post_attention_layernorm) is not RMSNorm:
                return False
        return True

    def _one_token_w4a16(self, h, cache):
        """The decoder stack for one token with the fused ops; returns the final norm's output.

        Each projection that closes a sublayer writes the new residual stream ``h`` (the add is in its
        epilogue). Up to ``PRENORM_MAX_HIDDEN`` it also writes ``h * w`` of the norm that follows and
        the GEMV after that norm divides by ``rms(h)`` itself (``prenorm``); above, a norm kernel runs."""
        layers = self.model.layers
        defer = h.shape[-1] <= PRENORM_MAX_HIDDEN
        paired = gemv_paired(h)  # GEMV inputs written in the GEMV's paired layout (PAIRED_DECODE)

        def norm(h, hw, rms: RMSNorm):
            """The norm after a projection that wrote ``h`` (and ``hw = [h * w]`` when deferring): the
            next GEMV's input and prenorm."""
            if defer:
                return hw[0], (h, rms.eps)
            return (rms_norm_paired(h, rms.weight, rms.eps) if paired else rms(h)), None

        first = layers[0].input_layernorm
        x, prenorm = (rms_norm_paired(h, first.weight, first.eps) if paired else first(h)), None
        for i, layer in enumerate(layers):
            attn, mlp, post = layer.self_attn, layer.mlp, layer.post_attention_layernorm
            a = w4a16_qkv_attention(x, *attn.qkv_proj.checked_weights(), cache, i, attn.rope, attn.hq, attn.hkv,
                                    prenorm=prenorm, paired_out=paired)
            h, *hw_next = w4a16_linear_residual(a, *attn.o_proj.checked_weights(), h, post.weight if defer else None,
                                                paired_hw=paired)
            x, prenorm = norm(h, hw_next, post)
            act = w4a16_gate_up_silu(x, *mlp.gate_up_proj.checked_weights(), prenorm=prenorm, paired_out=paired)
            nxt = layers[i + 1].input_layernorm if i + 1 < len(layers) else self.model.norm
            h, *hw_next = w4a16_linear_residual(act, *mlp.down_proj.checked_weights(), h,
                                                nxt.weight if defer and i + 1 < len(layers) else None,
                                                paired_hw=paired)
            if i + 1 < len(layers):
                x, prenorm = norm(h, hw_next, nxt)
        return self.model.norm(h)
