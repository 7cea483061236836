"""SiLU(gate) * up Triton kernel vs its float32 reference."""
import pytest
import torch

from tests.tolerances import assert_close_rel
from tinyq.backend import force_backend
from tinyq.kernels.silu_mul import silu_mul, silu_mul_reference
from tinyq.ops import silu_mul as silu_mul_op


@pytest.mark.parametrize("shape", [(1, 2 * 1536), (3, 2 * 37), (2, 5, 2 * 1100)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_silu_mul_matches_reference(shape, dtype):
    x = (torch.randn(shape) * 3).to(dtype)
    ref = silu_mul_reference(x)
    with force_backend("triton"):
        out = silu_mul(x)
    assert out.shape == (*shape[:-1], shape[-1] // 2) and out.dtype == dtype
    assert_close_rel(out, ref)


def test_reference_formula_and_op():
    x = torch.randn(4, 20)
    gate, up = x[:, :10], x[:, 10:]
    expected = gate * torch.sigmoid(gate) * up
    torch.testing.assert_close(silu_mul_reference(x), expected)
    with force_backend("triton"):
        assert_close_rel(silu_mul_op(x.half()), expected)


def test_bad_input():
    with pytest.raises(ValueError, match="even last dim"):
        silu_mul_reference(torch.randn(2, 7))
    with pytest.raises(ValueError, match="must be fp16"):
        with force_backend("triton"):
            silu_mul(torch.ones(2, 8, dtype=torch.int64))
