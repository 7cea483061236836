"""LLM families and their loader: ``load_model(path_or_"default", precision=...) -> (model, tokenizer)``."""
from __future__ import annotations

import os
import time
from typing import Optional

import torch

from tinyq.models.gguf import default_model_path, read_gguf
from tinyq.models.llama import CausalLM, ModelConfig
from tinyq.models.vlm import load_vlm
from tinyq.models.loader import (
    PRECISIONS,
    SUPPORTED,
    TensorSource,
    build_model,
    load_hf_dir,
    load_tokenizer,
    peak_host_memory_mb,
)

__all__ = ["CausalLM", "ModelConfig", "SUPPORTED", "default_model_path", "load_model", "load_vlm", "read_gguf"]


def load_model(
    path: str = "default",
    precision: str = "w4a16",
    group_size: int = 64,
    device=None,
    max_seq_len: int = 2048,
    dtype: Optional[torch.dtype] = None,
    verbose: bool = False,
    tokenizer="auto",
):
    """Load a Llama / Qwen2 model and its tokenizer: ``(model, tokenizer or None)``.

    ``path``: ``"default"`` (the embedded SmolLM2-135M-Instruct GGUF), an HF-format directory
    (config.json + safetensors, single or sharded; fp16/bf16 or a tinyq / AutoAWQ W4A16 checkpoint)
    or a ``.gguf`` file. ``precision``: ``"w4a16"`` (RTN-quantized at load with ``group_size``
    unless the checkpoint is already quantized), ``"w8a8"`` (int8 weights and activations: a tinyq W8A8 /
    SmoothQuant checkpoint, or per-channel RTN of an fp model at load), ``"fp16"``, ``"bf16"`` or ``"fp32"``.
    ``device``: default CUDA when available, else CPU. ``dtype``: activation dtype override.
    ``tokenizer``: ``"auto"`` (the one in the directory or GGUF file; None if there is none),
    ``None`` (do not load one), a directory to load it from, or a tokenizer object to pass through.

    The returned model has ``load_stats`` (seconds, peak host memory MB).
    """
    t0 = time.perf_counter()
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    if path == "default":
        path = default_model_path()
    if isinstance(path, str) and path.endswith(".gguf"):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"GGUF file not found: {path}")
        hf_config, state, own = read_gguf(path, tokenizer=tokenizer == "auto")
        source = TensorSource(tensors=state, where=path)
    else:
        hf_config, source, own = load_hf_dir(path, tokenizer=tokenizer == "auto")
    if isinstance(tokenizer, str) and tokenizer != "auto":
        tokenizer = load_tokenizer(tokenizer)
    elif tokenizer == "auto":
        tokenizer = own
    model = build_model(hf_config, source, precision, group_size, device, dtype, max_seq_len)
    if model.device.type == "cpu" and precision == "w4a16":
        with torch.inference_mode():  # build the CPU path's dequantized weights now, not in the first answer
            model(torch.zeros(1, 1, dtype=torch.long))
    if tokenizer is not None and tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    model.load_stats = {"seconds": time.perf_counter() - t0, "peak_host_mb": peak_host_memory_mb(), "path": path}
    if verbose:
        s = model.load_stats
        print(f"loaded {path} ({precision}) in {s['seconds']:.1f} s, peak host memory {s['peak_host_mb']:.0f} MB")
    return model, tokenizer
