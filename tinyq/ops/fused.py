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
started: they scale their dot products by ``1 / rms(h)``. Where ``PAIRED_DECODE`` of
:mod:`tinyq.kernels.w4a16_configs` says so (:func:`gemv_paired`), the ops that feed a GEMV write
its input in the GEMV's paired layout (:class:`~tinyq.kernels.paired.PairedRows`) and the GEMVs
read it so.

Each serves one token on the Triton path outside ``torch.compile`` (:func:`fused_decode`). The
weights must have passed ``check_w4a16_weight`` (``W4A16Linear.checked_weights``).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch

from tinyq.backend import use_triton
from tinyq.cache.static_cache import StaticKVCache
from tinyq.kernels.paired import PairedRows, empty_paired_rows, paired_plane
from tinyq.kernels.rmsnorm import rmsnorm
from tinyq.kernels.w4a16_configs import launch_plan, paired_decode
from tinyq.kernels.w4a16_gemv_residual import launch_w4a16_gemv_residual
from tinyq.kernels.w4a16_gemv_rope import launch_w4a16_gemv_rope
from tinyq.kernels.w4a16_gemv_silu import launch_w4a16_gemv_silu
from tinyq.ops.attention import attend_cache, check_token_qkv

Prenorm = Optional[Tuple[torch.Tensor, float]]  # (h, eps): the input is h * w, still to be divided by rms(h)
Row = Union[torch.Tensor, PairedRows]  # a GEMV input: one natural row, or one row in the paired layout


def fused_decode(x: torch.Tensor, scales: torch.Tensor) -> bool:
    """Whether the fused one-token ops serve ``x [..., K]`` against a W4A16 weight with ``scales``."""
    return (x.numel() == x.shape[-1] and x.dtype == scales.dtype and use_triton(x)
            and not torch.compiler.is_compiling())


def _gemv_plan(x):
    kind, cfg = launch_plan(1, x.dtype, x.get_device())
    if kind != "gemv":  # the shipped plans send M = 1 to the GEMV; a custom table must too
        raise RuntimeError(f"the fused W4A16 decode ops need a GEMV plan at M=1, got {kind!r}")
    return cfg


def gemv_paired(x: torch.Tensor) -> bool:
    """Whether the ops that feed a GEMV write its input paired on ``x``'s device (``PAIRED_DECODE``)."""
    return paired_decode(x.get_device())


def rms_norm_paired(h: torch.Tensor, weight: torch.Tensor, eps: float) -> PairedRows:
    """``rms_norm(h) * weight`` of one row ``h [..., N]`` written paired, for the GEMV that reads it."""
    return rmsnorm(h.reshape(1, h.shape[-1]), weight, eps, paired=True)


def _row(x: Row, k: int, qweight, where: str) -> Row:
    """One activation row ``[1, K]`` (any shape holding exactly K entries, e.g. ``[1, 1, Hq, D]``),
    or a :class:`PairedRows` of one row of K inputs."""
    if isinstance(x, PairedRows):
        if x.k != k or x.data.shape != (1, 4 * paired_plane(k)) or not x.data.is_contiguous():
            raise ValueError(f"{where}: paired x of {x.k} inputs, data {tuple(x.data.shape)}, is not one row of the "
                             f"weight's K={k} (expected contiguous [1, {4 * paired_plane(k)}])")
        return x
    if x.numel() != k:
        raise ValueError(f"{where}: x {tuple(x.shape)} is not one row of the weight's K={k}")
    x2 = x.reshape(1, k)
    return x2 if x2.stride(1) == 1 else x2.contiguous()


def _tensor(x: Row) -> torch.Tensor:
    return x.data if isinstance(x, PairedRows) else x


def _prenorm(prenorm: Prenorm, k: int, where: str):
    if prenorm is None:
        return None
    h, eps = prenorm
    if h.numel() != k:
        raise ValueError(f"{where}: the prenorm row has {h.numel()} entries, expected K={k}")
    return h.reshape(k), float(eps)


def w4a16_gate_up_silu(x: Row, qweight, scales, zeros, bias=None, prenorm: Prenorm = None,
                       paired_out: bool = False) -> Row:
    """``silu(x @ W_gate.T) * (x @ W_up.T)`` for one row ``x [..., K]`` or :class:`PairedRows`
    (``fused_decode`` true) and ``W = [W_gate; W_up]`` ``[2I, K]`` in tinyq int4; returns
    ``[..., I]`` (``[1, I]`` for paired x), or with ``paired_out`` the :class:`PairedRows` of it."""
    k = qweight.shape[1] * 8
    if qweight.shape[0] % 2:
        raise ValueError(f"w4a16_gate_up_silu: the weight has {qweight.shape[0]} rows, not [gate; up]")
    x2 = _row(x, k, qweight, "w4a16_gate_up_silu")
    like = _tensor(x2)
    inter = qweight.shape[0] // 2
    if paired_out:
        y = empty_paired_rows(1, inter, like.dtype, like.device)
    else:
        y = torch.empty((1, inter), dtype=like.dtype, device=like.device)
    launch_w4a16_gemv_silu(x2, qweight, scales, zeros, bias, y, prenorm=_prenorm(prenorm, k, "w4a16_gate_up_silu"),
                           **_gemv_plan(like))
    if paired_out or isinstance(x, PairedRows):
        return y
    return y.view(*x.shape[:-1], inter)


def w4a16_linear_residual(x: Row, qweight, scales, zeros, bias, residual, norm_weight=None, paired_hw: bool = False):
    """``h = x @ W.T (+ b) + residual`` for one row or :class:`PairedRows` (``fused_decode`` true);
    returns ``(h, h * w)`` with ``w = norm_weight`` (the next RMSNorm's weight; ``(h, None)``
    without it), ``h * w`` as :class:`PairedRows` with ``paired_hw``. ``h`` has residual's shape."""
    n, k = qweight.shape[0], qweight.shape[1] * 8
    x2 = _row(x, k, qweight, "w4a16_linear_residual")
    dtype = _tensor(x2).dtype
    if residual.numel() != n or residual.dtype != dtype or (norm_weight is not None and norm_weight.shape != (n,)):
        raise ValueError(f"w4a16_linear_residual: residual {tuple(residual.shape)} {residual.dtype} and norm weight "
                         f"{None if norm_weight is None else tuple(norm_weight.shape)} do not fit N={n}, {dtype}")
    h = torch.empty_like(residual)
    hw = None
    if norm_weight is not None:
        hw = empty_paired_rows(1, n, residual.dtype, residual.device) if paired_hw else torch.empty_like(residual)
    launch_w4a16_gemv_residual(x2, qweight, scales, zeros, bias, residual.reshape(n).contiguous(), norm_weight,
                               h.view(n), hw if hw is None or paired_hw else hw.view(n), **_gemv_plan(residual))
    return h, hw


def w4a16_qkv_attention(x: Row, qweight, scales, zeros, bias, cache: StaticKVCache, layer_idx: int, rope,
                        num_heads: int, num_kv_heads: int, prenorm: Prenorm = None, paired_out: bool = False) -> Row:
    """One token's attention block up to the output projection: ``x [1, 1, K]`` or one
    :class:`PairedRows` (``fused_decode`` true) -> q/k/v (``qweight`` ``[(Hq + 2 Hkv) D, K/8]``), RoPE (``rope`` a
    :class:`tinyq.kernels.rope.RopeConfig`) at ``cache.seq_pos``, k/v written into layer
    ``layer_idx``, causal attention over the cache. Returns ``[1, 1, Hq, D]`` (with ``paired_out``
    its :class:`PairedRows`, for the o_proj GEMV); like :func:`tinyq.ops.attention_with_cache` it
    does not advance the cache."""
    d, k = cache.head_dim, qweight.shape[1] * 8
    t = _tensor(x)
    check_token_qkv("w4a16_qkv_attention", str(tuple(t.shape)), isinstance(x, PairedRows) or x.shape[:-1] == (1, 1),
                    t.dtype, t.device, qweight.shape[0], cache, layer_idx, num_heads, num_kv_heads)
    x2 = _row(x, k, qweight, "w4a16_qkv_attention")
    kc, vc = cache.k[layer_idx], cache.v[layer_idx]
    q = torch.empty((1, 1, num_heads, d), dtype=t.dtype, device=t.device)
    launch_w4a16_gemv_rope(x2, qweight, scales, zeros, bias, q, kc, vc, cache.seq_pos, rope.inv_freq(t.device),
                           num_heads, num_kv_heads, prenorm=_prenorm(prenorm, k, "w4a16_qkv_attention"),
                           **_gemv_plan(t))
    out = empty_paired_rows(1, num_heads * d, t.dtype, t.device) if paired_out else None
    return attend_cache(q, kc, vc, cache.seq_pos, 1.0 / math.sqrt(d), out=out)
