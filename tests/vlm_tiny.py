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


def vlm_tokenizer(llama_bos: bool = False):
    """The tiny byte-level tokenizer of the LLM tests plus an ``<image>`` special token; with
    ``llama_bos``, also ``<s>`` / ``</s>`` and a BOS that encoding adds, as Llama tokenizers do."""
    from tokenizers import processors

    from tests.tiny_models import tiny_tokenizer

    tok = tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<image>"]})
    if llama_bos:
        tok.add_special_tokens({"bos_token": "<s>", "additional_special_tokens": ["<|im_start|>", "<image>", "</s>"]})
        bos = tok.convert_tokens_to_ids("<s>")
        tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    return tok


def make_llava_dir(path, tower: str = "clip", llm: str = "llama", legacy: bool = False, seed: int = 0,
                   feature_layer=-2):
    """A random tiny llava-hf ``LlavaForConditionalGeneration`` saved under ``path`` (new key names,
    or the legacy ones with ``legacy=True``; ``feature_layer`` an index or a list of them, whose
    hidden states are concatenated); returns ``(hf_model fp32, tokenizer)``."""
    import os

    from safetensors.torch import save_file
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from tests.tiny_models import hf_config

    tok = vlm_tokenizer()
    strategy = "default" if tower == "clip" else "full"
    cfg = LlavaConfig(text_config=hf_config(llm, len(tok)).to_dict(), vision_config=tower_config(tower).to_dict(),
                      image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=feature_layer,
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


class VilaFlatSquare(torch.nn.Module):
    """Reference space-to-channel written as VILA's ``flat_square_2x2`` / ``flat_square_3x3`` are
    (NVlabs/VILA llava/model/multimodal_projector/base_projector.py): pad rows, then columns, with
    zeros to a multiple of k; fold columns into channels, transpose, fold rows, transpose back."""

    def __init__(self, k: int):
        super().__init__()
        self.k = k

    def forward(self, x):
        k = self.k
        g = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], g, g, -1)
        n, w, h, c = x.shape
        if w % k:
            x = torch.cat([x, x.new_zeros(n, k - w % k, h, c)], dim=1)
            n, w, h, c = x.shape
        if h % k:
            x = torch.cat([x, x.new_zeros(n, w, k - h % k, c)], dim=2)
            n, w, h, c = x.shape
        x = x.contiguous().view(n, w, h // k, c * k).permute(0, 2, 1, 3).contiguous()
        x = x.view(n, h // k, w // k, c * k * k).permute(0, 2, 1, 3).contiguous()
        return x.reshape(n, -1, x.shape[-1])


def reference_projector(kind: str, mm_hidden: int, hidden: int):
    """The VILA ``MultimodalProjector.layers`` of ``kind`` in plain torch, random weights."""
    nn = torch.nn
    if kind == "mlp_downsample_3x3_fix":
        layers = nn.Sequential(VilaFlatSquare(3), nn.LayerNorm(9 * mm_hidden), nn.Linear(9 * mm_hidden, 3 * mm_hidden),
                               nn.GELU(), nn.LayerNorm(3 * mm_hidden), nn.Linear(3 * mm_hidden, hidden), nn.GELU(),
                               nn.Linear(hidden, hidden))
    else:
        layers = nn.Sequential(VilaFlatSquare(2), nn.LayerNorm(4 * mm_hidden), nn.Linear(4 * mm_hidden, hidden),
                               nn.GELU(), nn.Linear(hidden, hidden))
    return randomize_(layers).eval()


def make_nvila_dir(path, projector: str = "mlp_downsample_2x2_fix", s2: bool = True, image_size: int = IMAGE_SIZE,
                   llama_bos: bool = False):
    """A random tiny VILA/NVILA checkpoint (``llm/``, ``vision_tower/``, ``mm_projector/``) under
    ``path`` (its tokenizer: :func:`vlm_tokenizer`); returns ``(tower, projector, llm, tokenizer, root
    config)`` as transformers / torch parts."""
    import json
    import os

    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from tests.tiny_models import hf_config

    tok = vlm_tokenizer(llama_bos)
    torch.manual_seed(2)
    tower = tiny_tower("siglip", image_size=image_size)
    scales = [image_size, 2 * image_size, 3 * image_size]
    llm = AutoModelForCausalLM.from_config(hf_config("qwen2", len(tok))).float().eval()
    proj = reference_projector(projector, 32 * (3 if s2 else 1), llm.config.hidden_size)
    root = {"architectures": ["LlavaLlamaModel"], "model_type": "llava_llama", "mm_vision_select_layer": -2,
            "mm_vision_select_feature": "cls_patch", "max_tiles": 12,
            "image_aspect_ratio": "dynamic_s2" if s2 else "resize", "s2_scales": ",".join(map(str, scales))}
    for sub in ("llm", "vision_tower", "mm_projector"):
        os.makedirs(os.path.join(path, sub), exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(root, f)
    llm.save_pretrained(os.path.join(path, "llm"))
    tok.save_pretrained(os.path.join(path, "llm"))
    tower.save_pretrained(os.path.join(path, "vision_tower"))
    with open(os.path.join(path, "mm_projector", "config.json"), "w") as f:
        json.dump({"mm_projector_type": projector}, f)
    save_file({"layers." + k: v.clone() for k, v in proj.state_dict().items()},
              os.path.join(path, "mm_projector", "model.safetensors"))
    return tower, proj, llm, tok, root


def halve_columns(file, name: str):
    """Rewrite safetensors ``file`` with tensor ``name`` cut to half its columns (a checkpoint whose
    shape disagrees with its config); returns the original ``(rows, cols)``."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(file))
    rows, cols = tensors[name].shape
    tensors[name] = torch.zeros(rows, cols // 2)
    save_file(tensors, str(file))
    return rows, cols
