"""The AWQ W4A16 default chat model: SmolLM2-135M-Instruct, quantized on first use and cached.

The cache lives in ``$XDG_CACHE_HOME/tinyq`` (default ``~/.cache/tinyq``); its location is printed.
Calibration is kept small (:data:`DEFAULT_CALIB`) so the first run on a 2-core CPU stays within
about two minutes; the text is :func:`tinyq.quant.calib.default_calibration_text` (the Debian handbook's
calibration chapters if installed, else Python's stdlib docstrings).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from tinyq.quant.awq import AwqConfig
from tinyq.quant.pipeline import CalibConfig, QuantizeJob, quantize_to_checkpoint

# A lighter recipe than `tinyq quantize`'s (128 x 512 tokens, 20 grid points, losses on 8 blocks) so the
# first chat starts within ~1-2 minutes on a 2-core CPU: statistics from 16 x 256 tokens, losses on 2
# blocks, 10 scale grid points, clip errors on 256 tokens.
DEFAULT_CALIB = {"n_blocks": 16, "block_len": 256, "search_blocks": 2, "n_grid": 10, "clip_tokens": 256}
CACHE_VERSION = 2  # bump when the default recipe or the checkpoint layout changes, so stale caches are not reused
# (2: search results moved into a subfolder; loaders refuse v1's second top-level *.safetensors)


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tinyq"


def default_checkpoint_dir(group_size: int = 64) -> Path:
    return cache_dir() / f"smollm2-135m-instruct-awq-w4g{group_size}-v{CACHE_VERSION}"


def ensure_default_awq_checkpoint(group_size: int = 64, device=None, progress: bool = True) -> Path:
    """Path of the cached AWQ checkpoint of the default model; quantizes and caches it on first use."""
    if 576 % group_size:
        raise ValueError(f"group_size={group_size} does not divide SmolLM2's hidden size 576; use 32 or 64")
    dest = default_checkpoint_dir(group_size)
    if (dest / "config.json").is_file() and (dest / "model.safetensors").is_file():
        if progress:
            print(f"tinyq: using the cached AWQ default model at {dest}", file=sys.stderr)
        return dest
    print(f"tinyq: first use: quantizing the default model with AWQ (w4, g{group_size}; 1-2 minutes on a "
          f"2-core CPU, seconds on a GPU); cache: {dest}", file=sys.stderr, flush=True)
    job = QuantizeJob(
        model="default",
        method="awq",
        awq=AwqConfig(w_bit=4, group_size=group_size, search_blocks=DEFAULT_CALIB["search_blocks"],
                      n_grid=DEFAULT_CALIB["n_grid"], clip_tokens=DEFAULT_CALIB["clip_tokens"]),
        calib=CalibConfig(n_blocks=DEFAULT_CALIB["n_blocks"], block_len=DEFAULT_CALIB["block_len"]),
        device=device,
        progress=progress,
    )
    try:
        quantize_to_checkpoint(job, dest, replace=False)
    except FileExistsError:
        if not (dest / "config.json").is_file():
            raise
        # another process finished first: its checkpoint is whole (atomic rename) and is kept
    print(f"tinyq: cached the AWQ default model at {dest}", file=sys.stderr)
    return dest
