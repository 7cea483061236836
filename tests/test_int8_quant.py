"""Per-token int8 quantization and the fused norm / activation + quant kernels against their float32
references. The plain quantizer must match bit for bit; fused kernels compute their float input with a
different (but equally valid) float32 op order, so an int there may differ by one step at a rounding tie."""
import pytest
import torch

from tests.tolerances import assert_close_rel, close_quant
from tinyq.backend import force_backend
from tinyq.kernels.gelu_quant import gelu_quant, gelu_quant_reference
from tinyq.kernels.int8_quant import quantize_per_token, quantize_per_token_reference
from tinyq.kernels.layernorm import layernorm, layernorm_reference
from tinyq.kernels.layernorm_quant import layernorm_quant, layernorm_quant_reference
from tinyq.kernels import residual
from tinyq.kernels.residual import row_blocks
from tinyq.kernels.rmsnorm import rmsnorm_reference
from tinyq.kernels.rmsnorm_quant import rmsnorm_quant, rmsnorm_quant_reference
from tinyq.kernels.silu_mul_quant import silu_mul_quant, silu_mul_quant_reference
from tinyq.quant.int8_format import quantize_rows_reference

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
SHAPES = [(1, 64), (3, 100), (17, 576), (2, 3, 257)]


def static_of(x):
    return (x.float().abs().amax() / 100).reshape(1).to(x.device)  # some values clip at 127


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("static", [False, True])
def test_per_token_exact(shape, dtype, static):
    x = (torch.randn(shape) * 3).to(dtype).to(DEV)
    x.view(-1)[5] = 0.5 * x.view(-1)[5].sign()  # half-way cases must round alike
    s = static_of(x) if static else None
    with force_backend("triton"):
        q, scale = quantize_per_token(x, s)
    q_ref, scale_ref = quantize_per_token_reference(x, s)
    assert q.dtype == torch.int8 and q.shape == x.shape and scale.shape == x.shape[:-1]
    assert torch.equal(q.cpu(), q_ref.cpu()) and torch.equal(scale.cpu(), scale_ref.cpu())
    if not static:  # dequantized rows reproduce x to half a step
        err = (q.float() * scale[..., None] - x.float()).abs().amax(-1)
        assert (err <= scale * 0.5 * 1.0001).all()
        assert (q.abs().amax(-1) == 127).all()


def test_row_blocks():
    """A row as a power-of-two head and tail: no more lanes than one next_pow2 block, often far fewer."""
    assert row_blocks(1152) == (1024, 128) and row_blocks(4304) == (4096, 256)
    assert row_blocks(4096) == (4096, 0) and row_blocks(257) == (256, 1) and row_blocks(1) == (1, 0)
    for width in range(1, 5000):
        head, tail = row_blocks(width)
        assert head & (head - 1) == 0 and tail & (tail - 1) == 0
        assert width <= head + tail <= 1 << (width - 1).bit_length()


def test_row_warps_is_a_power_of_two():
    """The GPU compiler takes only power-of-two warp counts (the interpreter takes any): a row of
    1536 (SmolLM2's MLP: 1024 + 512) asked for 6 warps and failed to compile on the H200."""
    assert residual.row_warps(1024, 512, 1) == 4 and residual.row_warps(2048, 1024, 1) == 8
    for width in range(1, 70000, 7):
        for rows in (1, residual.MANY_ROWS):
            warps = residual.row_warps(*row_blocks(width), rows)
            assert 1 <= warps <= 16 and warps & (warps - 1) == 0, (width, rows, warps)


def test_reference_rounding_rule():
    q, s = quantize_rows_reference(torch.tensor([[127.0, 0.5, -0.5, 1.5, -2.5, 0.49, 0.0]]))
    assert s.item() == 1.0
    assert q.tolist() == [[127, 1, -1, 2, -3, 0, 0]]  # half away from zero
    q, s = quantize_rows_reference(torch.zeros(1, 4))
    assert q.abs().sum() == 0 and torch.isfinite(s).all()


@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES[:3])
def test_rmsnorm_quant(shape, dtype, with_residual):
    x = torch.randn(shape).to(dtype).to(DEV)
    res = torch.randn(shape).to(dtype).to(DEV) if with_residual else None
    w = (torch.rand(shape[-1]) + 0.5).to(dtype).to(DEV)
    with force_backend("triton"):
        out = rmsnorm_quant(x, w, 1e-5, res)
    ref = rmsnorm_quant_reference(x, w, 1e-5, res)
    if with_residual:
        # the interpreter's bf16 cast may truncate the sum (see test_rmsnorm): 1 ulp, then the
        # norm + quant of the kernel's own h must match
        assert_close_rel(out[2], ref[2].float(), dtype)
        ref = rmsnorm_quant_reference(out[2], w, 1e-5)
        normed = rmsnorm_reference(out[2], w, 1e-5)
    else:
        normed = rmsnorm_reference(x, w, 1e-5)
    close_quant(out[0], out[1], ref[0], ref[1])
    # the quantized rows are the norm's output to within half a step (+ the norm's own rounding)
    err = (ref[0].float() * ref[1][..., None] - normed.float()).abs()
    assert (err <= ref[1][..., None] * 0.5 + normed.float().abs() * 1e-2 + 1e-6).all()


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES[:3])
def test_layernorm_quant(shape, dtype, static):
    x = (torch.randn(shape) + 1).to(dtype).to(DEV)
    w = (torch.rand(shape[-1]) + 0.5).to(DEV)
    b = torch.randn(shape[-1]).to(DEV)
    s = static_of(x) if static else None
    with force_backend("triton"):
        q, scale = layernorm_quant(x, w, b, 1e-5, s)
    close_quant(q, scale, *layernorm_quant_reference(x, w, b, 1e-5, s))
    with force_backend("triton"):
        q, scale = layernorm_quant(x, w, None, 1e-5)
    close_quant(q, scale, *layernorm_quant_reference(x, w, None, 1e-5))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES[:3] + [(2, 5, 1152)])
def test_add_layernorm_quant(shape, dtype):
    """The residual add fused in front (a vision layer's second norm): h = x + r is returned (and
    quantized) as the unfused add would round it."""
    x = (torch.randn(shape) + 1).to(dtype).to(DEV)
    res = torch.randn(shape).to(dtype).to(DEV)
    w = (torch.rand(shape[-1]) + 0.5).to(DEV)
    b = torch.randn(shape[-1]).to(DEV)
    with force_backend("triton"):
        q, scale, h = layernorm_quant(x, w, b, 1e-5, None, res)
    ref = layernorm_quant_reference(x, w, b, 1e-5, None, res)
    # the interpreter's bf16 cast may truncate the sum (see test_rmsnorm): 1 ulp, then the norm + quant
    # of the kernel's own h must match
    assert_close_rel(h, ref[2].float(), dtype)
    close_quant(q, scale, *layernorm_quant_reference(h, w, b, 1e-5))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 128), (3, 200), (17, 1154)])
@pytest.mark.parametrize("static", [False, True])
def test_silu_mul_quant(shape, dtype, static):
    x = (torch.randn(shape) * 2).to(dtype).to(DEV)
    s = static_of(x) if static else None
    with force_backend("triton"):
        q, scale = silu_mul_quant(x, s)
    assert q.shape == (shape[0], shape[1] // 2)
    close_quant(q, scale, *silu_mul_quant_reference(x, s))


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES[:3] + [(2, 4304)])  # SigLIP's MLP width: a 4096 + 256 row
def test_gelu_quant(shape, dtype, approximate):
    x = (torch.randn(shape) * 3).to(dtype).to(DEV)
    x.view(-1)[0] = 30.0  # tanh form's tails: exp overflow must give tanh = 1, not NaN
    x.view(-1)[1] = -30.0
    with force_backend("triton"):
        q, scale = gelu_quant(x, approximate)
    close_quant(q, scale, *gelu_quant_reference(x, approximate))


def test_many_rows(monkeypatch):
    """From MANY_ROWS rows the row kernels take fewer, fatter threads (residual.row_warps): same
    results (the threshold lowered, so the interpreter runs a few rows, not a thousand)."""
    monkeypatch.setattr(residual, "MANY_ROWS", 4)
    assert residual.row_warps(1024, 128, 4) == 2 and residual.row_warps(1024, 128, 3) == 4
    x = (torch.randn(5, 1154) * 2 + 0.5).to(DEV)
    w, b = (torch.rand(1154) + 0.5).to(DEV), torch.randn(1154).to(DEV)
    with force_backend("triton"):
        outs = [quantize_per_token(x), gelu_quant(x, "tanh"), layernorm_quant(x, w, b, 1e-5)]
    refs = [quantize_per_token_reference(x), gelu_quant_reference(x, "tanh"), layernorm_quant_reference(x, w, b, 1e-5)]
    assert torch.equal(outs[0][0].cpu(), refs[0][0].cpu()) and torch.equal(outs[0][1].cpu(), refs[0][1].cpu())
    for (q, scale), (q_ref, scale_ref) in zip(outs[1:], refs[1:]):
        close_quant(q, scale, q_ref, scale_ref)


@pytest.mark.gpu
@pytest.mark.parametrize("m,k", [(1, 1152), (2048, 1152), (2048, 4304), (1030, 18944), (1, 1536), (3, 3072),
                                 (1100, 5120)])
def test_gpu_row_kernels_real_widths(m, k):
    """The row kernels compiled for the GPU at SigLIP's (1152 = 1024 + 128, 4304 = 4096 + 256),
    Qwen2-7B's MLP (18944 = 16384 + 4096), SmolLM2's MLP (1536), Llama-3.2-3B's (3072) and 13-14B
    models' (5120) widths, with few rows and with the many-rows warp rule."""
    torch.manual_seed(0)
    x = (torch.randn(m, k, device="cuda") * 2 + 0.3).half()
    w, b = torch.rand(k, device="cuda") + 0.5, torch.randn(k, device="cuda")
    q, scale = quantize_per_token(x)
    q_ref, scale_ref = quantize_per_token_reference(x)
    assert torch.equal(q, q_ref) and torch.equal(scale, scale_ref)
    close_quant(*gelu_quant(x, "tanh"), *gelu_quant_reference(x, "tanh"))
    close_quant(*layernorm_quant(x, w, b, 1e-6), *layernorm_quant_reference(x, w, b, 1e-6))
    out, h = layernorm(x, w, b, 1e-6, residual=x)
    ref, ref_h = layernorm_reference(x, w, b, 1e-6, residual=x)
    assert_close_rel(h, ref_h)
    assert_close_rel(out, ref)
    gate_up = torch.cat([x, x.flip(0)], dim=1)
    close_quant(*silu_mul_quant(gate_up), *silu_mul_quant_reference(gate_up))


def near_tie_rows(n_rows: int = 8):
    """float32 rows ``[a, v]`` (``a = max|row|``) where rounding ``v * 127 / a`` to an int depends on the
    last bit of ``127 / a``: the correctly rounded quotient and ``reciprocal(a) * 127`` give different
    ints. Found by stepping ``v`` a few ulps around each half-way point."""
    import numpy as np

    rng = np.random.default_rng(0)
    rows = []
    while len(rows) < n_rows:
        a = np.float32(rng.uniform(0.5, 8.0))
        exact, recip = np.float32(127) / a, (np.float32(1) / a) * np.float32(127)
        if exact == recip:
            continue
        k = int(rng.integers(1, 126))
        v0 = np.float32((k + 0.5) / float(exact))
        for step in range(-3, 4):
            v = np.nextafter(v0, np.float32(np.inf if step > 0 else -np.inf)) if step else v0
            for _ in range(abs(step) - 1):
                v = np.nextafter(v, np.float32(np.inf if step > 0 else -np.inf))
            r = [np.trunc(np.float32(v * inv) + np.float32(0.5)) for inv in (exact, recip)]
            if r[0] != r[1] and v < a:
                rows.append([float(a), float(v)])
                break
    return torch.tensor(rows, dtype=torch.float32)


def test_reference_uses_the_correctly_rounded_quotient():
    """The reference divides 127 by the row's absmax exactly as the kernels do (``div_rn``); torch's
    ``127 / tensor`` is a reciprocal times 127, one bit off in ~1 row in 4, which on real widths turns
    some half-way values to the other int."""
    x = near_tie_rows().to(DEV)
    with force_backend("triton"):
        q, scale = quantize_per_token(x)
    q_ref, scale_ref = quantize_per_token_reference(x)
    assert torch.equal(q.cpu(), q_ref.cpu()) and torch.equal(scale.cpu(), scale_ref.cpu())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_rows_get_nan_scale(bad):
    x = torch.randn(3, 40).to(DEV)
    x[1, 7] = bad
    w = torch.ones(40, device=DEV)
    with force_backend("triton"):
        outs = [quantize_per_token(x), rmsnorm_quant(x, w, 1e-5), layernorm_quant(x, w, None, 1e-5),
                silu_mul_quant(x), gelu_quant(x), quantize_per_token(x, static_of(x[::2]))]
    for q, scale in outs:
        assert torch.isnan(scale[1]), "a row with inf/NaN must be marked"
        assert torch.isfinite(scale[0]) and torch.isfinite(scale[2])


def test_bad_input():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="static activation scale must be one float32"):
        quantize_per_token_reference(x, torch.ones(2))
    with pytest.raises(ValueError, match="x must be fp16/bf16/fp32"):
        quantize_per_token_reference(x.to(torch.int32))
    with pytest.raises(ValueError, match="weight must be"):
        rmsnorm_quant_reference(x, torch.ones(7), 1e-5)
    with pytest.raises(ValueError, match="residual must match"):
        rmsnorm_quant_reference(x, torch.ones(8), 1e-5, x.half())
    with pytest.raises(ValueError, match="bias must be"):
        layernorm_quant_reference(x, torch.ones(8), torch.ones(3), 1e-5)
    with pytest.raises(ValueError, match="even last dim|2\\*I"):
        silu_mul_quant_reference(torch.randn(2, 7))
    with pytest.raises(ValueError, match="approximate must be"):
        gelu_quant_reference(x, "sigmoid")


def _quantizers(x, static):
    """Every row quantizer's (kernel, reference) pair on ``x``, weights of ones."""
    w = torch.ones(x.shape[-1], dtype=x.dtype, device=x.device)
    return {
        "quantize_per_token": (lambda: quantize_per_token(x, static), lambda: quantize_per_token_reference(x, static)),
        "rmsnorm_quant": (lambda: rmsnorm_quant(x, w, 1e-5, x, static_scale=static),
                          lambda: rmsnorm_quant_reference(x, w, 1e-5, x, static_scale=static)),
        "layernorm_quant": (lambda: layernorm_quant(x, w, w, 1e-5, static, x),
                            lambda: layernorm_quant_reference(x, w, w, 1e-5, static, x)),
        "silu_mul_quant": (lambda: silu_mul_quant(x, static), lambda: silu_mul_quant_reference(x, static)),
        "gelu_quant": (lambda: gelu_quant(x, "none", static), lambda: gelu_quant_reference(x, "none", static)),
    }


@pytest.mark.parametrize("static", [False, True])
def test_rows_of_no_features(static):
    """``x [M, 0]``: empty int8 rows and defined scales (an all-zero row's, or the static one) from
    the kernels and the references alike. The launchers crashed (a negative shift in the row split,
    ``reshape(-1, 0)``) or launched with N = 0, or left the scales unwritten; the references could
    not reduce the empty rows."""
    x = torch.randn(3, 0, dtype=torch.float16, device=DEV)
    s = torch.tensor([0.25], device=DEV) if static else None
    expected = torch.full((3,), 0.25) if static else torch.full((3,), 1e-10) / torch.full((3,), 127.0)
    for name, (kernel, reference) in _quantizers(x, s).items():
        with force_backend("triton"):
            got = kernel()
        want = reference()
        for out in (got, want):
            assert out[0].shape == (3, 0) and out[0].dtype == torch.int8, name
            torch.testing.assert_close(out[1].cpu(), expected, rtol=0, atol=0, msg=name)
        if len(got) == 3:  # the residual sum h = x + residual
            assert got[2].shape == want[2].shape == (3, 0)


@pytest.mark.parametrize("with_residual", [False, True])
def test_layernorm_quant_strided_weight_and_bias(with_residual):
    """Weight and bias that are strided views quantize like their contiguous copies (the kernel
    reads them at unit stride; the launcher copies such a view)."""
    x = torch.randn(5, 96, dtype=torch.float16) * 2 + 1
    res = torch.randn(5, 96, dtype=torch.float16) if with_residual else None
    w = (torch.rand(96, 2) + 0.5).half()[:, 0]
    b = torch.randn(96, 2, dtype=torch.float16)[:, 1]
    with force_backend("triton"):
        got = layernorm_quant(x, w, b, 1e-5, None, res)
        want = layernorm_quant(x, w.contiguous(), b.contiguous(), 1e-5, None, res)
    assert all(torch.equal(g, e) for g, e in zip(got, want))
    ref = layernorm_quant_reference(x, w, b, 1e-5, None, res)
    close_quant(got[0], got[1], ref[0], ref[1])


@pytest.mark.parametrize("value", [0.0, -0.5, float("inf"), float("nan")])
def test_static_scale_must_be_positive_where_it_is_free_to_read(value):
    """A static scale <= 0 (or inf/NaN) is refused where reading it costs no device sync: a CPU
    tensor (every quantizer, both paths) or ``check_value`` (a module's one-time weight check). On
    another device without ``check_value`` its value is never read (no sync on a GPU hot path)."""
    from tinyq.kernels.int8_quant import check_static_scale

    x = torch.randn(2, 8, dtype=torch.float16)
    s = torch.tensor([value])
    for name, (kernel, reference) in _quantizers(x, s).items():
        for call in (kernel, reference):
            with pytest.raises(ValueError, match="static activation scale must be positive and finite"):
                call()
    meta = torch.tensor([value], device="meta")
    check_static_scale(meta, meta.device)  # not read: no error, no sync
    check_static_scale(torch.tensor([0.5]), torch.device("cpu"), check_value=True)


def test_more_bad_input():
    x = torch.randn(2, 8)
    for call in (layernorm_quant_reference, layernorm_quant):
        with pytest.raises(ValueError, match="weight must be a float tensor"):
            call(x, torch.ones(8, dtype=torch.int32), None, 1e-5)
        with pytest.raises(ValueError, match="0-d"):
            call(torch.tensor(1.0), torch.ones(1), None, 1e-5)
    for call in (rmsnorm_quant_reference, rmsnorm_quant):
        with pytest.raises(ValueError, match="0-d"):
            call(torch.tensor(1.0), torch.ones(1), 1e-5)


def test_non_finite_rows_are_reported_by_flat_row_number():
    """Scales of a [B, S] batch once listed (batch, position) pairs flattened, read as rows 0, 0, 0, 1, ..."""
    from tinyq.quant.int8_format import check_finite_scales

    scale = torch.ones(2, 3)
    scale[0, 2], scale[1, 1] = float("nan"), float("inf")
    with pytest.raises(ValueError, match=r"^x: activations contain inf/NaN \(rows \[2, 4\]\)"):
        check_finite_scales(scale, "x")
    with pytest.raises(ValueError, match=r"\(rows \[1\]\)"):
        check_finite_scales(torch.tensor([1.0, float("nan"), 2.0]), "x")
