"""Rows of activations rewritten in a W4A16 GEMV's paired layout (:mod:`tinyq.kernels.paired`).

For a GEMV whose input comes from no fused producer (a plain ``W4A16Linear`` at M = 1 or 2): the paired
GEMV reads x in 16-byte coalesced pieces where the natural one reads 8 bytes at a 64-byte lane
stride, and this pass costs one read and one write of x (8 KB at K = 4096).

Tensors: ``x`` [M, K] fp16/bf16 (K a multiple of 32, unit column stride, row stride ``stride_x``);
out: :class:`~tinyq.kernels.paired.PairedRows`. Program (row, c) rewrites inputs
``c * BLOCK .. (c + 1) * BLOCK`` of one row: whole 32-input blocks, so its pairs land in one
contiguous run of each plane (``BLOCK / 4`` entries from ``c * BLOCK / 4``).

``scaled=True`` writes fp16 rows with a power-of-two scale per row instead (for bf16 x: the GEMV's
fp16 dot, 2.75 instructions a weight, where bf16 has no packed dot and costs ~4). With ``E`` the
exponent of ``max |x|`` of the row, the row is stored as ``x * 2^(14 - E)``, so its largest entry
lies in ``[2^14, 2^15)``: under the 34,000 at which the GEMV's fp16 pair sums could overflow, and
every bf16 value down to ``2^-31 max |x|`` is held exactly (8 mantissa bits within fp16's 11 and
its subnormals); smaller ones weigh less than the fp16 rounding of the products. ``scale`` holds
``2^(E - 14)``, kept a normal float: a row whose maximum is below ``2^-112`` is scaled by ``2^126``
only. One program holds a whole row (the maximum needs it), ``next_pow2(K)`` inputs, at most
:data:`SCALED_MAX_K`.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from tinyq.kernels.paired import PairedRows, empty_paired_rows, pair_rows_reference, store_paired_row

# Inputs per program: one 32-block group of a GEMV step (2 KB of fp16), so K = 4096 gives 4 programs
# a row and the pass stays a launch's worth of time; 4 warps hold it at 8 inputs a thread.
BLOCK = 1024
# The longest row the scaled pass holds in one program: 32768 inputs on 16 warps is 64 a thread
# (Llama-3-70B's down projection has K = 28672); longer rows would spill.
SCALED_MAX_K = 32768


@triton.jit
def _pair_rows_kernel(X, OUT, K, stride_x, stride_o, PLANE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    cols = c * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(X + row * stride_x + cols, mask=cols < K, other=0.0)
    store_paired_row(OUT + row * stride_o + c * (BLOCK // 4), v, K - c * BLOCK, BLOCK, PLANE)


@triton.jit
def _pair_rows_scaled_kernel(X, OUT, SCALE, K, stride_x, stride_o, PLANE: tl.constexpr, ROW: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, ROW)
    v = tl.load(X + row * stride_x + cols, mask=cols < K, other=0.0).to(tl.float32)
    biased = (tl.max(tl.abs(v), axis=0).to(tl.int32, bitcast=True) >> 23) & 0xFF  # 127 + E
    # the biased exponent of 2^(14 - E); capped so that its inverse stays a normal float (an all-zero
    # or subnormal row); an inf row gives 2^-114 and stays inf, a NaN stays NaN
    up = tl.minimum(141 + 127 - biased, 253)
    tl.store(SCALE + row, ((254 - up) << 23).to(tl.float32, bitcast=True))  # 2^(E - 14), exact
    scaled = (v * (up << 23).to(tl.float32, bitcast=True)).to(tl.float16)  # exact: a power of two
    store_paired_row(OUT + row * stride_o, scaled, K, ROW, PLANE)


def pair_rows(x: torch.Tensor, out: Optional[PairedRows] = None, *, scaled: bool = False) -> PairedRows:
    """``x [M, K]`` (fp16/bf16, K a multiple of 32, unit stride along K) in the paired layout,
    written into ``out`` when given (its K, dtype and at least M rows are checked). ``scaled``:
    fp16 rows and a power-of-two ``scale`` per row (module docstring)."""
    m, k = x.shape
    if x.stride(1) != 1:
        raise ValueError(f"pair_rows: x must have unit stride along K (strides {x.stride()})")
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"pair_rows: x must be fp16 or bf16, got {x.dtype}")
    if scaled and k > SCALED_MAX_K:
        raise ValueError(f"pair_rows: scaled rows hold at most {SCALED_MAX_K} inputs in one program, x has {k}")
    dtype = torch.float16 if scaled else x.dtype
    if out is None:
        out = empty_paired_rows(m, k, dtype, x.device)
        if scaled:
            out = out._replace(scale=torch.empty(m, dtype=torch.float32, device=x.device))
    elif out.k != k or out.data.dtype != dtype or out.data.shape[0] < m or out.data.device != x.device:
        raise ValueError(f"pair_rows: out holds {out.data.shape[0]} rows of {out.k} inputs, {out.data.dtype} on "
                         f"{out.data.device}; x is {m} rows of {k}, {x.dtype} on {x.device}"
                         + (", to be written as scaled float16" if scaled else ""))
    elif scaled != (out.scale is not None) or (scaled and not _scale_fits(out.scale, m, x.device)):
        need = f"a contiguous float32 scale of at least {m} rows on {x.device}" if scaled else "no scale"
        raise ValueError(f"pair_rows: scaled={scaled} needs an out with {need}")
    if m and k and scaled:
        row = max(32, triton.next_power_of_2(k))
        # 16 to 32 inputs a thread (4 warps up to 4096 inputs, 16 from 16384)
        _pair_rows_scaled_kernel[(m,)](
            x, out.data, out.scale, k, x.stride(0), out.data.stride(0),
            PLANE=out.data.shape[1] // 4, ROW=row, num_warps=max(4, min(16, row // 1024)),
        )
    elif m and k:
        _pair_rows_kernel[(m, triton.cdiv(k, BLOCK))](
            x, out.data, k, x.stride(0), out.data.stride(0),
            PLANE=out.data.shape[1] // 4, BLOCK=BLOCK, num_warps=4,
        )
    return out


def _scale_fits(scale: torch.Tensor, m: int, device) -> bool:
    return scale.dtype == torch.float32 and scale.numel() >= m and scale.device == device and scale.is_contiguous()


def pair_rows_scaled_reference(x: torch.Tensor) -> PairedRows:
    """What ``pair_rows(x, scaled=True)`` writes, in torch (the padding is zero). The row maximum
    skips NaN, as the kernel's does; a NaN entry stays NaN."""
    biased = (x.float().abs().nan_to_num(nan=0.0, posinf=float("inf")).amax(dim=1).view(torch.int32) >> 23) & 0xFF
    up = (268 - biased).clamp(max=253)
    factor = (up << 23).view(torch.float32)
    paired = pair_rows_reference((x.float() * factor[:, None]).half())
    return paired._replace(scale=((254 - up) << 23).view(torch.float32))


# pair_rows_reference lives beside the layout's definition (tinyq.kernels.paired)
__all__ = ["BLOCK", "SCALED_MAX_K", "pair_rows", "pair_rows_reference", "pair_rows_scaled_reference"]
