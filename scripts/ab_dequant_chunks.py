"""A/B of the large-M W4A16 path (dequantize into a scratch buffer, then cuBLAS) against cuBLAS fp16 on
the four Llama-3-8B linears (qkv, o, gate_up, down; g128), in one process, alternating rounds, each
variant timed from CUDA-graph replays of the four layers in sequence (116 MB of int4 weights, more
than L2). Variants:

- ``cublas``: ``torch.mm`` on dense fp16 weights (the fp16 model's cost);
- ``whole``: the shipped path, each layer dequantized whole, then one ``torch.mm``;
- ``chunk<R>``: each layer's weight rows in chunks of R, dequantized into one of two scratch tiles
  (R x K) and multiplied into ``y[:, rows]``, on one stream: a chunk small enough for L2 is read back
  by cuBLAS from L2, and its dirty lines are overwritten before they are written back;
- ``chunk<R>s``: the same with the dequantization on a second stream, chunk i + 1 dequantized while
  cuBLAS multiplies chunk i (events order the two buffers).

    python scripts/ab_dequant_chunks.py [--m 256,1024,4096] [--rows 1024,2048,4096]

Prints the median four-layer sum per variant, its ratio to cuBLAS and its error against ``whole``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.bench_w4a16 import SHAPES  # noqa: E402
from benchmarks.common import capture_graph, environment, replay_ms  # noqa: E402
from tinyq.kernels.w4a16_configs import launch_plan  # noqa: E402
from tinyq.kernels.w4a16_dequant import launch_w4a16_dequant  # noqa: E402
from tinyq.quant.format import quantize_weight  # noqa: E402


def chunked(x, layer, y, bufs, rows, side=None):
    """y = x @ W.T through row chunks of W dequantized into ``bufs`` (two [rows, K] tiles)."""
    qw, s, z = layer
    n = qw.shape[0]
    cfg = launch_plan(4096, x.dtype, x.get_device())[1]
    main = torch.cuda.current_stream()
    if side is not None:
        side.wait_stream(main)
    freed = [None, None]
    for i, n0 in enumerate(range(0, n, rows)):
        n1 = min(n, n0 + rows)
        w = bufs[i % 2][: n1 - n0]
        if side is None:
            launch_w4a16_dequant(qw[n0:n1], s[n0:n1], z[n0:n1], w, **cfg)
        else:
            with torch.cuda.stream(side):
                if freed[i % 2] is not None:
                    side.wait_event(freed[i % 2])
                launch_w4a16_dequant(qw[n0:n1], s[n0:n1], z[n0:n1], w, **cfg)
                ready = torch.cuda.Event()
                ready.record(side)
            main.wait_event(ready)
        torch.mm(x, w.t(), out=y[:, n0:n1])
        if side is not None:
            freed[i % 2] = torch.cuda.Event()
            freed[i % 2].record(main)
    if side is not None:
        main.wait_stream(side)
    return y


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", default="256,512,1024,2304,4096")
    ap.add_argument("--rows", default="1024,2048,4096")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    print(environment(), flush=True)
    dtype = torch.float16
    layers, dense = {}, {}
    for name, (k, n) in SHAPES.items():
        w = torch.randn(n, k, device="cuda") * 0.02
        layers[name] = quantize_weight(w, 128, dtype)
        dense[name] = w.to(dtype)
    kmax = max(k for k, n in SHAPES.values())
    side = torch.cuda.Stream()
    whole_buf = torch.empty(max(n * k for k, n in SHAPES.values()), dtype=dtype, device="cuda")
    row_opts = [int(r) for r in args.rows.split(",")]
    tiles = {r: [torch.empty(r * kmax, dtype=dtype, device="cuda") for _ in range(2)] for r in row_opts}
    cfg = launch_plan(4096, dtype, 0)[1]
    for m in (int(v) for v in args.m.split(",")):
        xs = {name: torch.randn(m, k, device="cuda", dtype=dtype) for name, (k, n) in SHAPES.items()}
        ys = {name: torch.empty(m, n, device="cuda", dtype=dtype) for name, (k, n) in SHAPES.items()}

        def whole(name):
            qw, s, z = layers[name]
            n, k = qw.shape[0], qw.shape[1] * 8
            w = whole_buf[: n * k].view(n, k)
            launch_w4a16_dequant(qw, s, z, w, **cfg)
            torch.mm(xs[name], w.t(), out=ys[name])

        def dequant_only(name):
            qw, s, z = layers[name]
            n, k = qw.shape[0], qw.shape[1] * 8
            launch_w4a16_dequant(qw, s, z, whole_buf[: n * k].view(n, k), **cfg)

        def make(variant):
            if variant == "dequant":
                return lambda: [dequant_only(nm) for nm in SHAPES]
            if variant == "cublas":
                return lambda: [torch.mm(xs[nm], dense[nm].t(), out=ys[nm]) for nm in SHAPES]
            if variant == "whole":
                return lambda: [whole(nm) for nm in SHAPES]
            two = variant.endswith("s")
            r = int(variant[5:].rstrip("s"))
            return lambda: [chunked(xs[nm], layers[nm], ys[nm],
                                    [t[: r * SHAPES[nm][0]].view(r, SHAPES[nm][0]) for t in tiles[r]], r,
                                    side if two else None) for nm in SHAPES]

        variants = ["cublas", "whole"] + [f"chunk{r}{t}" for r in row_opts for t in ("", "s")] + ["dequant"]
        make("whole")()
        ref = {nm: ys[nm].clone() for nm in SHAPES}
        errs = {}
        for v in variants[2:-1]:
            for nm in SHAPES:
                ys[nm].fill_(float("nan"))
            make(v)()
            torch.cuda.synchronize()
            errs[v] = max((ys[nm].float() - ref[nm].float()).abs().max().item() for nm in SHAPES)
        runs = {v: [] for v in variants}
        for _ in range(args.rounds):
            for v in variants:
                runs[v].append(replay_ms(capture_graph(make(v))) * 1e3)
        base = statistics.median(runs["cublas"])
        moved = sum(n * k * 2.5 for k, n in SHAPES.values())  # int4 read + fp16 write (scales aside)
        for v in variants:
            med = statistics.median(runs[v])
            if v == "dequant":
                print(f"M={m:5d} dequant alone {med:8.1f} us  {moved / med / 1e3:6.0f} GB/s", flush=True)
                continue
            print(f"M={m:5d} {v:12s} median {med:8.1f} us  cuBLAS/this {base / med:5.3f}  runs "
                  + ", ".join(f"{t:.1f}" for t in runs[v]) + (f"  max|diff| {errs[v]:.1e}" if v in errs else ""),
                  flush=True)


if __name__ == "__main__":
    main()
