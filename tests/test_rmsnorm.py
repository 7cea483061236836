"""RMSNorm (+ fused residual add) Triton kernel vs its float32 reference."""
import pytest
import torch

from tests.tolerances import assert_close_rel
from tinyq.backend import force_backend
from tinyq.kernels.paired import paired_plane, unpair_rows_reference
from tinyq.kernels.rmsnorm import rmsnorm, rmsnorm_reference
from tinyq.ops import add_rms_norm, rms_norm

SHAPES = [(1, 64), (3, 576), (5, 100), (2, 3, 1000)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rmsnorm_matches_reference(shape, dtype, with_residual):
    x = torch.randn(shape).to(dtype)
    res = torch.randn(shape).to(dtype) if with_residual else None
    w = (torch.rand(shape[-1]) + 0.5).to(dtype)
    ref = rmsnorm_reference(x, w, 1e-5, res)
    with force_backend("triton"):
        out = rmsnorm(x, w, 1e-5, res)
    if with_residual:
        out, h = out
        ref, ref_h = ref
        # the residual sum is one rounded add: bit-identical where the interpreter rounds to
        # nearest-even like the GPU (fp16/fp32); its bf16 cast may truncate, so 1 ulp there
        if dtype == torch.bfloat16:
            assert_close_rel(h, ref_h)
        else:
            assert torch.equal(h, ref_h)
    assert out.shape == x.shape and out.dtype == dtype
    assert_close_rel(out, ref)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rmsnorm_paired_output(dtype, with_residual, monkeypatch):
    """The norm writing a decode GEMV's paired input: the same values, in the paired layout, nothing
    written to the padding (K=576: 144 of 160 entries a plane; the output starts as NaN)."""
    import tinyq.kernels.rmsnorm as rmsnorm_kernel
    from tinyq.kernels.paired import PairedRows

    real = rmsnorm_kernel.empty_paired_rows
    monkeypatch.setattr(rmsnorm_kernel, "empty_paired_rows",
                        lambda *a: PairedRows(real(*a).data.fill_(float("nan")), a[1]))
    x = torch.randn(3, 576).to(dtype)
    res = torch.randn(3, 576).to(dtype) if with_residual else None
    w = (torch.rand(576) + 0.5).to(dtype)
    ref = rmsnorm_reference(x, w, 1e-5, res)
    with force_backend("triton"):
        out = rmsnorm(x, w, 1e-5, res, paired=True)
    assert int((out[0] if with_residual else out).data.isnan().sum()) == 3 * (4 * paired_plane(576) - 576)
    if with_residual:
        (out, h), (ref, ref_h) = out, ref
        assert_close_rel(h, ref_h)
    assert out.k == 576 and out.data.shape == (3, 4 * paired_plane(576))
    assert torch.equal(unpair_rows_reference(out), rmsnorm(x, w, 1e-5, res)[0] if with_residual else
                       rmsnorm(x, w, 1e-5))
    assert_close_rel(unpair_rows_reference(out), ref)
    with pytest.raises(ValueError, match="fp16 or bf16"), force_backend("triton"):
        rmsnorm(x.float(), w, 1e-5, paired=True)


def test_reference_matches_textbook_formula():
    x = torch.randn(4, 96, dtype=torch.float32)
    w = torch.rand(96) + 0.5
    expected = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6) * w
    torch.testing.assert_close(rmsnorm_reference(x, w, 1e-6), expected, rtol=1e-5, atol=1e-6)


def test_ops_dispatch_and_custom_op():
    x = torch.randn(2, 48, dtype=torch.float16)
    r = torch.randn(2, 48, dtype=torch.float16)
    w = torch.rand(48).half() + 0.5
    out, h = add_rms_norm(x, r, w, 1e-5)  # CPU: reference path
    with force_backend("triton"):
        out_t, h_t = add_rms_norm(x, r, w, 1e-5)  # custom op -> Triton (interpreted)
        single = rms_norm(x, w, 1e-5)
    assert torch.equal(h, h_t)
    assert_close_rel(out_t, out)
    assert_close_rel(single, rmsnorm_reference(x, w, 1e-5))


def test_bad_input():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="weight must be"):
        rmsnorm_reference(x, torch.ones(7), 1e-5, x)
    with pytest.raises(ValueError, match="residual must match"):
        with force_backend("triton"):
            rmsnorm(x, torch.ones(8), 1e-5, torch.randn(2, 8).half())
    with pytest.raises(ValueError, match="x must be"):
        with force_backend("triton"):
            rmsnorm(x.to(torch.int32), torch.ones(8), 1e-5)


def test_strided_weights_and_empty_rows():
    """A weight that is a strided view gives the right answer; rows of no features give empty
    outputs, as the torch path does; a non-float weight is refused."""
    from tinyq.kernels.rmsnorm_quant import rmsnorm_quant, rmsnorm_quant_reference
    from tinyq.ops import silu_mul

    x = torch.randn(3, 64, dtype=torch.float16)
    w = torch.randn(128, dtype=torch.float16)[::2]
    assert_close_rel(rmsnorm(x, w, 1e-5), rmsnorm_reference(x, w, 1e-5))
    q, s = rmsnorm_quant(x, w, 1e-5)
    q_ref, s_ref = rmsnorm_quant_reference(x, w, 1e-5)
    assert (q.int() - q_ref.int()).abs().max() <= 1
    torch.testing.assert_close(s, s_ref, rtol=1e-3, atol=0)
    with force_backend("triton"):
        assert rms_norm(torch.randn(3, 0), torch.ones(0), 1e-5).shape == (3, 0)
        assert silu_mul(torch.randn(3, 0)).shape == (3, 0)
    with pytest.raises(ValueError, match="weight must be a float tensor"):
        rmsnorm(x, torch.ones(64, dtype=torch.int32), 1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_rows_of_no_features_with_residual_and_0d_input(backend):
    """``add_rms_norm`` of ``x [M, 0]`` gives empty outputs (the residual's ``reshape(-1, 0)``
    raised); a 0-d x is a clear error, not an IndexError."""
    x, w = torch.randn(3, 0, dtype=torch.float16), torch.ones(0, dtype=torch.float16)
    with force_backend(backend):
        out, h = add_rms_norm(x, x, w, 1e-5)
        assert out.shape == h.shape == (3, 0)
        with pytest.raises(ValueError, match="0-d"):
            rms_norm(torch.tensor(1.0), torch.ones(1), 1e-5)
