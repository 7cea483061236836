"""SmoothQuant: calibration statistics, the smoothing fold (exact in float), and its effect on W8A8 error."""
import copy

import pytest
import torch

from tests.awq_tiny_models import tiny_model
from tinyq import W8A8Config, quantize_, smooth_
from tinyq.quant.smoothquant import calibrate


@pytest.fixture(scope="module")
def model_and_blocks():
    torch.manual_seed(0)
    model = tiny_model("llama", hidden=64, inter=128, layers=2, heads=4, kv=2)
    blocks = torch.randint(3, 200, (4, 32))
    return model, blocks


def test_calibrate_records_per_channel_max(model_and_blocks):
    model, blocks = model_and_blocks
    stats = calibrate(model, blocks, batch_blocks=3, progress=False)
    assert len(stats) == 2 * 7
    seen = {}

    def hook(name):
        def fn(_m, args):
            a = args[0].abs().reshape(-1, args[0].shape[-1]).amax(0)
            seen[name] = torch.maximum(seen[name], a) if name in seen else a
        return fn

    hooks = [mod.register_forward_pre_hook(hook(n)) for n, mod in model.named_modules() if n in stats]
    with torch.no_grad():
        model(blocks)
    for h in hooks:
        h.remove()
    for name, v in stats.items():  # the whole-model forward sees the same inputs
        torch.testing.assert_close(v, seen[name].float(), rtol=1e-5, atol=1e-6)


def test_smoothing_is_exact_in_float_and_follows_the_formula(model_and_blocks):
    model, blocks = model_and_blocks
    stats = calibrate(model, blocks, progress=False)
    smoothed = copy.deepcopy(model)
    new_stats = smooth_(smoothed, stats, alpha=0.5)
    with torch.no_grad():
        torch.testing.assert_close(smoothed(blocks).logits, model(blocks).logits, rtol=1e-4, atol=1e-4)
    layer, before = smoothed.model.layers[0], model.model.layers[0]
    attn = before.self_attn
    x_max = stats["model.layers.0.self_attn.q_proj"].clamp(min=1e-5)
    w_max = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).abs().amax(0).clamp(min=1e-5)
    s = x_max.sqrt() / w_max.sqrt()
    torch.testing.assert_close(layer.input_layernorm.weight, before.input_layernorm.weight / s)
    torch.testing.assert_close(layer.self_attn.k_proj.weight, attn.k_proj.weight * s)
    torch.testing.assert_close(new_stats["model.layers.0.self_attn.v_proj"], stats["model.layers.0.self_attn.v_proj"] / s)
    # o_proj / down_proj are not smoothed
    assert torch.equal(layer.self_attn.o_proj.weight, attn.o_proj.weight)
    assert torch.equal(new_stats["model.layers.1.mlp.down_proj"], stats["model.layers.1.mlp.down_proj"])


def test_smoothing_lowers_w8a8_error_on_outlier_channels(model_and_blocks):
    model, blocks = model_and_blocks
    stats = calibrate(model, blocks, progress=False)
    with torch.no_grad():
        ref = model(blocks).logits
        plain = quantize_(copy.deepcopy(model), W8A8Config())(blocks).logits
        sm = copy.deepcopy(model)
        sm_stats = smooth_(sm, stats, alpha=0.85)
        sq = quantize_(sm, W8A8Config())(blocks).logits
        static = quantize_(copy.deepcopy(sm), W8A8Config(act_quant="tensor", act_scales=sm_stats))(blocks).logits
    err = lambda y: (y - ref).pow(2).mean().item()  # noqa: E731
    assert err(sq) < err(plain), (err(sq), err(plain))
    assert err(static) < 10 * err(plain)  # static scales are coarser, but must still work


def test_bad_input(model_and_blocks):
    model, blocks = model_and_blocks
    stats = calibrate(model, blocks, progress=False)
    with pytest.raises(ValueError, match="alpha must lie"):
        smooth_(copy.deepcopy(model), stats, alpha=1.5)
    with pytest.raises(ValueError, match="no statistics for 'model.layers.0.self_attn.q_proj'"):
        smooth_(copy.deepcopy(model), {}, alpha=0.5)
    with pytest.raises(ValueError, match="smooth_ the floating-point model"):
        smooth_(quantize_(copy.deepcopy(model), W8A8Config()), stats)
    with pytest.raises(ValueError, match="no Llama/Qwen2 decoder layers"):
        smooth_(torch.nn.Linear(4, 4), stats)


def test_default_alpha_clamps_and_the_mlp_fold(model_and_blocks):
    """alpha defaults to 0.85; a channel that never fires (and whose weights are zero) keeps s = 1,
    not an inf/NaN or overflowing scale; post_attention_layernorm folds into gate/up by the same formula."""
    from tinyq.quant.smoothquant import DEFAULT_ALPHA

    assert DEFAULT_ALPHA == 0.85
    model, blocks = model_and_blocks
    stats = calibrate(model, blocks, progress=False)
    model = copy.deepcopy(model)
    mlp = model.model.layers[1].mlp
    name = "model.layers.1.mlp.gate_proj"
    stats = dict(stats, **{name: stats[name].clone(), "model.layers.1.mlp.up_proj": stats[name].clone()})
    stats[name][3] = stats["model.layers.1.mlp.up_proj"][3] = 0.0  # a dead channel ...
    with torch.no_grad():
        mlp.gate_proj.weight[:, 3] = 0.0  # ... with zero weights in both linears that read it
        mlp.up_proj.weight[:, 3] = 0.0
    before = copy.deepcopy(model.model.layers[1])
    smooth_(model, stats)  # the default alpha
    a = DEFAULT_ALPHA
    x_max = stats[name].clamp(min=1e-5)
    w_max = torch.cat([before.mlp.gate_proj.weight, before.mlp.up_proj.weight]).detach().abs().amax(0).clamp(min=1e-5)
    s = x_max.pow(a) / w_max.pow(1 - a)
    s[3] = 1.0  # the dead channel: nothing to balance
    layer = model.model.layers[1]
    assert torch.isfinite(layer.post_attention_layernorm.weight).all()
    torch.testing.assert_close(layer.post_attention_layernorm.weight, before.post_attention_layernorm.weight / s)
    torch.testing.assert_close(layer.mlp.up_proj.weight, before.mlp.up_proj.weight * s)
    assert torch.isfinite(layer.mlp.gate_proj.weight).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_channel_never_active_keeps_scale_one(dtype):
    """A residual channel that is zero in calibration has nothing to balance: s = 1 there. Its clamped
    statistic would give s ~ 1e-5, and the fp16 norm weight / s would overflow to inf (0 * inf = NaN)."""
    torch.manual_seed(0)
    model = tiny_model("llama", hidden=64, inter=128, layers=2, heads=4, kv=2)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 3] = 0  # layer 0's input: channel 3 is always 0
    model = model.to(dtype)
    blocks = torch.randint(3, 200, (4, 32))
    stats = calibrate(model, blocks, progress=False)
    assert float(stats["model.layers.0.self_attn.q_proj"][3]) == 0.0
    smoothed = copy.deepcopy(model)
    smooth_(smoothed, stats, alpha=0.85)
    before = model.model.layers[0].input_layernorm.weight
    assert float(smoothed.model.layers[0].input_layernorm.weight[3]) == float(before[3])  # s = 1
    with torch.no_grad():
        ref, out = model(blocks).logits.float(), smoothed(blocks).logits.float()
    assert torch.isfinite(out).all()
    assert (out - ref).abs().max() <= 0.05 * ref.abs().max()  # half-precision rounding of the folded weights
