"""Row helpers shared by the one-row-per-program kernels (norms, SiLU/GELU, int8 quantizers): the
launchers' flattening to rows, the split of a row into register blocks, and the fused norms'
residual-add prologue."""
import math
from typing import Optional

import torch
import triton
import triton.language as tl


def as_rows(t: torch.Tensor, width: int) -> torch.Tensor:
    """``t [..., width]`` as a 2-D ``[rows, width]`` with unit stride along the row (a view when possible)."""
    rows = t.reshape(-1 if width else math.prod(t.shape[:-1]), width)  # empty rows: no -1 to infer from
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def unit_stride(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A per-feature vector (a norm's weight or bias) the kernels read at unit stride: a copy only
    when a view breaks that (a column of a packed parameter, say); None stays None."""
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def check_norm_args(where: str, x: torch.Tensor, residual: Optional[torch.Tensor], max_n: int, **vectors) -> None:
    """The argument checks of every row-norm launcher (RMSNorm and LayerNorm, with or without int8
    output): ``x`` fp16/bf16/fp32 and at least 1-D, a ``residual`` matching it, rows of at most
    ``max_n`` features, and each per-feature vector (``weight``, and ``bias`` where None means none)
    1-D of the row width and of a float dtype. Errors start with ``where``."""
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"{where}: x must be fp16/bf16/fp32, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError(f"{where}: x must be [..., N], got a 0-d tensor")
    n = x.shape[-1]
    for name, t in vectors.items():
        if t is None and name == "bias":  # optional, as in torch.nn.functional.layer_norm
            continue
        if t.dim() != 1 or t.shape[0] != n:
            raise ValueError(f"{where}: {name} must be [{n}], got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{where}: {name} must be a float tensor, got {t.dtype}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"{where}: residual must match x ({tuple(x.shape)}, {x.dtype}), "
                         f"got {tuple(residual.shape)}, {residual.dtype}")
    if n > max_n:
        raise ValueError(f"{where}: rows of {n} features exceed the supported {max_n}")


def row_blocks(width: int) -> tuple[int, int]:
    """A row of ``width`` features as two power-of-two register blocks, ``head + tail >= width``:
    the largest power of two not above ``width``, then the rest rounded up (0 when ``width`` is a
    power of two). SigLIP's 1152 is 1024 + 128 and its MLP's 4304 is 4096 + 256, where one
    ``next_pow2`` block (2048, 8192) would be 44-47% padding, and these kernels are issue-bound:
    every lane of a block runs every instruction, masked or not (docs/perf_notes.md)."""
    if width < 1:  # launchers return rows of no features without launching
        raise ValueError(f"row_blocks: a row needs at least one feature, got width {width}")
    head = 1 << (width.bit_length() - 1)
    rest = width - head
    return head, (triton.next_power_of_2(rest) if rest else 0)


MANY_ROWS = 1024  # from here a row kernel has programs enough to fill the GPU many times over


def row_warps(head: int, tail: int = 0, rows: int = 0) -> int:
    """Warps for a one-row-per-program kernel over ``head + tail`` lanes. A few rows (decode) are
    latency-bound: spread each over many threads (~8 elements a thread, 1..16 warps). Many rows are
    issue-bound: every thread repeats the row's fixed work (the cross-warp reductions, the scalar
    math), so fatter threads issue fewer instructions per row (~32 elements a thread, 2..16 warps;
    the sm90 instruction counts are in docs/perf_notes.md)."""
    if rows >= MANY_ROWS:
        warps = min(max((head + tail) // 1024, 2), 16)
    else:
        warps = min(max((head + tail) // 256, 1), 16)
    return 1 << (warps.bit_length() - 1)  # a power of two: the GPU compiler takes nothing else (1536 -> 4)


@triton.jit
def row_columns(width, HEAD: tl.constexpr, TAIL: tl.constexpr):
    """Columns and masks of a row's two register blocks (:func:`row_blocks`): ``(ca, ma, cb, mb)``
    for ``[0, HEAD)`` and ``[HEAD, HEAD + TAIL)``; with ``TAIL == 0`` the tail repeats the head and
    must not be used."""
    ca = tl.arange(0, HEAD)
    ma = ca < width
    if TAIL > 0:
        cb = HEAD + tl.arange(0, TAIL)
        mb = cb < width
    else:
        cb, mb = ca, ma
    return ca, ma, cb, mb


@triton.jit
def load_row_add_residual(X, RES, H_OUT, row, cols, mask, stride_x, stride_r, stride_h, HAS_RESIDUAL: tl.constexpr):
    """Row ``row`` of ``x`` (+ the residual, ``h = x + r`` rounded to the output dtype and stored to
    ``H_OUT`` as the next residual), returned in float32."""
    h = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(RES + row * stride_r + cols, mask=mask, other=0.0)
        h = (h.to(tl.float32) + r.to(tl.float32)).to(H_OUT.dtype.element_ty)
        tl.store(H_OUT + row * stride_h + cols, h, mask=mask)
    return h.to(tl.float32)
