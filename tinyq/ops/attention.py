"""Functional attention ops: attention over the static KV cache (with fused RoPE) and plain flash
attention (vision towers, cache-free prefill).

Both are torch custom ops (``tinyq::attention_with_cache`` mutates the cache tensors;
``tinyq::flash_attention`` is pure) with fake implementations, so models using them work under
``torch.compile`` and CUDA-graph capture. CUDA tensors run the Triton kernels; CPU tensors run
the float32 torch path (fast enough to chat with a small model on a CPU).

Dispatch of ``attention_with_cache`` on ``L`` new tokens (L is a shape: static under capture):
one fused RoPE + cache-write launch, then :func:`attend_cache`: a query block whose ``L * G`` rows
fit one tile (decode, a chat turn's chunk) -> the split-KV kernel
(:mod:`tinyq.kernels.decode_attention`), else the flash kernel over the cache with the causal
offset (:mod:`tinyq.kernels.flash_attention`, long prefill chunks).
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F

from tinyq.backend import use_triton
from tinyq.cache.static_cache import StaticKVCache
from tinyq.kernels.decode_attention import MAX_DECODE_ROWS, decode_attention
from tinyq.kernels.flash_attention import KERNEL_DTYPES, check_attention_args, flash_attention_fwd
from tinyq.kernels.rope import RopeConfig, apply_rope_reference, rope_cache_write


def attend_cache(q_rot, kc, vc, seq_pos, scale: float, out=None):
    """Causal attention of ``L`` rotated queries ``[B, L, Hq, D]`` whose keys/values are already in
    the cache layer ``kc, vc [B, Hkv, max_seq_len, D]`` at ``seq_pos .. seq_pos + L``: the kernel
    choice of :func:`attention_with_cache` (Triton tensors). ``out``: where the decode kernel writes
    (a :class:`~tinyq.kernels.paired.PairedRows` for one token)."""
    if q_rot.shape[1] * (q_rot.shape[2] // kc.shape[1]) <= MAX_DECODE_ROWS:
        return decode_attention(q_rot, kc, vc, seq_pos, scale, out=out)
    if out is not None:
        raise ValueError(f"attend_cache: {q_rot.shape[1]} tokens of {q_rot.shape[2]} heads take the flash kernel, "
                         "which writes no given output")
    return flash_attention_fwd(q_rot, kc, vc, causal=True, scale=scale, seq_pos=seq_pos)


def check_token_qkv(where: str, x_desc: str, one_token: bool, dtype, device, qkv_rows: int, cache, layer_idx: int,
                    num_heads: int, num_kv_heads: int) -> None:
    """The checks of a fused one-token q/k/v projection into layer ``layer_idx`` of ``cache``: one
    token (``x_desc`` names the input in the error), a weight of ``(Hq + 2 Hkv) D`` rows, the cache's
    kv heads, dtype and device, and room for the token."""
    d = cache.head_dim
    if (not one_token or cache.batch_size != 1 or num_kv_heads != cache.num_kv_heads
            or qkv_rows != (num_heads + 2 * num_kv_heads) * d):
        raise ValueError(f"{where}: x {x_desc}, weight rows {qkv_rows}, {num_heads} heads and {num_kv_heads} kv heads "
                         f"do not fit one token and the cache (batch {cache.batch_size}, {cache.num_kv_heads} kv heads, "
                         f"head_dim {d})")
    if dtype != cache.dtype or device != cache.device:
        raise ValueError(f"{where}: x is {dtype} on {device}, the cache {cache.dtype} on {cache.device}")
    if not 0 <= layer_idx < cache.num_layers:
        raise ValueError(f"{where}: layer_idx {layer_idx} out of range [0, {cache.num_layers})")
    cache.check_room(1)


def _check_qkv(where, q, k, v):
    """q ``[B, L, Hq, D]``, k/v ``[B, L, Hkv, D]`` on one device; the rest is the kernels' shared check."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"{where}: q, k, v must be 4-D [B, L, heads, D], got {q.dim()}-D, {k.dim()}-D, {v.dim()}-D")
    devs = {t.device for t in (q, k, v)}
    if len(devs) != 1:
        raise ValueError(f"{where}: q, k, v are on different devices: {sorted(map(str, devs))}")
    if k.shape[1] != q.shape[1]:
        raise ValueError(f"{where}: k/v {tuple(k.shape)} do not match q {tuple(q.shape)} in length")
    dtypes = KERNEL_DTYPES if q.is_cuda else KERNEL_DTYPES + (torch.float32,)
    check_attention_args(where, q, k.transpose(1, 2), v.transpose(1, 2), dtypes)


def _torch_attention(q, k, v, causal: bool, scale: float, kv_len: int) -> torch.Tensor:
    """CPU path: torch's fused SDPA in float32 (~10x faster on a CPU than the explicit reference
    at 1000 tokens). q ``[B, L, Hq, D]``, k/v ``[B, Hkv, S, D]``; returns float32 ``[B, L, Hq, D]``."""
    L = q.shape[1]
    qh = q.float().transpose(1, 2)  # [B, Hq, L, D]
    kh, vh = k[:, :, :kv_len].float(), v[:, :, :kv_len].float()  # no copy for an fp32 cache
    mask, is_causal = None, False
    if causal and L > 1:
        # torch's CPU kernel applies is_causal's -inf before the scale (torch 2.13): a scale <= 0
        # makes it +inf or NaN and every row but the first NaN; the boolean mask applies after it
        if kv_len == L and scale > 0:
            is_causal = True
        else:  # chunk at offset kv_len - L: bottom-right aligned causality
            i = torch.arange(L, device=q.device)[:, None]
            mask = torch.arange(kv_len, device=q.device)[None, :] <= (kv_len - L) + i
    gqa = qh.shape[1] != kh.shape[1]
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=gqa)
    # The fused CPU kernel returns zeros for a query row holding inf/NaN, where the reference and
    # the Triton kernels give NaN (every score of such a row is NaN or +-inf). Marking the rows
    # costs one pass over q; the math backend, which propagates, is ~8x slower at 1000 tokens.
    # In place: SDPA's own layout (what the fake implementations' strides match) is kept.
    out.masked_fill_(~torch.isfinite(qh).all(-1, keepdim=True), float("nan"))
    return out.transpose(1, 2)


# ---------------------------------------------------------------- attention over the KV cache


def _attention_with_cache_impl(q, k, v, k_cache, v_cache, seq_pos, inv_freq, layer_idx: int, scale: float):
    kc, vc = k_cache[layer_idx], v_cache[layer_idx]  # [B, Hkv, max_seq_len, D] views
    L = q.shape[1]
    if use_triton(q):
        return attend_cache(rope_cache_write(q, k, v, kc, vc, seq_pos, inv_freq), kc, vc, seq_pos, scale)
    # torch path (CPU): the host knows the position; no device sync on a CPU tensor.
    pos = int(seq_pos[0])
    positions = torch.arange(pos, pos + L, device=q.device)
    q_rot = apply_rope_reference(q, positions, inv_freq)  # fp32 [B, L, Hq, D]
    kc[:, :, pos:pos + L].copy_(apply_rope_reference(k, positions, inv_freq).transpose(1, 2))
    vc[:, :, pos:pos + L].copy_(v.transpose(1, 2))
    return _torch_attention(q_rot, kc, vc, True, scale, pos + L).to(q.dtype)


@torch.library.custom_op("tinyq::attention_with_cache", mutates_args=("k_cache", "v_cache"))
def _attention_with_cache_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    seq_pos: torch.Tensor, inv_freq: torch.Tensor, layer_idx: int, scale: float,
) -> torch.Tensor:
    return _attention_with_cache_impl(q, k, v, k_cache, v_cache, seq_pos, inv_freq, layer_idx, scale)


@_attention_with_cache_op.register_fake
def _(q, k, v, k_cache, v_cache, seq_pos, inv_freq, layer_idx, scale):
    return torch.empty_like(q)


def attention_with_cache(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: StaticKVCache, layer_idx: int,
    rope: Union[RopeConfig, torch.Tensor], scale: Optional[float] = None,
) -> torch.Tensor:
    """Causal attention of ``L`` new tokens over the cache, with RoPE and the cache write fused.

    q ``[B, L, Hq, D]``, k/v ``[B, L, Hkv, D]`` (before RoPE; fp16/bf16, fp32 on CPU), same dtype
    as the cache. Rotates q and k at positions ``cache.seq_pos .. +L``, writes k and v into layer
    ``layer_idx``, attends to cache positions ``[0, pos + L)``. Returns ``[B, L, Hq, D]``.
    Does not advance the cache: call ``cache.advance(L)`` once after all layers.
    ``rope`` is a :class:`RopeConfig` or a float32 ``inv_freq [D/2]``. ``scale`` defaults to
    ``1/sqrt(D)``. Every check runs before anything is written: bad input leaves the cache as it was.
    """
    where = "attention_with_cache"
    _check_qkv(where, q, k, v)
    B, L, HQ, D = q.shape
    if not isinstance(cache, StaticKVCache):
        raise ValueError(f"{where}: cache must be a StaticKVCache, got {type(cache).__name__}")
    if q.device != cache.device:
        raise ValueError(f"{where}: q is on {q.device} but the cache is on {cache.device}")
    if q.dtype != cache.dtype:
        raise ValueError(f"{where}: q/k/v dtype {q.dtype} differs from the cache dtype {cache.dtype}")
    if B != cache.batch_size or k.shape[2] != cache.num_kv_heads or D != cache.head_dim:
        raise ValueError(
            f"{where}: k {tuple(k.shape)} does not fit the cache (batch {cache.batch_size}, "
            f"{cache.num_kv_heads} kv heads, head_dim {cache.head_dim})"
        )
    # bool is an int subclass: True would index the layer dim as a new axis, not layer 1
    if not isinstance(layer_idx, int) or isinstance(layer_idx, bool) or not 0 <= layer_idx < cache.num_layers:
        raise ValueError(f"{where}: layer_idx {layer_idx!r} out of range [0, {cache.num_layers})")
    if not torch.compiler.is_compiling():  # a host-int guard would recompile every step
        cache.check_room(L)
    if isinstance(rope, RopeConfig):
        if rope.head_dim != D:
            raise ValueError(f"{where}: rope head_dim {rope.head_dim} != q head_dim {D}")
        inv_freq = rope.inv_freq(q.device)
    else:
        inv_freq = rope
        if inv_freq.shape != (D // 2,) or inv_freq.dtype != torch.float32 or inv_freq.device != q.device:
            raise ValueError(f"{where}: inv_freq must be float32 [{D // 2}] on {q.device}, got "
                             f"{inv_freq.dtype} {tuple(inv_freq.shape)} on {inv_freq.device}")
        if inv_freq.stride(0) != 1:  # the RoPE kernel reads it at unit stride (a column of a table, say)
            inv_freq = inv_freq.contiguous()
    q, k, v = (_unit_last_stride(t) for t in (q, k, v))
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    op = _attention_with_cache_op if torch.compiler.is_compiling() else _attention_with_cache_impl
    return op(q, k, v, cache.k, cache.v, cache.seq_pos, inv_freq, layer_idx, scale)


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    """The kernels index head_dim with unit stride; copy only when a view breaks that."""
    return t if t.stride(-1) == 1 else t.contiguous()


# ---------------------------------------------------------------- attention without a cache


def _flash_attention_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float) -> torch.Tensor:
    kh, vh = k.transpose(1, 2), v.transpose(1, 2)  # [B, Hkv, S, D] views
    if use_triton(q):
        return flash_attention_fwd(q, kh, vh, causal=causal, scale=scale)
    return _torch_attention(q, kh, vh, causal, scale, kh.shape[2]).to(q.dtype)


_flash_attention_op = torch.library.custom_op("tinyq::flash_attention", _flash_attention_impl, mutates_args=())


@_flash_attention_op.register_fake
def _(q, k, v, causal, scale):
    return torch.empty_like(q)


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                    scale: Optional[float] = None) -> torch.Tensor:
    """``softmax(scale * q k^T [+ causal mask]) v`` without a cache or RoPE.

    q ``[B, S, Hq, D]``, k/v ``[B, S, Hkv, D]`` (fp16/bf16; fp32 on CPU); ``Hq`` a multiple of
    ``Hkv``; head_dim a multiple of 8 in [16, 256] (64, 72, 80, 96, 128...). Returns ``[B, S, Hq, D]``.
    """
    _check_qkv("flash_attention", q, k, v)
    q, k, v = (_unit_last_stride(t) for t in (q, k, v))
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    op = _flash_attention_op if torch.compiler.is_compiling() else _flash_attention_impl  # no dispatcher in eager
    return op(q, k, v, bool(causal), scale)
