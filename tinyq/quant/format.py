"""tinyq's int4 weight format, defined here and nowhere else.

A linear layer ``y = x @ W.T + b`` with ``W`` of shape ``[N, K]`` (N outputs, K inputs, as in
``nn.Linear.weight``) is stored as three tensors:

=========  ==================  ===============  ==============================================
name       shape               dtype            meaning
=========  ==================  ===============  ==============================================
qweight    ``[N, K // 8]``     int32            word ``c = 4b + w`` (``w`` in 0..3) of row ``n``
                                                holds ``q[n, 32b + 4i + w]`` in bits
                                                ``4i .. 4i+3`` (``i = 0`` lowest nibble);
                                                ``q`` is unsigned, 0..15
scales     ``[N, K // G]``     fp16 or bf16     one scale per (output row, group of G inputs)
zeros      ``[N, K // G]``     same as scales   integer zero points 0..15 (exact in fp16/bf16)
=========  ==================  ===============  ==============================================

``W[n, k] = (q[n, k] - zeros[n, k // G]) * scales[n, k // G]``.

Why this layout: it is K-contiguous like ``nn.Linear.weight``, so the decode GEMV reads each
output row as one contiguous run (2 KB per row at K=4096) and fusing q/k/v or gate/up at load is
a plain ``torch.cat`` along N. Within each block of 32 inputs (4 words, one 16-byte load), nibble
``i`` of the 4 words holds 4 *consecutive* inputs ``32b + 4i .. 32b + 4i + 3``, so a kernel that
peels nibble i off a 16-byte vector meets x in one 8-byte load instead of 4 scalar ones (the
plain order ``8c + i`` left the GEMV bound by L1 load instructions, docs/perf_notes.md). Zeros are
kept as integers in the scale dtype so the kernels dequantize with one subtract and one multiply,
and conversion to AutoAWQ's packing is lossless.

The quantizer is AWQ's group-wise asymmetric one (min/max per group, integer zero point).
"""
from __future__ import annotations

import torch

GROUP_SIZES = (32, 64, 128)
SCALE_DTYPES = (torch.float16, torch.bfloat16)
PACK = 8  # int4 values per int32 word
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ "gemm": nibble i holds column 8c + AWQ_ORDER[i]


def _has_values(t: torch.Tensor) -> bool:
    """Whether ``t`` holds values a range check can read: a meta tensor (a model skeleton quantized
    before its weights are loaded) has only a shape, and an empty one (a layer with no outputs) has
    no max."""
    return not t.is_meta and t.numel() > 0


def check_group_size(group_size: int, k: int, what: str = "weight") -> None:
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size={group_size} is not supported; choose one of {GROUP_SIZES}")
    if k % group_size != 0:
        raise ValueError(
            f"{what}: in_features K={k} is not divisible by group_size={group_size}; "
            f"choose a group size that divides K (e.g. {[g for g in GROUP_SIZES if k % g == 0] or 'none'})"
        )


def scale_dtype_for(weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype scales are stored in: bf16 for bf16 weights, fp16 otherwise (fp32 weights too)."""
    return torch.bfloat16 if weight_dtype == torch.bfloat16 else torch.float16


def group_scale_zero(lo: torch.Tensor, hi: torch.Tensor, n_bit: int, scale_dtype):
    """The quantizer's grid for groups spanning ``[lo, hi]`` (float32, any matching shapes):
    ``s = max(hi - lo, 1e-5) / (2^b - 1)`` rounded to ``scale_dtype`` (returned as float32, so
    ``(q - z) * s`` is the best reconstruction the stored scale allows) and the integer zero point
    ``z = clamp(-round(lo / s), 0, 2^b - 1)``. AWQ's quantizer; the only place it is written.

    The range is first widened to hold 0 (``lo <= 0 <= hi``): the zero point is an integer of the
    grid (AutoAWQ packs it in 4 bits), so a grid always contains 0, and a group of only positive
    (or only negative) weights would otherwise be clamped to ``[0, hi - lo]``. Groups that span 0,
    as LLM weight groups do, are unchanged."""
    qmax = 2**n_bit - 1
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    scale = ((hi - lo).clamp(min=1e-5) / qmax).to(scale_dtype).float()
    return scale, (-torch.round(lo / scale)).clamp(0, qmax)


def check_scales_fit(scale: torch.Tensor, groups: torch.Tensor, n_bit: int, scale_dtype) -> None:
    """Raise ``ValueError`` if a scale of :func:`group_scale_zero` is not finite: a group spanning
    more than ``15 * 65504`` (fp16's max) rounds its scale to inf in fp16, and every output using it
    becomes NaN. ``groups`` is the float32 weight ``[N, K/G, G]`` the scales came from.

    Checked where scales are stored (:func:`quantize_groupwise`: quantize_, the loader, checkpoints),
    once per weight; not inside :func:`group_scale_zero`, which AWQ's search calls per candidate and
    where a non-finite result only rejects that candidate."""
    if not _has_values(scale) or bool(torch.isfinite(scale).all()):
        return
    shape = (groups.shape[0], groups.shape[1] * groups.shape[2])
    if not bool(torch.isfinite(groups).all()):
        raise ValueError(f"weight of shape {shape} has inf/NaN values, which {scale_dtype} scales cannot represent")
    span = float((groups.amax(dim=-1).clamp(min=0) - groups.amin(dim=-1).clamp(max=0)).max())
    hint = ("; store bfloat16 scales instead (W4A16Config(dtype=torch.bfloat16), a bf16 model, or "
            "scale_dtype=torch.bfloat16) or rescale the weight") if scale_dtype != torch.bfloat16 else ""
    raise ValueError(
        f"weight of shape {shape}: a group spans {span:.4g}, so its scale ({span / (2**n_bit - 1):.4g}) "
        f"overflows {scale_dtype} (max {torch.finfo(scale_dtype).max:.6g}){hint}"
    )


def quantize_to_grid(g: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, n_bit: int) -> torch.Tensor:
    """``q = clamp(round(g / s) + z, 0, 2^b - 1)`` as float32 (values outside the grid land on its ends)."""
    return (torch.round(g / scale) + zero).clamp(0, 2**n_bit - 1)


def quantize_groupwise(w: torch.Tensor, group_size: int, n_bit: int = 4, scale_dtype=torch.float16):
    """Round-to-nearest group-wise asymmetric quantization of ``w [N, K]`` (AWQ's quantizer).

    Returns ``q`` (uint8 ``[N, K]``, 0..2^b-1), ``scales`` and ``zeros`` (``scale_dtype``, ``[N, K/G]``),
    on the grid of :func:`group_scale_zero` over each group's min and max.
    """
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight [N, K], got shape {tuple(w.shape)}")
    if scale_dtype not in SCALE_DTYPES:
        raise ValueError(f"scale dtype must be one of {SCALE_DTYPES}, got {scale_dtype}")
    if not 2 <= n_bit <= 8:
        raise ValueError(f"n_bit={n_bit} is outside 2..8")
    n, k = w.shape
    if k % group_size != 0:
        raise ValueError(f"weight of shape {tuple(w.shape)}: K={k} is not divisible by group_size={group_size}")
    g = w.detach().float().reshape(n, k // group_size, group_size)
    scale, zero = group_scale_zero(g.amin(dim=-1, keepdim=True), g.amax(dim=-1, keepdim=True), n_bit, scale_dtype)
    check_scales_fit(scale, g, n_bit, scale_dtype)
    q = quantize_to_grid(g, scale, zero, n_bit)
    return q.reshape(n, k).to(torch.uint8), scale.squeeze(-1).to(scale_dtype), zero.squeeze(-1).to(scale_dtype)


def dequantize_groupwise(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """``(q - z) * s`` in float32, ``[N, K]``."""
    n, k = q.shape
    groups = scales.shape[1]
    g = k // groups
    qf = q.float().reshape(n, groups, g)
    return ((qf - zeros.float()[..., None]) * scales.float()[..., None]).reshape(n, k)


def fake_quantize(w: torch.Tensor, group_size: int, n_bit: int = 4, scale_dtype=None) -> torch.Tensor:
    """``(q - z) * s`` of :func:`quantize_groupwise` without the integer round trip, in ``w``'s dtype
    (AWQ's search runs it 20x per linear per layer; evaluation uses it too). ``scale_dtype``
    defaults to :func:`scale_dtype_for` ``w.dtype``; AWQ passes the stored weight's when ``w`` is a
    float32 candidate."""
    n, k = w.shape
    g = w.detach().float().reshape(n, k // group_size, group_size)
    scale, zero = group_scale_zero(g.amin(dim=-1, keepdim=True), g.amax(dim=-1, keepdim=True), n_bit,
                                   scale_dtype or scale_dtype_for(w.dtype))
    return ((quantize_to_grid(g, scale, zero, n_bit) - zero) * scale).reshape(n, k).to(w.dtype)


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 words in [0, 2^32) -> int32 with two's-complement wrap-around."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _pack_last_dim(v: torch.Tensor, order=tuple(range(PACK))) -> torch.Tensor:
    """Pack int values 0..15 along the last dim, 8 per int32; nibble i holds element ``order[i]``."""
    *lead, n = v.shape
    if n % PACK != 0:
        raise ValueError(f"cannot pack a last dimension of {n}: it must be a multiple of {PACK}")
    v = v.to(torch.int64).reshape(*lead, n // PACK, PACK)
    words = torch.zeros(v.shape[:-1], dtype=torch.int64, device=v.device)
    for i, src in enumerate(order):
        words |= (v[..., src] & 0xF) << (4 * i)
    return _to_int32(words)


def _unpack_last_dim(words: torch.Tensor, order=tuple(range(PACK))) -> torch.Tensor:
    """Inverse of :func:`_pack_last_dim`; returns uint8 values with the last dim multiplied by 8."""
    if words.dtype != torch.int32:
        raise ValueError(f"packed words must be int32, got {words.dtype}")
    shifts = torch.arange(0, 4 * PACK, 4, device=words.device, dtype=torch.int32)
    nib = (words.unsqueeze(-1) >> shifts) & 0xF  # [..., W, 8], nibble i
    out = torch.empty_like(nib)
    out[..., list(order)] = nib
    return out.reshape(*words.shape[:-1], words.shape[-1] * PACK).to(torch.uint8)


BLOCK = 32  # inputs per interleaved block (4 words)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """``q`` uint8 ``[N, K]`` (0..15) -> tinyq ``qweight`` int32 ``[N, K // 8]`` (see module doc)."""
    if q.dim() != 2:
        raise ValueError(f"expected q of shape [N, K], got {tuple(q.shape)}")
    n, k = q.shape
    if k % BLOCK != 0:
        raise ValueError(f"K={k} must be a multiple of {BLOCK} for tinyq's int4 packing")
    if _has_values(q) and (int(q.max()) > 15 or int(q.min()) < 0):
        raise ValueError(f"int4 values must lie in 0..15, got {int(q.min())}..{int(q.max())} in q of shape {tuple(q.shape)}")
    # [N, K/32, 8 (nibble i), 4 (word w)] -> [N, K/32, 4, 8] -> [N, K/8, 8]: word 4b+w, nibble i
    planar = q.reshape(n, k // BLOCK, PACK, 4).transpose(2, 3).reshape(n, k // PACK, PACK)
    return _pack_last_dim(planar.reshape(n, k))


def unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """tinyq ``qweight`` int32 ``[N, K // 8]`` -> uint8 ``[N, K]``."""
    n, kw = qweight.shape
    nib = _unpack_last_dim(qweight).reshape(n, kw // 4, 4, PACK)  # [N, K/32, word w, nibble i]
    return nib.transpose(2, 3).reshape(n, kw * PACK)


def quantize_weight(w: torch.Tensor, group_size: int, scale_dtype=torch.float16):
    """``w [N, K]`` -> ``(qweight, scales, zeros)`` in tinyq's format (RTN)."""
    check_group_size(group_size, w.shape[-1])
    q, s, z = quantize_groupwise(w, group_size, 4, scale_dtype)
    return pack_int4(q), s, z


def check_grid_values(scales: torch.Tensor, zeros, prefix: str, where: str) -> None:
    """Raise ``ValueError`` naming ``where`` (the file) and the tensor ``<prefix>.scales`` /
    ``<prefix>.zeros`` unless every scale is finite and every zero point an integer in 0..15, as the
    quantizer writes them: a corrupt value would otherwise load silently and turn the layer's
    outputs (and the logits) into inf/NaN. One pass over each tensor at load time, never per
    forward; both are ``K / G`` times smaller than the weight. ``zeros`` None: AutoAWQ's, unpacked
    from 4 bits, cannot be out of range. Indices in the message are those of the tensors given
    (pass them as stored)."""
    if _has_values(scales):
        bad = ~torch.isfinite(scales)
        if bool(bad.any()):
            _raise_bad_value(bad, scales, f"{prefix}.scales", where, "scales must be finite")
    if zeros is not None and _has_values(zeros):
        z = zeros.float()
        bad = (z != z.round()) | (z < 0) | (z > 15)  # NaN fails the first test
        if bool(bad.any()):
            _raise_bad_value(bad, zeros, f"{prefix}.zeros", where, "zero points must be integers in 0..15")


def _raise_bad_value(bad: torch.Tensor, t: torch.Tensor, name: str, where: str, rule: str) -> None:
    first = tuple(bad.nonzero()[0].tolist())
    raise ValueError(f"{where}: tensor {name!r} holds {t[first].item()} at {list(first)} ({int(bad.sum())} of "
                     f"{t.numel()} values bad); {rule}: is the file corrupt?")


def dequantize_weight(qweight, scales, zeros) -> torch.Tensor:
    """tinyq format -> float32 ``W [N, K]`` (the reference every kernel is checked against)."""
    return dequantize_groupwise(unpack_int4(qweight), scales, zeros)


# --- AutoAWQ / HF "awq gemm" interoperability ------------------------------------------------

def from_awq_gemm(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor):
    """AutoAWQ "gemm" tensors -> tinyq ``(qweight, scales, zeros)``; lossless.

    AWQ: ``qweight`` int32 ``[K, N/8]`` and ``qzeros`` int32 ``[K/G, N/8]`` packed along N in the
    order :data:`AWQ_ORDER`; ``scales`` ``[K/G, N]``; ``W[k, n] = (q - z) * s``; ``y = x @ W``.
    """
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
        raise ValueError(f"AWQ qweight/qzeros must be int32, got {qweight.dtype}/{qzeros.dtype}")
    k, n8 = qweight.shape
    groups = scales.shape[0]
    if scales.shape[1] != n8 * PACK or qzeros.shape != (groups, n8) or k % groups != 0:
        raise ValueError(
            f"inconsistent AWQ shapes: qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)}, "
            f"scales {tuple(scales.shape)}"
        )
    q = _unpack_last_dim(qweight, AWQ_ORDER)  # [K, N]
    z = _unpack_last_dim(qzeros, AWQ_ORDER)  # [K/G, N]
    return pack_int4(q.t().contiguous()), scales.t().contiguous(), z.t().contiguous().to(scales.dtype)


def to_awq_gemm(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor):
    """tinyq ``(qweight, scales, zeros)`` -> AutoAWQ "gemm" ``(qweight, qzeros, scales)``; lossless."""
    q = unpack_int4(qweight)  # [N, K]
    n = q.shape[0]
    if n % PACK != 0:
        raise ValueError(f"AWQ gemm format needs out_features divisible by {PACK}, got N={n}")
    z = zeros.round().to(torch.int64)
    return (
        _pack_last_dim(q.t().contiguous(), AWQ_ORDER),
        _pack_last_dim(z.t().contiguous(), AWQ_ORDER),
        scales.t().contiguous().to(torch.float16),
    )
