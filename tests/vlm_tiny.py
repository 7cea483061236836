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
