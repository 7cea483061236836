"""A/B of W4A16 dequantization plans (int4 -> dense fp16, the large-M path's first half) on the four
Llama-3-8B linears (g128), one process, alternating rounds, each plan timed from CUDA-graph replays of
the four layers in sequence. Prints the median four-layer time and the bandwidth it reaches
(int4 read + fp16 write, scales and zeros aside), and checks every plan's output bit for bit.

    python scripts/ab_dequant.py [--plans 16x512x4,32x256x4,...]

A plan is ``BLOCK_N x BLOCK_K x num_warps``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.bench_w4a16 import SHAPES, random_layers  # noqa: E402
from benchmarks.common import capture_graph, environment, replay_ms  # noqa: E402
from tinyq.kernels.w4a16_dequant import launch_w4a16_dequant  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--plans", default="16x512x4,32x256x4,32x512x4,64x256x4,16x1024x8,32x512x8,64x512x8,8x1024x4")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    print(environment(), flush=True)
    layers = random_layers()
    outs = {name: torch.empty(n, k, device="cuda", dtype=torch.float16) for name, (k, n) in SHAPES.items()}
    plans = [dict(zip(("block_n", "block_k", "num_warps"), map(int, p.split("x")))) for p in args.plans.split(",")]

    def run(plan):
        for name in SHAPES:
            launch_w4a16_dequant(*layers[name], outs[name], **plan)

    run(plans[0])
    ref = {name: outs[name].clone() for name in SHAPES}
    ok = {}
    for i, plan in enumerate(plans):
        for name in SHAPES:
            outs[name].fill_(float("nan"))
        run(plan)
        ok[i] = all(torch.equal(outs[name], ref[name]) for name in SHAPES)
    runs = {i: [] for i in range(len(plans))}
    graphs = {i: capture_graph(lambda p=plan: run(p)) for i, plan in enumerate(plans)}
    for _ in range(args.rounds):
        for i in range(len(plans)):
            runs[i].append(replay_ms(graphs[i]) * 1e3)
    moved = sum(n * k * 2.5 for k, n in SHAPES.values())
    for i, plan in enumerate(plans):
        med = statistics.median(runs[i])
        print(f"{plan['block_n']}x{plan['block_k']}x{plan['num_warps']:<3} median {med:7.1f} us {moved / med / 1e3:6.0f} GB/s"
              f"  runs " + ", ".join(f"{t:.1f}" for t in runs[i]) + ("" if ok[i] else "  MISMATCH"), flush=True)


if __name__ == "__main__":
    main()
