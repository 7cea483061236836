"""Fused one-token op for W8A8 decoder layers: the int8 q/k/v GEMV with RoPE and the KV-cache write
in its epilogue (:mod:`tinyq.kernels.int8_gemv_rope`), then the one-launch split-KV attention. One
launch less a layer, with the unfused numbers (the kernel rounds the projection as the linear
would before rotating it). It serves one token on the Triton path outside ``torch.compile``
(:func:`fused_w8a8_decode`); the weights are a W8A8 linear's, already validated when it was built.
"""
from __future__ import annotations

import math

import torch

from tinyq.backend import use_triton
from tinyq.cache.static_cache import StaticKVCache
from tinyq.kernels.int8_configs import select_config
from tinyq.kernels.int8_gemv_rope import launch_int8_gemv_rope
from tinyq.ops.attention import attend_cache, check_token_qkv
from tinyq.ops.w8a8 import QuantizedActivation


def fused_w8a8_decode(x: torch.Tensor) -> bool:
    """Whether the fused one-token op serves the hidden state ``x`` (one token, Triton path, eager
    or CUDA-graph capture but not ``torch.compile`` tracing)."""
    return x.numel() == x.shape[-1] and use_triton(x) and not torch.compiler.is_compiling()


def _gemv_config(device) -> dict:
    cfg = select_config(1, device)
    if cfg.pop("kernel") != "gemv":  # the shipped tables send M = 1 to the GEMV; a custom table must too
        raise RuntimeError("the fused W8A8 decode op needs an int8 GEMV config at M=1")
    return cfg


def w8a8_qkv_attention(x: QuantizedActivation, qweight, weight_scale, bias, cache: StaticKVCache, layer_idx: int,
                       rope, num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """One token's attention block up to the output projection: the int8 row ``x`` (``[1, 1, K]``,
    from a fused norm+quant) -> q/k/v (``qweight`` int8 ``[(Hq + 2 Hkv) D, K]``), RoPE (``rope`` a
    :class:`tinyq.kernels.rope.RopeConfig`) at ``cache.seq_pos``, k/v written into layer
    ``layer_idx``, causal attention over the cache. Returns ``[1, 1, Hq, D]`` in ``x.dtype``; like
    :func:`tinyq.ops.attention_with_cache` it does not advance the cache."""
    d, k = cache.head_dim, qweight.shape[1]
    xq = x.q
    check_token_qkv("w8a8_qkv_attention", f"{tuple(xq.shape)} {xq.dtype}",
                    xq.numel() == k and xq.dtype == torch.int8 and x.scale.numel() == 1, x.dtype, xq.device,
                    qweight.shape[0], cache, layer_idx, num_heads, num_kv_heads)
    kc, vc = cache.k[layer_idx], cache.v[layer_idx]
    q = torch.empty((1, 1, num_heads, d), dtype=x.dtype, device=xq.device)
    launch_int8_gemv_rope(xq.reshape(1, k), x.scale.reshape(1), qweight, weight_scale, bias, q, kc, vc, cache.seq_pos,
                          rope.inv_freq(xq.device), num_heads, num_kv_heads, **_gemv_config(xq.device))
    return attend_cache(q, kc, vc, cache.seq_pos, 1.0 / math.sqrt(d))

