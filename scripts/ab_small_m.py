"""A/B of the W4A16 paths for M = 2..8 on the four Llama-3-8B linears (qkv, o, gate_up, down; g128), in
one process, alternating rounds, each variant timed from CUDA-graph replays over weight copies that
exceed L2. Prints, per dtype and M, the median four-layer sum per variant, its ratio to the shipped
M = 1 time, and its error against the float32 reference (max |y - ref| / max |ref|). Variants:

- ``shipped``: the dispatcher's plan for M (the split-K GEMM for M = 2..16 today);
- ``gemv<R>``: the GEMV with R activation rows a program (each weight word unpacked once for R rows;
  the kernel takes 1 or 2 since three and four lost, measured with its 1..4-row form of commit db7afc0);
- ``gemv<R>p``: the same on x paired inside the graph (``pair_rows``; bf16 as scaled fp16 pairs).

    python scripts/ab_small_m.py [--m 2,3,4,8] [--rows 2] [--dtypes float16,bfloat16]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.bench_w4a16 import SHAPES, random_layers  # noqa: E402
from benchmarks.common import copies_of, environment, graph_ms_rotating  # noqa: E402
from tinyq.kernels.pair_rows import pair_rows  # noqa: E402
from tinyq.kernels.w4a16_configs import launch_plan  # noqa: E402
from tinyq.kernels.w4a16_gemv import launch_w4a16_gemv  # noqa: E402
from tinyq.kernels.w4a16_matmul import w4a16_linear_reference, w4a16_matmul_checked  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", default="2,3,4,8")
    ap.add_argument("--rows", default="2")
    ap.add_argument("--dtypes", default="float16,bfloat16")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    print(environment(), flush=True)
    layers = random_layers()
    gemv_plan = launch_plan(1, torch.float16, 0)[1]
    for dtype in (getattr(torch, d) for d in args.dtypes.split(",")):
        dl = {name: (qw, s.to(dtype), z.to(dtype)) for name, (qw, s, z) in layers.items()}
        rot = {name: copies_of(dl[name], dl[name][0].numel() * 4) for name in dl}
        for m in [1] + [int(v) for v in args.m.split(",")]:
            xs = {name: torch.randn(m, k, device="cuda", dtype=dtype) for name, (k, n) in SHAPES.items()}
            ys = {name: torch.empty(m, n, device="cuda", dtype=dtype) for name, (k, n) in SHAPES.items()}
            refs = {name: w4a16_linear_reference(xs[name], *dl[name]).float() for name in dl}
            scaled = dtype == torch.bfloat16
            pairs = {name: pair_rows(xs[name], scaled=scaled) for name in xs}  # buffers outside the graph

            def call(variant, name, qw, s, z):
                x, y = xs[name], ys[name]
                if variant == "shipped":
                    return lambda: w4a16_matmul_checked(x, qw, s, z)
                rows = int(variant[4:].rstrip("p"))
                if variant.endswith("p"):
                    plan = dict(gemv_plan, rows=rows)
                    return lambda: launch_w4a16_gemv(pair_rows(x, pairs[name], scaled=scaled), qw, s, z, None, y,
                                                     **plan)
                plan = dict(launch_plan(1, dtype, 0)[1], rows=rows)
                return lambda: launch_w4a16_gemv(x, qw, s, z, None, y, **plan)

            variants = ["shipped"] + ([] if m == 1 else [f"gemv{r}{p}" for r in args.rows.split(",") if int(r) <= m
                                                         for p in ("", "p")])
            errs = {}
            for v in variants:
                err = 0.0
                for name in dl:
                    ys[name].fill_(float("nan"))
                    out = call(v, name, *dl[name])()
                    out = ys[name] if v != "shipped" else out
                    err = max(err, ((out.float() - refs[name]).abs().max() / refs[name].abs().max()).item())
                errs[v] = err
            runs = {v: [] for v in variants}
            for _ in range(args.rounds):
                for v in variants:
                    runs[v].append(sum(graph_ms_rotating([call(v, name, *c) for c in rot[name]]) for name in dl) * 1e3)
            if m == 1:
                base = statistics.median(runs["shipped"])
            for v in variants:
                med = statistics.median(runs[v])
                print(f"{str(dtype)[6:]:9s} M={m} {v:9s} median {med:7.1f} us  /M=1 {med / base:5.2f}  runs "
                      + ", ".join(f"{t:.1f}" for t in runs[v]) + f"  err {errs[v]:.1e}", flush=True)


if __name__ == "__main__":
    main()
