"""One tolerance table for kernel tests: max |out - ref| / max |ref| by output dtype.

The references are float32; the budget is the output rounding (fp16: 2^-11, bf16: 2^-8 relative)
plus a few ulps for the kernel's different summation order.
"""
import torch

REL_TOL = {torch.float16: 4e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-5}


def assert_close_rel(out: torch.Tensor, ref: torch.Tensor, dtype=None):
    dtype = dtype or out.dtype
    assert torch.isfinite(out).all(), "output has NaN/Inf (unwritten poison?)"
    err = (out.float() - ref.float()).abs().max().item()
    scale = ref.float().abs().max().item()
    assert err <= REL_TOL[dtype] * scale + 1e-6, f"max abs err {err:.4g} > {REL_TOL[dtype]} x {scale:.4g}"


def close_quant(q, s, q_ref, s_ref):
    """Scales within float32 rounding; ints equal except a rare +-1 at a rounding tie."""
    torch.testing.assert_close(s.cpu(), s_ref.cpu(), rtol=2e-6, atol=0)
    diff = (q.cpu().int() - q_ref.cpu().int()).abs()
    assert diff.max() <= 1 and diff.float().mean() < 0.01, f"max {diff.max()}, mean {diff.float().mean()}"
