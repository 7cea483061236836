"""A small NVILA-shaped model with RANDOM weights, built in memory, so the whole VLM pipeline
(dynamic-S2 tiling, SigLIP tower, 2x2 downsampling projector, "\\n" after the image, Qwen2 LLM,
chat with context streaming) can be watched on a CPU without any checkpoint. Its answers are noise.

Shapes: SigLIP 56-pixel tiles of 14-pixel patches (4 x 4), 2 layers, hidden 64; scales 56/112/168
(NVILA's 448/896/1344 divided by 8); projector LayerNorm(4 x 3 x 64) -> Linear -> GELU -> Linear;
Qwen2 LLM with 2 layers, hidden 128; a byte-level tokenizer with a ChatML template.
"""
from __future__ import annotations

import torch

from tinyq.models.llama import CausalLM, ModelConfig
from tinyq.models.nvila import CHATML_TEMPLATE, NvilaModel, build_projector
from tinyq.models.vision import VisionConfig, VisionTower

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]


def byte_tokenizer():
    """Byte-level BPE over the 256 byte symbols (no merges), ChatML specials and ``<image>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": SPECIALS})
    tok.chat_template = CHATML_TEMPLATE
    return tok


@torch.no_grad()
def random_tiny_nvila(seed: int = 0, dtype=torch.float32, device="cpu"):
    """``(NvilaModel, tokenizer)`` with random weights (see the module docstring)."""
    torch.manual_seed(seed)
    tok = byte_tokenizer()
    vcfg = VisionConfig(kind="siglip", hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                        image_size=56, patch_size=14, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh")
    tower = VisionTower(vcfg)
    lcfg = ModelConfig.from_hf({
        "architectures": ["Qwen2ForCausalLM"], "vocab_size": len(tok), "hidden_size": 128, "intermediate_size": 256,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
        "rope_theta": 1e6, "tie_word_embeddings": True, "max_position_embeddings": 4096,
        "eos_token_id": tok.eos_token_id,
    })
    llm = CausalLM(lcfg)
    llm.tie_weights()
    scales = [56, 112, 168]
    projector, _ = build_projector("mlp_downsample_2x2_fix", 3 * vcfg.hidden_size, lcfg.hidden_size)
    for module in (tower, llm, projector):
        for p in module.parameters():
            p.normal_(0, 0.05)
    model = NvilaModel(tower, projector, llm, tok.convert_tokens_to_ids("<image>"),
                       list(tok("\n").input_ids), s2_scales=scales)
    model.to(device, dtype).eval().requires_grad_(False)
    return model, tok
