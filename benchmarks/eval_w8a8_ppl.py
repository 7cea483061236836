"""Perplexity of SmolLM2-135M-Instruct (the embedded default) under W8A8: fp, W8A8 without smoothing,
and SmoothQuant over a short alpha sweep (per-token activations; the best alpha also with static
per-tensor activation scales).

Text: the Debian Administrator's Handbook (``apt-get install debian-handbook``): evaluation on chapters
1-8, calibration on the other chapters (disjoint; see tinyq/quant/calib.py). Windows of 512 tokens,
non-overlapping; ``--windows`` limits their number (stated in the output). W8A8 runs tinyq's CPU path:
int8 weights and activations, exact int32 products (torch._int_mm), the GPU kernels' integers.

    python benchmarks/eval_w8a8_ppl.py [--windows 40] [--alphas 0.5,0.7,0.85] \
        [--out benchmarks/results/w8a8_ppl_smollm2_cpu.json]
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import environment, write_json  # noqa: E402
from tinyq.quant import calib  # noqa: E402
from tinyq.quant.evaluate import perplexity, windows  # noqa: E402
from tinyq.quant.model_io import load_fp_model  # noqa: E402
from tinyq.quant.smoothquant import calibrate, smooth_  # noqa: E402
from tinyq.quantize import W8A8Config, quantize_  # noqa: E402

WITHIN_FP = 1.02  # the target: SmoothQuant W8A8 within 2% of fp


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--windows", type=int, default=40, help="evaluation windows (default 40)")
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--calib-blocks", type=int, default=32)
    p.add_argument("--calib-len", type=int, default=512)
    p.add_argument("--alphas", default="0.5,0.7,0.85")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--out", default="benchmarks/results/w8a8_ppl_smollm2_cpu.json")
    args = p.parse_args()

    model, tok = load_fp_model("default", dtype=torch.float32)
    wins = windows(calib.encode(tok, calib.handbook_text("eval")), args.window, args.windows)
    blocks = calib.calibration_blocks(tok, calib.handbook_text("calib"), args.calib_blocks, args.calib_len)
    env = environment()
    env["cpu_threads"] = torch.get_num_threads()
    res = {"settings": {**{k: v for k, v in vars(args).items() if k != "out"}, "windows": int(wins.shape[0]),
                        "eval_text": "debian-handbook chapters 1-8", "calib_text": "debian-handbook other chapters",
                        "scored_tokens": int(wins.shape[0] * (args.window - 1))},
           "env": env, "ppl": {}, "seconds": {}, "summary": []}

    def run(key, m):
        t0 = time.time()
        res["ppl"][key] = perplexity(m, wins, batch=args.batch)
        res["seconds"][key] = time.time() - t0
        print(f"{key}: {res['ppl'][key]:.3f}  ({res['seconds'][key]:.0f} s)", flush=True)
        write_json(args.out, res)

    run("fp", model)
    run("w8a8_no_smoothing", quantize_(copy.deepcopy(model), W8A8Config()))
    t0 = time.time()
    stats = calibrate(model, blocks, progress=False)
    res["seconds"]["calibration"] = time.time() - t0
    alphas = [float(a) for a in args.alphas.split(",")]
    smoothed = {}
    for alpha in alphas:
        m = copy.deepcopy(model)
        smoothed[alpha] = smooth_(m, stats, alpha)
        run(f"smoothquant_a{alpha:g}", quantize_(m, W8A8Config()))
    best = min(alphas, key=lambda a: res["ppl"][f"smoothquant_a{a:g}"])
    m = copy.deepcopy(model)
    smooth_(m, stats, best)
    run(f"smoothquant_a{best:g}_static", quantize_(m, W8A8Config(act_quant="tensor", act_scales=smoothed[best])))

    fp, plain = res["ppl"]["fp"], res["ppl"]["w8a8_no_smoothing"]
    sq = res["ppl"][f"smoothquant_a{best:g}"]
    res["best_alpha"] = best
    res["summary"] = [
        {"what": f"SmoothQuant W8A8 (alpha {best:g}, per-token) / fp perplexity", "value": round(sq / fp, 4),
         "target": f"<= {WITHIN_FP}", "met": sq / fp <= WITHIN_FP},
        {"what": "SmoothQuant W8A8 perplexity < W8A8 without smoothing", "value": f"{sq:.3f} vs {plain:.3f}",
         "target": "lower", "met": sq < plain},
        {"what": "W8A8 without smoothing / fp perplexity", "value": round(plain / fp, 4), "target": "(reference)",
         "met": None},
    ]
    write_json(args.out, res)
    for row in res["summary"]:
        print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
