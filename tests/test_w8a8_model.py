"""The W8A8 LLM path: tinyq's Llama/Qwen2 with precision="w8a8" (fused norm+quant feeding fused
qkv / gate_up), SmoothQuant checkpoints through ``tinyq quantize`` / ``tinyq eval``, on the CPU."""
import argparse
import copy
import json
import math
import re

import pytest
import torch
from awq_tiny_models import random_text, save_tiny_model_dir, word_tokenizer

from tests.tiny_models import make_model_dir
from tinyq import W8A8Config, W8A8Linear, quantize_, smooth_
from tinyq.backend import force_backend
from tinyq.commands import eval as eval_cmd
from tinyq.commands import quantize as quantize_cmd
from tinyq.generate import generate
from tinyq.models import load_model
from tinyq.models.w8a8 import W8A8MLP, W8A8RMSNorm
from tinyq.quant.smoothquant import calibrate


def _cli(module, argv):
    parser = argparse.ArgumentParser()
    module.add_parser(parser.add_subparsers(dest="command"))
    return module.run(parser.parse_args(argv))


def close(out, ref, tol=2e-2):
    assert torch.isfinite(out).all()
    err = (out.float() - ref.float()).abs().max() / ref.float().abs().max()
    assert err <= tol, f"relative max error {err:.3g} > {tol}"


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_w8a8_load_matches_quantized_transformers(tmp_path, kind):
    hf, tok = make_model_dir(tmp_path, kind)
    model, _ = load_model(str(tmp_path), precision="w8a8", device="cpu")
    layer = model.model.layers[0]
    assert isinstance(layer.input_layernorm, W8A8RMSNorm) and isinstance(layer.mlp, W8A8MLP)
    assert isinstance(layer.self_attn.qkv_proj, W8A8Linear) and not isinstance(model.lm_head, W8A8Linear)
    ids = torch.tensor([tok.encode("Hello thé world, in the end")])
    with torch.no_grad():
        ours = model(ids)
        same_linears = quantize_(copy.deepcopy(hf), W8A8Config())(ids).logits  # unfused modules, same linear
        close(ours, same_linears, tol=1e-5)
        # independent: W8A8 written out in float32 torch (per-row int8 weights, per-token int8
        # activations rounded half away from zero), in place of every decoder linear of the HF model
        fake = copy.deepcopy(hf)
        for name, lin in list(fake.named_modules()):
            if isinstance(lin, torch.nn.Linear) and name != "lm_head":
                parent, _, child = name.rpartition(".")
                setattr(fake.get_submodule(parent), child, _FakeW8A8(lin))
        close(ours, fake(ids).logits, tol=1e-4)
        close(ours, hf(ids).logits, tol=0.1)  # the quantization error itself (measured 0.023)
    assert generate(model, tok, "Hi", max_new_tokens=4, temperature=0).token_ids


class _FakeW8A8(torch.nn.Module):
    def __init__(self, lin):
        super().__init__()
        w = lin.weight.detach().double()
        self.sw = w.abs().amax(1) / 127
        self.wq = torch.round(w / self.sw[:, None]).clamp(-127, 127)
        self.b = None if lin.bias is None else lin.bias.detach().double()

    def forward(self, x):
        v = x.double()
        sx = v.abs().amax(-1, keepdim=True) / 127
        t = v / sx
        xq = (torch.sign(t) * torch.floor(t.abs() + 0.5)).clamp(-127, 127)
        y = (xq @ self.wq.T) * sx * self.sw
        return (y if self.b is None else y + self.b).to(x.dtype)


def test_w8a8_prefill_decode_and_triton_path(tmp_path):
    """Prefill then one cached decode step, on the torch path and on the (interpreted) Triton kernels."""
    _, tok = make_model_dir(tmp_path, "llama")
    model, _ = load_model(str(tmp_path), precision="w8a8", device="cpu", dtype=torch.float16)
    x = torch.tensor([tok.encode("Hi there")])
    with torch.no_grad():
        c1, c2 = model.new_cache(32), model.new_cache(32)
        ref = torch.cat([model(x, c1), model(x[:, :1], c1)], dim=1).float()
        with force_backend("triton"):
            out = torch.cat([model(x, c2), model(x[:, :1], c2)], dim=1).float()
        whole = model(torch.cat([x, x[:, :1]], dim=1)).float()  # no cache: the same positions at once
    close(out, ref)
    close(ref, whole)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("w8a8cli")
    save_tiny_model_dir(root / "fp", "llama", hidden=64, inter=128, heads=4, kv=2)
    (root / "calib.txt").write_text(random_text(1500, seed=1))
    (root / "eval.txt").write_text(random_text(600, seed=2))
    return root


@pytest.mark.parametrize("act_quant", ["token", "tensor"])
def test_smoothquant_checkpoint_cli(tiny_dir, tmp_path, capsys, act_quant):
    out = tmp_path / "ckpt"
    argv = ["quantize", "--model", str(tiny_dir / "fp"), "--method", "smoothquant", "--alpha", "0.7",
            "--act-quant", act_quant, "--out", str(out), "--calib-file", str(tiny_dir / "calib.txt"),
            "--calib-blocks", "4", "--calib-len", "64", "--device", "cpu", "--quiet"]
    assert _cli(quantize_cmd, argv) == 0
    assert "wrote W8A8 checkpoint" in capsys.readouterr().out
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "tinyq_w8a8" and qc["act_quant"] == act_quant and qc["alpha"] == 0.7

    # the same model smoothed and quantized in memory (transformers modules) gives the same logits
    from transformers import AutoModelForCausalLM

    from tinyq.quant import calib
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_dir / "fp")).eval()
    blocks = calib.calibration_blocks(word_tokenizer(), (tiny_dir / "calib.txt").read_text(), 4, 64)
    stats = smooth_(hf, calibrate(hf, blocks, progress=False), 0.7)
    with torch.no_grad():  # the checkpoint stores the unquantized tensors (norms, embeddings, lm_head) in fp16
        for name, p in hf.named_parameters():
            if not (".layers." in name and name.endswith("_proj.weight")):
                p.copy_(p.half().float())
    quantize_(hf, W8A8Config(act_quant=act_quant, act_scales=stats if act_quant == "tensor" else None))
    model, tok = load_model(str(out), precision="w8a8", device="cpu", dtype=torch.float32)
    ids = torch.tensor([tok.encode(random_text(40, seed=3))])
    with torch.no_grad():
        close(model(ids), hf(ids).logits)
    if act_quant == "tensor":  # a static-scale checkpoint that lost a scale is refused, naming it
        import shutil

        from safetensors.torch import load_file, save_file

        damaged = shutil.copytree(out, tmp_path / "damaged")
        for f in damaged.glob("*.safetensors"):
            state = load_file(str(f))
            save_file({k: v for k, v in state.items() if not k.endswith("layers.1.mlp.down_proj.input_scale")}, str(f))
        with pytest.raises(ValueError, match="layers.1.mlp.down_proj.input_scale: missing; .*act_quant 'tensor'"):
            load_model(str(damaged), precision="w8a8", device="cpu", dtype=torch.float32)
    if act_quant == "tensor":
        assert model.model.layers[0].input_layernorm.input_scale is not None

    argv = ["eval", "--model", str(out), "--ppl-file", str(tiny_dir / "eval.txt"), "--window", "64", "--json",
            "--quiet", "--device", "cpu"]
    assert _cli(eval_cmd, argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["mode"] == "W8A8 checkpoint on tinyq models" and math.isfinite(result["perplexity"])
    with pytest.raises(ValueError, match="load it with precision='w8a8'"):
        load_model(str(out), precision="w4a16", device="cpu")


def test_smoothquant_cli_refuses_a_model_whose_calibration_overflows(tiny_dir, tmp_path, capsys):
    """Activations that overflow float32 (layer 0's down_proj writes ~3e38 per input) would give NaN
    statistics and a checkpoint of NaN input scales: the command fails naming the layer, writes nothing."""
    from awq_tiny_models import tiny_model

    model = tiny_model("llama", hidden=64, inter=128, layers=2, heads=4, kv=2)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[5, :] = 3e38
    model.save_pretrained(str(tmp_path / "fp"))
    word_tokenizer().save_pretrained(str(tmp_path / "fp"))
    argv = ["quantize", "--model", str(tmp_path / "fp"), "--method", "smoothquant", "--act-quant", "tensor",
            "--out", str(tmp_path / "out"), "--calib-file", str(tiny_dir / "calib.txt"), "--calib-blocks", "3",
            "--calib-len", "17", "--device", "cpu", "--quiet"]
    assert _cli(quantize_cmd, argv) == 2
    assert re.search(r"SmoothQuant calibration, layer 1: the inputs of model\.layers\.1\.\S+ hold inf/NaN",
                     capsys.readouterr().err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fp"]


@pytest.mark.gpu
def test_w8a8_cuda_graph_decode_matches_eager(tmp_path):
    """Greedy generation through generate() (decode replayed from a CUDA graph) gives the tokens of an
    eager prefill + decode loop on the same GPU model."""
    _, tok = make_model_dir(tmp_path, "qwen2")
    model, _ = load_model(str(tmp_path), precision="w8a8", device="cuda", dtype=torch.float16)
    prompt = tok.encode("Hello thé world, in the end")
    got = generate(model, tok, prompt, max_new_tokens=12, temperature=0).token_ids
    cache = model.new_cache(64)
    want, ids = [], torch.tensor([prompt], device="cuda")
    with torch.no_grad():
        logits = model(ids, cache)
        for _ in range(len(got)):
            want.append(int(logits[0, -1].argmax()))
            logits = model(torch.tensor([[want[-1]]], device="cuda"), cache)
    assert got and got == want


class _ExplodingTokenizer:
    def save_pretrained(self, folder):
        raise KeyboardInterrupt  # as if the user pressed Ctrl-C halfway through the write


def test_w8a8_checkpoint_whole_or_nothing_and_named_errors(tmp_path):
    """A W8A8 checkpoint is written whole or not at all; a damaged one fails naming the tensor."""
    from safetensors.torch import load_file, save_file

    from tinyq.quant.w8a8_checkpoint import save_w8a8

    hf, tok = make_model_dir(tmp_path / "fp", "llama")
    ids = torch.randint(3, 50, (2, 16))
    stats = calibrate(hf, ids, progress=False)
    with pytest.raises(KeyboardInterrupt):
        save_w8a8(hf, tmp_path / "out", _ExplodingTokenizer())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fp"]  # no checkpoint, no temporary directory

    # a model quantized in memory is written with its modules' own int8 weights and scales
    mem = quantize_(copy.deepcopy(hf), W8A8Config())
    with pytest.raises(ValueError, match="quantizes its activations per token"):
        save_w8a8(mem, tmp_path / "mem", tok, act_quant="tensor", static_stats=None)
    partial = quantize_(copy.deepcopy(hf), W8A8Config(include=["*q_proj"]))
    with pytest.raises(ValueError, match=r"not quantized: \['model.layers.0.mlp.down_proj'"):
        save_w8a8(partial, tmp_path / "partial", tok)
    head_too = quantize_(copy.deepcopy(hf), W8A8Config(exclude=[]))
    with pytest.raises(ValueError, match=r"outside the decoder: \['lm_head'\]"):
        save_w8a8(head_too, tmp_path / "head", tok)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fp"]  # nothing written by the refused calls
    model, _ = load_model(str(save_w8a8(mem, tmp_path / "mem", tok)), precision="w8a8", device="cpu")
    assert torch.equal(model.model.layers[0].self_attn.qkv_proj.qweight[:hf.config.hidden_size],
                       mem.model.layers[0].self_attn.q_proj.qweight)
    with torch.no_grad():
        close(model(ids), mem(ids).logits)

    def damaged(name, edit):
        path = save_w8a8(hf, tmp_path / name, tok, act_quant="tensor", static_stats=stats)
        files = sorted(path.glob("*.safetensors"))
        tensors = {k: v for f in files for k, v in load_file(str(f)).items()}
        edit(tensors)
        for f in files:
            f.unlink()
        save_file(tensors, str(path / "model.safetensors"))
        return str(path)

    good = damaged("good", lambda t: None)
    model, _ = load_model(good, precision="w8a8", device="cpu")
    assert model.model.layers[0].input_layernorm.input_scale is not None
    key = "model.layers.1.self_attn.k_proj"
    wrong_dtype = damaged("dtype", lambda t: t.update({key + ".qweight": t[key + ".qweight"].to(torch.int16)}))
    with pytest.raises(ValueError, match=rf"checkpoint tensor '{key}.qweight' is torch.int16 \(\d+, \d+\), expected torch.int8"):
        load_model(wrong_dtype, precision="w8a8", device="cpu")
    for leaf, bad in ((".weight_scale", lambda t: t[:, None]), (".qweight", lambda t: t[:, :-16]),
                      (".input_scale", lambda t: t.repeat(2))):
        wrong_shape = damaged("shape" + leaf, lambda t: t.update({key + leaf: bad(t[key + leaf]).contiguous()}))
        with pytest.raises(ValueError, match=rf"checkpoint tensor '{key}{leaf}' (is torch|has shape)"):
            load_model(wrong_shape, precision="w8a8", device="cpu")
    partial = damaged("partial", lambda t: t.pop(key + ".input_scale"))
    with pytest.raises(ValueError, match="only some of .* have an input_scale|input_scale: missing"):
        load_model(partial, precision="w8a8", device="cpu")


@pytest.mark.parametrize("flags,message", [
    (["--method", "smoothquant", "--alpha", "1.5"], "--alpha must be in \\[0, 1\\], got 1.5"),
    (["--method", "smoothquant", "--alpha", "0.5", "--no-smooth"], "give one of them"),
    (["--method", "rtn", "--alpha", "0.5"], "--alpha: for --method smoothquant only"),
    (["--method", "awq", "--act-quant", "tensor", "--no-smooth"], "--no-smooth, --act-quant: for --method smoothquant"),
    (["--method", "smoothquant", "--format", "awq"], "tinyq format only"),
])
def test_quantize_cli_refuses_w8a8_flags_before_loading(tmp_path, capsys, flags, message):
    """Flags that are out of range, contradictory or for another method stop the command before any
    model is read (the model path here does not exist)."""
    argv = ["quantize", "--model", str(tmp_path / "no-such-model"), "--out", str(tmp_path / "out"), *flags]
    assert _cli(quantize_cmd, argv) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and "no-such-model" not in err
    assert not (tmp_path / "out").exists()


def test_chat_and_quantize_cli_options_for_w8a8(tiny_dir, tmp_path, capsys):
    """``quantize --method smoothquant --no-smooth`` writes a plain W8A8 checkpoint, and
    ``python -m tinyq chat --precision w8a8`` answers on the CPU (RTN W8A8 at load)."""
    import os
    import subprocess
    import sys

    out = tmp_path / "rtn"
    argv = ["quantize", "--model", str(tiny_dir / "fp"), "--method", "smoothquant", "--no-smooth", "--out", str(out),
            "--calib-file", str(tiny_dir / "calib.txt"), "--calib-blocks", "2", "--calib-len", "32", "--device", "cpu",
            "--quiet"]
    assert _cli(quantize_cmd, argv) == 0
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "tinyq_w8a8" and qc["method"] == "rtn" and qc["alpha"] is None
    # no smoothing: the norms are the float model's (in the checkpoint's fp16), nothing folded into them
    from safetensors.torch import load_file
    fp = {k: v for f in (tiny_dir / "fp").glob("*.safetensors") for k, v in load_file(str(f)).items()}
    ck = {k: v for f in out.glob("*.safetensors") for k, v in load_file(str(f)).items()}
    for key in ("model.layers.0.input_layernorm.weight", "model.layers.1.post_attention_layernorm.weight"):
        assert torch.equal(ck[key], fp[key].half())
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    make_model_dir(tmp_path / "chat", "llama", seed=2)  # a tokenizer with a chat template
    p = subprocess.run([sys.executable, "-m", "tinyq", "chat", "--model", str(tmp_path / "chat"), "--precision", "w8a8",
                        "--temperature", "0", "--max-new-tokens", "4", "--max-seq-len", "128"],
                       input="hello\n/exit\n", capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=root), cwd=root)
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("assistant> ") == 1 and "ms/token" in p.stdout


@pytest.fixture(scope="module")
def w8a8_dirs(tmp_path_factory):
    """``act_quant -> (folder of a saved W8A8 checkpoint, its tensors)`` for a tiny Llama."""
    from safetensors.torch import load_file

    from tinyq.quant.w8a8_checkpoint import save_w8a8

    root = tmp_path_factory.mktemp("w8a8_damaged")
    hf, tok = make_model_dir(root / "fp", "llama")
    stats = calibrate(hf, torch.randint(3, 50, (2, 16)), progress=False)
    out = {}
    for act_quant in ("token", "tensor"):
        path = save_w8a8(hf, root / act_quant, tok, act_quant=act_quant,
                         static_stats=stats if act_quant == "tensor" else None)
        files = sorted(path.glob("*.safetensors"))
        out[act_quant] = (path, {k: v for f in files for k, v in load_file(str(f)).items()})
    return out


def _damaged_w8a8(w8a8_dirs, act_quant, dst, edit_tensors=None, edit_quant=None) -> str:
    """A one-file copy of the ``act_quant`` checkpoint with its tensors and/or quantization_config edited."""
    import shutil

    from safetensors.torch import save_file

    src, tensors = w8a8_dirs[act_quant]
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors*"))
    tensors = {k: v.clone() for k, v in tensors.items()}
    if edit_tensors:
        edit_tensors(tensors)
    save_file(tensors, str(dst / "model.safetensors"))
    if edit_quant:
        cfg = json.loads((dst / "config.json").read_text())
        edit_quant(cfg["quantization_config"])
        (dst / "config.json").write_text(json.dumps(cfg))
    return str(dst)


UP = "model.layers.1.mlp.up_proj"


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 0.0, -0.5])
def test_w8a8_weight_scale_that_is_not_finite_and_positive_is_refused(w8a8_dirs, tmp_path, bad):
    """A NaN weight_scale once loaded silently and failed later in silu_mul_quant naming no tensor."""
    path = _damaged_w8a8(w8a8_dirs, "token", tmp_path / "ws", lambda t: t[UP + ".weight_scale"].__setitem__(3, bad))
    with pytest.raises(ValueError, match=rf"^{path}/model.safetensors: tensor '{UP}.weight_scale' has 1 scale\(s\) "
                                         r"that are not finite and positive \(rows \[3\]"):
        load_model(path, precision="w8a8", device="cpu")


def test_w8a8_missing_qweight_of_one_fused_part_is_named(w8a8_dirs, tmp_path):
    """With up_proj.qweight gone the loader once fell back to the dense path and asked for gate_proj.weight."""
    path = _damaged_w8a8(w8a8_dirs, "token", tmp_path / "noq", lambda t: t.pop(UP + ".qweight"))
    with pytest.raises(ValueError, match=rf"^{path}: the checkpoint has no tensor '{UP}.qweight', though "
                                         r"'model.layers.1.mlp.gate_proj' is quantized"):
        load_model(path, precision="w8a8", device="cpu")


def test_w8a8_act_quant_in_config_is_checked_and_enforced(w8a8_dirs, tmp_path):
    bad = _damaged_w8a8(w8a8_dirs, "token", tmp_path / "bad", edit_quant=lambda q: q.update(act_quant="channel"))
    with pytest.raises(ValueError, match=rf"^{bad}/config.json: quantization_config.act_quant 'channel' is not one of"):
        load_model(bad, precision="w8a8", device="cpu")
    # per-token config with static scales: one stray scale, or a whole static checkpoint relabelled
    o_proj = "model.layers.1.self_attn.o_proj.input_scale"
    stray = _damaged_w8a8(w8a8_dirs, "token", tmp_path / "stray", lambda t: t.update({o_proj: torch.tensor([0.01])}))
    relabelled = _damaged_w8a8(w8a8_dirs, "tensor", tmp_path / "relabelled",
                               edit_quant=lambda q: q.update(act_quant="token"))
    for path, name in ((stray, o_proj), (relabelled, "model.layers.0.self_attn.q_proj.input_scale")):
        with pytest.raises(ValueError, match=rf"^{path}/model.safetensors: tensor '{name}' is a static activation "
                                             "scale, but config.json says act_quant 'token'"):
            load_model(path, precision="w8a8", device="cpu")


def test_fused_w8a8_linear_names_the_file_when_only_some_parts_have_an_input_scale():
    from tinyq.models.loader import TensorSource
    from tinyq.models.w8a8 import fused_w8a8_linear

    parts = {}
    for n in ("a", "b"):
        parts[n + ".qweight"] = torch.ones(2, 4, dtype=torch.int8)
        parts[n + ".weight_scale"] = torch.ones(2)
    parts["b.input_scale"] = torch.tensor([0.5])
    src = TensorSource(parts, where="some/folder")
    with pytest.raises(ValueError, match=r"^some/folder: only some of \['a', 'b'\] have an input_scale"):
        fused_w8a8_linear(src, ["a", "b"], None, "cpu", [2, 2], 4)
