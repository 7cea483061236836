"""tinyq's Llama/Qwen2 runtime vs transformers on tiny random models, loaded through tinyq's loader."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.tiny_models import MISTRAL_WINDOW, hf_greedy, make_model_dir
from tinyq.backend import force_backend
from tinyq.generate import generate
from tinyq.models import load_model
from tinyq.nn import W4A16Linear
from tinyq.quant.format import dequantize_weight, quantize_weight, to_awq_gemm

KINDS = ["llama", "qwen2", "llama31"]
PROMPT = "Hello thé world, in the end"


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    out = {}
    for kind in KINDS:
        path = tmp_path_factory.mktemp(kind)
        hf, tok = make_model_dir(path, kind)
        out[kind] = (str(path), hf, tok)
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_fp32_matches_transformers(model_dirs, kind):
    path, hf, tok = model_dirs[kind]
    model, tokenizer = load_model(path, precision="fp32", device="cpu")
    ids = tokenizer.encode(PROMPT)
    x = torch.tensor([ids])
    with torch.no_grad():
        ref = hf(x).logits
        full = model(x)
        cache = model.new_cache(64)
        cached = torch.cat([model(x[:, :5], cache), model(x[:, 5:], cache)], dim=1)  # chunked prefill
    assert cache.length == len(ids)
    for out in (full, cached):
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    res = generate(model, tokenizer, ids, max_new_tokens=32, max_seq_len=128)
    assert res.token_ids == hf_greedy(hf, ids, 32)
    assert res.finish_reason == "length"


@pytest.mark.parametrize("dtype, tol", [(torch.float16, 5e-3), (torch.bfloat16, 3e-2)])  # measured 1.3e-3, 9e-3
def test_half_precision_close_to_fp32(model_dirs, dtype, tol):
    path, hf, _ = model_dirs["llama"]
    model, tok = load_model(path, precision={torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype], device="cpu")
    assert model.dtype == dtype
    x = torch.tensor([tok.encode(PROMPT)])
    with torch.no_grad():
        ref = hf(x).logits
        out = model(x, model.new_cache(64)).float()
    assert (out - ref).abs().max() <= tol * ref.abs().max()


def _fake_quantized_hf(hf, group_size):
    """HF model whose linears (not lm_head) hold their RTN-dequantized weights: W4A16's reference."""
    import copy

    ref = copy.deepcopy(hf)
    with torch.no_grad():
        for name, mod in ref.named_modules():
            if isinstance(mod, torch.nn.Linear) and name != "lm_head":
                mod.weight.copy_(dequantize_weight(*quantize_weight(mod.weight, group_size, torch.float16)))
    return ref


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_w4a16_matches_fake_quantized_reference(model_dirs, kind):
    path, hf, tok = model_dirs[kind]
    model, _ = load_model(path, precision="w4a16", group_size=32, device="cpu", dtype=torch.float32)
    assert isinstance(model.model.layers[0].self_attn.qkv_proj, W4A16Linear)
    assert isinstance(model.model.layers[0].mlp.gate_up_proj, W4A16Linear)
    assert not isinstance(model.lm_head, W4A16Linear)
    ref = _fake_quantized_hf(hf, 32)
    ids = tok.encode(PROMPT)
    x = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(model(x, model.new_cache(64)), ref(x).logits, rtol=1e-4, atol=1e-4)
    assert generate(model, tok, ids, max_new_tokens=16).token_ids == hf_greedy(ref, ids, 16)


def test_w4a16_triton_path_matches_torch_path(model_dirs):
    """The GPU code path (Triton W4A16 GEMM/GEMV, RMSNorm, SiLU-mul, RoPE + attention kernels), interpreted."""
    path, _, tok = model_dirs["llama"]
    model, _ = load_model(path, precision="w4a16", group_size=64, device="cpu", dtype=torch.float16)
    x = torch.tensor([tok.encode("Hi there")])
    with torch.no_grad():
        c1, c2 = model.new_cache(32), model.new_cache(32)
        ref = torch.cat([model(x, c1), model(x[:, :1], c1)], dim=1).float()
        with force_backend("triton"):
            out = torch.cat([model(x, c2), model(x[:, :1], c2)], dim=1).float()  # prefill, then one decode step
    assert torch.isfinite(out).all()
    assert (out - ref).abs().max() <= 4e-3 * ref.abs().max()  # fp16 paths (measured 9.5e-4)


def test_sharded_checkpoint(tmp_path):
    hf, tok = make_model_dir(tmp_path, "llama", seed=1, max_shard_size="100KB")
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    model, tokenizer = load_model(str(tmp_path), precision="fp32", device="cpu")
    x = torch.tensor([tokenizer.encode(PROMPT)])
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(x).logits, rtol=1e-4, atol=1e-4)
    assert model.load_stats["peak_host_mb"] > 0


def _write_quantized_checkpoint(src: str, dst, method: str, group_size: int = 32):
    """Turn an fp checkpoint into a tinyq or AutoAWQ W4A16 one (RTN)."""
    os.makedirs(dst, exist_ok=True)
    state = load_file(os.path.join(src, "model.safetensors"))
    out = {}
    for name, t in state.items():
        prefix = name[: -len(".weight")]
        if name.endswith(".weight") and t.dim() == 2 and "embed" not in name and "lm_head" not in name:
            q, s, z = quantize_weight(t, group_size, torch.float16)
            if method == "awq":
                out[prefix + ".qweight"], out[prefix + ".qzeros"], out[prefix + ".scales"] = to_awq_gemm(q, s, z)
            else:
                out[prefix + ".qweight"], out[prefix + ".scales"], out[prefix + ".zeros"] = q, s, z
        else:
            out[name] = t
    save_file(out, os.path.join(dst, "model.safetensors"))
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    cfg["quantization_config"] = {"quant_method": method, "bits": 4, "group_size": group_size, "version": (
        "gemm" if method == "awq" else 1), "zero_point": True}
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f)
    for f in os.listdir(src):
        if f.startswith(("tokenizer", "chat_template")):
            with open(os.path.join(src, f), "rb") as a, open(os.path.join(dst, f), "wb") as b:
                b.write(a.read())


@pytest.mark.parametrize("method", ["tinyq", "awq"])
def test_quantized_checkpoints_load_like_rtn_at_load(model_dirs, tmp_path, method):
    path, _, tok = model_dirs["qwen2"]
    _write_quantized_checkpoint(path, tmp_path, method)
    rtn, _ = load_model(path, precision="w4a16", group_size=32, device="cpu", dtype=torch.float32)
    ckpt, _ = load_model(str(tmp_path), precision="w4a16", device="cpu", dtype=torch.float32)
    x = torch.tensor([tok.encode(PROMPT)])
    with torch.no_grad():
        torch.testing.assert_close(ckpt(x), rtn(x), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="W4A16-quantized"):
        load_model(str(tmp_path), precision="fp16", device="cpu")


@pytest.mark.parametrize("method", ["tinyq", "awq"])
def test_damaged_quantized_checkpoints_name_the_tensor(model_dirs, tmp_path, method):
    """A quantized checkpoint whose tensors disagree with its config or with each other is refused
    with the tensor's name; the quant_method's case does not matter (AutoAWQ writes 'awq')."""
    path, _, tok = model_dirs["qwen2"]
    _write_quantized_checkpoint(path, tmp_path, method)
    cfg_path, weights = tmp_path / "config.json", tmp_path / "model.safetensors"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps(dict(cfg, quantization_config=dict(cfg["quantization_config"],
                                                                      quant_method=method.upper()))))
    load_model(str(tmp_path), precision="w4a16", device="cpu", dtype=torch.float32)
    cfg_path.write_text(json.dumps(dict(cfg, quantization_config=dict(cfg["quantization_config"], group_size=64))))
    with pytest.raises(ValueError, match="layers.0.self_attn.q_proj.(scales|qzeros): shape .* group_size 64"):
        load_model(str(tmp_path), precision="w4a16", device="cpu", dtype=torch.float32)
    cfg_path.write_text(json.dumps(cfg))
    state = load_file(str(weights))
    name = "model.layers.1.self_attn.o_proj.scales"
    state[name] = state[name][:-8].contiguous() if method == "tinyq" else state[name][:, :-8].contiguous()
    save_file(state, str(weights))
    with pytest.raises(ValueError, match="layers.1.self_attn.o_proj.(scales|qweight): shape"):
        load_model(str(tmp_path), precision="w4a16", device="cpu", dtype=torch.float32)


def test_mistral_sliding_window_is_exact_or_refused(tmp_path):
    """Up to ``sliding_window`` tokens full attention is the windowed model; past it tinyq refuses
    (transformers' Mistral would attend to the last ``sliding_window`` tokens only)."""
    hf, _ = make_model_dir(tmp_path, "mistral")
    w = MISTRAL_WINDOW
    with pytest.raises(ValueError, match=f"sliding_window={w}"):
        load_model(str(tmp_path), precision="fp32", device="cpu", max_seq_len=w + 1)
    model, _ = load_model(str(tmp_path), precision="fp32", device="cpu", max_seq_len=w)
    x = torch.tensor([[5, 9, 200, 31, 7, 77, 120, 3, 44, 61]])
    with torch.no_grad():
        ref = hf(x[:, :w]).logits
        torch.testing.assert_close(model(x[:, :w]), ref, rtol=1e-4, atol=1e-4)
        cache = model.new_cache()
        torch.testing.assert_close(model(x[:, :w], cache), ref, rtol=1e-4, atol=1e-4)
        with pytest.raises(ValueError, match=f"{w + 1} tokens exceed the model's sliding_window={w}"):
            model(x[:, : w + 1])
        with pytest.raises(ValueError, match=f"sliding_window={w}"):
            model.new_cache(w + 2)
        # the refusal matters: past the window transformers' answer differs from full attention
        full = hf.__class__(hf.config.__class__(**{**hf.config.to_dict(), "sliding_window": None}))
        full.load_state_dict(hf.state_dict())
        assert not torch.allclose(full.eval()(x).logits[:, -1], hf(x).logits[:, -1], atol=1e-3)


def test_bad_model_paths(model_dirs, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(str(tmp_path))
    path, _, _ = model_dirs["llama"]
    # unsupported architecture
    bad = tmp_path / "gpt2"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="unsupported architecture.*LlamaForCausalLM"):
        load_model(str(bad))
    # no tokenizer: the model loads without one, or with one from elsewhere
    notok = tmp_path / "notok"
    notok.mkdir()
    for f in ("config.json", "model.safetensors"):
        (notok / f).write_bytes(open(os.path.join(path, f), "rb").read())
    model, tok = load_model(str(notok), precision="fp32", device="cpu")
    assert tok is None and model.config.num_layers == 2
    _, tok = load_model(str(notok), precision="fp32", device="cpu", tokenizer=path)
    assert tok.encode("the") == model_dirs["llama"][2].encode("the")
    with pytest.raises(FileNotFoundError, match=f"no tokenizer in {notok}"):
        load_model(path, precision="fp32", device="cpu", tokenizer=str(notok))
    assert load_model(path, precision="fp32", device="cpu", tokenizer=None)[1] is None
    # a tensor of the wrong shape is named
    state = load_file(os.path.join(path, "model.safetensors"))
    state["model.layers.1.mlp.down_proj.weight"] = state["model.layers.1.mlp.down_proj.weight"][:, :64].contiguous()
    save_file(state, str(notok / "model.safetensors"))
    (notok / "tokenizer.json").write_bytes(open(os.path.join(path, "tokenizer.json"), "rb").read())
    with pytest.raises(ValueError, match="model.layers.1.mlp.down_proj.weight"):
        load_model(str(notok), precision="fp32", device="cpu")
    # a missing tensor is named, with the folder
    del state["model.layers.1.mlp.down_proj.weight"]
    save_file(state, str(notok / "model.safetensors"))
    with pytest.raises(ValueError, match=f"{notok}: the checkpoint has no tensor 'model.layers.1.mlp.down_proj.weight'"):
        load_model(str(notok), precision="fp32", device="cpu")
    # truncated or corrupt shard files are named
    data = open(os.path.join(path, "model.safetensors"), "rb").read()
    for name, blob in (("truncated", data[: len(data) - 1000]), ("short_header", data[:6]), ("garbage", b"x" * 4096)):
        (notok / "model.safetensors").write_bytes(blob)
        with pytest.raises(ValueError, match=f"{notok / 'model.safetensors'}: not a readable safetensors file"):
            load_model(str(notok), precision="fp32", device="cpu")
    # fp32 activations cannot feed the W4A16 GPU kernels: refused before anything is loaded
    with pytest.raises(ValueError, match="w4a16 on cuda needs fp16 or bf16 activations"):
        load_model(path, precision="w4a16", device="cuda", dtype=torch.float32)
    with pytest.raises(ValueError, match="precision must be"):
        load_model(path, precision="int8")
    with pytest.raises(ValueError, match="group_size"):
        load_model(path, precision="w4a16", group_size=48, device="cpu")


def _copy_dir(src, dst, state_fn=None, config_fn=None):
    os.makedirs(dst, exist_ok=True)
    for f in os.listdir(src):
        if f != "model.safetensors":
            with open(os.path.join(src, f), "rb") as a, open(os.path.join(dst, f), "wb") as b:
                b.write(a.read())
    state = load_file(os.path.join(src, "model.safetensors"))
    if state_fn:
        state_fn(state)
    save_file(state, os.path.join(dst, "model.safetensors"))
    if config_fn:
        cfg = json.loads(open(os.path.join(dst, "config.json")).read())
        config_fn(cfg)
        open(os.path.join(dst, "config.json"), "w").write(json.dumps(cfg))
    return str(dst)


@pytest.mark.parametrize("setting", ["attention_bias", "mlp_bias"])
def test_llama_biases_tinyq_lacks_are_refused(model_dirs, tmp_path, setting):
    """transformers' Llama puts attention_bias on o_proj too and mlp_bias on the MLP; tinyq's decoder
    has neither, so such a checkpoint is refused instead of run without them."""
    path, _, _ = model_dirs["llama"]
    bad = _copy_dir(path, tmp_path / "b", config_fn=lambda c: c.update({setting: True}))
    with pytest.raises(ValueError, match=f"{setting}=True"):
        load_model(bad, precision="fp32", device="cpu")


def test_tensors_the_model_never_reads_are_refused(model_dirs, tmp_path):
    """A tensor with no place in the model (an o_proj bias here) means a feature tinyq would drop."""
    path, _, _ = model_dirs["llama"]
    bad = _copy_dir(path, tmp_path / "b", state_fn=lambda s: s.update(
        {"model.layers.1.self_attn.o_proj.bias": torch.ones(s["model.layers.1.self_attn.o_proj.weight"].shape[0])}))
    with pytest.raises(ValueError, match=r"tensors \['model.layers.1.self_attn.o_proj.bias'\] have no place"):
        load_model(bad, precision="fp32", device="cpu")
    # old checkpoints' stored rotary tables are not weights
    old = _copy_dir(path, tmp_path / "old", state_fn=lambda s: s.update(
        {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4)}))
    load_model(old, precision="fp32", device="cpu")


@pytest.mark.parametrize("case,match", [
    ("k_in", r"'model.layers.0.self_attn.k_proj.weight' has shape \(\d+, 32\)"),
    ("q_rows_offset_by_k", r"'model.layers.0.self_attn.q_proj.weight' has shape"),
    ("q_bias_offset_by_k", r"'model.layers.0.self_attn.q_proj.bias' has shape"),
])
def test_each_fused_part_is_checked_before_concatenation(model_dirs, tmp_path, case, match):
    """q/k/v (and gate/up) are checked part by part, so parts whose errors cancel in the sum are caught."""
    path, _, _ = model_dirs["qwen2"]
    p = "model.layers.0.self_attn."

    def damage(s):
        if case == "k_in":
            s[p + "k_proj.weight"] = s[p + "k_proj.weight"][:, :32].contiguous()
        elif case == "q_rows_offset_by_k":  # q loses 8 rows, k gains 8: the fused shape still matches
            s[p + "k_proj.weight"] = torch.cat([s[p + "k_proj.weight"], s[p + "q_proj.weight"][-8:]])
            s[p + "q_proj.weight"] = s[p + "q_proj.weight"][:-8].contiguous()
        else:
            s[p + "k_proj.bias"] = torch.cat([s[p + "k_proj.bias"], s[p + "q_proj.bias"][-8:]])
            s[p + "q_proj.bias"] = s[p + "q_proj.bias"][:-8].contiguous()

    bad = _copy_dir(path, tmp_path / "b", state_fn=damage)
    with pytest.raises(ValueError, match=match):
        load_model(bad, precision="fp32", device="cpu")


def test_unreadable_json_names_the_file(model_dirs, tmp_path):
    path, _, _ = model_dirs["llama"]
    bad = _copy_dir(path, tmp_path / "b")
    open(os.path.join(bad, "config.json"), "w").write('{"architectures": ')
    with pytest.raises(ValueError, match=r"config.json: not valid JSON"):
        load_model(bad, precision="fp32", device="cpu")


def test_autoawq_config_spelling_loads(model_dirs, tmp_path):
    """AutoAWQ's own quantization_config keys (w_bit, q_group_size) load like the HF spelling."""
    path, _, tok = model_dirs["qwen2"]
    _write_quantized_checkpoint(path, tmp_path, "awq")
    hf_spelling, _ = load_model(str(tmp_path), precision="w4a16", device="cpu", dtype=torch.float32)
    cfg_path = tmp_path / "config.json"
    cfg = json.loads(cfg_path.read_text())
    qc = cfg["quantization_config"]
    qc["w_bit"], qc["q_group_size"] = qc.pop("bits"), qc.pop("group_size")
    cfg_path.write_text(json.dumps(cfg))
    awq_spelling, _ = load_model(str(tmp_path), precision="w4a16", device="cpu", dtype=torch.float32)
    x = torch.tensor([tok.encode(PROMPT)])
    with torch.no_grad():
        torch.testing.assert_close(awq_spelling(x), hf_spelling(x), rtol=0, atol=0)
