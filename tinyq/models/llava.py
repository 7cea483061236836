"""LLaVA-1.5 (llava-hf layout): CLIP or SigLIP tower -> ``mlp2x_gelu`` projector -> Llama / Qwen2.

Per image (transformers ``LlavaModel.get_image_features``; haotian-liu/LLaVA
llava/model/multimodal_projector/builder.py for ``mlp2x_gelu``)::

    pad to a square of the mean colour -> tower processor -> [1, 3, S, S]
    -> tower.features(vision_feature_layer (-2), strategy "default" drops CLS / "full") [T, C]
    -> linear_1 [C (x layers) -> H] -> GELU -> linear_2 [H -> H]          T rows in the LLM's space

The prompt holds T ``<image>`` ids per image (576 for a 336-pixel CLIP-L/14 tower).

Checkpoint layouts (both read): transformers >= 4.52 ``model.vision_tower.*``,
``model.multi_modal_projector.linear_{1,2}.*``, ``model.language_model.*``, ``lm_head.*``; the
legacy one ``vision_tower.*``, ``multi_modal_projector.*``, ``language_model.model.*``,
``language_model.lm_head.*``. The LLM streams through :func:`tinyq.models.loader.build_model`
(meta device, W4A16 RTN at load or AWQ checkpoints).
"""
from __future__ import annotations

import json
import os
import time
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tinyq.json_io import read_json
from tinyq.models.loader import TensorSource, build_model, checked_tensors, load_tokenizer, peak_host_memory_mb
from tinyq.models.vision import VisionConfig, VisionTower, load_vision_tower
from tinyq.models.vlm import VisionLanguageModel
from tinyq.nn.dense_linear import DenseLinear
from tinyq.vlm import media

# LLaVA-1.5's conversation ("vicuna_v1" in haotian-liu/LLaVA llava/conversation.py), for
# tokenizers without a chat template.
VICUNA_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + ' ' }}{% set start = 1 %}"
    "{% else %}{{ 'A chat between a curious human and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the human\\'s questions. ' }}{% set start = 0 %}{% endif %}"
    "{% for m in messages[start:] %}{% if m['role'] == 'user' %}{{ 'USER: ' + m['content'] + ' ' }}"
    "{% else %}{{ 'ASSISTANT: ' + m['content'] + eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
ACTS = {"gelu": F.gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


class LlavaProjector(nn.Module):
    """``mlp2x_gelu``: Linear -> GELU -> Linear (transformers ``LlavaMultiModalProjector``)."""

    def __init__(self, in_features: int, hidden: int, act: str = "gelu", bias: bool = True):
        super().__init__()
        if act not in ACTS:
            raise ValueError(f"unsupported projector_hidden_act {act!r}; supported: {sorted(ACTS)}")
        self.linear_1 = DenseLinear(in_features, hidden, bias=bias)
        self.linear_2 = DenseLinear(hidden, hidden, bias=bias)
        self.act = ACTS[act]

    def forward(self, x):
        return self.linear_2(self.act(self.linear_1(x)))


class LlavaModel(VisionLanguageModel):
    chat_template = VICUNA_TEMPLATE

    def __init__(self, tower: VisionTower, projector: LlavaProjector, llm, image_token_id: int,
                 feature_layer=-2, select_strategy: str = "default", processor=None):
        super().__init__()
        self.vision_tower, self.multi_modal_projector, self.llm = tower, projector, llm
        self.image_token_id, self.feature_layer, self.select_strategy = int(image_token_id), feature_layer, select_strategy
        tcfg = tower.config
        self.processor = processor or media.image_processor(tcfg.kind, tcfg.image_size)
        mean = getattr(self.processor, "image_mean", None) or media.CLIP_MEAN
        self.pad_color = tuple(mean)

    @torch.inference_mode()
    def encode_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[N, 3, S, S]`` -> ``[N, T, hidden]`` in the LLM's dtype."""
        feats = self.vision_tower.encode(pixel_values, self.feature_layer, self.select_strategy)
        return self.multi_modal_projector(feats).to(self.dtype)

    def encode_images(self, images: Sequence) -> List[torch.Tensor]:
        if not len(images):
            return []
        squares = [media.expand_to_square(media.load_image(im), self.pad_color) for im in images]
        return list(self.encode_pixels(media.pixel_values(self.processor, squares)))


def _layout(src: TensorSource):
    """(llm name map, vision prefix, projector prefix) of a llava-hf checkpoint."""
    if "model.language_model.embed_tokens.weight" in src:
        return {"model.": "model.language_model.", "lm_head.": "lm_head."}, "model.vision_tower.", "model.multi_modal_projector."
    if "language_model.model.embed_tokens.weight" in src:
        return {"model.": "language_model.model.", "lm_head.": "language_model.lm_head."}, "vision_tower.", "multi_modal_projector."
    raise ValueError("not a llava-hf checkpoint: no model.language_model.embed_tokens.weight "
                     "nor language_model.model.embed_tokens.weight")


class RenamedSource:
    """A view of a :class:`TensorSource` whose names get a prefix swapped (``{ours: theirs}``)."""

    def __init__(self, src, renames: dict):
        self.src, self.renames = src, renames

    def _name(self, name: str) -> str:
        for ours, theirs in self.renames.items():
            if name.startswith(ours):
                return theirs + name[len(ours):]
        return name

    def __contains__(self, name: str) -> bool:
        return self._name(name) in self.src

    def get(self, name: str) -> torch.Tensor:
        return self.src.get(self._name(name))

    @property
    def where(self) -> str:
        return self.src.where

    def location(self, name: str) -> str:
        return self.src.location(self._name(name))


def load_llava(path: str, precision: str = "w4a16", group_size: int = 64, device=None,
               max_seq_len: int = 4096, dtype: Optional[torch.dtype] = None):
    """Load a llava-hf ``LlavaForConditionalGeneration`` directory -> ``(LlavaModel, tokenizer)``.

    ``precision`` applies to the LLM (``"w4a16"``: RTN at load unless the checkpoint is AWQ); the
    tower and projector run in the LLM's activation dtype.
    """
    import transformers

    t0 = time.perf_counter()
    with open(os.path.join(path, "config.json")) as f:
        hf = json.load(f)
    if hf.get("model_type") != "llava":
        raise ValueError(f"{path}: model_type {hf.get('model_type')!r} is not 'llava'")
    cfg = transformers.LlavaConfig.from_dict(hf)  # fills the defaults llava-hf configs leave out
    text = cfg.text_config.to_dict()
    if "quantization_config" in hf:
        text["quantization_config"] = hf["quantization_config"]
    src = TensorSource(folder=path)
    llm_names, vision_prefix, proj_prefix = _layout(src)
    llm = build_model(text, RenamedSource(src, llm_names), precision, group_size, device, dtype, max_seq_len)
    vcfg = VisionConfig.from_hf(cfg.vision_config.to_dict())
    tower = load_vision_tower(vcfg, src, vision_prefix, llm.dtype, llm.device)
    layers = 1 if isinstance(cfg.vision_feature_layer, int) else len(cfg.vision_feature_layer)
    proj = LlavaProjector(vcfg.hidden_size * layers, llm.config.hidden_size, cfg.projector_hidden_act,
                          cfg.multimodal_projector_bias)
    proj.load_state_dict(checked_tensors(proj, src, lambda name: proj_prefix + name, "config.json"), strict=True)
    proj.to(llm.device, llm.dtype).requires_grad_(False)
    processor = media.image_processor(vcfg.kind, vcfg.image_size, path)
    model = LlavaModel(tower, proj, llm, cfg.image_token_id, cfg.vision_feature_layer,
                       cfg.vision_feature_select_strategy, processor).eval()
    tokenizer = load_tokenizer(path)
    template = processor_chat_template(path)
    if template is not None:  # the processor's, as transformers' LlavaProcessor renders with it
        tokenizer.chat_template = template
    model.load_stats = {"seconds": time.perf_counter() - t0, "peak_host_mb": peak_host_memory_mb(), "path": path}
    return model, tokenizer


def processor_chat_template(path: str) -> Optional[str]:
    """The processor's chat template that llava-hf folders ship as ``chat_template.json``
    (``{"chat_template": "..."}``), which the tokenizer does not load; None when there is none."""
    file = os.path.join(path, "chat_template.json")
    if not os.path.isfile(file):
        return None
    template = read_json(file).get("chat_template")
    if not isinstance(template, str):
        raise ValueError(f"{file}: not a chat template file (no \"chat_template\" string in it)")
    return template
