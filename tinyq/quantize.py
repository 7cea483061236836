"""``quantize_(model, config)``: swap a model's ``nn.Linear`` layers for quantized ones (W4A16 or W8A8), in place."""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import nn

from tinyq.nn.dense_linear import DenseLinear
from tinyq.nn.w4a16_linear import W4A16Linear
from tinyq.nn.w8a8_linear import ACT_QUANT, W8A8Linear
from tinyq.quant.format import GROUP_SIZES
from tinyq.quant.int8_format import MAX_K, QMAX


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
        _patterns_as_lists(self)


@dataclass
class W8A8Config:
    """SmoothQuant-style W8A8 settings: int8 weights per output channel, int8 activations.

    ``act_quant``: ``"token"`` (dynamic per-token scales, the default) or ``"tensor"`` (one static
    scale per linear, ``max|x| / 127``, which needs ``act_scales``: the per-input-channel ``max|x|``
    of each selected linear by full module name, as :func:`tinyq.quant.smoothquant.calibrate` returns
    and :func:`tinyq.smooth_` updates). ``include`` / ``exclude`` as in :class:`W4A16Config`.
    """

    act_quant: str = "token"
    act_scales: Optional[dict] = None
    include: Optional[Sequence[str]] = None
    exclude: Sequence[str] = field(default_factory=lambda: ["lm_head"])

    def __post_init__(self):
        _patterns_as_lists(self)
        if self.act_quant not in ACT_QUANT:
            raise ValueError(f"act_quant must be one of {ACT_QUANT}, got {self.act_quant!r}")
        if self.act_quant == "tensor" and self.act_scales is None:
            raise ValueError("act_quant='tensor' needs act_scales (per-channel max|x| from calibration)")


def _patterns_as_lists(config) -> None:
    """A single pattern given as a string is one pattern, not a sequence of one-letter ones;
    ``exclude=None`` excludes nothing (``include=None`` includes everything)."""
    for field_name in ("include", "exclude"):
        value = getattr(config, field_name)
        if isinstance(value, str):
            setattr(config, field_name, [value])
    if config.exclude is None:
        config.exclude = []


def _matches(name: str, patterns) -> bool:
    parts = name.split(".")
    suffixes = [".".join(parts[i:]) for i in range(len(parts))]
    return any(fnmatch.fnmatchcase(s, p) for p in patterns for s in suffixes)


def _selected(model: nn.Module, config) -> list:
    """``(names, linear)`` of every plain linear the config's include/exclude patterns select. A
    linear used in several places has all its names: it is selected when one of them is included
    and none excluded, and its one quantized replacement takes every place (it stays shared)."""
    if type(model) in (nn.Linear, DenseLinear):
        raise ValueError("quantize_ replaces the linears inside a model; for a single layer use "
                         "W4A16Linear.from_linear(linear) or W8A8Linear.from_linear(linear)")
    names = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        if type(mod) in (nn.Linear, DenseLinear):
            names.setdefault(id(mod), (mod, []))[1].append(name)
    out = []
    for mod, mod_names in names.values():
        included = config.include is None or any(_matches(n, config.include) for n in mod_names)
        if included and not any(_matches(n, config.exclude) for n in mod_names):
            out.append((mod_names, mod))
    return out


def _replace(model: nn.Module, names: list, new: nn.Module) -> None:
    for name in names:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _finite(weight: torch.Tensor) -> bool:
    return weight.is_meta or bool(torch.isfinite(weight).all())  # meta: no values to check


def _swap_all(model: nn.Module, chosen: list, build) -> nn.Module:
    """Build the replacement of every chosen ``(names, linear, *args)`` with ``build(linear, *args)``,
    and only then swap them in: a layer that fails to quantize (its error names it) leaves the model
    untouched. Peak memory is what replacing one by one gave: ``chosen`` holds every original until
    the end either way."""
    built = []
    for names, linear, *args in chosen:
        try:
            built.append((names, build(linear, *args)))
        except ValueError as exc:
            raise ValueError(f"layer {names[0]!r}: {exc}") from exc
    for names, new in built:
        _replace(model, names, new)
    return model


def quantize_(model: nn.Module, config=None) -> nn.Module:
    """Replace every selected ``nn.Linear`` of ``model`` in place: by a :class:`W4A16Linear` (RTN) for
    a :class:`W4A16Config` (the default), by a :class:`W8A8Linear` for a :class:`W8A8Config`.

    Returns the model. Raises ``ValueError`` naming the first layer that cannot be quantized, before
    anything is changed: every replacement is built before the first is swapped in.
    """
    config = config or W4A16Config()
    if isinstance(config, W8A8Config):
        return _quantize_w8a8(model, config)
    chosen = []
    for names, mod in _selected(model, config):
        name = names[0]
        if mod.in_features % config.group_size != 0:
            if config.skip_incompatible:
                continue
            raise ValueError(
                f"layer {name!r}: in_features={mod.in_features} is not divisible by group_size={config.group_size}; "
                "pick another group size, exclude the layer, or pass skip_incompatible=True"
            )
        if not _finite(mod.weight):  # checked for every layer before any is replaced
            raise ValueError(f"layer {name!r}: its weight has inf/NaN values, which 4-bit scales cannot represent")
        chosen.append((names, mod))
    return _swap_all(model, chosen, lambda linear: W4A16Linear.from_linear(linear, config.group_size, config.dtype))


def _quantize_w8a8(model: nn.Module, config: W8A8Config) -> nn.Module:
    chosen = []
    for names, mod in _selected(model, config):
        # a shared linear's statistics sit under whichever of its names calibration saw
        name = next((n for n in names if config.act_scales and n in config.act_scales), names[0])
        if mod.in_features > MAX_K:
            raise ValueError(f"layer {name!r}: in_features={mod.in_features} exceeds {MAX_K} (int32 accumulator)")
        if not _finite(mod.weight):  # checked for every layer before any is replaced
            raise ValueError(f"layer {name!r}: its weight has inf/NaN values, which int8 scales cannot represent")
        static = None
        if config.act_quant == "tensor":
            stat = config.act_scales.get(name)
            if stat is None:
                raise ValueError(f"layer {name!r}: no calibrated activation statistics in act_scales "
                                 f"({len(config.act_scales)} entries, e.g. {sorted(config.act_scales)[:2]})")
            peak = torch.as_tensor(stat).float().max()
            if not torch.isfinite(peak):  # checked for every layer before any is replaced
                raise ValueError(f"layer {name!r}: its act_scales entry is not finite (max|x| {float(peak)})")
            static = float(peak.clamp(min=1e-8)) / QMAX
        chosen.append((names, mod, static))
    return _swap_all(model, chosen, W8A8Linear.from_linear)
