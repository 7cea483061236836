"""W8A8 (SmoothQuant) checkpoints and the pipeline that makes them (``tinyq quantize --method smoothquant``).

A checkpoint is an HF-format directory like the W4A16 ones (:mod:`tinyq.quant.checkpoint`, whose
atomic writer it uses): ``config.json`` with ``quantization_config = {"quant_method": "tinyq_w8a8",
"bits": 8, "act_quant": "token" | "tensor", ...}`` and, per decoder linear ``<prefix>``:
``<prefix>.qweight`` int8 ``[N, K]``, ``<prefix>.weight_scale`` float32 ``[N]`` and, for static
activation scales, ``<prefix>.input_scale`` float32 ``[1]`` (:mod:`tinyq.quant.int8_format`).
SmoothQuant's scales are already folded into the norms and weights, so nothing else is needed to run
it. Embeddings, norms and lm_head stay in fp16 (bf16 for a bf16 model).
"""
from __future__ import annotations

import time

import torch
from torch import nn

from tinyq.nn.w8a8_linear import W8A8Linear
from tinyq.quant.checkpoint import check_output_dir, quantized_linear_names, storage_dtype, write_checkpoint
from tinyq.quant.int8_format import QMAX, quantize_weight_int8

QUANT_METHOD = "tinyq_w8a8"
ACT_QUANT = ("token", "tensor")


def w8a8_state_dict(model: nn.Module, static_stats: dict = None) -> dict:
    """The model's tensors with every decoder linear in tinyq's W8A8 format. ``static_stats``: per-channel
    ``max|x|`` of each linear's (smoothed) input by full name, for static per-tensor input scales.
    Linears that are ``W8A8Linear`` already (``quantize_(model, W8A8Config())``) are written as they are."""
    dtype = storage_dtype(model)
    names = set(quantized_linear_names(model))
    done = {n for n, m in model.named_modules() if isinstance(m, W8A8Linear)}
    out, seen = {}, set()
    for key, t in model.state_dict().items():
        if t.data_ptr() in seen and t.numel() > 0:  # tied weights stored once
            continue
        seen.add(t.data_ptr())
        prefix, _, leaf = key.rpartition(".")
        if prefix in done and leaf in ("qweight", "weight_scale", "input_scale"):
            out[key] = t.detach()  # int8 / float32 already, as the format stores them
        elif prefix in names and leaf == "weight":
            out[f"{prefix}.qweight"], out[f"{prefix}.weight_scale"] = quantize_weight_int8(t)
            if static_stats is not None:
                out[f"{prefix}.input_scale"] = _static_input_scale(prefix, static_stats)
        else:
            out[key] = t.detach().to(dtype if t.is_floating_point() else t.dtype).contiguous()
    return {k: v.contiguous().cpu() for k, v in out.items()}


def _static_input_scale(prefix: str, static_stats: dict) -> torch.Tensor:
    """``max|x| / 127`` (float32 ``[1]``) of linear ``prefix``'s calibrated input. Statistics holding
    inf/NaN are refused: the clamp below lets NaN through, and a NaN scale would make every output NaN."""
    if prefix not in static_stats:
        raise ValueError(f"no calibrated activation statistics for {prefix!r}")
    stats = torch.as_tensor(static_stats[prefix]).float()
    if not torch.isfinite(stats).all():
        raise ValueError(f"the activation statistics of {prefix!r} hold inf/NaN (calibration overflowed: "
                         "calibrate in float32 or bfloat16), so no static input scale can be written")
    amax = stats.max().clamp(min=1e-8)
    return (amax / QMAX).reshape(1)


def save_w8a8(model: nn.Module, out_dir, tokenizer=None, act_quant: str = "token", static_stats: dict = None,
              quant_extra: dict = None):
    """Write ``model`` (a floating-point model, smoothed or not, or one whose decoder linears are
    ``W8A8Linear`` already) as a W8A8 checkpoint, whole or not at all."""
    if act_quant not in ACT_QUANT:
        raise ValueError(f"act_quant must be one of {ACT_QUANT}, got {act_quant!r}")
    done = dict((n, m) for n, m in model.named_modules() if isinstance(m, W8A8Linear))
    if done:  # quantized in memory: the modules' own scales are what gets written
        if static_stats is not None:
            raise ValueError("static_stats: the model's W8A8Linear modules carry their scales already")
        names = set(quantized_linear_names(model))
        if set(done) != names:  # the checkpoint format: every decoder linear int8, nothing else
            missing, extra = sorted(names - set(done)), sorted(set(done) - names)
            raise ValueError("save_w8a8: a model quantized in memory must have every decoder linear, and only "
                             f"those, as W8A8Linear; not quantized: {missing[:3]}, outside the decoder: {extra[:3]}")
        wrong = [n for n, m in done.items() if m.act_quant != act_quant]
        if wrong:
            raise ValueError(f"act_quant={act_quant!r}, but {wrong[0]!r} ({len(wrong)} linear(s) in all) quantizes "
                             f"its activations per {done[wrong[0]].act_quant}")
    elif (act_quant == "tensor") != (static_stats is not None):
        raise ValueError("static per-tensor activation scales need calibration statistics (and only they use them)")
    tensors = w8a8_state_dict(model, static_stats)
    config = model.config.to_dict()
    config["torch_dtype"] = config["dtype"] = str(storage_dtype(model)).replace("torch.", "")
    config["quantization_config"] = {"quant_method": QUANT_METHOD, "bits": 8, "act_quant": act_quant,
                                     "modules_not_quantized": ["lm_head"], **(quant_extra or {})}
    return write_checkpoint(out_dir, tensors, config, tokenizer)


def smoothquant_to_checkpoint(job, out_dir, alpha, act_quant: str = "token") -> dict:
    """Load ``job.model``, calibrate on ``job.calib`` blocks, smooth with ``alpha`` (None: no smoothing),
    write a W8A8 checkpoint to ``out_dir`` (atomically). ``job`` is a
    :class:`tinyq.quant.pipeline.QuantizeJob` (its AWQ settings are unused)."""
    from tinyq.quant.model_io import load_fp_model
    from tinyq.quant.pipeline import _log, default_device
    from tinyq.quant.smoothquant import calibrate, smooth_

    if act_quant not in ACT_QUANT:
        raise ValueError(f"act_quant must be one of {ACT_QUANT}, got {act_quant!r}")
    check_output_dir(out_dir, source=job.model)
    device = job.device or default_device()
    dtype = torch.float16 if str(device).startswith("cuda") else torch.float32
    model, tokenizer = load_fp_model(job.model, dtype=dtype)
    stats, seconds = None, 0.0
    if alpha is not None or act_quant == "tensor":
        blocks = job.calib.blocks(tokenizer, _log if job.progress else None)
        t0 = time.time()
        stats = calibrate(model, blocks, device=device, progress=job.progress)
        seconds = time.time() - t0
    if alpha is not None:
        stats = smooth_(model, stats, alpha)
    extra = {"method": "smoothquant" if alpha is not None else "rtn", "alpha": alpha}
    if stats is not None:
        extra["calibration"] = {"blocks": job.calib.n_blocks, "block_len": job.calib.block_len,
                                "files": list(map(str, job.calib.files or [])) or "default"}
    path = save_w8a8(model, out_dir, tokenizer, act_quant, stats if act_quant == "tensor" else None, extra)
    return {"path": str(path), "calibration_seconds": seconds}
