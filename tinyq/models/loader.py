"""Load an HF-format model directory (or the embedded GGUF default) into :class:`CausalLM`.

The model is built on the ``meta`` device (no memory), then filled module by module in layer
order: each checkpoint tensor is read from an mmap'd safetensors file, the q/k/v and gate/up
tensors are concatenated into the fused linears (:data:`FUSED`), moved to the target device and,
for ``precision="w4a16"``, quantized there (RTN) before the next one is read. Host memory
therefore holds at most one fused weight at a time beyond the page cache, and a model larger than
the host's free memory still loads.

Quantized checkpoints are read as they are: tinyq's own format (``quant_method: "tinyq"``:
``qweight/scales/zeros`` per linear) and AutoAWQ's ``gemm`` format (``quant_method: "awq"``,
converted losslessly with :func:`tinyq.quant.format.from_awq_gemm`). They are read tensor by
tensor as each layer is built, so a model streams to the device; :func:`tinyq.quant.checkpoint.
read_quantized_state` reads a whole checkpoint at once for the quantization tools.
"""
from __future__ import annotations

import os
import resource
import sys
from typing import Dict, List, Optional

import torch
from torch import nn

from tinyq.json_io import read_json
from tinyq.models.llama import ARCHITECTURES, CausalLM, ModelConfig
from tinyq.nn.dense_linear import DenseLinear
from tinyq.models.w8a8 import fused_w8a8_linear, use_w8a8_layers
from tinyq.nn.w4a16_linear import W4A16Linear
from tinyq.nn.w8a8_linear import ACT_QUANT, W8A8Linear
from tinyq.quant.checkpoint import check_quantization_config, weight_files
from tinyq.quant.format import GROUP_SIZES, check_grid_values, from_awq_gemm, quantize_weight, scale_dtype_for
from tinyq.quant.int8_format import quantize_weight_int8
from tinyq.quant.w8a8_checkpoint import QUANT_METHOD as W8A8_METHOD

# tinyq module -> the checkpoint modules concatenated (along the output dim, in this order) into it.
# A table rather than nano-vllm-style per-module weight_loader callbacks: which module a linear
# becomes (dense, W4A16 by RTN or from a quantized checkpoint, W8A8) is decided here from the
# checkpoint and the precision, so no module exists to own its loading before its weights are read.
FUSED = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}
PRECISIONS = {"w4a16": None, "w8a8": None, "fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
NOT_QUANTIZED = ("lm_head",)  # logits are the most sensitive output; the embedding is a lookup


class TensorSource:
    """Named tensors, read on demand: safetensors files (mmap'd) or an in-memory dict."""

    def __init__(self, tensors: Optional[Dict[str, torch.Tensor]] = None, folder: Optional[str] = None,
                 where: Optional[str] = None):
        self._dict, self._files, self._where = tensors, {}, {}
        self.where = where or folder or "checkpoint"  # names the source in errors
        if folder is not None:
            self._index_folder(folder)

    def _index_folder(self, folder):

        files, weight_map = weight_files(folder)
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path} is listed in the index but missing")
            handle = open_safetensors(path)
            self._files[name] = handle
            if weight_map is None:
                for key in handle.keys():
                    self._where[key] = name
        if weight_map is not None:
            self._where = dict(weight_map)

    def __contains__(self, name: str) -> bool:
        return name in (self._dict if self._dict is not None else self._where)

    def names(self) -> List[str]:
        return list(self._dict if self._dict is not None else self._where)

    def location(self, name: str) -> str:
        """Where ``name`` is stored, for errors: its file (``folder/model-0001.safetensors``), or
        the source's ``where``."""
        file = self._where.get(name) if self._dict is None else None
        return os.path.join(self.where, file) if file else self.where

    def get(self, name: str) -> torch.Tensor:
        if name not in self:
            raise ValueError(f"{self.where}: the checkpoint has no tensor {name!r}")
        if self._dict is not None:
            return self._dict[name]
        file = self._where[name]
        if file not in self._files:
            raise ValueError(f"{self.where}: the index maps {name!r} to {file}, which is not one of its files")
        try:
            return self._files[file].get_tensor(name)
        except Exception as exc:  # safetensors raises its own error types; name the file
            raise ValueError(f"{os.path.join(self.where, file)}: cannot read tensor {name!r} ({exc})") from exc


def open_safetensors(path: str):
    """``safe_open`` with a one-line error naming a truncated or corrupt file."""
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(path, framework="pt", device="cpu")
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{path}: not a readable safetensors file, truncated or corrupt? ({exc})") from exc


def checked_tensors(module: nn.Module, src, stored_name, sizes_from: str) -> dict:
    """``module``'s state read from ``src`` (the checkpoint calls tensor ``name`` ``stored_name(name)``),
    for ``load_state_dict``. One whose shape is not the module's (built from the sizes in
    ``sizes_from``) is a ValueError naming the tensor and its file: load_state_dict's own error names
    neither and is not a ValueError."""
    tensors = {}
    for name, want in module.state_dict().items():
        stored = stored_name(name)
        t = src.get(stored)
        if t.shape != want.shape:
            raise ValueError(f"{src.location(stored)}: tensor {stored!r} has shape {tuple(t.shape)}, expected "
                             f"{tuple(want.shape)} from the sizes in {sizes_from}")
        tensors[name] = t
    return tensors


def peak_host_memory_mb() -> float:
    """Peak resident set size of this process so far, in MB (``ru_maxrss``)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def _expect(name: str, t: torch.Tensor, shape) -> torch.Tensor:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(t.shape)}, the model expects {tuple(shape)}")
    return t


class _ReadLog:
    """A tensor source that remembers which names were read."""

    def __init__(self, src):
        self.src, self.read = src, set()

    def __contains__(self, name: str) -> bool:
        return name in self.src

    def get(self, name: str) -> torch.Tensor:
        self.read.add(name)
        return self.src.get(name)

    def location(self, name: str) -> str:
        """The file holding ``name`` (for errors)."""
        return self.src.location(name)


def _part_rows(cfg: ModelConfig, sub: str, out_features: int) -> List[int]:
    """Output rows of each checkpoint module that makes tinyq linear ``sub`` (see :data:`FUSED`)."""
    if sub == "self_attn.qkv_proj":
        return [cfg.num_heads * cfg.head_dim] + [cfg.num_kv_heads * cfg.head_dim] * 2
    if sub == "mlp.gate_up_proj":
        return [cfg.intermediate_size] * 2
    return [out_features]


class _Loader:
    def __init__(self, model: CausalLM, source: TensorSource, precision: str, group_size: int, dtype, device,
                 quant: Optional[dict]):
        self.model, self.src, self.precision = model, _ReadLog(source), precision
        self.group_size, self.dtype, self.device, self.quant = group_size, dtype, device, quant
        self.quant_group = None if not quant or quant.get("quant_method") == W8A8_METHOD else (
            check_quantization_config(quant, "config.json"))  # AutoAWQ spells it q_group_size

    def run(self):
        self._fill()
        self._check_all_read()

    def _check_all_read(self):
        """A checkpoint tensor the model never read is a feature tinyq would silently drop (an
        o_proj or MLP bias, say): refuse it rather than run a different model."""
        names = getattr(self.src.src, "names", None)
        if names is None:
            return
        unread = sorted(n for n in names() if n.startswith(("model.", "lm_head.")) and n not in self.src.read
                        and not n.endswith("rotary_emb.inv_freq"))
        if unread:
            more = f" and {len(unread) - 3} more" if len(unread) > 3 else ""
            raise ValueError(f"{getattr(self.src.src, 'where', 'checkpoint')}: tensors {unread[:3]}{more} have no "
                             "place in tinyq's model (a feature it does not support?)")

    def _fill(self):
        m, cfg = self.model, self.model.config
        self._param("model.embed_tokens.weight", m.model.embed_tokens, "weight", (cfg.vocab_size, cfg.hidden_size))
        for i, layer in enumerate(m.model.layers):
            p = f"model.layers.{i}."
            for norm in ("input_layernorm", "post_attention_layernorm"):
                self._param(p + norm + ".weight", getattr(layer, norm), "weight", (cfg.hidden_size,))
            for sub in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"):
                self._linear(layer, sub, p)
        self._param("model.norm.weight", m.model.norm, "weight", (cfg.hidden_size,))
        if cfg.tie_word_embeddings and "lm_head.weight" not in self.src and "lm_head.qweight" not in self.src:
            m.tie_weights()
        else:
            self._linear(m, "lm_head", "")

    def _param(self, name, module, attr, shape):
        t = _expect(name, self.src.get(name), shape)
        setattr(module, attr, nn.Parameter(t.to(device=self.device, dtype=self.dtype), requires_grad=False))

    def _linear(self, parent: nn.Module, sub: str, prefix: str):
        owner_name, _, attr = sub.rpartition(".")
        owner = parent.get_submodule(owner_name) if owner_name else parent
        meta: nn.Linear = getattr(owner, attr)
        names = [prefix + s for s in FUSED.get(sub, (sub,))]
        rows = _part_rows(self.model.config, sub, meta.out_features)
        self._check_qweights_whole(names)
        if all(n + ".qweight" in self.src for n in names) and self._w8a8_checkpoint():
            new = self._prequantized_w8a8(names, meta, rows)
        elif all(n + ".qweight" in self.src for n in names):
            new = self._prequantized(names, meta, rows)
        else:
            w = torch.cat([_expect(n + ".weight", self.src.get(n + ".weight"), (r, meta.in_features)).to(self.device)
                           for n, r in zip(names, rows)], dim=0)
            _expect("+".join(n + ".weight" for n in names), w, (meta.out_features, meta.in_features))
            bias = self._bias(names, rows, meta)
            if self.precision == "w4a16" and not any(n.startswith(NOT_QUANTIZED) for n in names):
                try:
                    qweight, scales, zeros = quantize_weight(w, self.group_size, self._scale_dtype())
                except ValueError as exc:
                    raise ValueError(f"{names[0]}: {exc}") from exc
                new = W4A16Linear.from_quantized(qweight, scales, zeros, bias)
            elif self.precision == "w8a8" and not any(n.startswith(NOT_QUANTIZED) for n in names):
                new = W8A8Linear.from_quantized(*quantize_weight_int8(w), bias)  # per-token, no smoothing
            else:
                new = DenseLinear(meta.in_features, meta.out_features, bias=bias is not None, device="meta")
                new.weight = nn.Parameter(w.to(self.dtype), requires_grad=False)
                if bias is not None:
                    new.bias = nn.Parameter(bias, requires_grad=False)
        setattr(owner, attr, new)

    def _bias(self, names: List[str], rows: List[int], meta: nn.Linear) -> Optional[torch.Tensor]:
        """The parts' biases, each checked against its rows, concatenated; None for a linear without."""
        if meta.bias is None:
            return None
        return torch.cat([_expect(n + ".bias", self.src.get(n + ".bias"), (r,)) for n, r in zip(names, rows)]).to(
            self.device, self.dtype)

    def _check_qweights_whole(self, names: List[str]) -> None:
        """Parts fused into one linear are all quantized or none: with some ``qweight`` missing, the dense
        fallback would complain about a ``.weight`` the checkpoint never meant to hold."""
        present = [n for n in names if n + ".qweight" in self.src]
        missing = [n + ".qweight" for n in names if n not in present]
        if present and missing:
            raise ValueError(f"{self.src.location(missing[0])}: the checkpoint has no tensor {missing[0]!r}, though "
                             f"{present[0]!r} is quantized")

    def _w8a8_checkpoint(self) -> bool:
        return bool(self.quant) and self.quant.get("quant_method") == W8A8_METHOD

    def _prequantized_w8a8(self, names: List[str], meta: nn.Linear, rows: List[int]) -> W8A8Linear:
        if self.precision != "w8a8":
            raise ValueError(f"this checkpoint is W8A8-quantized; load it with precision='w8a8' (got {self.precision!r})")
        bias = self._bias(names, rows, meta)
        if self.quant.get("act_quant", "token") == "tensor":  # static scales: each linear has its own
            missing = [n + ".input_scale" for n in names if n + ".input_scale" not in self.src]
            if missing:
                raise ValueError(f"{missing[0]}: missing; config.json says act_quant 'tensor' (static activation "
                                 "scales), and without it the layer would quantize per token")
        else:  # a static scale here would switch this linear to act_quant 'tensor' against config.json
            extra = [n + ".input_scale" for n in names if n + ".input_scale" in self.src]
            if extra:
                raise ValueError(f"{self.src.location(extra[0])}: tensor {extra[0]!r} is a static activation scale, "
                                 "but config.json says act_quant 'token' (per-token scales)")
        new = fused_w8a8_linear(self.src, names, bias, self.device, rows, meta.in_features)
        _expect(names[0] + ".qweight (fused)", new.qweight, (meta.out_features, meta.in_features))
        return new

    def _scale_dtype(self):
        return scale_dtype_for(self.dtype)

    def _runtime_scales(self, name: str, scales: torch.Tensor) -> torch.Tensor:
        """``scales`` in the kernels' dtype for this model; a bf16 scale beyond fp16's range would
        become inf there (checked only when converting: a second pass over a small tensor)."""
        out = scales.to(self._scale_dtype())
        if out.dtype != scales.dtype and not bool(torch.isfinite(out).all()):
            raise ValueError(f"{self.src.location(name + '.scales')}: tensor {name + '.scales'!r} holds values up to "
                             f"{float(scales.float().abs().max()):.4g}, beyond {out.dtype}; load the model with "
                             "dtype=torch.bfloat16")
        return out

    def _prequantized(self, names: List[str], meta: nn.Linear, rows: List[int]) -> W4A16Linear:
        if self.precision != "w4a16":
            raise ValueError(f"this checkpoint is W4A16-quantized; load it with precision='w4a16' (got {self.precision!r})")
        awq = str(self.quant.get("quant_method", "")).lower() == "awq"
        k, group = meta.in_features, self.quant_group
        parts = []
        for n, r in zip(names, rows):
            if awq:
                raw = [self.src.get(n + suffix) for suffix in (".qweight", ".qzeros", ".scales")]
                _check_awq_part(n, *raw, k, group, r)
                check_grid_values(raw[2], None, n, self.src.location(n + ".scales"))
                q, s, z = from_awq_gemm(*raw)
            else:
                q, s, z = (self.src.get(n + suffix) for suffix in (".qweight", ".scales", ".zeros"))
                _check_part(n, q, s, z, k, group, r)
                check_grid_values(s, z, n, self.src.location(n + ".scales"))
            parts.append((q, self._runtime_scales(n, s), z.to(self._scale_dtype())))
        qweight, scales, zeros = (torch.cat([p[i] for p in parts]).to(self.device) for i in range(3))
        bias = self._bias(names, rows, meta)
        _expect(names[0] + ".qweight (fused)", qweight, (meta.out_features, meta.in_features // 8))
        return W4A16Linear.from_quantized(qweight.contiguous(), scales.contiguous(), zeros.contiguous(), bias)


def _check_part(name: str, qweight, scales, zeros, k: int, group: int, rows: int) -> None:
    """One tinyq-format linear ``name`` of ``rows`` outputs and ``k`` inputs in groups of ``group``:
    shapes and dtypes that agree with the config, or a ValueError naming the tensor."""
    for leaf, t, shape in ((".qweight", qweight, (rows, k // 8)), (".scales", scales, (rows, k // group)),
                           (".zeros", zeros, (rows, k // group))):
        if tuple(t.shape) != shape:
            raise ValueError(f"{name}{leaf}: shape {tuple(t.shape)}, expected {shape} (in_features {k}, "
                             f"group_size {group} in config.json)")
    if qweight.dtype != torch.int32:
        raise ValueError(f"{name}.qweight: dtype {qweight.dtype}, expected torch.int32")


def _check_awq_part(name: str, qweight, qzeros, scales, k: int, group: int, n: int) -> None:
    """The same for an AutoAWQ-gemm linear (``qweight [K, N/8]``, ``qzeros [K/G, N/8]``, ``scales [K/G, N]``)."""
    for leaf, t, shape in ((".qweight", qweight, (k, n // 8)), (".qzeros", qzeros, (k // group, n // 8)),
                           (".scales", scales, (k // group, n))):
        if tuple(t.shape) != shape:
            raise ValueError(f"{name}{leaf}: shape {tuple(t.shape)}, expected {shape} (AutoAWQ layout, in_features "
                             f"{k}, group_size {group} in config.json)")
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
        raise ValueError(f"{name}: qweight/qzeros dtype {qweight.dtype}/{qzeros.dtype}, expected torch.int32")


def _check_act_quant(quant: dict, folder: str) -> None:
    """A W8A8 ``act_quant`` tinyq does not know would load as per-token quantization, silently."""
    act_quant = quant.get("act_quant", "token")
    if act_quant not in ACT_QUANT:
        raise ValueError(f"{os.path.join(folder, 'config.json')}: quantization_config.act_quant {act_quant!r} is not "
                         f"one of {ACT_QUANT}")


def default_activation_dtype(precision: str, device: torch.device) -> torch.dtype:
    """fp16/bf16/fp32 as asked; for w4a16: fp16 on GPU, fp32 on CPU (torch's CPU GEMV in fp32 was
    faster than bf16 on the 2-core test machine, see the README)."""
    if PRECISIONS[precision] is not None:
        return PRECISIONS[precision]
    return torch.float16 if device.type == "cuda" else torch.float32


def build_model(hf_config: dict, source: TensorSource, precision: str = "w4a16", group_size: int = 64,
                device=None, dtype=None, max_seq_len: Optional[int] = None) -> CausalLM:
    """Build :class:`CausalLM` on ``meta`` from a config dict and fill it from ``source``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or default_activation_dtype(precision, device)
    if precision == "w4a16" and device.type == "cuda" and dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"w4a16 on {device} needs fp16 or bf16 activations (the kernels' dtypes), got dtype={dtype}")
    quant = hf_config.get("quantization_config")
    if quant is not None and quant.get("quant_method") == W8A8_METHOD:
        if precision != "w8a8":
            raise ValueError(f"this checkpoint is W8A8-quantized; load it with precision='w8a8' (got {precision!r})")
        _check_act_quant(quant, source.where)
    elif quant is not None:
        check_quantization_config(quant, "config.json")
    elif precision == "w4a16" and group_size not in GROUP_SIZES:
        raise ValueError(f"group_size={group_size} is not supported; choose one of {GROUP_SIZES}")
    cfg = ModelConfig.from_hf(hf_config)
    if max_seq_len is not None:
        cfg.check_window(int(max_seq_len))  # before any weight is read
    with torch.device("meta"):
        model = CausalLM(cfg)
    _Loader(model, source, precision, group_size, dtype, device, quant).run()
    if precision == "w8a8":
        use_w8a8_layers(model)
    if max_seq_len is not None:
        model.max_seq_len = int(max_seq_len)
    model.eval().requires_grad_(False)
    return model


def load_hf_dir(path: str, tokenizer: bool = True):
    """``(hf_config dict, TensorSource, tokenizer or None)`` of an HF-format directory, with clear
    errors. The tokenizer is None when not asked for or when the directory has none."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"model path does not exist: {path}")
    if not os.path.isdir(path):
        raise ValueError(f"{path} is not a directory (pass an HF model folder with config.json, or a .gguf file)")
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{path} has no config.json; is it an HF-format model directory?")
    hf_config = read_json(cfg_path)
    _add_generation_eos(hf_config, path)
    ModelConfig.from_hf(hf_config)  # unsupported architecture: fail before touching the weights
    source = TensorSource(folder=path)
    return hf_config, source, load_tokenizer(path) if tokenizer and has_tokenizer(path) else None


def _add_generation_eos(hf_config: dict, path: str) -> None:
    """Add the end ids of ``generation_config.json`` to ``eos_token_id`` (instruct models such as
    Llama-3-Instruct list their end-of-turn ids only there; transformers stops on all of them)."""
    gen_path = os.path.join(path, "generation_config.json")
    if not os.path.isfile(gen_path):
        return
    extra = read_json(gen_path).get("eos_token_id")
    ids = lambda v: [] if v is None else ([v] if isinstance(v, int) else list(v))  # noqa: E731
    merged = ids(hf_config.get("eos_token_id")) + [i for i in ids(extra) if i not in ids(hf_config.get("eos_token_id"))]
    if merged:
        hf_config["eos_token_id"] = merged


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def has_tokenizer(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES)


def load_tokenizer(path: str):
    """The transformers tokenizer of an HF directory (raises FileNotFoundError when it has none)."""
    from transformers import AutoTokenizer

    if not os.path.isdir(path) or not has_tokenizer(path):
        raise FileNotFoundError(f"no tokenizer in {path} (expected {', '.join(TOKENIZER_FILES)})")
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # transformers raises many types; name the folder
        raise ValueError(f"could not load the tokenizer in {path}: {exc}") from exc


SUPPORTED = sorted(ARCHITECTURES)
