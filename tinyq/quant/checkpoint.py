"""Quantized checkpoints: write tinyq / AutoAWQ ("awq gemm") directories, read either kind.

A checkpoint is an HF-format directory: ``config.json`` (the model config plus a
``quantization_config``), ``model.safetensors`` (or shards + ``model.safetensors.index.json``) and
tokenizer files. Each quantized linear ``<prefix>.weight`` becomes

* tinyq (``quant_method: "tinyq"``, ``version: 1``): ``<prefix>.qweight`` int32 ``[N, K/8]``,
  ``<prefix>.scales`` / ``<prefix>.zeros`` ``[N, K/G]`` (see :mod:`tinyq.quant.format`);
* AutoAWQ (``quant_method: "awq"``, ``version: "gemm"``): ``<prefix>.qweight`` int32 ``[K, N/8]``,
  ``<prefix>.qzeros`` int32 ``[K/G, N/8]``, ``<prefix>.scales`` fp16 ``[K/G, N]``.

:func:`read_quantized_state` is the one place both kinds are read and validated. Writes are atomic:
everything goes into a temporary directory next to the destination, renamed into place at the end.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from tinyq.quant.arch import decoder_of, expected_linear_shapes, family_for
from tinyq.quant.format import PACK, from_awq_gemm, quantize_weight, to_awq_gemm

FORMATS = ("tinyq", "awq")
TINYQ_VERSION = 1
MAX_SHARD_BYTES = 4 * 2**30


def quantized_linear_names(model: nn.Module) -> list:
    """Full names of the linears a checkpoint quantizes (every decoder-layer linear; not lm_head)."""
    fam = family_for(model.config)
    dec = decoder_of(model)
    prefix = next(name for name, mod in model.named_modules() if mod is dec)
    return [f"{prefix}.layers.{i}.{lin}" for i in range(len(dec.layers)) for lin in fam.linears]


def storage_dtype(model: nn.Module) -> torch.dtype:
    """bf16 for a bf16 model, else fp16: scales and the unquantized tensors (embeddings, norms,
    lm_head) are stored in it, so a model searched in fp32 on a CPU does not write fp32 embeddings."""
    return torch.bfloat16 if next(model.parameters()).dtype == torch.bfloat16 else torch.float16


def quantized_state_dict(model: nn.Module, group_size: int, fmt: str = "tinyq", dtype=None) -> dict:
    """The model's state dict with every decoder linear quantized (RTN of the current weights, so
    AWQ's folded scales and clipped ranges are what gets rounded); floating tensors in ``dtype``
    (default :func:`storage_dtype`)."""
    if fmt not in FORMATS:
        raise ValueError(f"checkpoint format {fmt!r} is not one of {FORMATS}")
    dtype = dtype or storage_dtype(model)
    scale_dtype = torch.float16 if fmt == "awq" or dtype not in (torch.float16, torch.bfloat16) else dtype
    names = set(quantized_linear_names(model))
    out, seen = {}, set()
    for key, t in model.state_dict().items():
        if t.data_ptr() in seen and t.numel() > 0:  # tied weights (lm_head = embed_tokens) stored once
            continue
        seen.add(t.data_ptr())
        prefix, _, leaf = key.rpartition(".")
        if prefix in names and leaf == "weight":
            qweight, scales, zeros = quantize_weight(t.detach(), group_size, scale_dtype)
            if fmt == "awq":
                qweight, qzeros, scales = to_awq_gemm(qweight, scales, zeros)
                out[f"{prefix}.qzeros"] = qzeros
            else:
                out[f"{prefix}.zeros"] = zeros.contiguous()
            out[f"{prefix}.qweight"] = qweight.contiguous()
            out[f"{prefix}.scales"] = scales.contiguous()
        else:
            out[key] = t.detach().to(dtype if t.is_floating_point() else t.dtype).contiguous()
    return out


def quantization_config(group_size: int, fmt: str = "tinyq", extra: dict = None) -> dict:
    if fmt == "awq":
        qc = {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True, "version": "gemm",
              "modules_to_not_convert": None}
    else:
        qc = {"quant_method": "tinyq", "bits": 4, "group_size": group_size, "version": TINYQ_VERSION,
              "modules_not_quantized": ["lm_head"]}
    qc.update(extra or {})
    return qc


def check_output_dir(path) -> Path:
    """Refuse early to overwrite a non-empty directory that is not a checkpoint."""
    dest = Path(path)
    if dest.exists():
        if not dest.is_dir():
            raise FileExistsError(f"output {dest} exists and is not a directory")
        if any(dest.iterdir()) and not (dest / "config.json").is_file():
            raise FileExistsError(f"output {dest} is a non-empty directory that is not a checkpoint; refusing to replace it")
    return dest


def _write_tensors(tensors: dict, folder: Path, max_shard_bytes: int) -> None:
    from safetensors.torch import save_file

    shards, cur, size = [], {}, 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if cur and size + nbytes > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[key] = t.cpu()
        size += nbytes
    shards.append(cur)
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata=meta)
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name), metadata=meta)
        for key, t in shard.items():
            weight_map[key] = name
            total += t.numel() * t.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_checkpoint(out_dir, tensors: dict, config: dict, tokenizer=None, extra_files: dict = None,
                     max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Write a checkpoint directory atomically: whole, or (on any error or interrupt) not at all."""
    dest = check_output_dir(out_dir).resolve()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private (0700); the checkpoint gets normal permissions
    try:
        _write_tensors(tensors, tmp, max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
        if tokenizer is not None:
            if hasattr(tokenizer, "save_pretrained"):
                tokenizer.save_pretrained(str(tmp))
            else:  # a bare tokenizers.Tokenizer
                tokenizer.save(str(tmp / "tokenizer.json"))
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data) if isinstance(data, bytes) else (tmp / name).write_text(data)
        if dest.exists() and any(dest.iterdir()):
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
            os.replace(dest, old / "ckpt")
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            if dest.exists():
                dest.rmdir()
            os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def save_quantized(model: nn.Module, out_dir, group_size: int, tokenizer=None, fmt: str = "tinyq",
                   quant_extra: dict = None, extra_files: dict = None, max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Quantize ``model``'s decoder linears (4-bit, ``group_size``) and write a checkpoint to ``out_dir``."""
    dtype = storage_dtype(model)
    tensors = quantized_state_dict(model, group_size, fmt, dtype)
    config = model.config.to_dict()
    config["torch_dtype"] = config["dtype"] = str(dtype).replace("torch.", "")
    config["quantization_config"] = quantization_config(group_size, fmt, quant_extra)
    return write_checkpoint(out_dir, tensors, config, tokenizer, extra_files, max_shard_bytes)


# --- reading ---------------------------------------------------------------------------------------

def _load_tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{folder}: no model.safetensors or model.safetensors.index.json")
    tensors = {}
    for name in files:
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder}: shard {name} listed in the index is missing")
        tensors.update(load_file(str(folder / name)))
    return tensors


def _expect(cond: bool, tensor: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"tensor {tensor!r}: {msg}")


def read_quantized_state(path):
    """Read a tinyq or AutoAWQ-gemm checkpoint directory.

    Returns ``(config, quantized, other)``: the config dict, ``{prefix: (qweight, scales, zeros,
    bias_or_None)}`` in tinyq format (``prefix`` = the HF module name, e.g.
    ``model.layers.0.self_attn.q_proj``) and the remaining tensors by name. Raises ``ValueError``
    naming the tensor on any shape, group-size, bit-width or architecture mismatch.
    """
    folder = Path(path)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{folder}: no config.json (not a checkpoint directory)")
    config = json.loads(cfg_path.read_text())
    family_for(config)  # unsupported architecture -> ValueError listing the supported ones
    qc = config.get("quantization_config")
    if not qc:
        raise ValueError(f"{folder}: config.json has no quantization_config (not a quantized checkpoint)")
    method = str(qc.get("quant_method", "")).lower()
    bits = qc.get("bits", qc.get("w_bit"))
    gs = qc.get("group_size", qc.get("q_group_size"))
    if method not in FORMATS:
        raise ValueError(f"{folder}: quant_method {method!r} is not one of {FORMATS}")
    if method == "awq" and str(qc.get("version", "gemm")).lower() != "gemm":
        raise ValueError(f"{folder}: AWQ version {qc.get('version')!r} is not supported (only 'gemm')")
    if method == "awq" and qc.get("zero_point") is False:
        raise ValueError(f"{folder}: AWQ checkpoints without zero points are not supported")
    if bits != 4:
        raise ValueError(f"{folder}: bits={bits}; tinyq's kernels read 4-bit weights only")
    if not isinstance(gs, int) or gs <= 0:
        raise ValueError(f"{folder}: invalid group_size {gs!r} in quantization_config")
    shapes = expected_linear_shapes(config)
    tensors = _load_tensors(folder)
    quantized = {}
    for key in [k for k in tensors if k.endswith(".qweight")]:
        prefix = key[: -len(".qweight")]
        suffix = next((s for s in shapes if prefix.endswith("." + s)), None)
        _expect(suffix is not None, key, "is not a linear of a supported decoder layer")
        n, k = shapes[suffix]
        names = [f"{prefix}.{leaf}" for leaf in (("qzeros", "scales") if method == "awq" else ("zeros", "scales"))]
        for name in names:
            _expect(name in tensors, name, "missing (its qweight is present)")
        qweight = tensors.pop(key)
        zeros, scales = (tensors.pop(name) for name in names)
        _expect(qweight.dtype == torch.int32, key, f"dtype {qweight.dtype}, expected torch.int32")
        _expect(scales.dtype in (torch.float16, torch.bfloat16), names[1], f"dtype {scales.dtype}, expected fp16/bf16")
        _expect(k % gs == 0, names[1], f"in_features {k} is not divisible by group_size {gs}")
        if method == "awq":
            _expect(tuple(qweight.shape) == (k, n // PACK), key, f"shape {tuple(qweight.shape)}, expected {(k, n // PACK)} "
                    f"(AWQ [K, N/8] for out={n}, in={k})")
            _expect(tuple(scales.shape) == (k // gs, n), names[1], f"shape {tuple(scales.shape)}, expected {(k // gs, n)} "
                    f"(group_size {gs})")
            _expect(tuple(zeros.shape) == (k // gs, n // PACK), names[0],
                    f"shape {tuple(zeros.shape)}, expected {(k // gs, n // PACK)}")
            qweight, scales, zeros = from_awq_gemm(qweight, zeros, scales)
        else:
            _expect(tuple(qweight.shape) == (n, k // PACK), key, f"shape {tuple(qweight.shape)}, expected {(n, k // PACK)} "
                    f"([N, K/8] for out={n}, in={k})")
            _expect(tuple(scales.shape) == (n, k // gs), names[1], f"shape {tuple(scales.shape)}, expected {(n, k // gs)} "
                    f"(group_size {gs})")
            _expect(tuple(zeros.shape) == (n, k // gs), names[0], f"shape {tuple(zeros.shape)}, expected {(n, k // gs)}")
            _expect(zeros.dtype == scales.dtype, names[0], f"dtype {zeros.dtype} differs from the scales' {scales.dtype}")
        bias = tensors.pop(f"{prefix}.bias", None)
        if bias is not None:
            _expect(tuple(bias.shape) == (n,), f"{prefix}.bias", f"shape {tuple(bias.shape)}, expected {(n,)}")
        quantized[prefix] = (qweight, scales, zeros, bias)
    for key in tensors:
        if key.endswith(".weight") and any(key[: -len(".weight")].endswith("." + sfx) for sfx in shapes):
            raise ValueError(f"tensor {key!r}: a decoder linear stored unquantized in a quantized checkpoint")
    if not quantized:
        raise ValueError(f"{folder}: no quantized tensors (*.qweight) found")
    return config, quantized, tensors


def load_quantized_model(path, device="cpu", dtype=torch.float16):
    """A transformers model whose decoder linears are :class:`tinyq.W4A16Linear` (from either
    checkpoint kind); used by evaluation and tests when tinyq's own models are not wanted."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from tinyq.nn import W4A16Linear

    config, quantized, other = read_quantized_state(path)
    plain = {k: v for k, v in config.items() if k != "quantization_config"}
    hf_config = AutoConfig.for_model(plain.pop("model_type"), **plain)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    for prefix, (qweight, scales, zeros, bias) in quantized.items():
        parent_name, _, child = prefix.rpartition(".")
        b = bias.to(dtype) if bias is not None else None
        setattr(model.get_submodule(parent_name), child, W4A16Linear.from_quantized(qweight, scales, zeros, b))
    missing, unexpected = model.load_state_dict({k: v.to(dtype) for k, v in other.items()}, strict=False, assign=True)
    if config.get("tie_word_embeddings") and "lm_head.weight" not in other:
        model.lm_head.weight = model.get_input_embeddings().weight
    missing = [m for m in missing if m.rpartition(".")[0] not in quantized
               and not (m == "lm_head.weight" and config.get("tie_word_embeddings"))]
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    dec = decoder_of(model)
    dec.rotary_emb = type(dec.rotary_emb)(config=dec.config)  # its non-persistent buffers were made on meta
    return model.to(device).eval()
