"""AWQ search on tiny random Llama/Qwen2 models with planted outlier channels (CPU)."""
import copy

import pytest
import torch
from awq_tiny_models import random_text, tiny_model, word_tokenizer

from tinyq.quant import calib
from tinyq.quant.arch import decoder_of, layer_kwargs, run_module
from tinyq.quant.awq import (
    AwqConfig,
    AwqResults,
    apply_awq,
    awq_search,
    clip_weight_,
    fake_quantize_model_,
    search_clip,
)
from tinyq.quant.format import fake_quantize


def _blocks(n=6, length=48, vocab=256, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n, length), generator=g)


def _layer_out_error(model, ref_model, blocks, layer_idx=0):
    """MSE of one decoder layer's output (same input for both models)."""
    dec, ref_dec = decoder_of(model), decoder_of(ref_model)
    x = ref_dec.embed_tokens(blocks)
    kw = layer_kwargs(ref_dec, x[:1])
    with torch.no_grad():
        y_ref = run_module(ref_dec.layers[layer_idx], x, kw)
        y = run_module(dec.layers[layer_idx], x, kw)
    return (y - y_ref).pow(2).mean().item()


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("w_bit,group_size", [(4, 32), (3, 64)])
def test_auto_scale_beats_rtn_on_block_output(kind, w_bit, group_size):
    model = tiny_model(kind)
    blocks = _blocks()
    rtn = fake_quantize_model_(copy.deepcopy(model), w_bit, group_size)
    awq = copy.deepcopy(model)
    awq_search(awq, blocks, AwqConfig(w_bit=w_bit, group_size=group_size, clip=False), progress=False)
    fake_quantize_model_(awq, w_bit, group_size)
    err_rtn = _layer_out_error(rtn, model, blocks)
    err_awq = _layer_out_error(awq, model, blocks)
    assert err_awq < 0.7 * err_rtn, (err_awq, err_rtn)


@pytest.mark.parametrize("kind,kv", [("llama", 4), ("llama", 2), ("qwen2", 2)])
def test_scale_folding_keeps_the_fp_function(kind, kv):
    """Folding the scales (incl. v->o under grouped-query attention) changes no fp output."""
    model = tiny_model(kind, kv=kv)
    blocks = _blocks(n=3)
    ref = model(blocks).logits
    searched = copy.deepcopy(model)
    res = awq_search(searched, blocks, AwqConfig(group_size=32, clip=False), progress=False)
    assert set(res.scales) == {f"layers.{i}.{p}" for i in range(2) for p in
                               ("input_layernorm", "self_attn.v_proj", "post_attention_layernorm", "mlp.up_proj")}
    assert not torch.equal(searched.model.layers[0].input_layernorm.weight, model.model.layers[0].input_layernorm.weight)
    torch.testing.assert_close(searched(blocks).logits, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("asym", [False, True])
def test_auto_clip_lowers_group_error(asym):
    torch.manual_seed(0)
    n, k, gs = 48, 128, 32
    w = torch.randn(n, k)
    w[torch.rand(n, k) < 0.02] *= 8  # heavy-tailed groups: clipping pays off
    x = torch.randn(256, k)
    cfg = AwqConfig(w_bit=3, group_size=gs, clip_asym=asym)
    ratio = search_clip(w, x, cfg)
    assert ratio.shape == (n, k // gs, 2) and ratio.min() >= 0.5 and ratio.max() <= 1.0
    assert (ratio < 1).any() and asym == bool((ratio[..., 0] != ratio[..., 1]).any())

    def group_err(weight):
        wq = fake_quantize(weight, gs, 3)
        xg = x.view(-1, k // gs, gs)
        ref = torch.einsum("tgi,ngi->tng", xg, w.view(n, -1, gs))
        out = torch.einsum("tgi,ngi->tng", xg, wq.view(n, -1, gs))
        return (out - ref).pow(2).mean(0)  # [N, groups]

    clipped = w.clone()
    clip_weight_(clipped, ratio, gs)
    before, after = group_err(w), group_err(clipped)
    assert (after <= before * (1 + 1e-5)).all()
    assert after.sum() < 0.9 * before.sum()
    if asym:  # the coordinate search starts from the symmetric optimum, so it can only be as good or better
        sym = w.clone()
        clip_weight_(sym, search_clip(w, x, AwqConfig(w_bit=3, group_size=gs, clip_asym=False)), gs)
        assert (after <= group_err(sym) * (1 + 1e-5)).all() and after.sum() < group_err(sym).sum()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n_bit,group_size", [(3, 32), (4, 64), (4, 128)])
def test_fake_quant_matches_the_format(n_bit, group_size, dtype):
    """The search's shortcut (no integer round trip) is exactly quantize + dequantize, scales in the
    dtype they are stored in (bf16 for bf16 weights, else fp16)."""
    from tinyq.quant.format import dequantize_groupwise, quantize_groupwise, scale_dtype_for

    w = (torch.randn(40, 256) * torch.rand(1, 256) * 3).to(dtype)
    q, scales, zeros = quantize_groupwise(w, group_size, n_bit, scale_dtype_for(dtype))
    assert scales.dtype == (torch.bfloat16 if dtype == torch.bfloat16 else torch.float16)
    expected = dequantize_groupwise(q, scales, zeros)  # float32
    torch.testing.assert_close(fake_quantize(w, group_size, n_bit), expected.to(dtype), rtol=0, atol=0)
    # a float32 candidate of a bf16 weight (AWQ's W*s) quantizes with the bf16 scales it will be stored with
    torch.testing.assert_close(fake_quantize(w.float(), group_size, n_bit, scale_dtype_for(dtype)), expected,
                               rtol=0, atol=0)


def test_scale_search_of_bf16_model_uses_bf16_scales(monkeypatch):
    import tinyq.quant.awq as awq_mod

    used = []
    real = awq_mod.fake_quantize
    monkeypatch.setattr(awq_mod, "fake_quantize",
                        lambda w, gs, bits, scale_dtype=None: used.append(scale_dtype) or real(w, gs, bits, scale_dtype))
    model = tiny_model("llama").to(torch.bfloat16)
    awq_search(model, _blocks(n=2, length=16), AwqConfig(group_size=32, clip=False, n_grid=2), progress=False)
    assert used and set(used) == {torch.bfloat16}


def test_search_results_round_trip(tmp_path, monkeypatch):
    model = tiny_model("qwen2")
    blocks = _blocks()
    searched = copy.deepcopy(model)
    res = awq_search(searched, blocks, AwqConfig(group_size=64, search_blocks=3), progress=False)
    path = tmp_path / "search.safetensors"
    res.save(path)
    loaded = AwqResults.load(path)
    assert loaded.config == res.config and loaded.family == "qwen2" and loaded.num_layers == 2
    assert loaded.scales.keys() == res.scales.keys() and loaded.clips.keys() == res.clips.keys()
    for key in res.clips:
        torch.testing.assert_close(loaded.clips[key], res.clips[key], rtol=0, atol=0)
    reapplied = apply_awq(copy.deepcopy(model), loaded)
    for (name, a), (_, b) in zip(searched.named_parameters(), reapplied.named_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    # a save that fails part way (here: at the rename) leaves the previous file whole, and no temporary
    before = path.read_bytes()
    with monkeypatch.context() as m:
        m.setattr("os.replace", lambda *a: (_ for _ in ()).throw(OSError(28, "No space left on device")))
        with pytest.raises(OSError, match="No space left"):
            res.save(path)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["search.safetensors"]


def test_apply_rejects_mismatched_results(tmp_path):
    res = awq_search(tiny_model("llama"), _blocks(n=2), AwqConfig(group_size=32, clip=False), progress=False)
    with pytest.raises(ValueError, match="family"):
        apply_awq(tiny_model("qwen2"), res)
    with pytest.raises(ValueError, match="cover 2 layers, the model has 3"):
        apply_awq(tiny_model("llama", layers=3), res)
    with pytest.raises(ValueError, match=r"scale layers\.0\.input_layernorm"):
        apply_awq(tiny_model("llama", hidden=64, heads=2, kv=1), res)
    (tmp_path / "x.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match=r"x\.safetensors: not a safetensors file"):
        AwqResults.load(tmp_path / "x.safetensors")
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        AwqResults.load(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="is a directory"):
        AwqResults.read_info(tmp_path)
    from safetensors.torch import save_file

    save_file({"scale.x": torch.ones(2)}, tmp_path / "other.safetensors")  # safetensors, but not search results
    with pytest.raises(ValueError, match="no 'tinyq_awq' metadata"):
        AwqResults.read_info(tmp_path / "other.safetensors")


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model, before):
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed == [], f"a refused apply_awq changed {changed[:4]}"


def test_apply_checks_every_layer_before_changing_any():
    """Results that fit layer 0's attention but not something later (the MLP width, a later layer's
    clip) are refused before anything is folded, so applying the right results afterwards gives
    exactly what a fresh model gets: no scale is folded twice."""
    res = awq_search(tiny_model("llama", hidden=64, inter=128), _blocks(n=2, length=16), AwqConfig(group_size=32),
                     progress=False)
    wider = tiny_model("llama", hidden=64, inter=192)
    before = _state(wider)
    with pytest.raises(ValueError, match=r"scale layers\.0\.mlp\.up_proj: shape \(128,\) does not match the model's \(192,\)"):
        apply_awq(wider, res)
    _assert_unchanged(wider, before)

    model, fresh = tiny_model("llama", hidden=64, inter=128), tiny_model("llama", hidden=64, inter=128)
    before = _state(model)
    bad_clip = AwqResults(res.config, res.family, res.num_layers, dict(res.scales), dict(res.clips))
    bad_clip.clips["layers.1.mlp.down_proj"] = res.clips["layers.1.mlp.down_proj"][:, :1]  # the last one applied
    with pytest.raises(ValueError, match=r"clip layers\.1\.mlp\.down_proj: shape \(64, 1, 2\) does not match \(64, 4\)"):
        apply_awq(model, bad_clip)
    _assert_unchanged(model, before)
    bad_scale = AwqResults(res.config, res.family, res.num_layers, dict(res.scales), dict(res.clips))
    bad_scale.scales["layers.1.mlp.up_proj"] = torch.full((128,), float("nan"))
    with pytest.raises(ValueError, match=r"scale layers\.1\.mlp\.up_proj: holds values that are not finite"):
        apply_awq(model, bad_scale)
    _assert_unchanged(model, before)
    apply_awq(model, res)  # the retry
    apply_awq(fresh, res)
    for k, v in fresh.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_non_finite_activations_or_losses_are_a_clear_error():
    """Activations that overflowed (inf/NaN) would make every loss NaN and leave no scale to fold:
    the search stops with the layer and group named, before folding a NaN scale into the weights."""
    model = tiny_model("llama", hidden=64, inter=128, layers=1)
    with torch.no_grad():
        model.model.embed_tokens.weight[5] = float("inf")  # one token whose activations overflow
    blocks = _blocks(n=2, length=16)
    blocks[0, 3] = 5
    before = copy.deepcopy(model.model.layers[0].state_dict())
    with pytest.raises(ValueError, match=r"layer 0, scale group input_layernorm -> self_attn.q_proj.*inf/NaN.*bfloat"):
        awq_search(model, blocks, AwqConfig(group_size=32, clip=False), progress=False)
    for name, t in model.model.layers[0].state_dict().items():
        assert torch.equal(t, before[name]), name  # nothing was folded
    # finite inputs, but the inspected module's output is not finite: every alpha's loss is NaN
    model = tiny_model("llama", hidden=64, inter=128, layers=1)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"layer 0, scale group post_attention_layernorm .*losses of every alpha"):
        awq_search(model, _blocks(n=2, length=16), AwqConfig(group_size=32, clip=False), progress=False)


def test_unknown_architecture_lists_supported():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="LlamaForCausalLM, Qwen2ForCausalLM"):
        awq_search(model, _blocks(n=1, vocab=64), progress=False)


def test_group_size_must_divide():
    with pytest.raises(ValueError, match="not divisible by group_size=128"):
        awq_search(tiny_model("llama", hidden=96, heads=3, kv=1, inter=192), _blocks(n=1), AwqConfig(group_size=128),
                   progress=False)
    with pytest.raises(ValueError, match="group_size=48"):
        AwqConfig(group_size=48)
    with pytest.raises(ValueError, match="w_bit=2"):
        AwqConfig(w_bit=2)


@pytest.mark.parametrize("setting,match", [
    (dict(n_grid=0), "n_grid=0"), (dict(clip_grid=-1), "clip_grid=-1"), (dict(batch_blocks=0), "batch_blocks=0"),
    (dict(search_blocks=0), "search_blocks=0"), (dict(clip_tokens=0), "clip_tokens=0"),
    (dict(max_shrink=1.5), "max_shrink=1.5"), (dict(max_shrink=0.01), "at least one ratio"),
])
def test_search_settings_are_checked_before_the_search(setting, match):
    """Settings that would crash the search halfway (an empty grid, no blocks) are refused up front."""
    with pytest.raises(ValueError, match=match):
        AwqConfig(**setting)
    AwqConfig(max_shrink=0.01, clip=False)  # no clip search: its settings do not matter


def test_calibration_blocks_and_short_text(tmp_path):
    tok = word_tokenizer()
    text = random_text(1000)
    blocks = calib.calibration_blocks(tok, text, n_blocks=4, block_len=100)
    assert blocks.shape == (4, 100) and blocks.dtype == torch.long and blocks.min() >= 3
    torch.testing.assert_close(blocks, calib.calibration_blocks(tok, text, 4, 100))
    with pytest.raises(ValueError, match="too short: .* 20 blocks"):
        calib.calibration_blocks(tok, text, n_blocks=20, block_len=100)


def test_read_text_files(tmp_path):
    (tmp_path / "a.txt").write_text("plain words here\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.html").write_text("<html><head><title>T</title></head><body><div class='para'>Some "
                                             "&amp; prose</div><pre>ls -l</pre></body></html>")
    text = calib.read_text_files([tmp_path])
    assert "plain words here" in text and "Some & prose" in text and "ls -l" not in text and "<" not in text
    with pytest.raises(FileNotFoundError, match="does not exist"):
        calib.read_text_files([tmp_path / "missing.txt"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no text files"):
        calib.read_text_files([tmp_path / "empty"])


def test_handbook_split_is_disjoint():
    try:
        pages = calib.handbook_pages()
    except FileNotFoundError:
        pytest.skip("debian-handbook is not installed (apt-get install debian-handbook)")
    eval_pages = {p for ch, p in pages if ch in calib.EVAL_CHAPTERS}
    calib_pages = {p for ch, p in pages if ch not in calib.EVAL_CHAPTERS}
    assert eval_pages and calib_pages and not eval_pages & calib_pages
    assert any(p.name == "sect.apt-get.html" for p in eval_pages)
    assert any(p.name == "sect.firewall-packet-filtering.html" for p in calib_pages)


@pytest.mark.gpu
def test_search_on_gpu_fp16_beats_rtn():
    """The model stays on the CPU in fp16; each layer is searched on the GPU and moved back."""
    model = tiny_model("llama").half()
    blocks = _blocks()
    ref = tiny_model("llama")  # fp32 reference on the CPU
    rtn = fake_quantize_model_(copy.deepcopy(model), 4, 32)
    awq = copy.deepcopy(model)
    res = awq_search(awq, blocks, AwqConfig(group_size=32), device="cuda", progress=False)
    assert all(p.device.type == "cpu" for p in awq.parameters()) and len(res.clips) == 2 * 5
    fake_quantize_model_(awq, 4, 32)
    err = {name: _layer_out_error(m.float(), ref, blocks) for name, m in (("rtn", rtn), ("awq", awq))}
    assert err["awq"] < 0.7 * err["rtn"], err


def test_layer_kwargs_calls_older_create_causal_mask(monkeypatch):
    """transformers 4.56 (the floor in pyproject.toml) names the argument ``input_embeds`` and
    requires ``cache_position``; 5.x has ``inputs_embeds``. Both signatures are served."""
    import transformers.masking_utils as mu

    seen = {}

    def create_causal_mask_456(config, input_embeds, attention_mask, cache_position, past_key_values,
                               position_ids=None):
        seen.update(embeds=input_embeds, cache_position=cache_position)
        return None

    monkeypatch.setattr(mu, "create_causal_mask", create_causal_mask_456)
    dec = decoder_of(tiny_model("llama"))
    x = dec.embed_tokens(_blocks(n=1, length=5))
    kw = layer_kwargs(dec, x)
    assert seen["embeds"] is x and seen["cache_position"].tolist() == [0, 1, 2, 3, 4]
    assert kw["attention_mask"] is None and kw["position_ids"].tolist() == [[0, 1, 2, 3, 4]]


def test_dependency_floors_cover_what_the_code_uses():
    """SDPA's enable_gqa needs torch 2.5; from_config(dtype=) and masking_utils need transformers 4.56."""
    import os
    import re

    text = open(os.path.join(os.path.dirname(__file__), "..", "pyproject.toml")).read()
    floors = {name: tuple(int(p) for p in ver.split(".")) for name, ver in re.findall(r'"(torch|transformers)>=([\d.]+)"', text)}
    assert floors["torch"] >= (2, 5) and floors["transformers"] >= (4, 56), floors
