"""What every tinyq VLM shares: a vision encoder + projector that turns images into rows of LLM
embeddings, an LLM (:class:`tinyq.models.CausalLM`), and the splice of those rows into the
``<image>`` positions of the prompt.

A prompt holds, per image, ``placeholder_ids(features)``: one ``image_token_id`` per feature row
(plus whatever tokens the family appends, e.g. NVILA's ``"\\n"``). Prefill embeds the ids and
overwrites the image positions with the feature rows, in order; the counts must match.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
from torch import nn

IMAGE_MARKER = "<image>"  # where an image goes in a message's text, before tokenization


class VisionLanguageModel(nn.Module):
    """Base class: subclasses set ``llm``, ``image_token_id`` and implement :meth:`encode_images`."""

    image_token_id: int
    chat_template: str = None  # used when the tokenizer has none
    # a tinyq.vlm.conversation.LegacyFormat that prompts the model instead of any chat template (VILA-1.5)
    conversation = None
    # what follows each image's marker in a user message, before the text: LLaVA writes
    # "<image>\n{question}"; a family whose placeholder ends in a "\n" of its own sets ""
    image_text_separator: str = "\n"

    @property
    def device(self) -> torch.device:
        return self.llm.device

    @property
    def dtype(self) -> torch.dtype:
        return self.llm.dtype

    def encode_images(self, images: Sequence) -> List[torch.Tensor]:
        """PIL images -> one ``[tokens_i, hidden]`` tensor of LLM embeddings per image."""
        raise NotImplementedError

    def placeholder_ids(self, features: torch.Tensor, tokenizer) -> List[int]:
        """The ids that stand for one image's ``features`` in the prompt."""
        return [self.image_token_id] * features.shape[0]

    def embed(self, input_ids: torch.Tensor, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """``input_ids [1, S]`` -> ``[1, S, hidden]`` with the rows of ``features`` (in order) written
        at the ``image_token_id`` positions. Raises ValueError when the counts differ."""
        embeds = self.llm.model.embed_tokens(input_ids)
        mask = input_ids[0] == self.image_token_id
        rows = torch.cat(list(features)) if len(features) else embeds.new_zeros(0, embeds.shape[-1])
        if int(mask.sum()) != rows.shape[0]:
            raise ValueError(f"the prompt has {int(mask.sum())} image-token positions but the {len(features)} image(s) "
                             f"give {rows.shape[0]} feature rows")
        embeds[0, mask] = rows.to(embeds.dtype)
        return embeds

    @torch.inference_mode()
    def logits(self, input_ids: torch.Tensor, images: Sequence = (), features=None) -> torch.Tensor:
        """Whole-sequence logits ``[1, S, vocab]`` of a prompt whose image tokens are already expanded
        (no cache): for tests and scoring. ``features`` skips the encoder."""
        features = self.encode_images(images) if features is None else features
        return self.llm(None, inputs_embeds=self.embed(input_ids.to(self.device), features))


def expand_images(text_pieces: Sequence[List[int]], placeholders: Sequence[List[int]]) -> List[int]:
    """Interleave token-id pieces (the text split at each :data:`IMAGE_MARKER`) with each image's
    placeholder ids; ``len(text_pieces) == len(placeholders) + 1`` or a ValueError."""
    if len(text_pieces) != len(placeholders) + 1:
        raise ValueError(f"the prompt has {len(text_pieces) - 1} {IMAGE_MARKER} placeholder(s) but "
                         f"{len(placeholders)} image(s) were given")
    ids = list(text_pieces[0])
    for ph, piece in zip(placeholders, text_pieces[1:]):
        ids += list(ph) + list(piece)
    return ids


def load_vlm(path: str, precision: str = "w4a16", **kwargs):
    """Load a VLM directory -> ``(model, tokenizer)``: llava-hf (``config.json`` with
    ``model_type: llava``) or VILA-1.5 / NVILA (``llm/``, ``vision_tower/``, ``mm_projector/``).
    ``kwargs``: ``group_size``, ``device``, ``max_seq_len``, ``dtype``, and for VILA / NVILA
    ``conversation`` (:func:`tinyq.models.nvila.load_nvila`)."""
    import json
    import os

    if not os.path.isdir(path):
        raise ValueError(f"VLM path is not a directory: {path}")
    if all(os.path.isdir(os.path.join(path, d)) for d in ("llm", "vision_tower", "mm_projector")):
        from tinyq.models.nvila import load_nvila

        return load_nvila(path, precision, **kwargs)
    cfg_path = os.path.join(path, "config.json")
    if os.path.isfile(cfg_path):
        with open(cfg_path) as f:
            if json.load(f).get("model_type") == "llava":
                from tinyq.models.llava import load_llava

                if kwargs.pop("conversation", "auto") not in ("auto", None):  # None: its chat template
                    raise ValueError(f"{path}: a llava-hf model is prompted with its chat template; conversation "
                                     "formats are VILA-1.5's")
                return load_llava(path, precision, **kwargs)
    raise ValueError(f"{path} is neither a llava-hf directory (config.json with model_type 'llava') nor a "
                     "VILA/NVILA one (llm/, vision_tower/, mm_projector/)")
