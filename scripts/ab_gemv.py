"""A/B of M = 1 W4A16 GEMV variants on the four Llama-3-8B linears (qkv, o, gate_up, down; g128), in
one process, alternating rounds, each variant timed from CUDA-graph replays over weight copies
that exceed L2. Prints the median four-layer sum per variant, its runs and its error against the
reference (float32 math rounded to the activations' dtype; max |y - ref| / max |ref| over the four
layers); tinygemm (bf16) is timed in the same rounds as the peer.

    python scripts/ab_gemv.py [--plans 8x1024x8x3,8x1024x4x3] [--modes natural,paired,prologue]

A plan is ``BLOCK_N x BLOCK_K x num_warps x num_stages``. Modes: ``natural`` x as the caller holds
it; ``paired`` x already in the paired layout (as the fused decode ops write it; pairing not
timed); ``prologue`` x paired by :func:`tinyq.kernels.pair_rows.pair_rows` inside the timed graph;
``scaled`` the same with ``scaled=True`` (fp16 pairs over a power of two per row, the fp16 dot).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.bench_w4a16 import SHAPES, tinygemm_pack  # noqa: E402
from benchmarks.common import copies_of, environment, graph_ms_rotating  # noqa: E402
from tinyq.kernels.pair_rows import pair_rows  # noqa: E402
from tinyq.kernels.w4a16_gemv import launch_w4a16_gemv  # noqa: E402
from tinyq.kernels.w4a16_matmul import w4a16_linear_reference  # noqa: E402
from tinyq.quant.format import quantize_weight  # noqa: E402


def parse_plan(text):
    bn, bk, warps, stages = (int(v) for v in text.split("x"))
    return dict(block_n=bn, block_k=bk, num_warps=warps, num_stages=stages, ptx_dequant=True,
                warp_blocks=min(32, bk // 32))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--plans", default="8x1024x8x3")
    ap.add_argument("--modes", default="natural,paired,prologue")
    ap.add_argument("--dtypes", default="float16,bfloat16")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    print(environment(), flush=True)
    layers = {}
    for name, (k, n) in SHAPES.items():
        w = torch.randn(n, k, device="cuda") * 0.02
        layers[name] = quantize_weight(w, 128, torch.float16)
    results = {}
    for dtype in (getattr(torch, d) for d in args.dtypes.split(",")):
        dl = {name: (qw, s.to(dtype), z.to(dtype)) for name, (qw, s, z) in layers.items()}
        rot = {name: copies_of(dl[name], dl[name][0].numel() * 4) for name in dl}
        xs = {name: torch.randn(1, k, device="cuda", dtype=dtype) for name, (k, n) in SHAPES.items()}
        xps = {name: pair_rows(xs[name]) for name in xs}
        ys = {name: torch.empty(1, n, device="cuda", dtype=dtype) for name, (k, n) in SHAPES.items()}
        refs = {name: w4a16_linear_reference(xs[name], *dl[name]).float() for name in dl}

        def call(mode, plan, name, qw, s, z):
            if mode == "natural":
                return lambda: launch_w4a16_gemv(xs[name], qw, s, z, None, ys[name], **plan)
            if mode == "paired":
                return lambda: launch_w4a16_gemv(xps[name], qw, s, z, None, ys[name], **plan)
            scaled = mode == "scaled"
            out = pair_rows(xs[name], scaled=scaled)  # the buffer is allocated outside the graph
            return lambda: launch_w4a16_gemv(pair_rows(xs[name], out, scaled=scaled), qw, s, z, None, ys[name], **plan)

        variants = [(mode, p) for p in args.plans.split(",") for mode in args.modes.split(",")]
        errs = {}
        for mode, p in variants:
            err = 0.0
            for name in dl:
                ys[name].fill_(float("nan"))
                call(mode, parse_plan(p), name, *dl[name])()
                err = max(err, ((ys[name].float() - refs[name]).abs().max() / refs[name].abs().max()).item())
            errs[(mode, p)] = err
        tg = {}
        if dtype == torch.bfloat16:
            for name, (k, n) in SHAPES.items():
                packed = tinygemm_pack(n, k)
                tg[name] = copies_of(packed, packed[0].numel() * 4)
        for _ in range(args.rounds):
            for mode, p in variants:
                plan = parse_plan(p)
                t = sum(graph_ms_rotating([call(mode, plan, name, *c) for c in rot[name]]) for name in dl)
                results.setdefault((str(dtype)[6:], mode, p), []).append(t * 1e3)
            if tg:
                t = sum(graph_ms_rotating([(lambda x=xs[name], wp=wp, sz=sz: torch._weight_int4pack_mm(x, wp, 128, sz))
                                           for wp, sz in tg[name]]) for name in tg)
                results.setdefault((str(dtype)[6:], "tinygemm", "-"), []).append(t * 1e3)
        for (d, mode, p), runs in results.items():
            if d == str(dtype)[6:]:
                err = errs.get((mode, p))
                print(f"{d:9s} {mode:9s} {p:14s} median {statistics.median(runs):7.1f} us  runs "
                      + ", ".join(f"{r:.1f}" for r in runs) + (f"  err {err:.1e}" if err is not None else ""), flush=True)


if __name__ == "__main__":
    main()
