"""Quantized checkpoints: write tinyq / AutoAWQ ("awq gemm") directories, read either kind.

A checkpoint is an HF-format directory: ``config.json`` (the model config plus a
``quantization_config``), ``model.safetensors`` (or shards + ``model.safetensors.index.json``) and
tokenizer files. Each quantized linear ``<prefix>.weight`` becomes

* tinyq (``quant_method: "tinyq"``, ``version: 1``): ``<prefix>.qweight`` int32 ``[N, K/8]``,
  ``<prefix>.scales`` / ``<prefix>.zeros`` ``[N, K/G]`` (see :mod:`tinyq.quant.format`);
* AutoAWQ (``quant_method: "awq"``, ``version: "gemm"``): ``<prefix>.qweight`` int32 ``[K, N/8]``,
  ``<prefix>.qzeros`` int32 ``[K/G, N/8]``, ``<prefix>.scales`` fp16 ``[K/G, N]``.

:func:`read_quantized_state` reads both kinds; :func:`check_quantization_config` and
:func:`weight_files` are the rules it shares with tinyq's runtime loader. Writes are whole or nothing:
everything goes into a temporary directory next to the destination, fsynced, renamed into place at the
end (see :mod:`tinyq.atomic_io`). ``config.json`` and the tokenizer files are written so that
transformers 4.x and 5.x, AutoAWQ and vLLM read them as they are; AWQ search results go to
:data:`SEARCH_RESULTS`, a subfolder no weight loader reads.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from tinyq.atomic_io import exchange, fsync_path, seal_tree
from tinyq.json_io import read_json
from tinyq.quant.arch import decoder_of, expected_linear_shapes, family_for
from tinyq.quant.format import PACK, check_grid_values, from_awq_gemm, quantize_weight, to_awq_gemm

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
    done = [n for n, m in model.named_modules() if type(m).__name__ in ("W4A16Linear", "W8A8Linear")]
    if done:  # their buffers would be stored as they are, under names and shapes no loader reads
        raise ValueError(f"the model is already quantized in memory ({len(done)} modules, e.g. {done[0]}); "
                         "checkpoints quantize a float model's linears: save the float model instead")
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
            try:
                qweight, scales, zeros = quantize_weight(t.detach(), group_size, scale_dtype)
            except ValueError as exc:
                raise ValueError(f"{prefix}: {exc}") from exc
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


NOT_CONVERTED = ["lm_head"]  # what stays in float besides the embedding (not a linear)
SEARCH_RESULTS = "awq_search/results.safetensors"  # a subfolder: no weight loader globs it as weights


def quantization_config(group_size: int, fmt: str = "tinyq", extra: dict = None) -> dict:
    """AutoAWQ's keys (as transformers 4.x/5.x and vLLM read them) for both formats."""
    qc = {"quant_method": fmt, "bits": 4, "group_size": group_size, "zero_point": True,
          "version": "gemm" if fmt == "awq" else TINYQ_VERSION, "modules_to_not_convert": list(NOT_CONVERTED)}
    qc.update(extra or {})
    return qc


def portable_config(config: dict, dtype: torch.dtype) -> dict:
    """``config`` with the keys both transformers generations read: 5.x ``rope_parameters`` and
    ``dtype``, 4.x ``rope_theta`` + ``rope_scaling`` (with ``rope_type`` and the older ``type``) and
    ``torch_dtype``. A 4.x reader that misses ``rope_theta`` silently uses 10000."""
    out = dict(config)
    # the reader's precedence (tinyq.kernels.rope.RopeConfig.from_hf, as transformers 5): a rope_scaling
    # block replaces rope_parameters whole
    rope = dict(out.get("rope_scaling") or out.get("rope_parameters") or {})
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    rope["rope_type"] = rope_type
    rope.pop("type", None)
    theta = rope.get("rope_theta", out.get("rope_theta"))
    if theta is not None:
        rope["rope_theta"] = out["rope_theta"] = theta
    out["rope_parameters"] = rope
    extra = {k: v for k, v in rope.items() if k not in ("rope_type", "rope_theta")}
    out["rope_scaling"] = {"rope_type": rope_type, "type": rope_type, **extra} if rope_type != "default" else None
    out["torch_dtype"] = out["dtype"] = str(dtype).replace("torch.", "")
    return out


def check_output_dir(path, replace: bool = True, source=None) -> Path:
    """Refuse early to overwrite a non-empty directory that is not a quantized checkpoint (a
    ``config.json`` with a ``quantization_config``: a float model directory is never replaced), or,
    with ``replace=False``, any non-empty directory, or the model being quantized (``source``); and
    a destination that cannot be created (a file on its path: NotADirectoryError; a folder that is
    not writable: PermissionError)."""
    dest = Path(path)
    _check_creatable(dest)
    if source is not None and Path(source).exists() and dest.exists() and dest.resolve() == Path(source).resolve():
        raise FileExistsError(f"output {dest} is the model being quantized; write the checkpoint elsewhere")
    if dest.exists():
        if not dest.is_dir():
            raise FileExistsError(f"output {dest} exists and is not a directory")
        if any(dest.iterdir()) and not replace:
            raise FileExistsError(f"output {dest} already exists")
        if any(dest.iterdir()) and not _is_quantized_checkpoint(dest):
            raise FileExistsError(f"output {dest} is a non-empty directory that is not a quantized checkpoint; "
                                  "refusing to replace it")
    return dest


def _check_creatable(dest: Path) -> None:
    """Its folders are made as needed (``mkdir(parents=True)``): the nearest one that exists must be a
    writable folder, found now rather than after the search."""
    folder = dest.absolute().parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise NotADirectoryError(f"output {dest}: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"output {dest}: its folder {folder} is not writable")


def _is_quantized_checkpoint(folder: Path) -> bool:
    try:
        return "quantization_config" in json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False


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


def _write_tokenizer(tokenizer, folder: Path) -> None:
    """Tokenizer files that transformers 4.40+ and 5.x both load: 5.x writes ``tokenizer_class:
    "TokenizersBackend"`` (unknown to 4.x) and keeps the chat template only in ``chat_template.jinja``
    (which 4.x before 4.49 does not read)."""
    if not hasattr(tokenizer, "save_pretrained"):  # a bare tokenizers.Tokenizer
        tokenizer.save(str(folder / "tokenizer.json"))
        return
    tokenizer.save_pretrained(str(folder))
    cfg_path = folder / "tokenizer_config.json"
    if not cfg_path.is_file():
        return
    cfg = read_json(cfg_path)
    if cfg.get("tokenizer_class") in (None, "TokenizersBackend"):
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        cfg["chat_template"] = template
        (folder / "chat_template.jinja").write_text(template)
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def _move_into_place(tmp: Path, dest: Path, replace: bool) -> None:
    """Rename ``tmp`` to ``dest``; an existing checkpoint there is swapped out in one atomic step
    (``replace``) or left alone (``FileExistsError``)."""
    try:
        os.rename(tmp, dest)  # dest absent or an empty directory
        return
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
    if not replace:
        raise FileExistsError(f"output {dest} was written by another process meanwhile; it was kept")
    check_output_dir(dest)
    try:
        exchange(tmp, dest)
    except OSError as exc:
        raise FileExistsError(f"cannot replace {dest} atomically here ({exc.strerror}); remove it first") from exc


def write_checkpoint(out_dir, tensors: dict, config: dict, tokenizer=None, extra_files: dict = None,
                     max_shard_bytes: int = MAX_SHARD_BYTES, replace: bool = True) -> Path:
    """Write a checkpoint directory whole or (on any error, interrupt or crash) not at all: files go to
    a temporary sibling, are fsynced, and the directory is renamed into place (an existing checkpoint
    is swapped out atomically, unless ``replace=False``, then ``FileExistsError``). ``extra_files``
    maps relative paths (subfolders allowed) to bytes or text."""
    dest = check_output_dir(out_dir, replace).resolve()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        _write_tensors(tensors, tmp, max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
        if tokenizer is not None:
            _write_tokenizer(tokenizer, tmp)
        for name, data in (extra_files or {}).items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_bytes(data) if isinstance(data, bytes) else (tmp / name).write_text(data)
        seal_tree(tmp)
        _move_into_place(tmp, dest, replace)
        fsync_path(dest.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the temporary files, or the swapped-out old checkpoint
    return dest


def save_quantized(model: nn.Module, out_dir, group_size: int, tokenizer=None, fmt: str = "tinyq",
                   quant_extra: dict = None, extra_files: dict = None, max_shard_bytes: int = MAX_SHARD_BYTES,
                   replace: bool = True) -> Path:
    """Quantize ``model``'s decoder linears (4-bit, ``group_size``) and write a checkpoint to ``out_dir``."""
    dtype = storage_dtype(model)
    tensors = quantized_state_dict(model, group_size, fmt, dtype)
    config = portable_config(model.config.to_dict(), dtype)
    config["quantization_config"] = quantization_config(group_size, fmt, quant_extra)
    return write_checkpoint(out_dir, tensors, config, tokenizer, extra_files, max_shard_bytes, replace)


# --- reading ---------------------------------------------------------------------------------------

def weight_files(folder) -> tuple:
    """``(file names, weight_map or None)`` of a directory's safetensors weights: the index's shards,
    else its one ``*.safetensors`` file. Several files and no index is an error, not a merge: one of
    them may hold something else (AWQ search results, an adapter) whose tensors would shadow weights."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: has no weight_map object (not a safetensors index?)")
        files = sorted(set(weight_map.values()))
        for name in files:
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{folder / name} is listed in {index.name} but missing")
        return files, weight_map
    files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {folder} (.bin checkpoints are not supported)")
    if len(files) > 1:
        hint = f" (older tinyq versions put AWQ search results there; move it to {SEARCH_RESULTS})" \
            if "awq_search.safetensors" in files else ""
        raise ValueError(f"{folder}: {len(files)} *.safetensors files ({', '.join(files)}) and no "
                         f"model.safetensors.index.json saying which hold the weights; move the others away{hint}")
    return files, None


def check_quantization_config(qc: dict, where) -> int:
    """The group size of a ``quantization_config`` tinyq reads (4-bit ``tinyq``, or AutoAWQ ``awq``
    gemm with zero points); ``ValueError`` naming ``where`` otherwise. AutoAWQ's own spellings
    (``w_bit``, ``q_group_size``) are accepted."""
    method = str(qc.get("quant_method", "")).lower()
    bits = qc.get("bits", qc.get("w_bit"))
    gs = qc.get("group_size", qc.get("q_group_size"))
    if method not in FORMATS:
        raise ValueError(f"{where}: quant_method {method!r} is not one of {FORMATS}")
    if method == "awq" and str(qc.get("version", "gemm")).lower() != "gemm":
        raise ValueError(f"{where}: AWQ version {qc.get('version')!r} is not supported (only 'gemm')")
    if method == "awq" and qc.get("zero_point") is False:
        raise ValueError(f"{where}: AWQ checkpoints without zero points are not supported")
    if bits != 4:
        raise ValueError(f"{where}: bits={bits}; tinyq's kernels read 4-bit weights only")
    if not isinstance(gs, int) or isinstance(gs, bool) or gs <= 0:
        raise ValueError(f"{where}: invalid group_size {gs!r} in quantization_config")
    return gs


def _load_tensors(folder: Path):
    """``(tensors, location)``: every tensor of the checkpoint by name, read through the loader's
    :class:`~tinyq.models.loader.TensorSource` (whose errors name a truncated or corrupt file), and
    its ``location(name)``, the file holding a tensor (for errors)."""
    from tinyq.models.loader import TensorSource  # tinyq.models.loader imports this module

    src = TensorSource(folder=str(folder))
    return {name: src.get(name) for name in src.names()}, src.location


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
    config = read_json(cfg_path)
    family_for(config)  # unsupported architecture -> ValueError listing the supported ones
    qc = config.get("quantization_config")
    if not qc:
        raise ValueError(f"{folder}: config.json has no quantization_config (not a quantized checkpoint)")
    gs = check_quantization_config(qc, cfg_path)
    method = str(qc["quant_method"]).lower()
    shapes = expected_linear_shapes(config)
    tensors, location = _load_tensors(folder)
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
            _expect(zeros.dtype == torch.int32, names[0], f"dtype {zeros.dtype}, expected torch.int32")
            _expect(tuple(qweight.shape) == (k, n // PACK), key, f"shape {tuple(qweight.shape)}, expected {(k, n // PACK)} "
                    f"(AWQ [K, N/8] for out={n}, in={k})")
            _expect(tuple(scales.shape) == (k // gs, n), names[1], f"shape {tuple(scales.shape)}, expected {(k // gs, n)} "
                    f"(group_size {gs})")
            _expect(tuple(zeros.shape) == (k // gs, n // PACK), names[0],
                    f"shape {tuple(zeros.shape)}, expected {(k // gs, n // PACK)}")
            check_grid_values(scales, None, prefix, location(names[1]))  # its zeros are 4-bit: always 0..15
            qweight, scales, zeros = from_awq_gemm(qweight, zeros, scales)
        else:
            _expect(tuple(qweight.shape) == (n, k // PACK), key, f"shape {tuple(qweight.shape)}, expected {(n, k // PACK)} "
                    f"([N, K/8] for out={n}, in={k})")
            _expect(tuple(scales.shape) == (n, k // gs), names[1], f"shape {tuple(scales.shape)}, expected {(n, k // gs)} "
                    f"(group_size {gs})")
            _expect(tuple(zeros.shape) == (n, k // gs), names[0], f"shape {tuple(zeros.shape)}, expected {(n, k // gs)}")
            _expect(zeros.dtype == scales.dtype, names[0], f"dtype {zeros.dtype} differs from the scales' {scales.dtype}")
            check_grid_values(scales, zeros, prefix, location(names[1]))
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
        has_bias = getattr(model.get_submodule(prefix), "bias", None) is not None
        if has_bias != (bias is not None):  # load_state_dict below cannot see a replaced module's bias
            raise ValueError(f"{path}: tensor {prefix + '.bias'!r} is "
                             f"{'missing' if has_bias else 'in the checkpoint, but the model has no such bias'}")
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
