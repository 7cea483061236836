"""Row helpers shared by the one-row-per-program kernels (norms, SiLU/GELU, int8 quantizers): the
launchers' flattening to rows and the fused norms' residual-add prologue."""
import torch
import triton
import triton.language as tl


def as_rows(t: torch.Tensor, width: int) -> torch.Tensor:
    """``t [..., width]`` as a 2-D ``[rows, width]`` with unit stride along the row (a view when possible)."""
    rows = t.reshape(-1, width)
    return rows if rows.stride(-1) == 1 else rows.contiguous()


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
