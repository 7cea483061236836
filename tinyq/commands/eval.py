"""``tinyq eval``: perplexity over non-overlapping windows of a text file.

Examples::

    python -m tinyq eval --model smollm2-awq --ppl-file book.txt                 # a quantized checkpoint
    python -m tinyq eval --model smollm2-w8a8 --ppl-handbook                      # a W8A8 (SmoothQuant) one
    python -m tinyq eval --model default --ppl-handbook                           # fp, Debian handbook eval chapters
    python -m tinyq eval --model default --ppl-handbook --fake-quant awq --w-bit 3 --group-size 64
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tinyq.commands.quantize import add_calibration_args, check_search_flags, job_from_args
from tinyq.json_io import read_json
from tinyq.quant.format import GROUP_SIZES


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "eval", help="perplexity of a model or checkpoint on a text file",
        description="Perplexity over non-overlapping windows of --window tokens. A quantized checkpoint runs on "
                    "tinyq's W4A16 kernels; an fp model can be fake-quantized (RTN or AWQ, 3 or 4 bits) first.",
    )
    p.add_argument("--model", default="default", help="'default', a .gguf file, an HF model directory, or a tinyq / "
                                                      "AutoAWQ checkpoint directory")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ppl-file", nargs="+", metavar="FILE", help="evaluation text (files or directories)")
    src.add_argument("--ppl-handbook", action="store_true",
                     help="the Debian handbook's evaluation chapters 1-8 (apt-get install debian-handbook)")
    p.add_argument("--window", type=int, default=512, help="window length in tokens (default 512)")
    p.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows")
    p.add_argument("--batch", type=int, default=1, help="windows per forward (default 1)")
    p.add_argument("--fake-quant", default="none", choices=("none", "rtn", "awq"),
                   help="fake-quantize an fp model's decoder linears first (default none)")
    p.add_argument("--w-bit", type=int, default=4, choices=(3, 4), help="bits for --fake-quant (default 4)")
    p.add_argument("--group-size", type=int, default=64, choices=GROUP_SIZES, help="group size for --fake-quant")
    p.add_argument("--backend", default="auto", choices=("auto", "tinyq", "transformers"),
                   help="run checkpoints on tinyq's models (auto, tinyq) or transformers modules with "
                        "tinyq W4A16 linears")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    add_calibration_args(p)
    return p


def _is_checkpoint(path: str) -> bool:
    cfg = Path(path) / "config.json"
    return cfg.is_file() and bool(read_json(cfg).get("quantization_config"))


def _is_w8a8_checkpoint(path: str) -> bool:
    from tinyq.quant.w8a8_checkpoint import QUANT_METHOD

    qc = read_json(Path(path) / "config.json").get("quantization_config") or {}
    return qc.get("quant_method") == QUANT_METHOD


def load_for_eval(args):
    """``(model, tokenizer, description)``; ``model(ids)`` returns logits or an HF output."""
    import torch

    from tinyq.quant.awq import fake_quantize_model_
    from tinyq.quant.pipeline import default_device, prepare

    device = args.device or default_device()
    use_tinyq = args.backend in ("tinyq", "auto")
    if _is_checkpoint(args.model):
        if args.fake_quant != "none":
            raise ValueError(f"{args.model} is already quantized; --fake-quant applies to fp models")
        if _is_w8a8_checkpoint(args.model):  # SmoothQuant W8A8: tinyq's models only
            from tinyq.models import load_model

            model, tok = load_model(args.model, precision="w8a8", device=device)
            return model, tok, "W8A8 checkpoint on tinyq models"
        if use_tinyq:
            from tinyq.models import load_model

            model, tok = load_model(args.model, precision="w4a16", device=device)
            return model, tok, "checkpoint on tinyq models"
        from tinyq.models.loader import has_tokenizer, load_tokenizer
        from tinyq.quant.checkpoint import load_quantized_model

        dtype = torch.float16 if device.startswith("cuda") else torch.float32
        model = load_quantized_model(args.model, device=device, dtype=dtype)
        tok = load_tokenizer(args.model) if has_tokenizer(args.model) else None  # None: run() says what is missing
        return model, tok, "checkpoint on transformers"
    if args.fake_quant == "none" and use_tinyq and device.startswith("cuda"):
        from tinyq.models import load_model

        model, tok = load_model(args.model, precision="fp16", device=device)
        return model, tok, "fp16 on tinyq models"
    job = job_from_args(args, "awq" if args.fake_quant == "awq" else "rtn")
    model, tok, _results, _secs = prepare(job)
    if args.fake_quant != "none":
        fake_quantize_model_(model, args.w_bit, args.group_size)
    what = "fp" if args.fake_quant == "none" else f"fake-quant {args.fake_quant} w{args.w_bit}g{args.group_size}"
    return model.to(device), tok, what


def run(args) -> int:
    from tinyq.quant import calib
    from tinyq.quant.evaluate import perplexity, windows
    from tinyq.quant.pipeline import default_device

    try:
        for flag, value, least in (("--window", args.window, 2), ("--batch", args.batch, 1),
                                   ("--max-windows", args.max_windows, 1)):
            if value is not None and value < least:  # before the model is loaded
                raise ValueError(f"{flag} must be at least {least}, got {value}")
        check_search_flags(args)
        # the text first: a missing or empty file is reported before minutes of loading
        text = calib.handbook_text("eval") if args.ppl_handbook else calib.read_text_files(args.ppl_file)
        model, tok, what = load_for_eval(args)
        if tok is None:
            raise ValueError(f"{args.model} has no tokenizer (tokenizer.json, tokenizer.model or vocab.json)")
        wins = windows(calib.encode(tok, text), args.window, args.max_windows)
        ppl = perplexity(model, wins, batch=args.batch, device=args.device or default_device(), progress=not args.quiet)
    except (ValueError, OSError) as exc:  # OSError: a file that cannot be read or written
        print(f"tinyq eval: error: {exc}", file=sys.stderr)
        return 2
    result = {"model": args.model, "mode": what, "perplexity": ppl, "windows": int(wins.shape[0]), "window": args.window}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"perplexity {ppl:.3f} ({what}; {wins.shape[0]} windows of {args.window} tokens)")
    return 0
