"""Tiny random HF models (Llama, Qwen2, Llama-3.1 rope-scaled) saved as HF directories, with a
small byte-level BPE tokenizer that has a chat template. Shared by the runtime tests."""
from __future__ import annotations

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MISTRAL_WINDOW = 8


def tiny_tokenizer():
    """Byte-level BPE over the 256 byte symbols plus a few merges (so decoding must handle both
    multi-byte UTF-8 split across tokens and merged tokens); ~300 ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("e", "r"), ("o", "n"), ("Ã", "©")]
    vocab = {tok: i for i, tok in enumerate(alphabet)}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": SPECIALS[1:2]})
    tok.chat_template = CHAT_TEMPLATE
    return tok


def hf_config(kind: str, vocab_size: int):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-5, initializer_range=0.08, bos_token_id=None, eos_token_id=None)
    if kind == "llama":
        return LlamaConfig(**common, rope_theta=10000.0)
    if kind == "llama31":
        return LlamaConfig(**common, rope_theta=500000.0, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32})
    if kind == "mistral":  # Mistral-7B-v0.1 style: sliding_window set, no use_sliding_window flag
        return MistralConfig(**common, rope_theta=10000.0, sliding_window=MISTRAL_WINDOW)
    if kind == "qwen2":
        return Qwen2Config(**common, rope_theta=1000000.0, tie_word_embeddings=True)
    raise ValueError(kind)


def make_model_dir(path, kind: str = "llama", seed: int = 0, **save_kwargs):
    """Save a random tiny ``kind`` model + tokenizer under ``path``; returns ``(hf_model fp32, tokenizer)``."""
    from transformers import AutoModelForCausalLM

    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    cfg = hf_config(kind, len(tok))
    model = AutoModelForCausalLM.from_config(cfg).float().eval()
    if kind == "qwen2":  # HF initializes biases to zero: make them matter
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    model.save_pretrained(str(path), **save_kwargs)
    tok.save_pretrained(str(path))
    return model, tok


def hf_greedy(model, ids, n: int):
    """``n`` greedy tokens from an HF model by full forwards (no cache, no EOS handling)."""
    ids = torch.tensor([list(ids)])
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(ids).logits[0, -1].argmax())
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out


def prefill_then_decode(model, ids, steps: int = 3, max_seq_len: int = 32):
    """A tinyq model's last prefill logits and ``steps`` greedy one-token steps over a fresh cache:
    ``(float32 logits [1, 1 + steps, vocab], cache)``."""
    cache = model.new_cache(max_seq_len)
    out = [model(ids, cache, last_only=True)]
    tok_id = out[-1][:, -1:].argmax(-1)
    for _ in range(steps):
        out.append(model(tok_id, cache))
        tok_id = out[-1].argmax(-1)
    return torch.cat(out, 1).float(), cache
