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


def _overflowing_model(dtype=torch.float32):
    """Layer 0's down_proj writes ~3e38 (float32) / ~6e4 (float16) per input into residual channel 5,
    so some tokens' layer-0 outputs overflow and layer 1 sees inf/NaN."""
    model = tiny_model("llama", hidden=64, inter=128, layers=2, heads=4, kv=2)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[5, :] = torch.finfo(dtype).max
    return model.to(dtype)


def _params(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model, before):
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed == [], f"a refused call changed {changed[:4]}"


@pytest.mark.parametrize("dtype,advice", [(torch.float32, "so large that float32 overflows"),
                                          (torch.float16, "float16 activations overflow above 65504")])
def test_calibration_that_overflows_is_refused_naming_the_layer(dtype, advice):
    """Non-finite statistics would read as "never active" channels (NaN > clamp is False) and become NaN
    static input scales: calibrate stops at the first layer whose inputs overflowed, naming it, its
    linear and what to do, and leaves the model as it was."""
    model = _overflowing_model(dtype)
    before = _params(model)
    blocks = torch.randint(3, 200, (3, 17), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"SmoothQuant calibration, layer 1: the inputs of "
                                         rf"model\.layers\.1\.self_attn\.q_proj hold inf/NaN.*{advice}"):
        calibrate(model, blocks, progress=False)
    _assert_unchanged(model, before)


def test_non_finite_statistics_are_refused_before_anything_is_folded(model_and_blocks):
    model, blocks = model_and_blocks
    stats = calibrate(model, blocks, progress=False)
    model = copy.deepcopy(model)
    before = _params(model)
    for name in ("model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"):  # smoothed, or only returned
        bad = dict(stats, **{name: stats[name].clone()})
        bad[name][7] = float("nan")
        with pytest.raises(ValueError, match=rf"act_scales\['{name}'\] holds inf/NaN"):
            smooth_(model, bad, alpha=0.5)
        _assert_unchanged(model, before)


def test_a_refused_smooth_leaves_every_layer_unchanged(model_and_blocks):
    """Statistics that fit layer 0 but not layer 1 (missing, or another width) are refused before layer 0
    is folded: a retry with the right statistics does not smooth layer 0 twice."""
    model, blocks = model_and_blocks
    stats = calibrate(model, blocks, progress=False)
    target, fresh = copy.deepcopy(model), copy.deepcopy(model)
    before = _params(target)
    no_layer_1 = {k: v for k, v in stats.items() if ".layers.1." not in k}
    with pytest.raises(ValueError, match=r"no statistics for 'model\.layers\.1\.self_attn\.q_proj'"):
        smooth_(target, no_layer_1, alpha=0.5)
    _assert_unchanged(target, before)
    narrow = dict(stats, **{"model.layers.1.mlp.up_proj": torch.ones(32)})
    with pytest.raises(ValueError, match=r"act_scales for 'model\.layers\.1\.mlp\.up_proj': shape \(32,\), expected \(64,\)"):
        smooth_(target, narrow, alpha=0.5)
    _assert_unchanged(target, before)
    got, want = smooth_(target, stats, alpha=0.5), smooth_(fresh, stats, alpha=0.5)
    _assert_unchanged(target, _params(fresh))
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_fold_smoothing_refuses_non_finite_inputs_and_changes_nothing():
    """The fold's own guard (the vision tower calls it directly): NaN statistics or inf weights are an
    error naming the group, never a NaN or zero scale folded into the norm."""
    from tinyq.quant.smoothquant import fold_smoothing

    norm, lin = torch.nn.LayerNorm(8), torch.nn.Linear(8, 4)
    before = [t.clone() for t in (norm.weight, norm.bias, lin.weight)]
    x_max = torch.ones(8)
    x_max[2] = float("nan")
    with pytest.raises(ValueError, match="layers.3 -> fc1: the activation statistics hold inf/NaN in 1 of 8"):
        fold_smoothing(norm, [lin], x_max, 0.5, where="layers.3 -> fc1")
    with torch.no_grad():
        norm.weight[1] = float("nan")
    with pytest.raises(ValueError, match="smoothing scale is not finite and positive in 1 channels"):
        fold_smoothing(norm, [lin], torch.ones(8), 0.5)
    assert torch.equal(norm.bias, before[1]) and torch.equal(lin.weight, before[2])


def test_static_scales_from_non_finite_statistics_are_never_written(model_and_blocks, tmp_path):
    from tinyq.quant.w8a8_checkpoint import save_w8a8

    model, blocks = model_and_blocks
    stats = calibrate(model, blocks, progress=False)
    name = "model.layers.1.self_attn.o_proj"
    stats[name] = stats[name].clone()
    stats[name][0] = float("inf")
    with pytest.raises(ValueError, match=rf"'{name}' hold inf/NaN .*no static input scale can be written"):
        save_w8a8(copy.deepcopy(model), tmp_path / "out", None, act_quant="tensor", static_stats=stats)
    assert list(tmp_path.iterdir()) == []  # nothing written, no temporary left behind
