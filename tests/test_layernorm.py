"""LayerNorm (+ fused residual add) Triton kernel vs its float32 reference."""
import pytest
import torch

from tests.tolerances import assert_close_rel
from tinyq.backend import force_backend
from tinyq.kernels import residual
from tinyq.kernels.layernorm import layernorm, layernorm_reference
from tinyq.ops.layer_norm import add_layer_norm, layer_norm

SHAPES = [(1, 64), (3, 72), (5, 100), (2, 3, 1152)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("with_residual", [False, True])
def test_layernorm_matches_reference(shape, dtype, with_residual):
    x = (torch.randn(shape) * 3 + 1).to(dtype)  # a non-zero mean: the centering must matter
    res = torch.randn(shape).to(dtype) if with_residual else None
    w = (torch.rand(shape[-1]) + 0.5).to(dtype)
    b = torch.randn(shape[-1]).to(dtype)
    ref = layernorm_reference(x, w, b, 1e-6, res)
    with force_backend("triton"):
        out = layernorm(x, w, b, 1e-6, res)
    if with_residual:
        (out, h), (ref, ref_h) = out, ref
        assert_close_rel(h, ref_h)
    assert out.shape == x.shape and out.dtype == dtype
    assert_close_rel(out, ref)


def test_layernorm_many_rows(monkeypatch):
    """From residual.MANY_ROWS rows the kernel runs fewer, fatter threads (threshold lowered here)."""
    monkeypatch.setattr(residual, "MANY_ROWS", 4)
    x, res = torch.randn(6, 1152) * 3 + 1, torch.randn(6, 1152)
    w, b = torch.rand(1152) + 0.5, torch.randn(1152)
    with force_backend("triton"):
        out, h = layernorm(x, w, b, 1e-6, res)
    ref, ref_h = layernorm_reference(x, w, b, 1e-6, res)
    assert_close_rel(h, ref_h)
    assert_close_rel(out, ref)


def test_reference_matches_textbook_formula():
    x = torch.randn(4, 96) * 2 + 3
    w, b = torch.rand(96) + 0.5, torch.randn(96)
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    expected = (x - mean) / torch.sqrt(var + 1e-5) * w + b
    torch.testing.assert_close(layernorm_reference(x, w, b, 1e-5), expected, rtol=1e-5, atol=1e-5)


def test_ops_dispatch_and_custom_op():
    x, r = torch.randn(2, 48).half(), torch.randn(2, 48).half()
    w, b = torch.rand(48).half() + 0.5, torch.randn(48).half()
    out, h = add_layer_norm(x, r, w, b, 1e-5)  # CPU: reference path
    with force_backend("triton"):
        out_t, h_t = add_layer_norm(x, r, w, b, 1e-5)  # custom op -> Triton (interpreted)
        single = layer_norm(x, w, b, 1e-5)
    assert torch.equal(h, h_t)
    assert_close_rel(out_t, out)
    assert_close_rel(single, layernorm_reference(x, w, b, 1e-5))


def test_bad_input():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="bias must be"):
        layernorm_reference(x, torch.ones(8), torch.ones(7), 1e-5)
    with pytest.raises(ValueError, match="residual must match"):
        layernorm_reference(x, torch.ones(8), torch.ones(8), 1e-5, x.half())
    with pytest.raises(ValueError, match="x must be"):
        layernorm_reference(x.int(), torch.ones(8), torch.ones(8), 1e-5)


@pytest.mark.parametrize("with_residual", [False, True])
def test_strided_weight_and_bias(with_residual):
    """Weight and bias that are strided views (columns of a packed parameter) give the right
    answer: the kernel reads them at unit stride, so the launcher copies such a view."""
    x = torch.randn(5, 96, dtype=torch.float16) * 2 + 1
    res = torch.randn(5, 96, dtype=torch.float16) if with_residual else None
    w = (torch.rand(96, 2) + 0.5).half()[:, 0]
    b = torch.randn(96, 2, dtype=torch.float16)[:, 1]
    assert w.stride() == (2,) and b.stride() == (2,)
    with force_backend("triton"):
        out = layernorm(x, w, b, 1e-5, res)
    ref = layernorm_reference(x, w.contiguous(), b.contiguous(), 1e-5, res)
    if with_residual:
        (out, h), (ref, ref_h) = out, ref
        assert torch.equal(h, ref_h)
    assert_close_rel(out, ref)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bias_is_optional(backend):
    """``bias=None`` is a LayerNorm without bias, as in ``torch.nn.functional.layer_norm`` and
    layer_norm_quant (it raised AttributeError)."""
    x, r = torch.randn(3, 72).half(), torch.randn(3, 72).half()
    w = (torch.rand(72) + 0.5).half()
    expected = torch.nn.functional.layer_norm(x.float(), (72,), w.float(), None, 1e-5)
    h_expected = (x.float() + r.float()).half()
    expected_h = torch.nn.functional.layer_norm(h_expected.float(), (72,), w.float(), None, 1e-5)
    with force_backend(backend):
        out = layer_norm(x, w, None, 1e-5)
        out_h, h = add_layer_norm(x, r, w, None, 1e-5)
    assert_close_rel(out, expected, torch.float16)
    assert torch.equal(h, h_expected)
    assert_close_rel(out_h, expected_h, torch.float16)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_rows_of_no_features(backend):
    """``x [M, 0]`` gives empty outputs, as torch does, without a launch (it crashed in the
    launcher's row split and reshape)."""
    x, w = torch.randn(3, 0, dtype=torch.float16), torch.ones(0, dtype=torch.float16)
    with force_backend(backend):
        assert layer_norm(x, w, w, 1e-5).shape == (3, 0)
        out, h = add_layer_norm(x, x, w, w, 1e-5)
    assert out.shape == h.shape == (3, 0)


def test_bad_weights_and_0d_input():
    x = torch.randn(2, 8)
    for call in (layernorm_reference, layernorm):
        with pytest.raises(ValueError, match="weight must be a float tensor"):
            call(x, torch.ones(8, dtype=torch.int32), torch.ones(8), 1e-5)
        with pytest.raises(ValueError, match="bias must be a float tensor"):
            call(x, torch.ones(8), torch.ones(8, dtype=torch.int32), 1e-5)
        with pytest.raises(ValueError, match="0-d"):
            call(torch.tensor(1.0), torch.ones(1), torch.ones(1), 1e-5)
