"""A/B of the small-M W4A16 GEMM plans per layer: split-K factor, weight rows a tile, in-kernel reduce.

A layer's best split-K factor depends on its shape: gate/up (N = 28672) has 224 tiles of 128 weight
rows, so 8 splits leave each program 4 K steps (all pipeline prologue) and write 8 fp32 partials of
``M x N`` (15 MB at M = 16, a quarter of its weight bytes); o and down (N = 4096) have 32-64 tiles
and need the splits to fill 132 SMs. The shipped plans split only layers with fewer tiles than SMs.

For each layer and M, every variant is timed from CUDA-graph replays over weight copies that exceed
L2, in alternating rounds (medians); prints the time per layer, the best variant per layer and the
four-layer sum of the per-layer best against the shipped plan, and each variant's error against the
float32 reference (max |y - ref| / max |ref|).

    python scripts/ab_split_k.py [--m 4,8,16,32,64,128] [--splits 1,2,4,8] [--block-n 64,128] [--dtypes float16]
"""
from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.bench_w4a16 import SHAPES, random_layers  # noqa: E402
from benchmarks.common import copies_of, environment, graph_ms_rotating  # noqa: E402
from tinyq.kernels.w4a16_configs import launch_plan  # noqa: E402
from tinyq.kernels.w4a16_matmul import w4a16_linear_reference, w4a16_matmul_checked  # noqa: E402


def variants_for(shipped: dict, splits, block_ns):
    """``shipped``: the dispatcher's plan (its split-K only where the tiles leave SMs idle);
    ``always-split``: the same plan splitting every layer; then every split x tile width."""
    out = {"shipped": None, "always-split": ("gemm", dict(shipped, split_below_tiles=0))}
    for s, bn, fused in itertools.product(splits, block_ns, (False, True)):
        if s == 1 and fused:
            continue
        out[f"s{s}-n{bn}{'-f' if fused else ''}"] = ("gemm", dict(shipped, split_k=s, block_n=bn, fused_reduce=fused,
                                                                split_below_tiles=0))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", default="4,8,16,32,64,128")
    ap.add_argument("--splits", default="1,2,4,8")
    ap.add_argument("--block-n", default="64,128")
    ap.add_argument("--dtypes", default="float16")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    print(environment(), flush=True)
    layers = random_layers()
    splits = [int(v) for v in args.splits.split(",")]
    block_ns = [int(v) for v in args.block_n.split(",")]
    for dtype in (getattr(torch, d) for d in args.dtypes.split(",")):
        dl = {name: (qw, s.to(dtype), z.to(dtype)) for name, (qw, s, z) in layers.items()}
        rot = {name: copies_of(dl[name], dl[name][0].numel() * 4) for name in dl}
        for m in (int(v) for v in args.m.split(",")):
            kind, shipped = launch_plan(m, dtype, 0)
            if kind != "gemm":
                print(f"M={m}: shipped plan is {kind}, skipped")
                continue
            variants = variants_for(shipped, splits, block_ns)
            xs = {name: torch.randn(m, k, device="cuda", dtype=dtype) for name, (k, n) in SHAPES.items()}
            refs = {name: w4a16_linear_reference(xs[name], *dl[name]).float() for name in dl}

            def call(v, name, qw, s, z):
                x, cfg = xs[name], variants[v]
                return lambda: w4a16_matmul_checked(x, qw, s, z, config=cfg)

            errs = {}
            for v in variants:
                errs[v] = max(((call(v, name, *dl[name])().float() - refs[name]).abs().max()
                               / refs[name].abs().max()).item() for name in dl)
            runs = {(v, name): [] for v in variants for name in dl}
            for _ in range(args.rounds):
                for v in variants:
                    for name in dl:
                        runs[v, name].append(graph_ms_rotating([call(v, name, *c) for c in rot[name]]) * 1e3)
            med = {key: statistics.median(r) for key, r in runs.items()}
            print(f"\n{str(dtype)[6:]} M={m} shipped {shipped}")
            print(f"{'variant':14s} " + " ".join(f"{name:>9s}" for name in dl) + f" {'sum':>9s}  err")
            for v in variants:
                row = [med[v, name] for name in dl]
                print(f"{v:14s} " + " ".join(f"{t:9.1f}" for t in row) + f" {sum(row):9.1f}  {errs[v]:.1e}")
            best = {name: min(variants, key=lambda v: med[v, name]) for name in dl}
            best_sum = sum(med[best[name], name] for name in dl)
            ship_sum = sum(med["shipped", name] for name in dl)
            print("best per layer: " + ", ".join(f"{name} {best[name]} {med[best[name], name]:.1f}" for name in dl)
                  + f"; sum {best_sum:.1f} us against shipped {ship_sum:.1f} ({ship_sum / best_sum:.3f}x)", flush=True)


if __name__ == "__main__":
    main()
