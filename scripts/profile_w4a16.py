"""Profile helper: run W4A16 launch plans once each on one Llama-3-8B shape, for Nsight Compute.

Every plan is warmed up first (compiled), then called exactly once in order, so

    ncu --clock-control none -k regex:"w4a16_(gemm|gemv)_kernel" --launch-skip S --launch-count P \\
        --section SpeedOfLight --section WarpStateStats --section Occupancy \\
        python3 scripts/profile_w4a16.py --m 16 --plans 'gemm:block_m=16,block_n=64,unpack=frag,split_k=4' ...

profiles each plan's main kernel (S = the number of warm-up launches the script prints).
A plan is ``kind:key=value,...`` (kinds and keys of ``tinyq.kernels.w4a16_configs``).
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tinyq.kernels.w4a16_matmul import w4a16_matmul  # noqa: E402
from tinyq.quant.format import quantize_weight  # noqa: E402

DEFAULTS = {"gemv": dict(block_n=8, block_k=1024, num_warps=8, num_stages=3, ptx_dequant=True),
            "gemm": dict(block_m=16, block_n=64, block_k=128, swap_ab=True, unpack="frag", ptx_dequant=True,
                         split_k=1, num_warps=4, num_stages=4)}


def parse_plan(text):
    kind, _, rest = text.partition(":")
    cfg = dict(DEFAULTS[kind])
    for item in filter(None, rest.split(",")):
        key, value = item.split("=")
        cfg[key] = int(value) if value.lstrip("-").isdigit() else (value == "True" if value in ("True", "False") else value)
    return kind, cfg


ap = argparse.ArgumentParser()
ap.add_argument("--k", type=int, default=4096)
ap.add_argument("--n", type=int, default=28672)
ap.add_argument("--m", type=int, default=1)
ap.add_argument("--dtype", default="float16")
ap.add_argument("--plans", nargs="+", required=True)
ap.add_argument("--warmup", type=int, default=2)
args = ap.parse_args()
dtype = getattr(torch, args.dtype)
qw, s, z = quantize_weight(torch.randn(args.n, args.k, device="cuda") * 0.02, 128, dtype)
x = torch.randn(args.m, args.k, device="cuda", dtype=dtype)
plans = [parse_plan(p) for p in args.plans]
for plan in plans:
    for _ in range(args.warmup):
        w4a16_matmul(x, qw, s, z, config=plan)
torch.cuda.synchronize()
print(f"warm-up launches of the main kernels: {args.warmup * len(plans)}", flush=True)
for plan in plans:
    w4a16_matmul(x, qw, s, z, config=plan)
torch.cuda.synchronize()
