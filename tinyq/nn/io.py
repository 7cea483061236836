"""Save and load a (partly) quantized module's weights as one safetensors file.

Writes are atomic (temporary file in the same folder, then ``os.replace``), so a crash leaves
either the old file or the new one, never half of one. Loads check every tensor's name, shape
and dtype against the module and name the first mismatch.
"""
from __future__ import annotations

import os
import tempfile

import torch
from safetensors.torch import load_file, save_file
from torch import nn


def save_safetensors(module: nn.Module, path: str, metadata: dict | None = None) -> None:
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=folder)
    os.close(fd)
    try:
        save_file(state, tmp, metadata={"format": "pt", **(metadata or {})})
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_safetensors(module: nn.Module, path: str, device: str | torch.device | None = None) -> nn.Module:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no safetensors file at {path!r}")
    loaded = load_file(path, device=str(device) if device is not None else "cpu")
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
    module.load_state_dict(loaded)
    return module
