"""Save and load a (partly) quantized module's weights as one safetensors file.

Writes are atomic (temporary file in the same folder, fsynced, then ``os.replace``), so a crash leaves
either the old file or the new one, never half of one; the file gets normal permissions (0666 minus the
umask). Tied parameters (``lm_head.weight`` = ``embed_tokens.weight``) are stored once and listed in
the file's metadata under ``tinyq.tied`` (alias -> stored name). Loads check every tensor's name,
shape and dtype against the module and name the first mismatch.
"""
from __future__ import annotations

import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from tinyq.atomic_io import replacing

TIED_KEY = "tinyq.tied"


def _dedup_state(module: nn.Module):
    """``(tensors, tied)``: each storage once (safetensors refuses shared memory); ``tied`` maps an
    alias to the name it is stored under. A tensor that only overlaps another's storage is copied."""
    tensors, tied, first, storages = {}, {}, {}, set()
    for name, t in module.state_dict().items():
        t = t.detach()
        ident = (t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
        if t.numel() and ident in first:
            tied[name] = first[ident]
            continue
        first[ident] = name
        storage = (t.device, t.untyped_storage().data_ptr()) if t.numel() else None
        t = t.cpu().contiguous()
        tensors[name] = t.clone() if storage in storages else t
        storages.add(storage)
    return tensors, tied


def save_safetensors(module: nn.Module, path: str, metadata: dict | None = None) -> None:
    tensors, tied = _dedup_state(module)
    meta = {"format": "pt", **(metadata or {})}
    if tied:
        meta[TIED_KEY] = json.dumps(tied)
    with replacing(path) as tmp:
        save_file(tensors, tmp, metadata=meta)


def load_safetensors(module: nn.Module, path: str, device: str | torch.device | None = None) -> nn.Module:
    """Fill ``module`` from ``path`` (read onto ``device``, default CPU) and return it. A module built
    on the meta device takes the loaded tensors themselves, so it ends up on ``device``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no safetensors file at {path!r}")
    try:
        loaded = load_file(path, device=str(device) if device is not None else "cpu")
        with safe_open(path, framework="pt") as f:
            tied = json.loads((f.metadata() or {}).get(TIED_KEY, "{}"))
    except Exception as exc:  # safetensors' own errors (a truncated or foreign file) do not name it
        raise ValueError(f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc})") from exc
    for alias, name in tied.items():
        if name not in loaded:
            raise ValueError(f"{path}: tied tensor {alias!r} points at {name!r}, which the file does not hold")
        loaded[alias] = loaded[name]
    expected = module.state_dict()
    missing = sorted(set(expected) - set(loaded))
    unexpected = sorted(set(loaded) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path}: missing tensors {missing[:5]}, unexpected tensors {unexpected[:5]}")
    for name, t in loaded.items():
        want = expected[name]
        if t.shape != want.shape or t.dtype != want.dtype:
            raise ValueError(
                f"{path}: tensor {name!r} is {t.dtype} {tuple(t.shape)}, the module expects {want.dtype} {tuple(want.shape)}"
            )
    # a module built on the meta device has no storage to copy into: take the loaded tensors as they
    # are, then tie again what was tied (assign gives each name its own tensor)
    if not any(t.is_meta for t in expected.values()):
        module.load_state_dict(loaded)
        return module
    def owner(name):
        parent, _, leaf = name.rpartition(".")
        return module.get_submodule(parent), leaf

    groups = {}
    for name, t in [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]:
        groups.setdefault(id(t), []).append(name)
    module.load_state_dict(loaded, assign=True)
    for first, *aliases in groups.values():
        shared = getattr(*owner(first))
        for alias in aliases:
            setattr(*owner(alias), shared)
    return module
