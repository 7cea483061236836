"""Load a floating-point model as a transformers ``*ForCausalLM`` for AWQ search and evaluation.

``"default"`` (the embedded SmolLM2-135M-Instruct GGUF) and ``.gguf`` files go through
:func:`tinyq.models.gguf.read_gguf`; an HF directory through ``from_pretrained`` (local files only).
"""
from __future__ import annotations

from pathlib import Path

import torch


def model_from_state(hf_config: dict, state: dict, dtype=torch.float32):
    """A transformers causal LM built from a config dict and an HF-named state dict (no copy)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from tinyq.quant.arch import decoder_of, family_for

    family_for(hf_config)  # unsupported architecture -> clear error before building anything
    cfg = dict(hf_config)
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.get_input_embeddings().weight
        missing = [m for m in missing if m != "lm_head.weight"]
    if missing or unexpected:
        raise ValueError(f"state dict does not match {type(model).__name__}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    dec = decoder_of(model)
    dec.rotary_emb = type(dec.rotary_emb)(config=dec.config)  # its buffers were created on meta
    return model.eval()


def load_fp_model(path: str = "default", dtype=torch.float32):
    """``(model, tokenizer)`` of a floating-point model: ``"default"``, a ``.gguf`` file or an HF directory."""
    if path == "default" or str(path).endswith(".gguf"):
        from tinyq.models.gguf import default_model_path, read_gguf

        gguf_path = default_model_path() if path == "default" else str(path)
        hf_config, state, tokenizer = read_gguf(gguf_path)
        return model_from_state(hf_config, state, dtype), tokenizer
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"model {path}: not 'default', a .gguf file, or a directory with config.json")
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tinyq.quant.arch import family_for

    config = json.loads((folder / "config.json").read_text())
    family_for(config)
    if config.get("quantization_config"):
        raise ValueError(f"{path} is already quantized ({config['quantization_config'].get('quant_method')}); "
                         "AWQ needs the floating-point model")
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    return model, tokenizer
