"""Tiny random vision towers and VLMs for the VLM tests (fp32, a few KB of weights)."""
from __future__ import annotations

import torch

IMAGE_SIZE, PATCH = 28, 7  # 4 x 4 patches


def tower_config(kind: str, image_size: int = IMAGE_SIZE, patch: int = PATCH, layers: int = 3):
    from transformers import CLIPVisionConfig, SiglipVisionConfig

    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=2,
                  image_size=image_size, patch_size=patch)
    return CLIPVisionConfig(**common) if kind == "clip" else SiglipVisionConfig(**common)


def randomize_(module: torch.nn.Module, std: float = 0.2) -> torch.nn.Module:
    """Random weights everywhere (HF zero-inits biases and sets norms to 1: make them matter)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + std * torch.randn_like(p))
            else:
                p.normal_(0, std)
    return module


def tiny_tower(kind: str, **kw):
    from transformers import CLIPVisionModel, SiglipVisionModel

    cls = CLIPVisionModel if kind == "clip" else SiglipVisionModel
    torch.manual_seed(1)
    return randomize_(cls(tower_config(kind, **kw))).float().eval()


def vlm_tokenizer():
    """The tiny byte-level tokenizer of the LLM tests plus an ``<image>`` special token."""
    from tests.tiny_models import tiny_tokenizer

    tok = tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<image>"]})
    return tok


def make_llava_dir(path, tower: str = "clip", llm: str = "llama", legacy: bool = False, seed: int = 0):
    """A random tiny llava-hf ``LlavaForConditionalGeneration`` saved under ``path`` (new key names,
    or the legacy ones with ``legacy=True``); returns ``(hf_model fp32, tokenizer)``."""
    import os

    from safetensors.torch import save_file
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from tests.tiny_models import hf_config

    tok = vlm_tokenizer()
    strategy = "default" if tower == "clip" else "full"
    cfg = LlavaConfig(text_config=hf_config(llm, len(tok)).to_dict(), vision_config=tower_config(tower).to_dict(),
                      image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
                      vision_feature_select_strategy=strategy, image_seq_length=(IMAGE_SIZE // PATCH) ** 2)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg).float().eval()
    randomize_(model.model.vision_tower)
    randomize_(model.model.multi_modal_projector, std=0.5)
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    # Published llava-hf files: the tower under ``vision_model.``; new or legacy prefixes elsewhere.
    renames = [("model.vision_tower.", "model.vision_tower.vision_model.")]
    if legacy:
        renames = [("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
                   ("model.vision_tower.", "vision_tower.vision_model."),
                   ("model.multi_modal_projector.", "multi_modal_projector.")]
    save_file(_renamed(model.state_dict(), renames), os.path.join(path, "model.safetensors"))
    return model, tok


def _renamed(sd, renames):
    out = {}
    for k, v in sd.items():
        for old, new in renames:
            if k.startswith(old):
                k = new + k[len(old):]
                break
        out[k] = v.clone()  # tied tensors must not share memory in a safetensors file
    return out
