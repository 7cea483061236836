"""Fused one-token ops for W4A16 decoder layers: each GEMV launch does a projection and what
surrounds it.

At one token a decoder layer is a chain of microsecond kernels, and a small model's step time is
their count: SmolLM2-135M ran 10 launches a layer (norm, qkv, RoPE + cache write, attention,
combine, o_proj, add + norm, gate_up, SiLU, down). With these ops it runs 5:

- :func:`w4a16_qkv_attention`: the q/k/v projection with RoPE and the cache write in its
  epilogue (:mod:`tinyq.kernels.w4a16_gemv_rope`), then the one-launch split-KV attention;
- :func:`w4a16_linear_residual`: o_proj or down_proj with the residual add in its epilogue, also
  writing ``h * w`` of the next RMSNorm (:mod:`tinyq.kernels.w4a16_gemv_residual`);
- :func:`w4a16_gate_up_silu`: the gate/up projection with the SiLU-gated product in its epilogue
  (:mod:`tinyq.kernels.w4a16_gemv_silu`).

The qkv and gate/up ops take ``prenorm=(h, eps)`` to finish the RMSNorm that the previous op
started: they scale their dot products by ``1 / rms(h)``.

Each serves one token on the Triton path outside ``torch.compile`` (:func:`fused_decode`). The
weights must have passed ``check_w4a16_weight`` (``W4A16Linear.checked_weights``).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from tinyq.backend import use_triton
from tinyq.cache.static_cache import StaticKVCache
from tinyq.kernels.w4a16_configs import launch_plan
from tinyq.kernels.w4a16_gemv_residual import launch_w4a16_gemv_residual
from tinyq.kernels.w4a16_gemv_rope import launch_w4a16_gemv_rope
from tinyq.kernels.w4a16_gemv_silu import launch_w4a16_gemv_silu
from tinyq.ops.attention import attend_cache

Prenorm = Optional[Tuple[torch.Tensor, float]]  # (h, eps): the input is h * w, still to be divided by rms(h)


def fused_decode(x: torch.Tensor, scales: torch.Tensor) -> bool:
    """Whether the fused one-token ops serve ``x [..., K]`` against a W4A16 weight with ``scales``."""
    return (x.numel() == x.shape[-1] and x.dtype == scales.dtype and use_triton(x)
            and not torch.compiler.is_compiling())


def _gemv_plan(x):
    kind, cfg = launch_plan(1, x.dtype, x.get_device())
    if kind != "gemv":  # the shipped plans send M = 1 to the GEMV; a custom table must too
        raise RuntimeError(f"the fused W4A16 decode ops need a GEMV plan at M=1, got {kind!r}")
    return cfg


def _row(x: torch.Tensor, k: int, qweight, where: str) -> torch.Tensor:
    """One activation row ``[1, K]`` (any shape holding exactly K entries, e.g. ``[1, 1, Hq, D]``)."""
    if x.numel() != k:
        raise ValueError(f"{where}: x {tuple(x.shape)} is not one row of the weight's K={k}")
    x2 = x.reshape(1, k)
    return x2 if x2.stride(1) == 1 else x2.contiguous()


def _prenorm(prenorm: Prenorm, k: int, where: str):
    if prenorm is None:
        return None
    h, eps = prenorm
    if h.numel() != k:
        raise ValueError(f"{where}: the prenorm row has {h.numel()} entries, expected K={k}")
    return h.reshape(k), float(eps)


def w4a16_gate_up_silu(x, qweight, scales, zeros, bias=None, prenorm: Prenorm = None) -> torch.Tensor:
    """``silu(x @ W_gate.T) * (x @ W_up.T)`` for one row ``x [..., K]`` (``fused_decode`` true) and
    ``W = [W_gate; W_up]`` ``[2I, K]`` in tinyq int4; returns ``[..., I]``."""
    k = qweight.shape[1] * 8
    if qweight.shape[0] % 2:
        raise ValueError(f"w4a16_gate_up_silu: the weight has {qweight.shape[0]} rows, not [gate; up]")
    x2 = _row(x, k, qweight, "w4a16_gate_up_silu")
    y = torch.empty((1, qweight.shape[0] // 2), dtype=x.dtype, device=x.device)
    launch_w4a16_gemv_silu(x2, qweight, scales, zeros, bias, y, prenorm=_prenorm(prenorm, k, "w4a16_gate_up_silu"),
                           **_gemv_plan(x))
    return y.view(*x.shape[:-1], y.shape[1])


def w4a16_linear_residual(x, qweight, scales, zeros, bias, residual, norm_weight=None):
    """``h = x @ W.T (+ b) + residual`` for one row (``fused_decode`` true); returns ``(h, h * w)``
    with ``w = norm_weight`` (the next RMSNorm's weight; ``(h, None)`` without it)."""
    n, k = qweight.shape[0], qweight.shape[1] * 8
    x2 = _row(x, k, qweight, "w4a16_linear_residual")
    if residual.numel() != n or residual.dtype != x.dtype or (norm_weight is not None and norm_weight.shape != (n,)):
        raise ValueError(f"w4a16_linear_residual: residual {tuple(residual.shape)} {residual.dtype} and norm weight "
                         f"{None if norm_weight is None else tuple(norm_weight.shape)} do not fit N={n}, {x.dtype}")
    h = torch.empty_like(residual)
    hw = torch.empty_like(residual) if norm_weight is not None else None
    launch_w4a16_gemv_residual(x2, qweight, scales, zeros, bias, residual.reshape(n).contiguous(), norm_weight,
                               h.view(n), None if hw is None else hw.view(n), **_gemv_plan(x))
    return h, hw


def w4a16_qkv_attention(x, qweight, scales, zeros, bias, cache: StaticKVCache, layer_idx: int, rope,
                        num_heads: int, num_kv_heads: int, prenorm: Prenorm = None) -> torch.Tensor:
    """One token's attention block up to the output projection: ``x [1, 1, K]`` (``fused_decode``
    true) -> q/k/v (``qweight`` ``[(Hq + 2 Hkv) D, K/8]``), RoPE (``rope`` a
    :class:`tinyq.kernels.rope.RopeConfig`) at ``cache.seq_pos``, k/v written into layer
    ``layer_idx``, causal attention over the cache. Returns ``[1, 1, Hq, D]``; like
    :func:`tinyq.ops.attention_with_cache` it does not advance the cache."""
    d, k = cache.head_dim, qweight.shape[1] * 8
    if (x.shape[:-1] != (1, 1) or cache.batch_size != 1 or num_kv_heads != cache.num_kv_heads
            or qweight.shape[0] != (num_heads + 2 * num_kv_heads) * d):
        raise ValueError(f"w4a16_qkv_attention: x {tuple(x.shape)}, weight rows {qweight.shape[0]}, {num_heads} "
                         f"heads and {num_kv_heads} kv heads do not fit the cache (batch {cache.batch_size}, "
                         f"{cache.num_kv_heads} kv heads, head_dim {d})")
    if x.dtype != cache.dtype or x.device != cache.device:
        raise ValueError(f"w4a16_qkv_attention: x is {x.dtype} on {x.device}, the cache {cache.dtype} on {cache.device}")
    if not 0 <= layer_idx < cache.num_layers:
        raise ValueError(f"w4a16_qkv_attention: layer_idx {layer_idx} out of range [0, {cache.num_layers})")
    x2 = _row(x, k, qweight, "w4a16_qkv_attention")
    cache.check_room(1)
    kc, vc = cache.k[layer_idx], cache.v[layer_idx]
    q = torch.empty((1, 1, num_heads, d), dtype=x.dtype, device=x.device)
    launch_w4a16_gemv_rope(x2, qweight, scales, zeros, bias, q, kc, vc, cache.seq_pos, rope.inv_freq(x.device),
                           num_heads, num_kv_heads, prenorm=_prenorm(prenorm, k, "w4a16_qkv_attention"),
                           **_gemv_plan(x))
    return attend_cache(q, kc, vc, cache.seq_pos, 1.0 / math.sqrt(d))
