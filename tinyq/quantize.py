"""``quantize_(model, config)``: swap a model's ``nn.Linear`` layers for quantized ones, in place."""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import nn

from tinyq.nn.dense_linear import DenseLinear
from tinyq.nn.w4a16_linear import W4A16Linear
from tinyq.quant.format import GROUP_SIZES


@dataclass
class W4A16Config:
    """Round-to-nearest W4A16 settings.

    ``include`` / ``exclude`` are shell-style patterns (``fnmatch``) over module names as in
    ``model.named_modules()``; a pattern matches the full name or any dotted suffix, so
    ``"lm_head"`` and ``"*.mlp.*"`` both work. ``lm_head`` is excluded by default (its logits are the
    most sensitive output of an LLM).
    """

    group_size: int = 128
    include: Optional[Sequence[str]] = None
    exclude: Sequence[str] = field(default_factory=lambda: ["lm_head"])
    dtype: Optional[torch.dtype] = None  # scale dtype; default: the layer's weight dtype (fp16 if fp32)
    skip_incompatible: bool = False  # skip layers whose in_features the group size does not divide

    def __post_init__(self):
        if self.group_size not in GROUP_SIZES:
            raise ValueError(f"group_size={self.group_size} is not supported; choose one of {GROUP_SIZES}")


def _matches(name: str, patterns) -> bool:
    parts = name.split(".")
    suffixes = [".".join(parts[i:]) for i in range(len(parts))]
    return any(fnmatch.fnmatchcase(s, p) for p in patterns for s in suffixes)


def quantize_(model: nn.Module, config: W4A16Config = None) -> nn.Module:
    """Replace every selected ``nn.Linear`` of ``model`` by a :class:`W4A16Linear` (RTN), in place.

    Returns the model. Raises ``ValueError`` naming the first layer whose ``in_features`` the group
    size does not divide, before anything is changed (unless ``skip_incompatible``).
    """
    config = config or W4A16Config()
    chosen = []
    for name, mod in model.named_modules():
        if type(mod) not in (nn.Linear, DenseLinear):
            continue
        if config.include is not None and not _matches(name, config.include):
            continue
        if _matches(name, config.exclude):
            continue
        if mod.in_features % config.group_size != 0:
            if config.skip_incompatible:
                continue
            raise ValueError(
                f"layer {name!r}: in_features={mod.in_features} is not divisible by group_size={config.group_size}; "
                "pick another group size, exclude the layer, or pass skip_incompatible=True"
            )
        chosen.append(name)
    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, child)
        setattr(parent, child, W4A16Linear.from_linear(linear, config.group_size, config.dtype))
    return model
