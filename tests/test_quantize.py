"""W4A16Linear and quantize_: module behaviour, save/load, compile, and a tiny HF Llama."""
import pytest
import torch
from torch import nn

import tinyq
from tinyq.backend import force_backend
from tinyq.nn import W4A16Linear, load_safetensors, save_safetensors


def test_from_linear_matches_dequantized_weight():
    lin = nn.Linear(128, 48).half()
    q = W4A16Linear.from_linear(lin, group_size=64)
    x = torch.randn(5, 128, dtype=torch.float16)
    ref = nn.functional.linear(x.float(), q.dequantized_weight(), lin.bias.float())
    assert torch.allclose(q(x).float(), ref, atol=2e-2, rtol=1e-2)
    assert "group_size=64" in repr(q) and "in_features=128" in repr(q) and "bias=True" in repr(q)


def test_triton_and_reference_paths_agree():
    lin = nn.Linear(256, 40, bias=False)
    q = W4A16Linear.from_linear(lin, group_size=32)
    x = torch.randn(2, 3, 256, dtype=torch.float16)
    cpu = q(x)
    with force_backend("triton"):
        tri = q(x)
    assert torch.allclose(cpu.float(), tri.float(), atol=1e-2, rtol=1e-2)


def test_cpu_cache_tracks_weight_changes():
    q = W4A16Linear.from_linear(nn.Linear(64, 16), group_size=64)
    x = torch.randn(2, 64)
    before = q(x)
    q.scales.mul_(2)
    after = q(x)
    assert not torch.allclose(before, after)


def test_safetensors_roundtrip(tmp_path):
    model = nn.Sequential(nn.Linear(64, 32), nn.SiLU(), nn.Linear(32, 8))
    tinyq.quantize_(model, tinyq.W4A16Config(group_size=32))
    path = str(tmp_path / "m.safetensors")
    save_safetensors(model, path)
    fresh = nn.Sequential(W4A16Linear(64, 32, group_size=32), nn.SiLU(), W4A16Linear(32, 8, group_size=32))
    load_safetensors(fresh, path)
    x = torch.randn(3, 64)
    assert torch.equal(model(x), fresh(x))
    wrong = nn.Sequential(W4A16Linear(64, 32, group_size=64), nn.SiLU(), W4A16Linear(32, 8, group_size=32))
    with pytest.raises(ValueError, match="tensor '0.scales'"):
        load_safetensors(wrong, path)
    with pytest.raises(FileNotFoundError):
        load_safetensors(fresh, str(tmp_path / "missing.safetensors"))


def test_quantize_filters_and_errors():
    model = nn.ModuleDict({"a": nn.Linear(64, 64), "b": nn.Linear(64, 64), "lm_head": nn.Linear(64, 10)})
    tinyq.quantize_(model, tinyq.W4A16Config(group_size=64, include=["a", "lm_head"], exclude=[]))
    assert isinstance(model["a"], W4A16Linear) and isinstance(model["lm_head"], W4A16Linear)
    assert type(model["b"]) is nn.Linear
    model2 = nn.ModuleDict({"ok": nn.Linear(128, 8), "odd": nn.Linear(96, 8)})
    with pytest.raises(ValueError, match="layer 'odd': in_features=96 is not divisible by group_size=64"):
        tinyq.quantize_(model2, tinyq.W4A16Config(group_size=64))
    assert type(model2["ok"]) is nn.Linear  # nothing changed before the error
    tinyq.quantize_(model2, tinyq.W4A16Config(group_size=64, skip_incompatible=True))
    assert isinstance(model2["ok"], W4A16Linear) and type(model2["odd"]) is nn.Linear
    with pytest.raises(ValueError, match="group_size=100 is not supported"):
        tinyq.W4A16Config(group_size=100)


def test_compiles_with_fake_op():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 16)).half()
    tinyq.quantize_(model, tinyq.W4A16Config(group_size=32))
    x = torch.randn(4, 64, dtype=torch.float16)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    assert torch.allclose(compiled(x).float(), model(x).float(), atol=1e-2, rtol=1e-2)


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def test_quantize_hf_llama_within_tolerance():
    model = _tiny_llama()
    ids = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        ref = model(ids).logits
        tinyq.quantize_(model, tinyq.W4A16Config(group_size=32))
        out = model(ids).logits
        n_quant = sum(isinstance(m, W4A16Linear) for m in model.modules())
        assert n_quant == 2 * 7  # q,k,v,o,gate,up,down per layer; lm_head excluded by default
        assert type(model.lm_head) is nn.Linear
        # Exactly the model whose linears carry the dequantized weights (the quantizer's output).
        fake = _tiny_llama()
        for name, mod in model.named_modules():
            if isinstance(mod, W4A16Linear):
                fake.get_submodule(name).weight.copy_(mod.dequantized_weight())
        expected = fake(ids).logits
    assert torch.allclose(out, expected, atol=1e-4, rtol=1e-4)
    # Against the unquantized model: 4-bit g32 RTN on Gaussian weights leaves ~8% rms noise per
    # weight; through 14 linears the logits move by ~13% here. Bound it at 20%, and require
    # that the swap really happened.
    rel = (out - ref).norm() / ref.norm()
    assert 1e-3 < rel < 0.2, f"relative logit error {rel:.3f}"
