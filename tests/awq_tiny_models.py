"""Tiny random Llama/Qwen2 models, a word-level tokenizer and text for the AWQ / checkpoint / CLI tests."""
from __future__ import annotations

import random

import torch

WORDS = [f"w{i}" for i in range(200)]


def tiny_model(kind: str = "llama", hidden: int = 128, inter: int = 256, layers: int = 2, heads: int = 4, kv: int = 2,
               vocab: int = 256, outliers: bool = True, seed: int = 0):
    """A random ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` (fp32). With ``outliers``, a few input
    channels of every layer are amplified 20x through the norms (AWQ's salient channels)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    cfg_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[kind]
    cfg = cfg_cls(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=kv, vocab_size=vocab, max_position_embeddings=512, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            if kind == "qwen2":  # Qwen2 has q/k/v biases; make them non-zero so they are exercised
                for name in ("q_proj", "k_proj", "v_proj"):
                    getattr(layer.self_attn, name).bias.normal_(0, 0.02)
            if outliers:
                layer.input_layernorm.weight[:4] *= 20
                layer.post_attention_layernorm.weight[5:9] *= 20
                layer.mlp.up_proj.weight[7:10] *= 10
    return model


def fp16_exact(model):
    """Round the parameters to fp16 values (kept in fp32), so checkpoints, which store fp16, are
    lossless. Not ``model.half().float()``: that would also round the rotary inv_freq buffer."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    return model


def word_tokenizer():
    """A transformers fast tokenizer over WORDS (+ specials), whitespace-split."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def random_text(n_words: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    lines, line = [], []
    for i in range(n_words):
        line.append(rng.choice(WORDS[:50]) if rng.random() < 0.7 else rng.choice(WORDS))
        if len(line) == 12:
            lines.append(" ".join(line))
            line = []
    lines.append(" ".join(line))
    return "\n".join(lines)


def save_tiny_model_dir(path, kind: str = "llama", **kw):
    model = tiny_model(kind, **kw)
    model.save_pretrained(str(path))
    word_tokenizer().save_pretrained(str(path))
    return model
