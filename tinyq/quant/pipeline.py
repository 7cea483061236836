"""The quantization pipeline behind ``tinyq quantize``, the cached default and the benchmarks:
load the fp model, cut calibration blocks, run the AWQ search (or none, for RTN), write a checkpoint."""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Optional, Sequence

import torch

from tinyq.quant import calib
from tinyq.quant.awq import AwqConfig, AwqResults, apply_awq, awq_search

METHODS = ("awq", "rtn")
# On a CPU the scale-search losses use 8 of the calibration blocks unless told otherwise (all 128 would
# take ~16x longer: about an hour for SmolLM2-135M on 2 cores); statistics always use every block.
CPU_SEARCH_BLOCKS = 8


@dataclass
class CalibConfig:
    files: Optional[Sequence[str]] = None  # None: calib.default_calibration_text()
    n_blocks: int = 128
    block_len: int = 512

    def blocks(self, tokenizer, log=None):
        if self.files:
            text, what = calib.read_text_files(self.files), f"--calib-file {' '.join(map(str, self.files))}"
        else:
            text, what = calib.default_calibration_text()
        if log:
            log(f"calibration: {self.n_blocks} blocks x {self.block_len} tokens from {what}")
        return calib.calibration_blocks(tokenizer, text, self.n_blocks, self.block_len, what=f"calibration text ({what})")


@dataclass
class QuantizeJob:
    model: str = "default"
    method: str = "awq"
    awq: AwqConfig = field(default_factory=AwqConfig)
    calib: CalibConfig = field(default_factory=CalibConfig)
    device: Optional[str] = None  # where layers are searched; default CUDA if available
    load_search: Optional[str] = None  # re-apply saved results instead of searching
    save_search: Optional[str] = None
    progress: bool = True


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_new_file(path, what: str = "output file") -> None:
    """``path`` can be written as a file: not a directory, in an existing, writable folder; a
    ValueError naming ``what`` otherwise. Checked before the (long) search whose result goes there."""
    if os.path.isdir(path):
        example = os.path.join(path, "awq_search.safetensors")
        raise ValueError(f"{what} {path} is a directory; name a file, e.g. {example}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"{what} {path}: its folder does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {path}: its folder {folder} is not writable")


def check_search_file(path, awq: AwqConfig, what: str = "load_search") -> None:
    """``path`` holds AWQ search results for ``awq``'s bits and group size (its header is read, not
    its tensors): a ValueError (FileNotFoundError if missing) naming ``what`` and ``path`` otherwise."""
    try:
        info = AwqResults.read_info(path)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{what}: {exc}") from None
    except ValueError as exc:
        raise ValueError(f"{what}: {exc}") from None
    for key in ("w_bit", "group_size"):
        if info["config"].get(key) != getattr(awq, key):
            raise ValueError(f"{what} {path}: search results are for {key}={info['config'].get(key)}, "
                             f"not {getattr(awq, key)}")


def prepare(job: QuantizeJob):
    """Load the model and apply AWQ (search or saved results); RTN leaves it as it is.

    Returns ``(model, tokenizer, results_or_None, seconds_of_search)``. The model stays on the CPU
    (fp16 when a GPU does the search, fp32 otherwise); the search moves one layer at a time.
    """
    from tinyq.quant.model_io import load_fp_model

    if job.method not in METHODS:
        raise ValueError(f"method {job.method!r} is not one of {METHODS}")
    device = job.device or default_device()
    dtype = torch.float16 if str(device).startswith("cuda") else torch.float32
    log = _log if job.progress else None
    if job.method == "awq" and job.load_search:  # a bad file or path is found before the model loads
        check_search_file(job.load_search, job.awq)
    elif job.method == "awq" and job.save_search:  # ... and before the search, not after it
        check_new_file(job.save_search, "save_search")
    model, tokenizer = load_fp_model(job.model, dtype=dtype)
    if job.method == "rtn":
        return model, tokenizer, None, 0.0
    if job.load_search:
        results = AwqResults.load(job.load_search)
        return apply_awq(model, results), tokenizer, results, 0.0
    blocks = job.calib.blocks(tokenizer, log)
    awq_cfg = job.awq
    if awq_cfg.search_blocks is None and not str(device).startswith("cuda"):
        awq_cfg = replace(awq_cfg, search_blocks=CPU_SEARCH_BLOCKS)
    if log:
        log(f"AWQ search on {device}: losses on {awq_cfg.search_blocks or blocks.shape[0]} blocks")
    t0 = time.time()
    results = awq_search(model, blocks, awq_cfg, device=device, progress=job.progress)
    seconds = time.time() - t0
    if log:
        log(f"AWQ search: {seconds:.1f} s on {device}")
    if job.save_search:
        try:
            results.save(job.save_search)
        except OSError as exc:  # atomic_io's message names its temporary file: name the destination
            raise OSError(f"could not write the AWQ search results to {job.save_search}: "
                          f"{exc.strerror or exc}") from exc
    return model, tokenizer, results, seconds


def quantize_to_checkpoint(job: QuantizeJob, out_dir, fmt: str = "tinyq", replace: bool = True) -> dict:
    """Run ``job`` and write a 4-bit checkpoint to ``out_dir`` (atomically; an existing checkpoint is
    replaced, or with ``replace=False`` kept and ``FileExistsError`` raised). Returns a summary dict."""
    from tinyq.quant.checkpoint import SEARCH_RESULTS, check_output_dir, save_quantized

    if job.awq.w_bit != 4:
        raise ValueError(f"w_bit={job.awq.w_bit}: checkpoints are 4-bit (the kernels' format); 3-bit AWQ is for "
                         "evaluation only (tinyq eval --fake-quant awq --w-bit 3)")
    check_output_dir(out_dir, replace, job.model)  # fail before the (long) search, not after
    model, tokenizer, results, seconds = prepare(job)
    extra = {"method": job.method}
    files = {SEARCH_RESULTS: results.to_bytes()} if results is not None else None
    if results is not None:
        extra.update({k: results.config[k] for k in ("duo_scaling", "clip", "n_grid")})
        extra["calibration"] = {"blocks": job.calib.n_blocks, "block_len": job.calib.block_len,
                                "files": list(map(str, job.calib.files or [])) or "default"}
    path = save_quantized(model, out_dir, job.awq.group_size, tokenizer, fmt,
                          quant_extra=extra if fmt == "tinyq" else None, extra_files=files, replace=replace)
    return {"path": str(path), "search_seconds": seconds}
