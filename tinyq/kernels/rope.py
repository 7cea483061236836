"""Rotary position embedding (rotate-half convention), fused with the KV-cache write.

Math, for a head vector ``x`` of size ``D`` at position ``p`` with ``h = D/2`` and
``inv_freq[i]`` (float32, ``[h]``, scaling rule already applied), ``a_i = p * inv_freq[i]``::

    out[i]     = x[i]     * cos(a_i) - x[i + h] * sin(a_i)        for i < h
    out[i + h] = x[i + h] * cos(a_i) + x[i]     * sin(a_i)

This is transformers' ``rotate_half`` convention (Llama, Qwen2, Mistral, SmolLM2).
``inv_freq`` follows the HF config: ``default`` is ``theta ** (-2i/D)``; ``linear`` divides it by
``factor``; ``llama3`` divides low frequencies by ``factor``, keeps high ones and blends between.

:func:`rope_cache_write` (Triton) rotates ``k`` and writes it with ``v`` into one layer of the
cache at positions ``seq_pos .. seq_pos + L`` (``seq_pos`` read on the device), and returns the
rotated ``q``; cos/sin are computed in the kernel from the positions and ``inv_freq``.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, Optional

import torch
import triton
import triton.language as tl

from tinyq.backend import check_kernel_device
from tinyq.kernels.flash_attention import check_out, check_seq_pos

ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """RoPE parameters of one model: ``head_dim``, base ``theta`` and the HF scaling rule."""

    head_dim: int
    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    _cache: Dict[Any, torch.Tensor] = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope type {self.rope_type!r} is not supported (supported: {ROPE_TYPES})")
        if self.head_dim <= 0 or self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {self.head_dim}")
        if self.rope_type != "default" and self.factor <= 0:
            raise ValueError(f"rope scaling factor must be > 0, got {self.factor}")
        if self.rope_type == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise ValueError("llama3 rope scaling needs high_freq_factor > low_freq_factor")

    @classmethod
    def from_hf(cls, config, head_dim: Optional[int] = None) -> "RopeConfig":
        """Read a transformers config (object or dict) in either style, 5.x ``rope_parameters =
        {"rope_type", "rope_theta", "factor", ...}`` or the older ``rope_theta`` + ``rope_scaling =
        {"rope_type" | "type", "factor", ...}``, with transformers 5's precedence
        (``PreTrainedConfig.convert_rope_params_to_dict`` and ``standardize_rope_params``)."""
        get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
        # transformers: ``rope_parameters = rope_scaling or rope_parameters``. A config re-saved by
        # transformers 5 holds ``rope_parameters: {"rope_type": "default"}``; a rope_scaling block added
        # to it (Qwen2.5's long-context recipe) replaces it whole, its rope_theta included.
        params = dict(get("rope_scaling") or get("rope_parameters") or {})
        theta = params.get("rope_theta", get("rope_theta", None))
        theta = 10000.0 if theta is None else float(theta)
        rope_type = params.get("rope_type", params.get("type", "default")) or "default"
        if head_dim is None:
            head_dim = get("head_dim", None) or get("hidden_size") // get("num_attention_heads")
        kw = dict(head_dim=int(head_dim), theta=theta, rope_type=rope_type)
        if rope_type in ("linear", "llama3"):
            kw["factor"] = float(params["factor"])
        if rope_type == "llama3":
            kw["low_freq_factor"] = float(params.get("low_freq_factor", 1.0))
            kw["high_freq_factor"] = float(params.get("high_freq_factor", 4.0))
            # a top-level key (Phi-3 style) wins over the one inside the rope dict, as in transformers
            kw["original_max_position_embeddings"] = int(
                get("original_max_position_embeddings", None)
                or params.get("original_max_position_embeddings")
                or get("max_position_embeddings", 8192)
            )
        rope = cls(**kw)  # refuses an unsupported rope_type first
        check_partial_rotary(params.get("partial_rotary_factor", get("partial_rotary_factor", None)), rope_type)
        return rope

    def inv_freq(self, device=None) -> torch.Tensor:
        """float32 ``[head_dim / 2]`` with the scaling applied; memoized per device (so a CUDA
        graph capture never triggers a host-to-device copy after the first call)."""
        device = torch.device(device if device is not None else "cpu")
        if device not in self._cache:
            self._cache[device] = self._compute_inv_freq().to(device)
        return self._cache[device]

    def _compute_inv_freq(self) -> torch.Tensor:
        d = self.head_dim
        inv = 1.0 / (self.theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
        if self.rope_type == "linear":
            return inv / self.factor
        if self.rope_type == "llama3":
            old = self.original_max_position_embeddings
            low_wavelen, high_wavelen = old / self.low_freq_factor, old / self.high_freq_factor
            wavelen = 2 * math.pi / inv
            scaled = torch.where(wavelen > low_wavelen, inv / self.factor, inv)
            smooth = (old / wavelen - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor)
            blended = (1 - smooth) * scaled / self.factor + smooth * scaled
            medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
            return torch.where(medium, blended, scaled)
        return inv


def check_partial_rotary(factor, rope_type: str) -> None:
    """Refuse a ``partial_rotary_factor`` that transformers would apply. With default RoPE, transformers'
    Llama, Qwen2 and Mistral rotate the whole head and never read it; their scaled rules (linear,
    llama3) do read it, and then fail on the shape mismatch (transformers 5.x), so tinyq refuses."""
    if factor is None or rope_type == "default" or float(factor) == 1.0:
        return
    raise ValueError(f"partial_rotary_factor={factor} with rope_type {rope_type!r} is not supported (tinyq "
                     "rotates the whole head: a factor of 1, or default RoPE, where transformers ignores it)")


def _as_inv_freq(rope, device) -> torch.Tensor:
    return rope.inv_freq(device) if isinstance(rope, RopeConfig) else rope.to(device=device, dtype=torch.float32)


def apply_rope_reference(x: torch.Tensor, positions: torch.Tensor, rope) -> torch.Tensor:
    """Float32 reference. ``x [B, L, H, D]``, ``positions [L]`` or ``[B, L]`` (ints),
    ``rope`` a :class:`RopeConfig` or an ``inv_freq`` tensor; returns float32 ``[B, L, H, D]``."""
    inv_freq = _as_inv_freq(rope, x.device)
    h = x.shape[-1] // 2
    ang = positions.to(x.device).float()[..., None] * inv_freq  # [(B,) L, D/2]
    if ang.dim() == 2:
        ang = ang[None]
    cos, sin = ang.cos()[:, :, None, :], ang.sin()[:, :, None, :]  # [B|1, L, 1, D/2]
    xf = x.float()
    x1, x2 = xf[..., :h], xf[..., h:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


# 2*pi split in two so that k * TWO_PI_HI is exact in float32 for k < 2**15 (6.28125 has 8
# significant bits): the reduction of an angle of ~1e5 rad then adds < 1e-6 rad of error, and
# cos/sin only ever see [-pi, pi], where the GPU's fast approximations are accurate to ~1e-6.
TWO_PI_HI = tl.constexpr(6.28125)
TWO_PI_LO = tl.constexpr(2 * math.pi - 6.28125)
INV_TWO_PI = tl.constexpr(1 / (2 * math.pi))


@triton.jit
def rotate(x1, x2, cos, sin):
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin


@triton.jit
def cos_sin(pos, inv_freq):
    """cos and sin of the angles ``pos * inv_freq`` (float32, rounded like the reference), the
    angle reduced to [-pi, pi] first."""
    ang = pos.to(tl.float32) * inv_freq
    k_turns = tl.floor(ang * INV_TWO_PI + 0.5)
    red = (ang - k_turns * TWO_PI_HI) - k_turns * TWO_PI_LO
    return tl.cos(red), tl.sin(red)


@triton.jit
def _rope_cache_write_kernel(
    Q, K, V, Q_OUT, K_CACHE, V_CACHE, SEQ_POS, INV_FREQ,
    L, HQ, HKV, MAX_SEQ,
    stride_qb, stride_ql, stride_qh,
    stride_kb, stride_kl, stride_kh,
    stride_vb, stride_vl, stride_vh,
    stride_ob, stride_ol, stride_oh,
    stride_cb, stride_ch, stride_cn,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr, HQ_PAD: tl.constexpr, HKV_PAD: tl.constexpr,
):
    # One program per token: all its q heads, k heads and v heads, as [heads, D/2] tiles.
    pid = tl.program_id(0)
    b = pid // L
    t = pid % L
    pos = tl.load(SEQ_POS) + t
    offs_i = tl.arange(0, HALF_PAD)
    mask_i = offs_i < HALF
    cos, sin = cos_sin(pos, tl.load(INV_FREQ + offs_i, mask=mask_i, other=0.0))
    cos, sin = cos[None, :], sin[None, :]

    hq = tl.arange(0, HQ_PAD)
    mq = (hq < HQ)[:, None] & mask_i[None, :]
    q_ptr = Q + b * stride_qb + t * stride_ql + hq[:, None] * stride_qh + offs_i[None, :]
    q1 = tl.load(q_ptr, mask=mq, other=0.0).to(tl.float32)
    q2 = tl.load(q_ptr + HALF, mask=mq, other=0.0).to(tl.float32)
    r1, r2 = rotate(q1, q2, cos, sin)
    o_ptr = Q_OUT + b * stride_ob + t * stride_ol + hq[:, None] * stride_oh + offs_i[None, :]
    tl.store(o_ptr, r1.to(Q_OUT.dtype.element_ty), mask=mq)
    tl.store(o_ptr + HALF, r2.to(Q_OUT.dtype.element_ty), mask=mq)

    hk = tl.arange(0, HKV_PAD)
    # The host checked the room; the position mask only guards memory if a stale graph replays.
    mk = ((hk < HKV) & (hk * 0 + pos < MAX_SEQ))[:, None] & mask_i[None, :]
    k_ptr = K + b * stride_kb + t * stride_kl + hk[:, None] * stride_kh + offs_i[None, :]
    k1 = tl.load(k_ptr, mask=mk, other=0.0).to(tl.float32)
    k2 = tl.load(k_ptr + HALF, mask=mk, other=0.0).to(tl.float32)
    r1, r2 = rotate(k1, k2, cos, sin)
    c_off = b * stride_cb + hk[:, None] * stride_ch + pos * stride_cn + offs_i[None, :]
    tl.store(K_CACHE + c_off, r1.to(K_CACHE.dtype.element_ty), mask=mk)
    tl.store(K_CACHE + c_off + HALF, r2.to(K_CACHE.dtype.element_ty), mask=mk)
    v_ptr = V + b * stride_vb + t * stride_vl + hk[:, None] * stride_vh + offs_i[None, :]
    tl.store(V_CACHE + c_off, tl.load(v_ptr, mask=mk, other=0.0).to(V_CACHE.dtype.element_ty), mask=mk)
    tl.store(V_CACHE + c_off + HALF, tl.load(v_ptr + HALF, mask=mk, other=0.0).to(V_CACHE.dtype.element_ty), mask=mk)


def rope_cache_write(q, k, v, k_cache, v_cache, seq_pos, inv_freq, q_out=None) -> torch.Tensor:
    """Rotate ``q`` and ``k`` at positions ``seq_pos[0] + [0, L)``; write rotated ``k`` and ``v``
    into the cache layer; return rotated ``q``.

    q ``[B, L, Hq, D]``, k/v ``[B, L, Hkv, D]`` (last dim contiguous), k_cache/v_cache one layer
    ``[B, Hkv, max_seq_len, D]`` (last dim contiguous), seq_pos int32 ``[1]``, inv_freq float32
    ``[D/2]``. Returns ``q_out`` (allocated if None) ``[B, L, Hq, D]`` in q's dtype. Shapes are
    assumed checked by the caller (:func:`tinyq.ops.attention_with_cache`), room in the cache too.
    """
    check_kernel_device("rope_cache_write", q, k, v, k_cache, v_cache, seq_pos, inv_freq)
    B, L, HQ, D = q.shape
    HKV = k.shape[2]
    for name, t in (("q", q), ("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"rope_cache_write: {name} needs a contiguous last dimension")
    if k_cache.stride() != v_cache.stride():
        raise ValueError("rope_cache_write: k_cache and v_cache must share one layout")
    check_seq_pos("rope_cache_write", seq_pos)
    if inv_freq.shape != (D // 2,) or inv_freq.dtype != torch.float32 or inv_freq.stride(0) != 1:
        raise ValueError(f"rope_cache_write: inv_freq must be a contiguous float32 [{D // 2}], got "
                         f"{inv_freq.dtype} {tuple(inv_freq.shape)} with strides {inv_freq.stride()}")
    if q_out is None:
        q_out = torch.empty((B, L, HQ, D), dtype=q.dtype, device=q.device)
    else:
        check_out("rope_cache_write", q_out, q, (B, L, HQ, D), name="q_out")
    half = D // 2
    _rope_cache_write_kernel[(B * L,)](
        q, k, v, q_out, k_cache, v_cache, seq_pos, inv_freq,
        L, HQ, HKV, k_cache.shape[2],
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        q_out.stride(0), q_out.stride(1), q_out.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        HALF=half, HALF_PAD=triton.next_power_of_2(half),
        HQ_PAD=triton.next_power_of_2(HQ), HKV_PAD=triton.next_power_of_2(HKV),
        num_warps=4,
    )
    return q_out
