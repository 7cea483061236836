"""``tinyq quantize``: AWQ (or RTN) 4-bit quantization of a Llama/Qwen2 model into a checkpoint.

Examples::

    python -m tinyq quantize --model default --out smollm2-awq           # AWQ, w4, g64
    python -m tinyq quantize --model ./Llama-3-8B --group-size 128 --calib-file corpus/ --out llama3-awq
    python -m tinyq quantize --model ./Llama-3-8B --method rtn --format awq --out llama3-rtn-autoawq
    python -m tinyq quantize --model default --method smoothquant --alpha 0.85 --out smollm2-w8a8   # W8A8
"""
from __future__ import annotations

import argparse
import sys

from tinyq.quant.format import GROUP_SIZES
from tinyq.quant.smoothquant import DEFAULT_ALPHA


def add_calibration_args(p: argparse.ArgumentParser) -> None:
    """Flags shared by ``quantize`` and ``eval`` (for its on-the-fly AWQ)."""
    g = p.add_argument_group("AWQ search")
    g.add_argument("--calib-file", nargs="+", metavar="PATH",
                   help="calibration text: files or directories (.txt/.md/.rst/.html); default: the Debian handbook's "
                        "calibration chapters if installed (apt-get install debian-handbook), else Python stdlib docstrings")
    g.add_argument("--calib-blocks", type=int, default=128, help="number of calibration blocks (default 128)")
    g.add_argument("--calib-len", type=int, default=512, help="tokens per calibration block (default 512)")
    g.add_argument("--search-blocks", type=int, default=None,
                   help="blocks the scale-search losses use (default: all on a GPU, 8 on a CPU; statistics use all)")
    g.add_argument("--no-clip", action="store_true", help="skip the clip search")
    g.add_argument("--no-duo-scaling", action="store_true", help="s = mean|x|^a instead of mean|x|^a / mean|w|^(1-a)")
    g.add_argument("--n-grid", type=int, default=20, help="alpha grid points of the scale search (default 20)")
    g.add_argument("--load-search", metavar="FILE", help="apply saved search results instead of searching")
    g.add_argument("--save-search", metavar="FILE", help="also save the search results to FILE (safetensors)")
    g.add_argument("--device", help="where the search runs (default: cuda if available, else cpu)")
    g.add_argument("--quiet", action="store_true", help="no progress output")


def job_from_args(args, method: str):
    from tinyq.quant.awq import AwqConfig
    from tinyq.quant.pipeline import CalibConfig, QuantizeJob

    return QuantizeJob(
        model=args.model,
        method=method,
        awq=AwqConfig(w_bit=args.w_bit, group_size=args.group_size, n_grid=args.n_grid,
                      duo_scaling=not args.no_duo_scaling, clip=not args.no_clip, search_blocks=args.search_blocks),
        calib=CalibConfig(files=args.calib_file, n_blocks=args.calib_blocks, block_len=args.calib_len),
        device=args.device,
        load_search=args.load_search,
        save_search=args.save_search,
        progress=not args.quiet,
    )


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "quantize", help="AWQ/RTN 4-bit quantization into a tinyq (or AutoAWQ) checkpoint",
        description="Quantize a Llama/Qwen2 model's decoder linears to 4 bits with AWQ (activation-aware scale and "
                    "clip search) or RTN, and write a checkpoint directory (atomically).",
    )
    p.add_argument("--model", default="default", help="'default' (embedded SmolLM2-135M-Instruct), a .gguf file "
                                                      "or an HF model directory (default: default)")
    p.add_argument("--w-bit", type=int, default=4, choices=(3, 4),
                   help="weight bits (default 4; 3 only with --save-search and no --out: 3-bit has no kernel)")
    p.add_argument("--group-size", type=int, default=64, choices=GROUP_SIZES, help="quantization group size (default 64)")
    p.add_argument("--method", default="awq", choices=("awq", "rtn", "smoothquant"),
                   help="awq (default) or rtn (round-to-nearest) for W4A16; smoothquant for W8A8 (int8 weights and "
                        "activations)")
    p.add_argument("--alpha", type=float, default=None,
                   help=f"SmoothQuant migration strength in [0, 1] (default {DEFAULT_ALPHA}); --no-smooth for plain W8A8")
    p.add_argument("--no-smooth", action="store_true", help="smoothquant method without smoothing (W8A8 RTN)")
    p.add_argument("--act-quant", default=None, choices=("token", "tensor"),
                   help="W8A8 activation scales: dynamic per token (default) or static per tensor from calibration")
    p.add_argument("--out", metavar="DIR", help="output checkpoint directory")
    p.add_argument("--format", default="tinyq", choices=("tinyq", "awq"),
                   help="tinyq (default) or awq: AutoAWQ 'gemm' layout that transformers 4.x/5.x, AutoAWQ and vLLM "
                        "load (see the README's AWQ section)")
    add_calibration_args(p)
    return p


def run(args) -> int:
    from tinyq.quant.checkpoint import SEARCH_RESULTS
    from tinyq.quant.pipeline import prepare, quantize_to_checkpoint

    try:
        check_w8a8_flags(args)  # before a model is loaded and calibrated
        check_search_flags(args)
        job = job_from_args(args, args.method)
        if args.out is None:
            if not args.save_search or args.method != "awq":
                raise ValueError("give --out DIR (or, for a search only, --method awq --save-search FILE)")
            prepare(job)
            print(f"search results saved to {args.save_search}")
            return 0
        if args.method == "smoothquant":
            return _smoothquant(args, job)
        summary = quantize_to_checkpoint(job, args.out, args.format)
    except (ValueError, OSError) as exc:  # OSError: a path (--out, --save-search, ...) that cannot be used
        print(f"tinyq quantize: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.format} W4A16 checkpoint ({args.method}, g{args.group_size}) to {summary['path']}")
    if args.method == "awq":  # for --load-search; kept out of the weights' folder level
        print(f"AWQ search results: {summary['path']}/{SEARCH_RESULTS}")
    return 0


def check_w8a8_flags(args) -> None:
    """The SmoothQuant flags belong to --method smoothquant, agree with each other and are in range."""
    given = [flag for flag, value in (("--alpha", args.alpha), ("--no-smooth", args.no_smooth or None),
                                      ("--act-quant", args.act_quant)) if value is not None]
    if args.method != "smoothquant" and given:
        raise ValueError(f"{', '.join(given)}: for --method smoothquant only (got --method {args.method})")
    if args.no_smooth and args.alpha is not None:
        raise ValueError("--alpha sets the smoothing that --no-smooth turns off: give one of them")
    if args.alpha is not None and not 0.0 <= args.alpha <= 1.0:
        raise ValueError(f"--alpha must be in [0, 1], got {args.alpha}")
    if args.method == "smoothquant" and args.format != "tinyq":
        raise ValueError("W8A8 checkpoints are written in the tinyq format only (--format tinyq)")
    if args.method == "smoothquant" and args.w_bit != 4:
        raise ValueError("--w-bit is for the 4-bit methods (awq, rtn); smoothquant writes int8 weights")
    search = [flag for flag, value in (("--save-search", args.save_search), ("--load-search", args.load_search)) if value]
    if args.method != "awq" and search:
        raise ValueError(f"{', '.join(search)}: for --method awq only (got --method {args.method})")


def check_search_flags(args) -> None:
    """``--save-search`` names a file that can be written, ``--load-search`` a search-results file
    for these bits and group size: found before the model is loaded and searched, not after."""
    from tinyq.quant.awq import AwqConfig
    from tinyq.quant.pipeline import check_new_file, check_search_file

    if args.save_search:
        check_new_file(args.save_search, "--save-search")
    if args.load_search:
        check_search_file(args.load_search, AwqConfig(w_bit=args.w_bit, group_size=args.group_size), "--load-search")


def _smoothquant(args, job) -> int:
    from tinyq.quant.w8a8_checkpoint import smoothquant_to_checkpoint

    alpha = None if args.no_smooth else (DEFAULT_ALPHA if args.alpha is None else args.alpha)
    act_quant = args.act_quant or "token"
    summary = smoothquant_to_checkpoint(job, args.out, alpha, act_quant)
    what = "no smoothing" if alpha is None else f"alpha {alpha:g}"
    print(f"wrote W8A8 checkpoint (smoothquant, {what}, {act_quant} activation scales) to {summary['path']}")
    return 0
