"""W4A16Linear and quantize_: module behaviour, save/load, compile, and a tiny HF Llama."""
import numpy as np
import pytest
import torch
from torch import nn

from tests.tolerances import assert_close_rel

import tinyq
from tinyq.backend import force_backend
from tinyq.nn import W4A16Linear, load_safetensors, save_safetensors


def rtn_numpy(w: torch.Tensor, group_size: int, scale_dtype=np.float16) -> torch.Tensor:
    """AWQ's round-to-nearest int4 quantizer written out independently of tinyq (numpy, one group at a
    time): per group of ``group_size`` inputs ``s = max(max - min, 1e-5) / 15`` (stored in
    ``scale_dtype``), ``z = clamp(round(-min / s), 0, 15)``, ``q = clamp(round(w / s) + z, 0, 15)``;
    returns the reconstruction ``(q - z) * s`` as float32."""
    w = w.detach().float().numpy()
    out = np.empty_like(w)
    for row in range(w.shape[0]):
        for start in range(0, w.shape[1], group_size):
            grp = w[row, start : start + group_size]
            s = np.float32(scale_dtype(max(grp.max() - grp.min(), np.float32(1e-5)) / np.float32(15)))
            z = np.clip(np.round(-grp.min() / s), 0, 15)
            q = np.clip(np.round(grp / s) + z, 0, 15)
            out[row, start : start + group_size] = (q - z) * s
    return torch.from_numpy(out)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_from_linear_is_rtn_of_the_float_weights(dtype, group_size):
    torch.manual_seed(group_size)
    lin = nn.Linear(256, 48).to(dtype)
    original = lin.weight.detach().float().clone()
    q = W4A16Linear.from_linear(lin, group_size=group_size)
    scale_np = {torch.bfloat16: None}.get(dtype, np.float16)
    if scale_np is None:  # numpy has no bfloat16: round the scale through torch instead
        def scale_np(v):
            return np.float32(torch.tensor(float(v)).to(torch.bfloat16).item())
    expected = rtn_numpy(original, group_size, scale_np)
    torch.testing.assert_close(q.dequantized_weight(), expected, rtol=0, atol=0)
    # RTN: every weight within half a step (the group's range / 15) of the original, plus what
    # rounding the scale to 16 bits can add across the 15 steps (2^-11 relative for fp16, 2^-8 bf16)
    grouped = original.reshape(48, -1, group_size)
    step = (grouped.amax(-1) - grouped.amin(-1)) / 15
    slack = 15 * (2**-8 if dtype == torch.bfloat16 else 2**-11)
    err = (expected.reshape(48, -1, group_size) - grouped).abs()
    assert (err <= step[..., None] * (0.5 + slack) + 1e-6).all()
    x = torch.randn(5, 256, dtype=dtype)
    ref = nn.functional.linear(x.float(), expected, lin.bias.float())
    assert_close_rel(q(x), ref, dtype=dtype if dtype != torch.float32 else torch.float16)
    assert "group_size=%d" % group_size in repr(q) and "in_features=256" in repr(q) and "bias=True" in repr(q)


def test_triton_and_reference_paths_agree():
    lin = nn.Linear(256, 40, bias=False)
    q = W4A16Linear.from_linear(lin, group_size=32)
    x = torch.randn(2, 3, 256, dtype=torch.float16)
    cpu = q(x)
    with force_backend("triton"):
        tri = q(x)
    ref = x.float() @ q.dequantized_weight().t()
    assert_close_rel(cpu, ref)
    assert_close_rel(tri, ref)


def test_cpu_cache_tracks_weight_changes():
    q = W4A16Linear.from_linear(nn.Linear(64, 16), group_size=64)
    x = torch.randn(2, 64)
    before = q(x)
    q.scales.mul_(2)
    after = q(x)
    assert not torch.allclose(before, after)


def test_cpu_cache_follows_replaced_buffers():
    """A buffer replaced by a new tensor (not changed in place) is used at the next call."""
    q = W4A16Linear.from_linear(nn.Linear(64, 16), group_size=64)
    x = torch.randn(2, 64)
    q(x)
    q.zeros = q.zeros + 3  # a new tensor, at _version 0 like the old one
    assert torch.allclose(q(x), x @ q.dequantized_weight().t() + q.bias, atol=1e-5)


def test_single_string_patterns_and_bad_static_scales():
    """exclude="lm_head" is one pattern; a non-finite calibration statistic is refused before any
    layer is replaced, naming the layer."""
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    tinyq.quantize_(model, tinyq.W4A16Config(group_size=64, exclude="1"))
    assert isinstance(model[0], W4A16Linear) and isinstance(model[1], nn.Linear)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    stats = {"0": torch.ones(64), "1": torch.full((64,), float("nan"))}
    with pytest.raises(ValueError, match="layer '1': its act_scales entry is not finite"):
        tinyq.quantize_(model, tinyq.W8A8Config(act_quant="tensor", act_scales=stats))
    assert all(type(m) is nn.Linear for m in model)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    with torch.no_grad():
        model[1].weight[3, 5] = float("inf")
    with pytest.raises(ValueError, match="layer '1': its weight has inf/NaN values"):
        tinyq.quantize_(model, tinyq.W4A16Config(group_size=64))
    assert all(type(m) is nn.Linear for m in model)


def test_cpu_module_checks_its_weights_and_input():
    """The CPU path validates as the GPU path does: mis-shaped buffers and integer inputs are errors."""
    q = W4A16Linear.from_linear(nn.Linear(128, 16), group_size=64)
    bad = W4A16Linear.from_quantized(q.qweight, q.scales, q.zeros[:, :1].contiguous(), q.bias)
    with pytest.raises(ValueError, match="zeros must match scales"):
        bad(torch.randn(2, 128))
    with pytest.raises(ValueError, match="takes float activations"):
        q(torch.ones(2, 128, dtype=torch.int32))
    for x in (torch.randn(2, 64), torch.tensor(1.0)):  # wrong width; a 0-d input has no features at all
        with pytest.raises(ValueError, match=r"input has shape .*last dimension must be the 128 input features"):
            q(x)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    with torch.no_grad():
        model[1].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="layer '1': its weight has inf/NaN values, which int8"):
        tinyq.quantize_(model, tinyq.W8A8Config())
    assert all(type(m) is nn.Linear for m in model)


def test_unreadable_files_are_named(tmp_path):
    """A truncated safetensors file and an empty GGUF file: errors that name the file."""
    from tinyq.models.gguf import read_gguf

    q = W4A16Linear.from_linear(nn.Linear(64, 16), group_size=64)
    path = tmp_path / "q.safetensors"
    save_safetensors(q, str(path))
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="q.safetensors: not a readable safetensors file"):
        load_safetensors(q, str(path))
    (tmp_path / "m.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match="m.gguf: the file is empty"):
        read_gguf(str(tmp_path / "m.gguf"))


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
    h = torch.relu(x.float() @ model[0].dequantized_weight().t() + model[0].bias.float()).half().float()
    ref = h @ model[2].dequantized_weight().t() + model[2].bias.float()  # float32, fp16 between layers
    assert_close_rel(compiled(x), ref)
    assert_close_rel(model(x), ref)


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
        # The unquantized model with each selected linear's weight replaced by an independent RTN of it.
        fake = _tiny_llama()
        for name, mod in model.named_modules():
            if isinstance(mod, W4A16Linear):
                w = fake.get_submodule(name).weight
                w.copy_(rtn_numpy(w, 32))
        expected = fake(ids).logits
    assert torch.allclose(out, expected, atol=1e-4, rtol=1e-4)
    # Against the unquantized model: 4-bit g32 RTN on Gaussian weights leaves ~8% rms noise per
    # weight; through 14 linears the logits move by ~13% here. Bound it at 20%, and require
    # that the swap really happened.
    rel = (out - ref).norm() / ref.norm()
    assert 1e-3 < rel < 0.2, f"relative logit error {rel:.3f}"


def test_quantize_shared_linears_stay_shared_and_root_linears_are_refused():
    """A linear used in two places gets one replacement in both (quantizing twice changes nothing);
    a bare nn.Linear cannot be replaced in place; exclude=None excludes nothing."""
    torch.manual_seed(0)
    shared = nn.Linear(64, 64)
    model = nn.ModuleDict({"a": shared, "b": nn.Sequential(shared, nn.Linear(64, 32))})
    tinyq.quantize_(model, tinyq.W4A16Config(group_size=32))
    assert isinstance(model["a"], W4A16Linear) and model["a"] is model["b"][0]
    first = model["a"]
    tinyq.quantize_(model, tinyq.W4A16Config(group_size=32))
    assert model["a"] is first and model["b"][0] is first
    # excluded under one of its names: left alone under both
    shared = nn.Linear(64, 64)
    model = nn.ModuleDict({"a": shared, "keep": shared})
    tinyq.quantize_(model, tinyq.W8A8Config(exclude=["keep"]))
    assert type(model["a"]) is nn.Linear and model["a"] is model["keep"]
    with pytest.raises(ValueError, match="for a single layer use W4A16Linear.from_linear"):
        tinyq.quantize_(nn.Linear(64, 64), tinyq.W4A16Config(group_size=32))
    for config in (tinyq.W4A16Config(group_size=32, exclude=None), tinyq.W8A8Config(exclude=None)):
        m = nn.Sequential(nn.Linear(64, 64))
        tinyq.quantize_(m, config)
        assert type(m[0]) is not nn.Linear


def test_modules_under_inference_mode_and_dtype_moves():
    """Built and run under torch.inference_mode (no version counters); .float() keeps the 4-bit
    format's fp16 scales (fp32 activations still run on the CPU), .to(bf16) converts them; a W8A8
    layer's bias is its own copy."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    x = torch.randn(3, 64)
    dense = lambda m: x @ m.dequantized_weight().T + m.bias.float()  # noqa: E731
    with torch.inference_mode():
        q = W4A16Linear.from_linear(lin, group_size=32)
        y = q(x)
        torch.testing.assert_close(y, dense(q), rtol=1e-5, atol=1e-5)
        q.load_state_dict({k: (v * 2 if k == "scales" else v) for k, v in q.state_dict().items()})
        torch.testing.assert_close(q(x), dense(q), rtol=1e-5, atol=1e-5)  # the cache follows the load
        assert not torch.allclose(q(x), y)
    q = W4A16Linear.from_linear(lin, group_size=32).float()
    assert q.scales.dtype == torch.float16 and q.zeros.dtype == torch.float16
    torch.testing.assert_close(q(x), dense(q), rtol=1e-5, atol=1e-5)
    assert q.to(torch.bfloat16).scales.dtype == torch.bfloat16
    w8 = tinyq.W8A8Linear.from_linear(lin)
    w8.bias.zero_()
    assert lin.bias.abs().sum() > 0


def test_load_into_a_meta_module(tmp_path):
    """A module built on the meta device (no memory) is filled by load_safetensors."""
    torch.manual_seed(0)
    src = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 32))
    tinyq.quantize_(src, tinyq.W4A16Config(group_size=64))
    save_safetensors(src, str(tmp_path / "m.safetensors"))
    dst = nn.Sequential(W4A16Linear(128, 64, group_size=64, device="meta"), nn.ReLU(),
                        W4A16Linear(64, 32, group_size=64, device="meta"))
    load_safetensors(dst, str(tmp_path / "m.safetensors"), device="cpu")
    x = torch.randn(2, 128)
    assert dst[0].qweight.device.type == "cpu" and torch.equal(dst(x), src(x))

    def tied(device):  # an embedding and a head sharing one weight, as tied LLMs do
        m = nn.ModuleDict({"emb": nn.Embedding(10, 64, device=device), "head": nn.Linear(64, 10, bias=False,
                                                                                        device=device)})
        m["head"].weight = m["emb"].weight
        return m

    save_safetensors(tied("cpu"), str(tmp_path / "t.safetensors"))
    dst = load_safetensors(tied("meta"), str(tmp_path / "t.safetensors"), device="cpu")
    assert dst["head"].weight is dst["emb"].weight and dst["head"].weight.device.type == "cpu"


@pytest.mark.parametrize("config", [
    tinyq.W4A16Config(group_size=32),
    tinyq.W8A8Config(),
    tinyq.W8A8Config(act_quant="tensor", act_scales={"0": torch.full((64,), 3.0), "2": torch.full((32,), 2.0)}),
], ids=["w4a16", "w8a8-token", "w8a8-tensor"])
def test_quantize_a_meta_skeleton_then_load_its_weights(tmp_path, config):
    """The gpt-fast path: build the float model on meta (no memory), quantize_ it (shapes only, no
    value checks to run), then load_safetensors fills it from a model quantized the same way."""
    def model(device):
        return nn.Sequential(nn.Linear(64, 32, device=device), nn.ReLU(), nn.Linear(32, 8, device=device))

    src = tinyq.quantize_(model("cpu"), config)
    save_safetensors(src, str(tmp_path / "q.safetensors"))
    skeleton = tinyq.quantize_(model("meta"), config)
    assert [type(m) for m in skeleton] == [type(m) for m in src] and skeleton[0].qweight.is_meta
    load_safetensors(skeleton, str(tmp_path / "q.safetensors"), device="cpu")
    x = torch.randn(3, 64)
    assert skeleton[0].qweight.device.type == "cpu" and torch.equal(skeleton(x), src(x))


def test_fp16_scale_overflow_is_refused_naming_the_layer_and_changes_nothing():
    """fp32 weights whose group range exceeds 15 * 65504 would get inf fp16 scales and NaN outputs:
    quantize_ names the layer, suggests bf16 scales and (replacements are all built before any is
    swapped in) leaves the model as it was, the earlier quantizable layer included."""
    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 16))
    with torch.no_grad():
        model[1].weight.mul_(1e7)  # |w| up to ~1.8e6: finite in fp32 and bf16
    with pytest.raises(ValueError, match=r"layer '1': weight of shape \(16, 32\): a group spans .* overflows "
                                         r"torch\.float16 .*W4A16Config\(dtype=torch\.bfloat16\)"):
        tinyq.quantize_(model, tinyq.W4A16Config(group_size=32))
    assert [type(m) for m in model] == [nn.Linear, nn.Linear]
    x = torch.randn(2, 64)
    ref = model(x)
    tinyq.quantize_(model, tinyq.W4A16Config(group_size=32, dtype=torch.bfloat16))
    assert model[1].scales.dtype == torch.bfloat16 and torch.isfinite(model(x)).all()
    assert ((model(x) - ref).norm() / ref.norm()) < 0.2


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_a_layer_without_outputs_is_quantized_like_any_other():
    """out_features=0 once crashed pack_int4's range check (no max of an empty tensor) after the layer
    before it had been swapped in."""
    for config in (tinyq.W4A16Config(group_size=32), tinyq.W8A8Config()):
        model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 0))
        tinyq.quantize_(model, config)
        assert all(type(m).__name__.endswith("Linear") and type(m) is not nn.Linear for m in model)
        for dtype in (torch.float32, torch.float16):
            assert model(torch.randn(2, 64, dtype=dtype)).shape == (2, 0)
    from tinyq.quant.format import pack_int4
    assert pack_int4(torch.zeros(0, 32, dtype=torch.uint8)).shape == (0, 4)
    with pytest.raises(ValueError, match=r"int4 values must lie in 0\.\.15, got 0\.\.16"):
        pack_int4(torch.tensor([[16] + [0] * 31], dtype=torch.uint8))
