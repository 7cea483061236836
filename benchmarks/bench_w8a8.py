"""W8A8 linear benchmark: tinyq int8 (activation quantization included) vs cuBLAS fp16 vs torch._int_mm.

Llama-3-8B linear shapes (qkv, o, gate_up, down) at M = 1, 16, 256, 4096, or with ``--shapes
siglip-so400m`` the four linears of NVILA's SigLIP tower (hidden 1152, MLP 4304; 17 448-tiles are
M = 17408). Per shape and M, one run:

- ``w8a8``: tinyq's per-token quantization kernel + int8 matmul (what a W8A8Linear costs on a float
  input); ``gemm``: the int8 matmul alone (input already int8, as after a fused norm+quant);
- ``fp16``: cuBLAS (``F.linear``) on the fp16 weight;
- ``int_mm``: ``torch._int_mm`` (cuBLASLt int8 -> int32, no scales; M > 16 only).

Every M is timed from CUDA-graph replays over rotating weight copies (> 3x L2, so weights come from
HBM, and no Python launch cost, which a graphed decode step never pays and a long prefill hides). Also: RMSNorm(+residual) fused with the quantization vs the RMSNorm alone, K = 4096,
graph-timed at every M, and each ``W8A8Linear`` at M=1 called from an eager loop against its graph
replay (the host cost an eager model pays).
``--sweep`` first measures :func:`tinyq.kernels.int8_configs.sweep_candidates` per M bucket and uses
the winners (printed in the format of ``tinyq/kernels/int8_configs.py``).

    python benchmarks/bench_w8a8.py [--sweep] [--shapes llama3-8b|siglip-so400m] [--out benchmarks/results/w8a8_h200.json]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import (  # noqa: E402
    best_config, copies_of, eager_vs_graph, environment, graph_ms_rotating, require_cuda, timed, write_json,
)
from tinyq.kernels.int8_configs import BUCKETS, select_config, sweep_candidates  # noqa: E402
from tinyq.kernels.int8_matmul import int8_matmul  # noqa: E402
from tinyq.kernels.int8_quant import quantize_per_token  # noqa: E402
from tinyq.kernels.rmsnorm import rmsnorm  # noqa: E402
from tinyq.kernels.rmsnorm_quant import rmsnorm_quant  # noqa: E402
from tinyq.quant.int8_format import quantize_weight_int8  # noqa: E402

SHAPE_SETS = {  # name -> {linear: (K, N)}
    "llama3-8b": {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096)},
    "siglip-so400m": {"qkv": (1152, 3456), "o": (1152, 1152), "fc1": (1152, 4304), "fc2": (4304, 1152)},
}
MS = (1, 16, 256, 4096)
# Every M is timed from CUDA-graph replays, as a model's graphed decode or its pipelined prefill runs
# the linears: with do_bench a W8A8 call (two Triton launches, ~120-200 us of Python on the lent H100's
# host) measures the host wherever its GPU time is shorter, e.g. o_proj at M = 4096 (109 us of GEMM).
# Host cost is reported separately (host_cost rows).
GRAPH_MAX_M = 1 << 30
ROTATE_BYTES = 200e6  # > 3x the H200's 60 MB L2
# The targets: W8A8 (quantization included) speedup over cuBLAS fp16, summed over the four linears
TARGET_SPEEDUP = {4096: 1.6, 256: 1.3, 16: 1.5}
NORM_TARGET = 1.1  # fused norm+quant at most 1.1x the norm alone






def make_weights(k, n):
    w16 = (torch.randn(n, k, device="cuda") * 0.02).half()
    q, s = quantize_weight_int8(w16)
    return w16, q.contiguous(), s.contiguous()


def check(x, q, s, cfg=None):
    """Max relative error of the W8A8 output on its first 64 rows against the exact product (fp64 on
    the GPU is exact here: |acc| < 2^53); raises if the int32 accumulator is not exact."""
    xq, sx = quantize_per_token(x)
    y = int8_matmul(xq, q, sx, s, out_dtype=torch.float16, config=cfg)[:64]
    acc = int8_matmul(xq, q, sx, s, out_dtype=torch.int32, config=cfg)[:64]
    exact = xq[:64].double() @ q.double().t()
    if not torch.equal(acc.double(), exact):
        raise RuntimeError("int32 accumulator differs from the exact product")
    ref = exact * sx[:64, None].double() * s[None, :].double()
    return ((y.double() - ref).abs().max() / ref.abs().max()).item()


def w8a8(x, q, s, cfg):
    """What a W8A8Linear does with a float input: quantize per token, then the int8 matmul."""
    xq, sx = quantize_per_token(x)
    return int8_matmul(xq, q, sx, s, config=cfg)


def sweep(weights, rotations, max_m, shapes, open_m=4096, kernels=("gemv", "gemm", "tma")):
    m = max_m if max_m is not None else open_m  # the open-ended bucket at the largest M asked for
    names = ["o", "gate_up"] if m > 256 and "gate_up" in shapes else list(shapes)  # Llama at large M: two of four

    per_shape = {name: (float("inf"), None) for name in names}  # each linear's own best, for the record

    def total_ms(cfg):
        total, alone = 0.0, []
        for name in names:
            k, _ = shapes[name]
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            xq, sx = quantize_per_token(x)
            if check(x, *weights[name][1:], cfg) > 1e-2:
                raise RuntimeError("wrong result")
            t = timed(m, lambda q, s: (lambda: int8_matmul(xq, q, sx, s, config=cfg)), rotations[name], GRAPH_MAX_M)
            per_shape[name] = min(per_shape[name], (t, cfg), key=lambda p: p[0])
            alone.append(f"{name} {t * 1e3:.1f}")
            total += t
        print("    per linear (us): " + ", ".join(alone), end="")  # best_config's line for this config follows
        return total

    candidates = [c for c in sweep_candidates(max_m) if c["kernel"] in kernels]
    shipped = select_config(m, torch.device("cuda"))
    if shipped not in candidates:  # the shipped config is measured in the same run, whatever the kernels swept
        candidates.insert(0, shipped)
    best = best_config(candidates, total_ms, f"M={m}")
    if best is None:  # every candidate failed, the shipped config included
        print(f"  bucket {max_m}: every one of {len(candidates)} candidates failed; the shipped config stays",
              flush=True)
        return None
    ms, cfg = best
    print(f"  bucket {max_m}: best {cfg} ({ms * 1e3:.1f} us at M={m} over {names})", flush=True)
    for name, (t, c) in per_shape.items():
        if c is not None:
            print(f"    {name:8s} alone: best {t * 1e3:.1f} us with {c}", flush=True)
    return cfg


def sweep_kernels(value: str) -> tuple:
    kinds = tuple(v.strip() for v in value.split(",") if v.strip())
    if not kinds or not set(kinds) <= {"gemv", "gemm", "tma"}:
        raise argparse.ArgumentTypeError(f"expected some of gemv, gemm, tma, got {value!r}")
    return kinds


def bucket_of(m):
    return next(b for b in BUCKETS if b is None or m <= b)


def norm_rows(ms, rounds: int = 5):
    """add+RMSNorm alone vs fused with the quantization, K = 4096: GPU time from CUDA-graph replays at
    every M (eager timing at M=4096 measured the fused launcher's Python, 63 us against 36 us of GPU
    time), timed in alternation ``rounds`` times, medians kept."""
    rows = []
    k = 4096
    w = torch.rand(k, device="cuda", dtype=torch.float16) + 0.5
    for m in ms:
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        r = torch.randn(m, k, device="cuda", dtype=torch.float16)
        variants = [(x.clone(), r.clone()) for _ in range(8)]
        t_norm, t_fused, t_quant = [], [], []
        for _ in range(rounds):
            t_norm.append(graph_ms_rotating([(lambda a=a, b=b: rmsnorm(a, w, 1e-5, b)) for a, b in variants]))
            t_fused.append(graph_ms_rotating([(lambda a=a, b=b: rmsnorm_quant(a, w, 1e-5, b)) for a, b in variants]))
            t_quant.append(graph_ms_rotating([(lambda a=a: quantize_per_token(a)) for a, _ in variants]))
        t_norm, t_fused, t_quant = (statistics.median(t) for t in (t_norm, t_fused, t_quant))
        rows.append(dict(m=m, k=k, rmsnorm_us=t_norm * 1e3, rmsnorm_quant_us=t_fused * 1e3,
                         quantize_alone_us=t_quant * 1e3, ratio=t_fused / t_norm))
        print(f"M={m:5d} add+RMSNorm {t_norm*1e3:7.1f} us  +quant fused {t_fused*1e3:7.1f} us  "
              f"({t_fused / t_norm:.2f}x)  quant alone {t_quant*1e3:7.1f} us", flush=True)
    return rows


def host_cost_rows(shapes):
    """A ``W8A8Linear`` call at M=1 (the activation quantization and the int8 GEMV) per shape, as an
    eager loop pays it against its CUDA-graph replay."""
    from tinyq.nn import W8A8Linear

    rows = []
    for name, (k, n) in shapes.items():
        lin = W8A8Linear.from_linear(torch.nn.Linear(k, n, bias=False).to("cuda", torch.float16))
        x = torch.randn(1, k, device="cuda", dtype=torch.float16)
        eager, graph = eager_vs_graph(lambda: lin(x))
        rows.append(dict(op=f"W8A8Linear {name} M=1", eager_us=eager, graph_us=graph, ratio=eager / graph))
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--shapes", default="llama3-8b", choices=sorted(SHAPE_SETS))
    ap.add_argument("--sweep-buckets", default=None,
                    help="comma-separated bucket ends to sweep (e.g. 4,16,64,256,none); default: those of --ms")
    ap.add_argument("--sweep-kernels", default="gemv,gemm,tma", type=sweep_kernels,
                    help="the candidate kernels to sweep: gemv, gemm (pointer loads), tma (tensor descriptors), "
                         "comma-separated")
    args = ap.parse_args()
    require_cuda("bench_w8a8")
    ms = [int(v) for v in args.ms.split(",")]
    torch.manual_seed(0)
    shapes = SHAPE_SETS[args.shapes]
    weights = {name: make_weights(*shapes[name]) for name in shapes}
    rotations = {name: copies_of(weights[name][1:], weights[name][1].numel()) for name in shapes}
    rotations16 = {name: copies_of(weights[name][:1], weights[name][0].numel() * 2) for name in shapes}
    env = environment()
    print(env, flush=True)

    tuned = {}
    if args.sweep:
        buckets = {bucket_of(m) for m in ms}
        if args.sweep_buckets:
            buckets = {None if b == "none" else int(b) for b in args.sweep_buckets.split(",")}
        for b in sorted(buckets, key=lambda v: v or 1 << 30):
            cfg = sweep(weights, rotations, b, shapes, max(max(ms), 257), args.sweep_kernels)
            if cfg is not None:
                tuned[b] = cfg

    rows = []
    for m in ms:
        cfg = tuned.get(bucket_of(m)) or select_config(m, torch.device("cuda"))
        for name, (k, n) in shapes.items():
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            xq, sx = quantize_per_token(x)
            rel = check(x, *weights[name][1:], cfg)
            t_w8a8 = timed(m, lambda q, s: (lambda: w8a8(x, q, s, cfg)), rotations[name], GRAPH_MAX_M)
            t_gemm = timed(m, lambda q, s: (lambda: int8_matmul(xq, q, sx, s, config=cfg)), rotations[name], GRAPH_MAX_M)
            t_fp16 = timed(m, lambda w: (lambda: F.linear(x, w)), rotations16[name], GRAPH_MAX_M)
            t_int_mm = float("nan")
            if m > 16:  # cuBLASLt int8 through torch needs M > 16
                t_int_mm = timed(m, lambda q, s: (lambda: torch._int_mm(xq, q.t())), rotations[name], GRAPH_MAX_M)
            rows.append(dict(m=m, shape=name, k=k, n=n, config=cfg, max_rel_err=rel, w8a8_us=t_w8a8 * 1e3,
                             gemm_only_us=t_gemm * 1e3, cublas_fp16_us=t_fp16 * 1e3, int_mm_us=t_int_mm * 1e3,
                             w8a8_tops=2 * m * n * k / t_w8a8 / 1e9, weight_gbps=n * k / t_w8a8 / 1e6))
            print(f"M={m:5d} {name:8s} w8a8 {t_w8a8*1e3:9.1f} us  gemm {t_gemm*1e3:9.1f}  fp16 {t_fp16*1e3:9.1f}  "
                  f"_int_mm {t_int_mm*1e3:9.1f}  {rows[-1]['w8a8_tops']:6.1f} TOPS  err {rel:.1e}", flush=True)

    host = host_cost_rows(shapes)
    print("\nhost cost (eager wall us/call vs graph replay us/call):")
    for h in host:
        print(f"  {h['op']:28s} eager {h['eager_us']:7.1f}  graph {h['graph_us']:7.1f}  {h['ratio']:5.2f}x")

    print("\nfused add+RMSNorm+quant vs add+RMSNorm (K = 4096):")
    norms = norm_rows(ms)
    sums, summary = {}, []
    for m in ms:
        sel = [r for r in rows if r["m"] == m]
        sums[m] = {key: sum(r[key] for r in sel) for key in ("w8a8_us", "gemm_only_us", "cublas_fp16_us", "int_mm_us")}
        speedup = sums[m]["cublas_fp16_us"] / sums[m]["w8a8_us"]
        target = TARGET_SPEEDUP.get(m) if args.shapes == "llama3-8b" else None  # the targets are Llama's
        summary.append(dict(what=f"M={m}: cuBLAS fp16 / W8A8 incl. quantization, sum of {'+'.join(shapes)}"
                                 f"{'' if args.shapes == 'llama3-8b' else f' ({args.shapes})'}",
                            value=round(speedup, 3), target=f">= {target}" if target else "(reference)",
                            met=(speedup >= target) if target else None))
    for r in norms:
        summary.append(dict(what=f"M={r['m']}: fused add+RMSNorm+quant / add+RMSNorm time", value=round(r["ratio"], 3),
                            target=f"<= {NORM_TARGET}", met=r["ratio"] <= NORM_TARGET))
    for h in host:
        summary.append(dict(what=f"eager/graph {h['op']} float16", value=round(h["ratio"], 3), target="report",
                            met=None))
    write_json(args.out, dict(env=env, shapes={"set": args.shapes, **shapes},
                              timing="every M: CUDA-graph replays over weight copies > "
                              f"{ROTATE_BYTES / 1e6:.0f} MB",
                              rows=rows, norm=norms, host_cost=host, tuned={str(k): v for k, v in tuned.items()},
                              sums=sums,
                              summary=summary))
    if tuned:
        print("\ntuned configs (int8_configs.py format):")
        for b, cfg in tuned.items():
            print(f"    ({b}, dict({', '.join(f'{k}={v!r}' for k, v in cfg.items())})),")
    print(f"\n{env.get('gpu')} torch {env['torch']} triton {env['triton']}; sum of {'+'.join(shapes)} (us):")
    print(f"{'M':>6} {'w8a8':>9} {'gemm':>9} {'cuBLAS':>9} {'_int_mm':>9} {'vs cuBLAS':>9}")
    for m, s in sums.items():
        print(f"{m:6d} {s['w8a8_us']:9.1f} {s['gemm_only_us']:9.1f} {s['cublas_fp16_us']:9.1f} {s['int_mm_us']:9.1f} "
              f"{s['cublas_fp16_us'] / s['w8a8_us']:8.2f}x")
    for row in summary:
        print(row)


if __name__ == "__main__":
    main()
