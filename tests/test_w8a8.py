"""W8A8Linear, the functional ops, quantize_(W8A8Config) and safetensors I/O."""
import pickle

import pytest
import torch
from torch import nn

from tests.tolerances import assert_close_rel
from tinyq import W8A8Config, W8A8Linear, quantize_
from tinyq.backend import force_backend
from tinyq.nn import load_safetensors, save_safetensors
from tinyq.nn import w8a8_linear as w8a8_linear_mod
from tinyq.ops import w8a8 as w8a8_ops
from tinyq.ops.w8a8 import QuantizedActivation, add_rms_norm_quant, quantize_activation, silu_mul_quant, w8a8_linear
from tinyq.quant.int8_format import quantize_rows_reference


def linear(k, n, bias=True, dtype=torch.float32):
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.normal_(0, 0.05)
    return lin.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 96), (3, 5, 96), (17, 96)])
def test_from_linear_matches_dequantized_math(shape, dtype):
    lin = linear(96, 40)
    mod = W8A8Linear.from_linear(lin)
    if dtype != torch.float32:
        mod.bias = mod.bias.to(dtype)
    x = torch.randn(shape).to(dtype)
    y = mod(x)
    assert y.shape == (*shape[:-1], 40) and y.dtype == dtype
    q, s = quantize_rows_reference(x.reshape(-1, 96).float())
    ref = (q.float() * s[:, None]) @ mod.dequantized_weight().t() + lin.bias.float()
    assert_close_rel(y.reshape(-1, 40), ref, dtype)
    # and close to the float layer (int8 rounding of both operands: ~1%)
    err = (y.float() - lin.float()(x.float())).abs().max() / lin.float()(x.float()).abs().max()
    assert err < 0.03


@pytest.mark.parametrize("m", [1, 3, 17])
def test_cpu_path_gives_the_kernels_numbers(m):
    mod = W8A8Linear.from_linear(linear(80, 24)).half()
    assert mod.bias.dtype == torch.float16 and mod.weight_scale.dtype == torch.float32  # scales stay fp32
    x = torch.randn(m, 80).half()
    y_cpu = mod(x)
    with force_backend("triton"):
        y_kernel = mod(x)
        qa = quantize_activation(x)
    qa_cpu = quantize_activation(x)
    assert torch.equal(qa.q, qa_cpu.q) and torch.equal(qa.scale, qa_cpu.scale)
    assert torch.equal(y_kernel, y_cpu)


def test_fused_activation_feeds_the_linear():
    mod = W8A8Linear.from_linear(linear(64, 16, bias=False))
    x, res = torch.randn(4, 64), torch.randn(4, 64)
    w = torch.rand(64) + 0.5
    qa, h = add_rms_norm_quant(x, res, w, 1e-5)
    assert isinstance(qa, QuantizedActivation) and qa.shape == (4, 64) and qa.dtype == torch.float32
    normed = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5) * w)
    assert_close_rel(mod(qa), mod(normed), torch.float16)  # same math up to the norm's rounding
    gu = torch.randn(2, 3, 128)
    down = W8A8Linear.from_linear(linear(64, 8))
    y = down(silu_mul_quant(gu))
    assert y.shape == (2, 3, 8)


def test_static_activation_scale():
    lin = linear(64, 16)
    x = torch.randn(5, 64)
    amax = x.abs().max().item()
    mod = W8A8Linear.from_linear(lin, act_scale=amax / 127)
    assert mod.act_quant == "tensor" and "input_scale" in mod.state_dict()
    q, s = quantize_rows_reference(x, torch.tensor([amax / 127]))
    ref = (q.float() * s[:, None]) @ mod.dequantized_weight().t() + lin.bias
    assert_close_rel(mod(x), ref, torch.float32)
    with pytest.raises(ValueError, match="act_scale must be one positive"):
        W8A8Linear.from_linear(lin, act_scale=0.0)


def test_quantize_filters_and_static_config():
    model = nn.Sequential()
    model.add_module("attn", nn.Sequential(linear(32, 32), linear(32, 32)))
    model.add_module("lm_head", linear(32, 10))
    quantize_(model, W8A8Config(exclude=["lm_head", "attn.1"]))
    assert isinstance(model.attn[0], W8A8Linear) and type(model.attn[1]) is nn.Linear
    assert type(model.lm_head) is nn.Linear
    model2 = nn.Sequential(linear(32, 8), linear(8, 4))
    with pytest.raises(ValueError, match="needs act_scales"):
        W8A8Config(act_quant="tensor")
    with pytest.raises(ValueError, match="layer '1': no calibrated"):
        quantize_(model2, W8A8Config(act_quant="tensor", act_scales={"0": torch.ones(32)}))
    assert type(model2[0]) is nn.Linear  # nothing changed on error
    quantize_(model2, W8A8Config(act_quant="tensor", act_scales={"0": torch.full((32,), 2.54), "1": torch.ones(8)},
                                 exclude=[]))
    assert model2[0].input_scale.item() == pytest.approx(0.02)


def test_save_load_round_trip(tmp_path):
    def build():
        m = nn.Sequential(linear(48, 24), nn.ReLU(), linear(24, 8, bias=False))
        return quantize_(m, W8A8Config(exclude=[]))

    src = build()
    path = tmp_path / "w8a8.safetensors"
    save_safetensors(src, str(path))
    torch.manual_seed(1)
    dst = load_safetensors(build(), str(path))
    x = torch.randn(3, 48)
    assert torch.equal(src(x), dst(x))
    static = quantize_(nn.Sequential(linear(48, 24)), W8A8Config(act_quant="tensor", exclude=[],
                                                                  act_scales={"0": torch.ones(48)}))
    with pytest.raises(ValueError, match="unexpected tensors"):
        load_safetensors(nn.Sequential(build()[0]), str(save_and(static, tmp_path / "s.safetensors")))


def save_and(module, path):
    save_safetensors(module, str(path))
    return path


def test_bad_input():
    mod = W8A8Linear.from_linear(linear(32, 8))
    q, s = mod.qweight, mod.weight_scale
    with pytest.raises(ValueError, match="qweight must be a 2-D int8"):
        W8A8Linear.from_quantized(q.to(torch.int32), s)
    with pytest.raises(ValueError, match=r"weight_scale must be float32 \[8\]"):
        W8A8Linear.from_quantized(q, s.half())
    with pytest.raises(ValueError, match="weight_scale must be float32"):
        W8A8Linear.from_quantized(q, s[:4])
    with pytest.raises(ValueError, match="input has 31 features"):
        mod(torch.randn(2, 31))
    with pytest.raises(ValueError, match="float tensor or a QuantizedActivation"):
        w8a8_linear(torch.zeros(2, 32, dtype=torch.int8), q, s)
    for bad in (float("nan"), float("inf")):
        x = torch.randn(3, 32)
        x[2, 5] = bad
        with pytest.raises(ValueError, match=r"inf/NaN \(rows \[2\]\)"):
            mod(x)
        with force_backend("triton"), pytest.raises(ValueError, match="inf/NaN"):
            mod(x)


def test_custom_ops_pass_opcheck():
    """Schemas and fake implementations are right, so torch.compile / CUDA graphs can trace the ops."""
    from tinyq.ops import w8a8

    x = torch.randn(3, 64)
    mod = W8A8Linear.from_linear(linear(64, 16))
    q, s = quantize_rows_reference(x)
    w = torch.rand(64) + 0.5
    cases = [
        (w8a8._int8_linear.op, (q, s, mod.qweight, mod.weight_scale, mod.bias, torch.float32)),
        (w8a8._quantize.op, (x, None)),
        (w8a8._add_rms_norm_quant.op, (x, torch.randn(3, 64), w, 1e-5, torch.tensor([0.05]))),
        (w8a8._silu_mul_quant.op, (torch.randn(2, 64), None)),
        (w8a8._gelu_quant.op, (x, "tanh", None)),
        (w8a8._layer_norm_quant.op, (x, w, None, 1e-5, None)),
    ]
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # the Triton kernels: on the GPU, or interpreted
    for op, args in cases:
        args = tuple(a.to(dev) if torch.is_tensor(a) else a for a in args)
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def test_weights_validated_once_and_again_when_replaced():
    """``W8A8Linear`` checks its weight tensors once, not on every call (host cost), and again when
    a buffer is replaced: a bad replacement is named, never launched."""
    mod = W8A8Linear.from_linear(linear(48, 16))
    x = torch.randn(3, 48)
    with force_backend("triton"):
        y = mod(x)
        assert torch.equal(y, w8a8_linear(x, mod.qweight, mod.weight_scale, mod.bias))
        calls = []
        real_check = w8a8_ops.check_w8a8_weight
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(w8a8_linear_mod, "check_w8a8_weight", lambda *a: calls.append(a) or real_check(*a))
            mod(x)
            assert calls == []  # the same tensors: no new validation
            mod.bias = mod.bias.clone()
            mod(x)
            assert len(calls) == 1  # a replaced tensor is checked, even where it reuses a freed one's id
        # pickling or copying forgets what was checked; the copy checks its own tensors
        copied = pickle.loads(pickle.dumps(mod))
        assert torch.equal(copied(x), mod(x))
        mod.weight_scale = mod.weight_scale[:8].clone()
        with pytest.raises(ValueError, match=r"weight scale must be float32 \[16\]"):
            mod(x)
        mod.weight_scale = torch.ones(16)
        mod.qweight = mod.qweight.to(torch.int16)
        with pytest.raises(ValueError, match="weight must be a 2-D int8 tensor"):
            mod(x)


def test_weights_are_symmetric_int8_per_output_channel():
    """qweight = round(w / s) with s = max|w_row| / 127, int8 in [-127, 127]; a zero row keeps a tiny
    positive scale instead of dividing by zero."""
    lin = linear(64, 6, bias=False)
    with torch.no_grad():
        lin.weight[2] = 0.0
        lin.weight[4, 7] = -1.0  # this row's max |w| lies on a negative entry
    mod = W8A8Linear.from_linear(lin)
    w = lin.weight.detach().float()
    scale = w.abs().amax(1).clamp(min=1e-8) / 127
    assert mod.qweight.dtype == torch.int8 and mod.weight_scale.dtype == torch.float32
    torch.testing.assert_close(mod.weight_scale, scale, rtol=0, atol=0)
    assert torch.equal(mod.qweight, torch.round(w / scale[:, None]).to(torch.int8))
    assert mod.qweight[4, 7] == -127 and int(mod.qweight.abs().max()) == 127 and not mod.qweight[2].any()


def test_quantize_include_filter():
    model = nn.Sequential()
    model.add_module("attn", nn.Sequential(linear(32, 32), linear(32, 32)))
    model.add_module("mlp", nn.Sequential(linear(32, 32)))
    model.add_module("lm_head", linear(32, 10))
    quantize_(model, W8A8Config(include=["attn.*"]))
    assert isinstance(model.attn[0], W8A8Linear) and isinstance(model.attn[1], W8A8Linear)
    assert type(model.mlp[0]) is nn.Linear and type(model.lm_head) is nn.Linear


@pytest.mark.gpu
def test_gpu_non_finite_activations_are_marked_or_refused(monkeypatch):
    """On CUDA a row holding inf/NaN comes out NaN (its scale is NaN), the other rows stay exact;
    with TINYQ_CHECK_FINITE=1 the call refuses instead, naming the row."""
    mod = W8A8Linear.from_linear(linear(64, 16)).to("cuda").half()
    x = torch.randn(3, 64, device="cuda", dtype=torch.float16)
    x[1, 5] = float("inf")
    monkeypatch.delenv("TINYQ_CHECK_FINITE", raising=False)
    y = mod(x)
    assert torch.isnan(y[1]).all() and torch.isfinite(y[0]).all() and torch.isfinite(y[2]).all()
    assert torch.equal(y[[0, 2]], mod(x[[0, 2]]))
    monkeypatch.setenv("TINYQ_CHECK_FINITE", "1")
    with pytest.raises(ValueError, match=r"inf/NaN \(rows \[1\]"):
        mod(x)


def test_empty_batch_gives_empty_rows():
    """A batch of no rows (the CPU path's int32 reference included) is [0, N], as for W4A16Linear."""
    from tinyq.nn import W8A8Linear

    m = W8A8Linear.from_linear(torch.nn.Linear(64, 32).half())
    assert m(torch.randn(0, 64, dtype=torch.float16)).shape == (0, 32)
    assert m(torch.randn(2, 0, 64, dtype=torch.float16)).shape == (2, 0, 32)



@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_module_weight_check_refuses_strided_bias_and_bad_static_scale(backend):
    """The weight side a W8A8Linear checks once: a strided bias (the kernels read it at unit stride:
    wrong outputs before) and a static activation scale <= 0 or non-finite (read there once, on any
    device) are named errors."""
    base = W8A8Linear.from_linear(linear(32, 8, dtype=torch.float16), act_scale=0.05)
    x = torch.randn(3, 32, dtype=torch.float16)
    strided = W8A8Linear.from_quantized(base.qweight, base.weight_scale, torch.randn(8, 2).half()[:, 0])
    with force_backend(backend), pytest.raises(ValueError, match="bias must be contiguous"):
        strided(x)
    for bad in (0.0, -0.05, float("nan")):
        mod = W8A8Linear.from_quantized(base.qweight, base.weight_scale, base.bias, torch.tensor([bad]))
        with force_backend(backend), pytest.raises(ValueError, match="static activation scale must be positive"):
            mod(x)
    with force_backend(backend):
        y = base(x)
    assert_close_rel(y, w8a8_linear(x, base.qweight, base.weight_scale, base.bias, base.input_scale))

