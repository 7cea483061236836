"""Tiny GGUF files written the way llama.cpp's ``convert_hf_to_gguf.py`` writes them (with
``gguf.GGUFWriter``), and the transformers model that reads one back. Shared by the GGUF tests.

What the converter does, restated from its ``TextModel`` / ``LlamaModel`` / ``Qwen2Model`` classes:
hyper-parameters under ``<arch>.*`` keys; tensor names from ``gguf.get_tensor_name_map``; for the
Llama family only, q and k rows permuted per head (``LlamaModel.permute``: pairs interleaved, k with
the kv head count); for llama3 RoPE scaling only, a ``rope_freqs`` tensor of per-frequency divisors
(``LlamaModel.generate_extra_tensors``); a tied ``lm_head`` is not written.
"""
from __future__ import annotations

import json
import math
import os

import numpy as np
import torch

ARCH = {"llama": "llama", "llama31": "llama", "qwen2": "qwen2"}


def llama_cpp_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The converter's q/k row permutation: per head, rows ``[0, D/2)`` and ``[D/2, D)`` interleaved."""
    d = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, d // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def llama3_rope_freqs(cfg) -> torch.Tensor:
    """The converter's ``rope_freqs``: divisor of each RoPE frequency under llama3 scaling."""
    sc = cfg.rope_scaling if getattr(cfg, "rope_scaling", None) else cfg.rope_parameters
    theta, d = sc.get("rope_theta", getattr(cfg, "rope_theta", None)), cfg.head_dim
    factor, low, high = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
    old = sc["original_max_position_embeddings"]
    out = []
    for i in range(0, d, 2):
        wavelen = 2 * math.pi * theta ** (i / d)
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


def write_gguf(path, model, tokenizer, kind: str) -> None:
    """Write HF ``model`` (fp32) and its byte-level BPE ``tokenizer`` as a GGUF file."""
    import gguf

    cfg, arch = model.config, ARCH[kind]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    rope = getattr(cfg, "rope_parameters", None) or {}
    w.add_rope_freq_base(float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if arch == "llama":
        w.add_vocab_size(cfg.vocab_size)
        w.add_rope_dimension_count(cfg.head_dim)
    vocab = tokenizer.get_vocab()
    w.add_tokenizer_model("gpt2")
    w.add_token_list(sorted(vocab, key=vocab.get))
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA if arch == "llama" else gguf.MODEL_ARCH.QWEN2,
                                     cfg.num_hidden_layers)
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if arch == "llama" and ".q_proj." in name:
            t = llama_cpp_permute(t, cfg.num_attention_heads)
        elif arch == "llama" and ".k_proj." in name:
            t = llama_cpp_permute(t, cfg.num_key_value_heads)
        w.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), t.float().numpy())
    if kind == "llama31":
        w.add_tensor("rope_freqs.weight", llama3_rope_freqs(cfg).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def transformers_from_gguf(path):
    """transformers' own reading of the file: ``from_pretrained(gguf_file=)`` (needs ``accelerate``),
    else the same reader (``load_gguf_checkpoint``) into a model built from the GGUF's config."""
    import importlib.util

    from transformers import AutoConfig, AutoModelForCausalLM

    folder, name = os.path.split(os.path.abspath(path))
    if importlib.util.find_spec("accelerate") is not None:
        return AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder, gguf_file=name)).float().eval()
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return model
