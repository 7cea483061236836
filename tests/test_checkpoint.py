"""tinyq / AutoAWQ checkpoints: write atomically, read and validate, reload to identical outputs (CPU)."""
import copy
import json

import pytest
import torch
from awq_tiny_models import fp16_exact, tiny_model, word_tokenizer

from tinyq.atomic_io import normal_file_mode
from tinyq.quant import checkpoint as ck
from tinyq.quant.awq import fake_quantize_model_
from tinyq.quant.format import dequantize_weight

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _ids(n=2, length=16):
    return torch.randint(3, 256, (n, length), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("kind,group_size", [("llama", 64), ("qwen2", 32), ("llama", 128)])
def test_checkpoint_reloads_to_identical_outputs(tmp_path, kind, group_size):
    model = fp16_exact(tiny_model(kind))  # values fp16 holds exactly: the checkpoint stores fp16
    path = ck.save_quantized(model, tmp_path / "ckpt", group_size, word_tokenizer())
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["torch_dtype"] == cfg["dtype"] == "float16"
    assert cfg["quantization_config"] == {"quant_method": "tinyq", "bits": 4, "group_size": group_size, "version": 1,
                                          "zero_point": True, "modules_to_not_convert": ["lm_head"]}
    for p in (path, path / "model.safetensors", path / "config.json"):  # not tempfile's/safetensors' private modes
        assert p.stat().st_mode & 0o777 == normal_file_mode(directory=p.is_dir()), p
    assert (path / "tokenizer.json").is_file()
    config, quantized, other = ck.read_quantized_state(path)
    assert set(quantized) == {f"model.layers.{i}.{n}" for i in range(2) for n in LINEARS}
    assert "lm_head.weight" in other and not any(k.endswith("q_proj.weight") for k in other)
    qweight, scales, zeros, bias = quantized["model.layers.1.mlp.down_proj"]
    assert qweight.dtype == torch.int32 and qweight.shape == (128, 256 // 8) and scales.shape == (128, 256 // group_size)
    assert bias is None  # down_proj has no bias in either family
    if kind == "qwen2":
        assert quantized["model.layers.0.self_attn.q_proj"][3] is not None
    # the fake-quantized fp model computes exactly what the checkpoint stores
    expect = fake_quantize_model_(copy.deepcopy(model), 4, group_size)
    torch.testing.assert_close(dequantize_weight(qweight, scales, zeros), expect.model.layers[1].mlp.down_proj.weight,
                               rtol=0, atol=0)
    loaded = ck.load_quantized_model(path, dtype=torch.float32)
    again = ck.load_quantized_model(path, dtype=torch.float32)
    ids = _ids()
    with torch.no_grad():
        out = loaded(ids).logits
        torch.testing.assert_close(again(ids).logits, out, rtol=0, atol=0)
        torch.testing.assert_close(out, expect(ids).logits, rtol=1e-5, atol=1e-5)


def test_awq_export_and_import_agree(tmp_path):
    """tinyq -> AutoAWQ layout -> tinyq is lossless (AutoAWQ's own reading is checked against fixtures in
    test_autoawq_fixtures.py)."""
    model = fp16_exact(tiny_model("qwen2"))
    tinyq_dir = ck.save_quantized(model, tmp_path / "tq", 64, word_tokenizer())
    awq_dir = ck.save_quantized(model, tmp_path / "awq", 64, word_tokenizer(), fmt="awq")
    qc = json.loads((awq_dir / "config.json").read_text())["quantization_config"]
    assert qc == {"quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": True, "version": "gemm",
                  "modules_to_not_convert": ["lm_head"]}
    _, tq, _ = ck.read_quantized_state(tinyq_dir)
    _, imported, other = ck.read_quantized_state(awq_dir)
    for prefix, tensors in tq.items():
        for a, b in zip(imported[prefix], tensors):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, rtol=0, atol=0, msg=prefix)
    loaded = ck.load_quantized_model(awq_dir, dtype=torch.float32)
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, ck.load_quantized_model(tinyq_dir, dtype=torch.float32)(ids).logits)


def test_sharded_synthesized_autoawq_checkpoint(tmp_path):
    model = tiny_model("llama")
    tensors = ck.quantized_state_dict(model, 32, fmt="awq")
    config = model.config.to_dict()
    config["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True,
                                     "version": "GEMM"}
    path = ck.write_checkpoint(tmp_path / "sharded", tensors, config, max_shard_bytes=64 * 1024)
    shards = sorted(p.name for p in path.glob("model-*.safetensors"))
    assert len(shards) > 2 and (path / "model.safetensors.index.json").is_file()
    _, quantized, other = ck.read_quantized_state(path)
    assert len(quantized) == 14 and "model.embed_tokens.weight" in other
    (path / shards[1]).unlink()
    with pytest.raises(FileNotFoundError, match=shards[1]):
        ck.read_quantized_state(path)


def _edit(path, config_fn=None, tensor_fn=None):
    from safetensors.torch import load_file, save_file

    if config_fn:
        cfg = json.loads((path / "config.json").read_text())
        config_fn(cfg)
        (path / "config.json").write_text(json.dumps(cfg))
    if tensor_fn:
        t = load_file(str(path / "model.safetensors"))
        tensor_fn(t)
        save_file(t, str(path / "model.safetensors"))


@pytest.mark.parametrize("fmt", ["tinyq", "awq"])
@pytest.mark.parametrize("case,match", [
    ("group_size", r"tensor 'model\.layers\.\d\.[a-z_.]+\.scales': shape .* \(group_size 32\)"),
    ("bits", "bits=3"),
    ("arch", "unsupported architecture .*LlamaForCausalLM, Qwen2ForCausalLM"),
    ("shape", r"tensor 'model\.layers\.1\.mlp\.down_proj\.qweight': shape"),
    ("missing", r"tensor 'model\.layers\.0\.mlp\.up_proj\.(zeros|qzeros)': missing"),
    ("dtype", r"tensor 'model\.layers\.0\.self_attn\.o_proj\.qweight': dtype"),
    ("unquantized", r"tensor 'model\.layers\.0\.mlp\.gate_proj\.weight': a decoder linear stored unquantized"),
])
def test_mismatched_checkpoint_names_the_tensor(tmp_path, fmt, case, match):
    model = tiny_model("llama")
    path = ck.save_quantized(model, tmp_path / "c", 64, fmt=fmt)
    zeros = "qzeros" if fmt == "awq" else "zeros"
    edits = {
        "group_size": dict(config_fn=lambda c: c["quantization_config"].update(group_size=32)),
        "bits": dict(config_fn=lambda c: c["quantization_config"].update(bits=3)),
        "arch": dict(config_fn=lambda c: c.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])),
        "shape": dict(tensor_fn=lambda t: t.update({"model.layers.1.mlp.down_proj.qweight":
                                                    t["model.layers.1.mlp.down_proj.qweight"][:, :-1].contiguous()})),
        "missing": dict(tensor_fn=lambda t: t.pop(f"model.layers.0.mlp.up_proj.{zeros}")),
        "dtype": dict(tensor_fn=lambda t: t.update({"model.layers.0.self_attn.o_proj.qweight":
                                                    t["model.layers.0.self_attn.o_proj.qweight"].to(torch.int64)})),
        "unquantized": dict(tensor_fn=lambda t: t.update({"model.layers.0.mlp.gate_proj.weight": torch.zeros(256, 128)})),
    }
    _edit(path, **edits[case])
    with pytest.raises(ValueError, match=match):
        ck.read_quantized_state(path)


def test_not_a_quantized_checkpoint(tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(str(tmp_path / "fp"))
    with pytest.raises(ValueError, match="no quantization_config"):
        ck.read_quantized_state(tmp_path / "fp")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        ck.read_quantized_state(tmp_path)


class _ExplodingTokenizer:
    def save_pretrained(self, folder):
        raise KeyboardInterrupt  # as if the user pressed Ctrl-C halfway through the write


def test_interrupted_write_leaves_no_checkpoint(tmp_path):
    model = tiny_model("llama")
    with pytest.raises(KeyboardInterrupt):
        ck.save_quantized(model, tmp_path / "out", 64, _ExplodingTokenizer())
    assert list(tmp_path.iterdir()) == []  # neither the checkpoint nor a temporary directory


def test_overwrite_rules(tmp_path):
    model = tiny_model("llama")
    first = ck.save_quantized(model, tmp_path / "out", 64)
    (first / "stale.txt").write_text("from the first write")
    second = ck.save_quantized(model, tmp_path / "out", 32)  # replacing a checkpoint is allowed, whole
    assert not (second / "stale.txt").exists()
    assert json.loads((second / "config.json").read_text())["quantization_config"]["group_size"] == 32
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="not a quantized checkpoint"):
        ck.save_quantized(model, tmp_path / "docs", 64)
    assert (tmp_path / "docs" / "notes.txt").read_text() == "precious"
    # a float model directory has a config.json too, but is never replaced
    model.save_pretrained(tmp_path / "float")
    with pytest.raises(FileExistsError, match="not a quantized checkpoint"):
        ck.save_quantized(model, tmp_path / "float", 64)
    assert "quantization_config" not in json.loads((tmp_path / "float" / "config.json").read_text())


@pytest.mark.parametrize("fmt", ["tinyq", "awq"])
def test_a_model_quantized_in_memory_is_refused(tmp_path, fmt):
    """quantize_ then save_quantized would store W4A16Linear buffers no loader reads: refused, nothing written."""
    from tinyq import W4A16Config, quantize_

    model = tiny_model("llama")
    quantize_(model, W4A16Config(group_size=32))
    with pytest.raises(ValueError, match="already quantized in memory .*save the float model"):
        ck.save_quantized(model, tmp_path / "out", 64, fmt=fmt)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("fmt", ["tinyq", "awq"])
def test_checkpoint_runs_on_tinyq_models(tmp_path, fmt):
    """Both checkpoint kinds load into tinyq's own runtime and compute the fake-quantized model."""
    models = pytest.importorskip("tinyq.models")
    model = fp16_exact(tiny_model("qwen2"))
    path = ck.save_quantized(model, tmp_path / fmt, 32, word_tokenizer(), fmt=fmt)
    runtime, _tok = models.load_model(str(path), precision="w4a16", device="cpu", dtype=torch.float32)
    ids = _ids(n=1)
    with torch.no_grad():
        expect = fake_quantize_model_(copy.deepcopy(model), 4, 32)(ids).logits
        torch.testing.assert_close(runtime(ids).float(), expect, rtol=1e-5, atol=1e-5)


def test_replacing_a_checkpoint_never_leaves_the_destination_empty(tmp_path, monkeypatch):
    """After every rename the destination holds a whole checkpoint (the old one, then the new one): a crash
    at any point leaves one of them."""
    import os

    model = tiny_model("llama")
    dest = ck.save_quantized(model, tmp_path / "out", 64)
    states = []
    for name in ("rename", "replace"):
        real = getattr(os, name)

        def watched(src, dst, _real=real):
            _real(src, dst)
            states.append((dest / "config.json").is_file())
        monkeypatch.setattr(os, name, watched)
    real_exchange = ck.exchange
    monkeypatch.setattr(ck, "exchange", lambda a, b: (real_exchange(a, b), states.append((dest / "config.json").is_file())))
    ck.save_quantized(model, dest, 32)
    assert states and all(states)
    assert json.loads((dest / "config.json").read_text())["quantization_config"]["group_size"] == 32
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the swapped-out old one is gone


def test_no_atomic_swap_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    import errno

    model = tiny_model("llama")
    dest = ck.save_quantized(model, tmp_path / "out", 64)

    def unsupported(a, b):
        raise OSError(errno.EINVAL, "Invalid argument")
    monkeypatch.setattr(ck, "exchange", unsupported)
    with pytest.raises(FileExistsError, match="cannot replace .* atomically"):
        ck.save_quantized(model, dest, 32)
    assert json.loads((dest / "config.json").read_text())["quantization_config"]["group_size"] == 64
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_exchange_swaps_directories(tmp_path):
    from tinyq.atomic_io import exchange

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x").write_text("a")
    (tmp_path / "b").mkdir()
    exchange(tmp_path / "a", tmp_path / "b")
    assert (tmp_path / "b" / "x").read_text() == "a" and not any((tmp_path / "a").iterdir())


class _RacingTokenizer:
    """Saves itself after another process has put a whole checkpoint at ``dest``."""

    def __init__(self, model, dest):
        self.model, self.dest = model, dest

    def save_pretrained(self, folder):
        ck.save_quantized(self.model, self.dest, 32)


def test_keep_existing_checkpoint_when_another_writer_wins(tmp_path):
    model = tiny_model("llama")
    dest = tmp_path / "cache"
    with pytest.raises(FileExistsError, match="written by another process meanwhile"):
        ck.save_quantized(model, dest, 64, _RacingTokenizer(model, dest), replace=False)
    assert json.loads((dest / "config.json").read_text())["quantization_config"]["group_size"] == 32
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]
    with pytest.raises(FileExistsError, match="already exists"):
        ck.save_quantized(model, dest, 64, replace=False)


@pytest.mark.parametrize("qc,match", [
    ({"quant_method": "gptq", "bits": 4, "group_size": 64}, "quant_method 'gptq'"),
    ({"quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": True, "version": "gemv"}, "version 'gemv'"),
    ({"quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": False}, "without zero points"),
    ({"quant_method": "awq", "w_bit": 8, "q_group_size": 64, "zero_point": True}, "bits=8"),
    ({"quant_method": "tinyq", "group_size": 64}, "bits=None"),
    ({"quant_method": "tinyq", "bits": 4, "group_size": 0}, "invalid group_size 0"),
])
def test_runtime_loader_and_reader_share_the_config_check(tmp_path, qc, match):
    models = pytest.importorskip("tinyq.models")
    path = ck.save_quantized(tiny_model("llama"), tmp_path / "c", 64, word_tokenizer())
    _edit(path, config_fn=lambda c: c.update(quantization_config=qc))
    with pytest.raises(ValueError, match=match):
        ck.read_quantized_state(path)
    with pytest.raises(ValueError, match=match):
        models.load_model(str(path), precision="w4a16", device="cpu", dtype=torch.float32)


def test_save_safetensors_tied_embeddings(tmp_path, monkeypatch):
    """The README's quantize_ then save_safetensors on a tied-embedding model (SmolLM2's layout): the tied
    tensor is stored once, restored tied, the file has normal permissions and is fsynced before the rename."""
    import os

    import tinyq
    from tinyq import atomic_io
    from tinyq.nn import io as nn_io

    def tied_model():
        m = tiny_model("llama", outliers=False)
        m.lm_head.weight = m.model.embed_tokens.weight
        return m
    model = tied_model()
    tinyq.quantize_(model, tinyq.W4A16Config(group_size=64))
    events = []
    real_fsync, real_replace = atomic_io.fsync_path, os.replace
    monkeypatch.setattr(atomic_io, "fsync_path", lambda p: (events.append(("fsync", os.path.basename(p))), real_fsync(p)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", os.path.basename(b))), real_replace(a, b)))
    path = tmp_path / "m.safetensors"
    nn_io.save_safetensors(model, str(path))
    assert [e[0] for e in events] == ["fsync", "replace", "fsync"] and events[1][1] == "m.safetensors"
    assert path.stat().st_mode & 0o777 == normal_file_mode()
    fresh = tied_model()
    tinyq.quantize_(fresh, tinyq.W4A16Config(group_size=64))
    with torch.no_grad():
        fresh.model.embed_tokens.weight.zero_()
    nn_io.load_safetensors(fresh, str(path))
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight
    ids = _ids(n=1)
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_transformers_loader_refuses_a_missing_or_extra_bias(tmp_path):
    """``load_quantized_model`` swaps in W4A16 modules, which load_state_dict cannot check: a
    Qwen2 q_proj without its bias (or a Llama one with a bias) is refused, not dropped."""
    path = ck.save_quantized(tiny_model("qwen2"), tmp_path / "q", 64)
    _edit(path, tensor_fn=lambda t: t.pop("model.layers.0.self_attn.q_proj.bias"))
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn.q_proj.bias' is missing"):
        ck.load_quantized_model(path, dtype=torch.float32)
    path = ck.save_quantized(tiny_model("llama"), tmp_path / "l", 64)
    _edit(path, tensor_fn=lambda t: t.update({"model.layers.0.mlp.up_proj.bias": torch.zeros(256)}))
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp.up_proj.bias' is in the checkpoint"):
        ck.load_quantized_model(path, dtype=torch.float32)


def test_a_truncated_shard_is_named_by_every_loader(tmp_path):
    """safetensors' own error for a truncated file names no file; every reader names the shard."""
    from tinyq.models import load_model

    path = ck.save_quantized(tiny_model("llama"), tmp_path / "q", 64, word_tokenizer(), max_shard_bytes=64 * 1024)
    shard = sorted(p.name for p in path.glob("model-*.safetensors"))[1]
    size = (path / shard).stat().st_size
    with open(path / shard, "r+b") as f:
        f.truncate(size - 100)
    match = rf"{shard}: not a readable safetensors file, truncated or corrupt\?"
    for load in (lambda: ck.read_quantized_state(path), lambda: ck.load_quantized_model(path),
                 lambda: load_model(str(path), precision="w4a16", device="cpu")):
        with pytest.raises(ValueError, match=match):
            load()


@pytest.mark.parametrize("fmt,leaf,where,value", [
    ("tinyq", "zeros", (0, 0), 99.5), ("tinyq", "zeros", (3, 1), 16.0), ("tinyq", "zeros", (2, 0), float("nan")),
    ("tinyq", "scales", (0, 1), float("nan")), ("awq", "scales", (1, 5), float("inf")),
])
def test_corrupt_grid_values_are_refused_by_both_loaders(tmp_path, fmt, leaf, where, value):
    """A zero point off the 4-bit grid or a non-finite scale once loaded silently and gave
    non-finite logits; both loaders now name the file, the tensor, the value and its index."""
    from tinyq.models import load_model

    path = ck.save_quantized(tiny_model("llama"), tmp_path / "q", 64, word_tokenizer(), fmt=fmt)
    name = f"model.layers.0.mlp.up_proj.{leaf}"

    def corrupt(t):
        t[name][where] = value

    _edit(path, tensor_fn=corrupt)
    match = rf"model\.safetensors: tensor '{name}' holds {value} at \[{where[0]}, {where[1]}\]"
    for load in (lambda: ck.read_quantized_state(path), lambda: ck.load_quantized_model(path),
                 lambda: load_model(str(path), precision="w4a16", device="cpu")):
        with pytest.raises(ValueError, match=match):
            load()


def test_bf16_scales_beyond_fp16_are_refused_at_load(tmp_path):
    """A bf16 checkpoint's scales are converted to fp16 for fp32/fp16 activations: one beyond fp16's
    range would become inf, so the loader says to load in bf16 (which works)."""
    from tinyq.models import load_model

    path = ck.save_quantized(tiny_model("llama").to(torch.bfloat16), tmp_path / "q", 64, word_tokenizer())
    _edit(path, tensor_fn=lambda t: t["model.layers.1.self_attn.o_proj.scales"].__setitem__((1, 0), 1e6))
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor 'model\.layers\.1\.self_attn\.o_proj\.scales' "
                                         r"holds values up to .* beyond torch\.float16; .*dtype=torch\.bfloat16"):
        load_model(str(path), precision="w4a16", device="cpu", dtype=torch.float32)
    model, _ = load_model(str(path), precision="w4a16", device="cpu", dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.isfinite(model(_ids(n=1)).float()).all()


def test_fp16_scale_overflow_names_the_linear_when_saving_or_loading(tmp_path):
    """fp32 weights whose group range exceeds 15 * 65504 would store inf fp16 scales: the checkpoint
    writer and the runtime loader (RTN at load) name the linear; nothing is written."""
    from tinyq.models import load_model

    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(1e7)
    match = r"model\.layers\.1\.mlp\.down_proj: weight of shape \(128, 256\): a group spans .* overflows torch\.float16"
    with pytest.raises(ValueError, match=match):
        ck.save_quantized(model, tmp_path / "q", 64, word_tokenizer())
    assert not (tmp_path / "q").exists()
    model.save_pretrained(str(tmp_path / "fp"))
    word_tokenizer().save_pretrained(str(tmp_path / "fp"))
    with pytest.raises(ValueError, match=match):
        load_model(str(tmp_path / "fp"), precision="w4a16", device="cpu", group_size=64)
