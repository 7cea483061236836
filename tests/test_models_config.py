"""config.json settings read as transformers (5.x) reads them: each one tinyq supports gives
transformers' fp32 logits on a tiny random model, each one it does not is refused at load with a
ValueError naming the key."""
import json
import os

import pytest
import torch

from tests.tiny_models import make_model_dir
from tinyq.models import load_model
from tinyq.models.llama import ModelConfig

IDS = [5, 9, 200, 31, 7, 77, 120, 3, 44, 61, 250, 18, 90, 140, 2, 66, 171, 33, 8, 215]  # 20 tokens


def edit_config(path, edit) -> None:
    """Apply ``edit(config dict)`` to ``path``/config.json."""
    cfg_path = os.path.join(path, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    edit(cfg)
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)


def edited_model_dir(path, kind: str, edit):
    """A tiny ``kind`` model saved under ``path`` with ``edit`` applied to its config.json; returns the
    fp32 transformers model reloaded from it (so transformers reads the edited config)."""
    from transformers import AutoModelForCausalLM

    make_model_dir(path, kind)
    edit_config(path, edit)
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def assert_refused(path, kind: str, edit, match: str):
    """A tiny ``kind`` model with ``edit`` applied to its config.json fails to load with ``match``."""
    make_model_dir(path, kind)
    edit_config(path, edit)
    with pytest.raises(ValueError, match=match):
        load_model(str(path), precision="fp32", device="cpu", tokenizer=None)


def assert_matches_transformers(path, hf, ids=IDS):
    """tinyq's fp32 logits, whole-sequence and chunked through the cache, equal transformers'."""
    model, _ = load_model(str(path), precision="fp32", device="cpu", tokenizer=None)
    x = torch.tensor([ids])
    with torch.no_grad():
        ref = hf(x).logits
        cache = model.new_cache(len(ids))
        cached = torch.cat([model(x[:, :7], cache), model(x[:, 7:], cache)], dim=1)
        torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(cached, ref, rtol=1e-4, atol=1e-4)
    return model


def set_keys(**kv):
    return lambda c: c.update(kv)


# ---- RoPE: rope_scaling added to a transformers-5 config that has rope_parameters {"rope_type": "default"}


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_rope_scaling_wins_over_resaved_rope_parameters(tmp_path, kind):
    """transformers applies ``rope_scaling or rope_parameters`` (Qwen2's rope_theta 1e6 in rope_parameters
    is dropped with it: transformers then uses 10000, and so does tinyq)."""
    def add_scaling(c):
        assert c["rope_parameters"]["rope_type"] == "default"
        c["rope_scaling"] = {"type": "linear", "factor": 4.0}

    hf = edited_model_dir(tmp_path, kind, add_scaling)
    assert hf.config.rope_parameters["rope_type"] == "linear"
    model = assert_matches_transformers(tmp_path, hf)
    assert model.config.rope.rope_type == "linear" and model.config.rope.factor == 4.0
    assert model.config.rope.theta == hf.config.rope_parameters["rope_theta"] == 10000.0


def test_unsupported_rope_scaling_over_default_rope_parameters_is_refused(tmp_path):
    yarn = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    assert_refused(tmp_path, "qwen2", set_keys(rope_scaling=yarn), "rope type 'yarn' is not supported")


def test_top_level_original_max_position_embeddings_wins(tmp_path):
    """Phi-3 style top-level key: transformers uses it over the llama3 dict's (32 in the tiny model)."""
    hf = edited_model_dir(tmp_path, "llama31", set_keys(original_max_position_embeddings=64))
    assert hf.config.rope_parameters["original_max_position_embeddings"] == 64
    model = assert_matches_transformers(tmp_path, hf)
    assert model.config.rope.original_max_position_embeddings == 64


def test_partial_rotary_factor_with_default_rope_is_ignored_like_transformers(tmp_path):
    hf = edited_model_dir(tmp_path, "llama", set_keys(partial_rotary_factor=0.5))
    assert_matches_transformers(tmp_path, hf)


# ---- the MLP activation


@pytest.mark.parametrize("kind,act", [("llama", "gelu"), ("llama", "relu"), ("qwen2", "gelu_pytorch_tanh"),
                                      ("mistral", "gelu")])
def test_hidden_act_other_than_silu_is_refused(tmp_path, kind, act):
    assert_refused(tmp_path, kind, set_keys(hidden_act=act), f"hidden_act='{act}' is not supported")


def test_hidden_act_swish_is_silu(tmp_path):
    hf = edited_model_dir(tmp_path, "llama", set_keys(hidden_act="swish"))
    assert_matches_transformers(tmp_path, hf)


# ---- head_dim


def test_unsupported_head_dim_is_refused_at_load(tmp_path):
    """Refused when the config is read, not at the first cached forward."""
    assert_refused(tmp_path, "llama", set_keys(head_dim=8), "model config: head_dim 8 is not supported")


# ---- sliding windows


def test_mistral_without_sliding_window_key_gets_transformers_default(tmp_path):
    """MistralConfig defaults a missing sliding_window to 4096: tinyq runs full attention, exact up to
    4096 tokens, and refuses longer sequences."""
    hf = edited_model_dir(tmp_path, "mistral", lambda c: c.pop("sliding_window"))
    assert hf.config.sliding_window == 4096
    model = assert_matches_transformers(tmp_path, hf)
    assert model.config.sliding_window == 4096
    with pytest.raises(ValueError, match="4097 tokens exceed the model's sliding_window=4096"):
        load_model(str(tmp_path), precision="fp32", device="cpu", tokenizer=None, max_seq_len=4097)


def test_mistral_explicit_null_window_is_full_attention(tmp_path):
    hf = edited_model_dir(tmp_path, "mistral", set_keys(sliding_window=None))
    assert hf.config.sliding_window is None
    model = assert_matches_transformers(tmp_path, hf)
    assert model.config.sliding_window is None


@pytest.mark.parametrize("window", [0, -4])
def test_mistral_non_positive_window_is_refused(window):
    with pytest.raises(ValueError, match=f"sliding_window={window} must be a positive"):
        ModelConfig.from_hf(_tiny_config("mistral", sliding_window=window))


def _drop_layer_types(**kv):
    """An older Qwen2 config (no layer_types): transformers derives them from max_window_layers."""
    def edit(c):
        c.pop("layer_types", None)
        c.update(kv)
    return edit


def test_qwen2_sliding_window_over_no_layer_is_full_attention(tmp_path):
    """use_sliding_window with max_window_layers >= num_hidden_layers: transformers windows no layer. The
    window (4) is shorter than the sequence (20), so a windowed layer would change the logits."""
    hf = edited_model_dir(tmp_path, "qwen2", _drop_layer_types(use_sliding_window=True, sliding_window=4,
                                                               max_window_layers=2))
    assert hf.config.layer_types == ["full_attention", "full_attention"]
    assert_matches_transformers(tmp_path, hf)


@pytest.mark.parametrize("edit", [
    _drop_layer_types(use_sliding_window=True, sliding_window=4, max_window_layers=1),
    set_keys(use_sliding_window=True, sliding_window=4, layer_types=["full_attention", "sliding_attention"]),
], ids=["max_window_layers", "layer_types"])
def test_qwen2_windowed_layers_are_refused(tmp_path, edit):
    assert_refused(tmp_path, "qwen2", edit, r"use_sliding_window=True with sliding_window=4 windows .* layers \[1\]")


def test_qwen2_sliding_window_without_the_flag_is_ignored():
    assert ModelConfig.from_hf(_tiny_config("qwen2", sliding_window=4, max_window_layers=0)).sliding_window is None


# ---- bias flags that transformers' Mistral and Qwen2 never read


@pytest.mark.parametrize("kind,key", [("mistral", "attention_bias"), ("mistral", "mlp_bias"), ("qwen2", "mlp_bias")])
def test_bias_flags_the_family_ignores_are_ignored(tmp_path, kind, key):
    """transformers' Mistral and Qwen2 hard-code their biases (Llama's flags are refused: test_models.py).
    The tiny Mistral's window (8) is dropped so that the 20-token comparison runs."""
    no_window = {"sliding_window": None} if kind == "mistral" else {}
    hf = edited_model_dir(tmp_path, kind, set_keys(**{key: True}, **no_window))
    assert_matches_transformers(tmp_path, hf)


def _tiny_config(kind: str, **kv) -> dict:
    arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}[kind]
    return {"architectures": [arch], "model_type": kind, "vocab_size": 300, "hidden_size": 64,
            "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            **kv}
