"""The paired activation layout: how kernels that produce a W4A16 GEMV's input write it so that the
GEMV loads it in 16-byte coalesced pieces, ready to multiply.

A GEMV lane handles one 32-input block of a weight row: 4 words, whose nibble ``j`` and ``j + 4``
meet inputs ``32b + 4j + w`` and ``32b + 4j + 16 + w`` (word ``w``; :mod:`tinyq.quant.format`).
In the natural layout its activations are the block's 64 contiguous bytes, which the lanes of a
warp, each on its own block, fetch 8 bytes at a time 64 bytes apart, and pack into pairs. The
paired layout stores those pairs where the lanes read them side by side:

    input n = 32 b + 16 h + 4 j + w   (j, w < 4; h < 2)   sits at   j * PLANE + 8 b + 2 w + h

so plane ``j`` holds, block after block, the 4 pairs ``(x[32b + 4j + w], x[32b + 4j + 16 + w])``
that nibbles ``j`` and ``j + 4`` of the block's words need. ``PLANE`` (:func:`paired_plane`) is
K/4 rounded up to 32 entries, so every plane starts 64-byte aligned; the entries past K/4 are
padding and never read.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl


@triton.jit
def paired_offsets(n, PLANE):
    """Where input ``n`` of a row sits in the paired layout with planes ``PLANE`` entries apart:
    ``n = 32 b + 16 h + 4 j + w`` goes to ``j PLANE + 8 b + 2 w + h``."""
    r = n % 32
    return ((r % 16) // 4) * PLANE + (n // 32) * 8 + (n % 4) * 2 + r // 16


@triton.jit
def store_paired_row(row_ptr, v, n_valid, BLOCK: tl.constexpr, PLANE: tl.constexpr):
    """Store a row ``v [BLOCK]`` held in input order (``BLOCK`` a multiple of 32; inputs from
    ``n_valid`` on, a multiple of 32, are padding) in the paired layout at ``row_ptr``. The values
    are permuted in registers (one pass through shared memory) so that each plane is written in
    contiguous 16-byte pieces; stored through :func:`paired_offsets` they would be 2-byte stores
    scattered over 4 planes."""
    vp = tl.reshape(tl.permute(tl.reshape(v, (BLOCK // 32, 2, 4, 4)), (2, 0, 3, 1)), (4, BLOCK // 4))  # [j, 8b+2w+h]
    o = tl.arange(0, BLOCK // 4)
    tl.store(row_ptr + tl.arange(0, 4)[:, None] * PLANE + o[None, :], vp, mask=(o < n_valid // 4)[None, :])


def paired_plane(k: int) -> int:
    """Entries per plane of a paired row of ``k`` inputs: K/4 rounded up to 32, so every plane starts
    64-byte aligned and its stride in int32 words is a multiple of 16 (Triton emits 16-byte loads
    only for strides it knows are)."""
    return -(-k // 128) * 32


class PairedRows(NamedTuple):
    """Rows of ``k`` activations in the paired layout: ``data [M, 4 * paired_plane(k)]``
    (fp16/bf16, contiguous). Kernels write it through :func:`paired_offsets`.

    ``scale`` (float32 ``[M]``, or None for 1): row m of the activations is ``data[m] * scale[m]``.
    :func:`tinyq.kernels.pair_rows.pair_rows` writes bf16 rows so, as fp16 over a power of two, for
    the fp16 dot of the W4A16 GEMV; a consumer that reads ``data`` must apply it (:func:`x_operand`)."""
    data: torch.Tensor
    k: int
    scale: Optional[torch.Tensor] = None


def empty_paired_rows(m: int, k: int, dtype: torch.dtype, device) -> PairedRows:
    """Uninitialized :class:`PairedRows` for ``m`` rows of ``k`` inputs (a multiple of 32), fp16/bf16."""
    if dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"a paired GEMV input holds fp16 or bf16 pairs, not {dtype}")
    if k % 32:
        raise ValueError(f"a paired GEMV input needs a multiple of 32 entries per row, this one has {k}")
    return PairedRows(torch.empty((m, 4 * paired_plane(k)), dtype=dtype, device=device), k)


def pair_rows_reference(x: torch.Tensor) -> PairedRows:
    """``x [M, K]`` (K a multiple of 32) in the paired layout; the padding is zero."""
    m, k = x.shape
    if k % 32:
        raise ValueError(f"pair_rows_reference: K={k} is not a multiple of 32")
    data = x.new_zeros(m, 4, paired_plane(k))
    data[:, :, :k // 4] = x.reshape(m, k // 32, 2, 4, 4).permute(0, 3, 1, 4, 2).reshape(m, 4, k // 4)
    return PairedRows(data.view(m, -1), k)


def unpair_rows_reference(x: PairedRows) -> torch.Tensor:
    """The ``[M, K]`` rows of a :class:`PairedRows` (the inverse of :func:`pair_rows_reference`)."""
    m, k = x.data.shape[0], x.k
    planes = x.data.view(m, 4, -1)[:, :, :k // 4]
    return planes.reshape(m, 4, k // 32, 4, 2).permute(0, 2, 4, 1, 3).reshape(m, k)


def x_operand(x, scaled_ok: bool = False):
    """``(tensor, plane)`` for a GEMV kernel's activation arguments: a natural ``[M, K]`` tensor as
    is with plane 0, a :class:`PairedRows` as int32 pairs with its plane stride in words. Rows with
    a ``scale`` only where the caller applies it (``scaled_ok``): read as plain rows they would be
    silently wrong by a power of two."""
    if isinstance(x, PairedRows):
        if x.scale is not None and not scaled_ok:
            raise ValueError("this GEMV reads paired rows without a per-row scale; these carry one")
        return x.data.view(torch.int32), x.data.shape[1] // 8
    return x, 0


def out_operand(out):
    """``(tensor, plane)`` for a kernel that writes a GEMV's input: a natural tensor as is with plane
    0, a :class:`PairedRows` as its data with the plane stride in entries (:func:`paired_offsets`)."""
    if isinstance(out, PairedRows):
        return out.data, out.data.shape[1] // 4
    return out, 0
