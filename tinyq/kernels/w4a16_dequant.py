"""W4A16 dequantization into a dense fp16/bf16 weight: ``W[n, k] = (q[n, k] - z[n, g]) * s[n, g]``.

For large M the product is compute-bound and the dense GEMM of cuBLAS is the fastest Triton can
hand the tensor cores to; dequantizing once per call costs about one read of the int4 weight and
one write of the dense one (N*K*2.5 bytes), a few percent of the GEMM at M >= 1024. The dense
weight lives in a reusable per-device scratch buffer (:func:`scratch`), so the model keeps only its
4-bit copy in memory: the scratch holds one layer at a time.

Tensors: ``qweight`` int32 [N, K/8] in tinyq's packing (:mod:`tinyq.quant.format`: word
``4b + w`` holds input ``32b + 4i + w`` in nibble i); ``scales``/``zeros`` [N, K/G]; ``out`` [N, K]
(row stride ``stride_on``) in the scales' dtype. One program writes a ``[BLOCK_N, BLOCK_K]`` tile.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tinyq.quant.format import dequantize_weight


@triton.jit
def _w4a16_dequant_kernel(
    qw_ptr, s_ptr, z_ptr, out_ptr,
    N, K,
    stride_wn, stride_sn, stride_on,
    GROUP_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    tl.static_assert(BLOCK_K % 32 == 0, "a tile holds whole 32-input packing blocks")
    tl.static_assert(GROUP_SIZE % 32 == 0, "groups hold whole 32-input packing blocks")
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_b = pid_k * (BLOCK_K // 32) + tl.arange(0, BLOCK_K // 32)  # 32-input blocks
    offs_w = tl.arange(0, 4)
    shifts = tl.arange(0, 8) * 4
    n_mask = offs_n < N
    b_ok = offs_b * 32 < K
    words = tl.load(qw_ptr + offs_n[:, None, None] * stride_wn + 4 * offs_b[None, :, None] + offs_w[None, None, :],
                    mask=n_mask[:, None, None] & b_ok[None, :, None], other=0)  # [BN, BK/32, 4]
    # [BN, BK/32, 8, 4]: input 32b + 4i + w, as the float 2^23 + q (q OR-ed into the mantissa of 2^23,
    # whose last bit weighs 1): no int-to-float convert, a quarter-rate instruction on sm90
    q_magic = ((words[:, :, None, :] >> shifts[None, None, :, None]) & 0xF) | 0x4B000000
    sz = offs_n[:, None] * stride_sn + (offs_b * 32 // GROUP_SIZE)[None, :]  # [BN, BK/32]
    sz_mask = n_mask[:, None] & b_ok[None, :]
    s = tl.load(s_ptr + sz, mask=sz_mask, other=0.0)
    z = tl.load(z_ptr + sz, mask=sz_mask, other=0.0)
    # (q - z) * s is exact in fp32 (4-bit times an 8- or 11-bit mantissa): one rounding, at the store
    z_magic = z.to(tl.float32) + 8388608.0  # 2^23 + z: exact, z is an integer 0..15
    w = (q_magic.to(tl.float32, bitcast=True) - z_magic[:, :, None, None]) * s.to(tl.float32)[:, :, None, None]
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    w = tl.reshape(w, (BLOCK_N, BLOCK_K)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + offs_n[:, None] * stride_on + offs_k[None, :], w,
             mask=n_mask[:, None] & (offs_k < K)[None, :])


def launch_w4a16_dequant(qweight, scales, zeros, out, *, block_n: int = 32, block_k: int = 256,
                         num_warps: int = 4):
    """Dequantize already-validated tensors into ``out`` [N, K] (scales' dtype, unit column stride)."""
    n, k = qweight.shape[0], qweight.shape[1] * 8
    grid = (triton.cdiv(n, block_n), triton.cdiv(k, block_k))
    _w4a16_dequant_kernel[grid](
        qweight, scales, zeros, out,
        n, k,
        qweight.stride(0), scales.stride(0), out.stride(0),
        GROUP_SIZE=k // scales.shape[1],
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=num_warps,
    )
    return out


_SCRATCH: dict = {}  # (device, dtype) -> buffer
_KEPT: list = []  # buffers that a captured CUDA graph writes on replay: never freed


def scratch(numel: int, dtype: torch.dtype, device: torch.device, capturing: bool = False) -> torch.Tensor:
    """A reusable flat buffer of at least ``numel`` elements per (device, dtype), grown on demand.

    Kernels on one stream run in order, so the next layer's dequantization cannot overwrite a
    weight that a GEMM still reads. The buffer is sized by the largest layer seen. ``capturing``:
    the caller is capturing a CUDA graph, whose replays will write this buffer, so it is kept alive
    even once a larger layer has outgrown it."""
    key = (device, dtype)
    buf = _SCRATCH.get(key)
    if buf is None or buf.numel() < numel:
        buf = None  # the old buffer is freed here (unless kept), before the larger one is allocated
        _SCRATCH.pop(key, None)
        buf = _SCRATCH[key] = torch.empty(numel, dtype=dtype, device=device)
    if capturing and all(kept is not buf for kept in _KEPT):
        _KEPT.append(buf)
    return buf[:numel]


def w4a16_dequant_reference(qweight, scales, zeros) -> torch.Tensor:
    """Float32 ``W [N, K]``."""
    return dequantize_weight(qweight, scales, zeros)
