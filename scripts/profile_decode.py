"""Profile helper: the GPU kernels of one decode step (a CUDA-graph replay) of a random-weight model.

    python3 scripts/profile_decode.py --models smollm2,llama3-8b --precision w4a16 --steps 50 [--paired off,on]

Prints, per model, each kernel name with its launches per token and mean time, sorted by total
time; the sum over kernels against the wall time per token says how much is launch gaps.
``--paired off,on`` runs each model with the decode GEMV inputs in their natural layout and paired
(``PAIRED_DECODE``, :mod:`tinyq.kernels.paired`), one after the other in the same process.
``--int8-gemv 8x512x8x3,4x1024x4x1`` (W8A8) runs each model once per M=1 int8 GEMV config
(block_n x block_k x warps x stages, in place of the shipped one), a sweep inside the model:
the GEMVs there follow other kernels' tails, which a benchmark of one GEMV does not see.
"""
import argparse
import collections
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.bench_e2e import GREEDY, GROUP_SIZE, SHAPES, rand_list  # noqa: E402
from benchmarks.common import random_model  # noqa: E402
from tinyq.generate import Generator  # noqa: E402
from tinyq.kernels import int8_configs  # noqa: E402
from tinyq.kernels.w4a16_configs import PAIRED_DECODE, device_arch  # noqa: E402
from tinyq.warmup import warm_up  # noqa: E402


def kernel_table(prof, steps):
    from torch.autograd import DeviceType

    acc = collections.defaultdict(lambda: [0, 0.0])
    for e in prof.events():
        if getattr(e, "device_type", None) != DeviceType.CUDA or getattr(e, "is_user_annotation", False):
            continue
        t = getattr(e, "self_device_time_total", None)
        t = getattr(e, "self_cuda_time_total", 0) if t is None else t
        acc[e.name][0] += 1
        acc[e.name][1] += t or e.time_range.elapsed_us()
    rows = [(name[:70], n / steps, us / steps, us / n) for name, (n, us) in acc.items()]
    return sorted(rows, key=lambda r: -r[2])


def int8_gemv_config(spec: str) -> dict:
    """``"8x512x8x3"`` -> the M=1 GEMV config with block_n 8, block_k 512, 8 warps, 3 stages."""
    bn, bk, warps, stages = (int(v) for v in spec.split("x"))
    return dict(kernel="gemv", block_n=bn, block_k=bk, num_warps=warps, num_stages=stages, dp4a=True)


def profile_model(name, precision, steps, paired=None, int8_gemv=None):
    from torch.profiler import ProfilerActivity, profile

    device = torch.device("cuda")
    arch = device_arch(device)
    if paired is not None:
        PAIRED_DECODE[arch] = paired
    table = int8_configs.CONFIGS[int8_configs.device_arch(device)]
    if int8_gemv is not None:
        table[0] = (table[0][0], int8_gemv_config(int8_gemv))
    gemv_cfg = {k: v for k, v in table[0][1].items() if k != "kernel"} if precision == "w8a8" else {}
    model = random_model(SHAPES[name], precision, device, GROUP_SIZE.get(name, 128))
    gen = Generator(model, None, max_seq_len=256)
    warm_up(gen)
    sampler = gen.sampler(GREEDY)
    logits = gen.prefill(rand_list(4, model.config.vocab_size))
    print(f"{name}: prefill logits finite: {bool(torch.isfinite(logits).all())}, max |l| {logits.abs().max():.3g}")
    tok = gen.first_token(logits, sampler)
    for _ in range(5):
        tok = gen.decode_next(tok, sampler)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        tok = gen.decode_next(tok, sampler)
    torch.cuda.synchronize()
    wall_us = 1e6 * (time.perf_counter() - t0) / steps
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            tok = gen.decode_next(tok, sampler)
        torch.cuda.synchronize()
    rows = kernel_table(prof, steps)
    kernels_us = sum(r[2] for r in rows)
    launches = sum(r[1] for r in rows)
    gemv_note = f"; int8 GEMV {gemv_cfg}" if gemv_cfg else ""
    print(f"\n== {name} {precision} (paired GEMV inputs: {PAIRED_DECODE[arch]}{gemv_note}): "
          f"{wall_us:.1f} us/token wall, {kernels_us:.1f} us of kernels, "
          f"{launches:.0f} launches/token ({(wall_us - kernels_us) / max(launches, 1):.2f} us gap per launch)")
    print(f"{'kernel':70s} {'n/tok':>6s} {'us/tok':>8s} {'us/call':>8s}")
    for r in rows:
        print(f"{r[0]:70s} {r[1]:6.1f} {r[2]:8.1f} {r[3]:8.2f}")
    del gen, model
    torch.cuda.empty_cache()
    return {"model": name, "precision": precision, "paired": PAIRED_DECODE[arch], "int8_gemv": gemv_cfg,
            "wall_us": wall_us, "kernels_us": kernels_us,
            "launches": launches, "kernels": [dict(zip(("name", "per_token", "us_per_token", "us_per_call"), r))
                                              for r in rows]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="smollm2,llama3-8b")
    ap.add_argument("--precision", default="w4a16")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--paired", default="", help="off,on: each model with and without paired GEMV inputs")
    ap.add_argument("--int8-gemv", default="", help="M=1 int8 GEMV configs to run in turn, e.g. 8x512x8x3,4x1024x4x1")
    ap.add_argument("--out")
    args = ap.parse_args()
    modes = [{"off": False, "on": True}[v] for v in args.paired.split(",") if v] or [None]
    gemvs = [v for v in args.int8_gemv.split(",") if v] or [None]
    res = [profile_model(m, args.precision, args.steps, p, g) for m in args.models.split(",") for p in modes
           for g in gemvs]
    print("\nmodel      paired  int8 GEMV                 wall us/token  kernels us/token  int8 GEMVs us/token")
    for r in res:
        gemv = sum(k["us_per_token"] for k in r["kernels"] if k["name"].startswith("_int8_gemv"))
        cfg = "x".join(str(r["int8_gemv"][k]) for k in ("block_n", "block_k", "num_warps", "num_stages")) \
            if r["int8_gemv"] else "-"
        print(f"{r['model']:10s} {str(r['paired']):6s}  {cfg:24s} {r['wall_us']:13.1f} {r['kernels_us']:17.1f} "
              f"{gemv:20.1f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
