"""Dense fp16 GEMV (tinyq) vs cuBLAS (F.linear) at M=1 on Llama-3-8B shapes, one run.

Both timed from CUDA-graph replays over weight copies larger than L2 (a decode step runs as a
graph). ``--sweep`` measures launch configs first and prints the winner.

    python benchmarks/bench_dense_gemv.py [--sweep] [--out FILE]
    python benchmarks/bench_dense_gemv.py --sweep-heads [--out FILE]   # configs per small-model output head
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import best_config, copies_of, environment, graph_ms_rotating, require_cuda, write_json  # noqa: E402
from tinyq.kernels.dense_gemv import DEFAULT_CONFIG, dense_gemv, dense_gemv_reference  # noqa: E402

SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096),
          "lm_head": (4096, 128256)}
# Output heads of small models (K = hidden size): the K-aware configs are swept on these.
HEADS = {"smollm2_head": (576, 49152), "qwen2_0.5b_head": (896, 151936), "llama3.2_1b_head": (2048, 128256)}
ROTATE_BYTES = 160e6


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--sweep-heads", action="store_true", help="sweep configs per small-model output head")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    require_cuda("bench_dense_gemv")
    torch.manual_seed(0)
    env = environment()
    if args.sweep_heads:
        return sweep_heads(args.out, env)
    weights = {}
    for name, (k, n) in SHAPES.items():
        w = (torch.randn(n, k, device="cuda") * 0.02).half()
        copies = max(1, int(-(-ROTATE_BYTES // (w.numel() * 2))))
        weights[name] = [w] + [w.clone() for _ in range(copies - 1)]
    xs = {name: torch.randn(1, k, device="cuda", dtype=torch.float16) for name, (k, n) in SHAPES.items()}

    def t_ours(name, cfg):
        return graph_ms_rotating([(lambda w=w: dense_gemv(xs[name], w, config=cfg)) for w in weights[name]])

    cfg = dict(DEFAULT_CONFIG)
    if args.sweep:
        grid = [dict(block_n=bn, block_k=bk, num_warps=nw, num_stages=ns)
                for bn, bk, nw, ns in itertools.product((2, 4, 8, 16), (256, 512, 1024, 2048), (4, 8), (1, 2, 3))
                if bn * bk <= 8192]
        best = best_config(grid, lambda c: sum(t_ours(name, c) for name in ("qkv", "o", "gate_up", "down")))
        cfg = best[1]
        print(f"best {cfg} ({best[0] * 1e3:.1f} us)")
    rows = []
    for name, (k, n) in SHAPES.items():
        x = xs[name]
        y = dense_gemv(x, weights[name][0], config=cfg)
        ref = dense_gemv_reference(x, weights[name][0]).float()
        err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
        ours = t_ours(name, cfg)
        cub = graph_ms_rotating([(lambda w=w: F.linear(x, w)) for w in weights[name]])
        gb = n * k * 2 / 1e9
        rows.append(dict(shape=name, k=k, n=n, tinyq_us=ours * 1e3, cublas_us=cub * 1e3, tinyq_tbs=gb / ours,
                         cublas_tbs=gb / cub, err=err))
        print(f"{name:8s} tinyq {ours * 1e3:7.1f} us {gb / ours:5.2f} TB/s | cuBLAS {cub * 1e3:7.1f} us "
              f"{gb / cub:5.2f} TB/s | {cub / ours:5.2f}x  err {err:.1e}")
    total_q = sum(r["tinyq_us"] for r in rows if r["shape"] != "lm_head")
    total_c = sum(r["cublas_us"] for r in rows if r["shape"] != "lm_head")
    print(f"{env.get('gpu')}: qkv+o+gate_up+down tinyq {total_q:.1f} us, cuBLAS {total_c:.1f} us, "
          f"{total_c / total_q:.2f}x; config {cfg}")
    write_json(args.out, dict(env=env, config=cfg, rows=rows, timing="CUDA graph, rotating weights > 160 MB"))


def sweep_heads(out, env):
    """Best config per small-model output head, timed beside the shipped default and cuBLAS."""
    rows = []
    for name, (k, n) in HEADS.items():
        w = (torch.randn(n, k, device="cuda") * 0.02).half()
        ws = [c[0] for c in copies_of((w,), w.numel() * 2, ROTATE_BYTES)]
        x = torch.randn(1, k, device="cuda", dtype=torch.float16)

        def t(cfg):
            return graph_ms_rotating([(lambda w=w: dense_gemv(x, w, config=cfg)) for w in ws])

        grid = [dict(block_n=bn, block_k=bk, num_warps=nw, num_stages=ns)
                for bn, bk, nw, ns in itertools.product((4, 8, 16, 32, 64), (64, 128, 256, 512, 1024, 2048),
                                                         (4, 8), (1, 3))
                if 1024 <= bn * bk <= 16384 and bk <= max(64, triton.next_power_of_2(k))]
        best_ms, best = best_config(grid, t, name)
        base = t(DEFAULT_CONFIG)
        cub = graph_ms_rotating([(lambda w=w: F.linear(x, w)) for w in ws])
        gb = n * k * 2 / 1e9
        rows.append(dict(shape=name, k=k, n=n, best=best, best_us=best_ms * 1e3, default_us=base * 1e3,
                         cublas_us=cub * 1e3, best_tbs=gb / best_ms))
    for r in rows:
        print(f"{r['shape']:18s} best {r['best_us']:6.1f} us ({r['best_tbs']:.2f} TB/s) {r['best']} | "
              f"default {r['default_us']:6.1f} | cuBLAS {r['cublas_us']:6.1f}")
    summary = [dict(what=f"{r['shape']}: best config vs cuBLAS (F.linear), speedup",
                    value=r["cublas_us"] / r["best_us"], target=1.0, met=r["cublas_us"] >= r["best_us"]) for r in rows]
    write_json(out, dict(env=env, heads=rows, summary=summary, timing="CUDA graph, rotating weights > 160 MB"))


if __name__ == "__main__":
    main()
