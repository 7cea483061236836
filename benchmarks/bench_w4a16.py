"""W4A16 linear benchmark: tinyq vs cuBLAS fp16 (F.linear) vs torch's tinygemm, one run.

Llama-3-8B linear shapes at M = 1, 16, 2048, 4096; group size 128. tinygemm
(``torch._weight_int4pack_mm``) takes bf16 only, so it runs in bf16; cuBLAS and tinyq in fp16.
Prints medians (us), GB/s (weight + activation bytes), TFLOP/s and ratios; ``--sweep`` first
measures launch-config candidates per M bucket and uses the winners (printed in the format of
``tinyq/kernels/w4a16_configs.py``). Also measures fp16 accumulation (tinyq W4A16 GEMM and the
plain fp16acc GEMM) against fp32 accumulation and cuBLAS at large M.

    python benchmarks/bench_w4a16.py [--sweep] [--out benchmarks/results/w4a16_h100.json]
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import bench_ms, environment, graph_ms_rotating, write_json  # noqa: E402
from tinyq.kernels.fp16acc_gemm import fp16acc_gemm  # noqa: E402
from tinyq.kernels.w4a16_configs import select_config  # noqa: E402
from tinyq.kernels.w4a16_matmul import w4a16_matmul  # noqa: E402
from tinyq.ops.linear import w4a16_linear_reference  # noqa: E402
from tinyq.quant.format import quantize_weight  # noqa: E402

SHAPES = {  # name: (K, N)
    "qkv": (4096, 6144),
    "o": (4096, 4096),
    "gate_up": (4096, 28672),
    "down": (14336, 4096),
    "lm_head": (4096, 128256),
}
MS = (1, 16, 2048, 4096)
G = 128
GRAPH_MAX_M = 16  # at or below this M a call takes microseconds: time CUDA-graph replays (see timed())
ROTATE_BYTES = 160e6  # weight copies in rotation per shape: > 3x the H100's 50 MB L2


def copies_of(tensors, nbytes):
    """``tensors`` plus clones, enough that the set holds ROTATE_BYTES."""
    n = max(1, int(-(-ROTATE_BYTES // nbytes)))
    return [tensors] + [tuple(t.clone() for t in tensors) for _ in range(n - 1)]


def timed(m, make_call, variants):
    """Median ms of ``make_call(*variant)`` over weight ``variants``.

    Small M: CUDA-graph replays over all variants (no Python launch cost, which decode never pays,
    and every call reads its weights from HBM). Large M: do_bench on the first variant (L2 flushed
    between runs; launch cost is noise next to milliseconds of work)."""
    if m <= GRAPH_MAX_M:
        return graph_ms_rotating([make_call(*v) for v in variants])
    return bench_ms(make_call(*variants[0]))


def make_weights(k, n, device="cuda"):
    w = torch.randn(n, k, device=device) * 0.02
    qweight, scales, zeros = quantize_weight(w, G, torch.float16)
    return w.half(), qweight, scales, zeros


def tinygemm_pack(w16):
    """Random int4 weights in torch's tinygemm layout (same shape as ``w16``), or None."""
    try:
        n, k = w16.shape
        q = torch.randint(0, 16, (n, k), dtype=torch.int32, device=w16.device)
        packed_u8 = ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8)
        wp = torch._convert_weight_to_int4pack(packed_u8, 8)
        sz = torch.rand(k // G, n, 2, device=w16.device, dtype=torch.bfloat16)
        return wp, sz
    except Exception as e:  # reported, and the row shows nan
        print(f"tinygemm unavailable: {type(e).__name__}: {e}")
        return None


def tinygemm_fn(packed, x):
    """torch's int4 tinygemm (bf16 activations) as a zero-arg callable, or None."""
    if packed is None:
        return None
    wp, sz = packed
    xb = x.bfloat16()
    try:
        torch._weight_int4pack_mm(xb, wp, G, sz)
    except Exception as e:
        print(f"tinygemm failed: {type(e).__name__}: {e}")
        return None
    return lambda: torch._weight_int4pack_mm(xb, wp, G, sz)


def candidates(m):
    if m <= 4:
        for ptx, bn, bk, nw, ns in itertools.product((True, False), (2, 4, 8), (1024, 2048, 4096), (4, 8), (1, 2, 3)):
            if bn * bk <= 16384 and (ptx or ns == 2):  # [BN, BK/8] fp32 accumulators within registers
                yield dict(kernel="gemv", block_n=bn, block_k=bk, num_warps=nw, num_stages=ns, ptx_dequant=ptx)
    elif m <= 16:
        for ptx, bn, swap, ns in itertools.product((True, False), (32, 64), (False, True), (3, 5)):
            yield dict(kernel="gemm", block_m=16, block_n=bn, block_k=128, swap_ab=swap,
                       unpack="split", ptx_dequant=ptx, num_warps=4, num_stages=ns)
    elif m <= 256:
        for bm, bn, unpack, swap in itertools.product((32, 64, 128), (64, 128), ("reshape", "split", "ptx"), (False, True)):
            if bm <= m:
                yield dict(kernel="gemm", block_m=bm, block_n=bn, block_k=64 if unpack == "reshape" else 128,
                           swap_ab=swap, unpack="split" if unpack == "ptx" else unpack, ptx_dequant=unpack == "ptx",
                           num_warps=4, num_stages=4)
    else:
        big = [  # (block_m, block_n, block_k, swap_ab, unpack, num_warps, num_stages)
            (128, 128, 64, False, "reshape", 4, 4),
            (128, 128, 64, False, "gather", 4, 4),
            (128, 128, 64, False, "gather", 8, 4),
            (128, 256, 64, False, "gather", 8, 3),
            (256, 128, 64, False, "gather", 8, 3),
            (128, 128, 128, False, "split", 8, 3),
            (256, 128, 128, False, "split", 8, 3),
            (128, 256, 128, False, "split", 8, 3),
            (256, 128, 64, True, "gather", 8, 3),
            (128, 128, 64, True, "gather", 4, 4),
            (256, 128, 128, True, "split", 8, 3),
            (128, 128, 128, True, "split", 8, 3),
            (256, 64, 64, False, "gather", 4, 4),
            (256, 128, 64, False, "reshape", 8, 3),
            (128, 128, 128, False, "ptx", 4, 3),
            (128, 128, 128, False, "ptx", 8, 3),
            (128, 256, 128, False, "ptx", 8, 3),
            (256, 128, 128, False, "ptx", 8, 3),
            (128, 128, 128, True, "ptx", 8, 3),
            (256, 128, 128, True, "ptx", 8, 3),
            (128, 256, 128, True, "ptx", 8, 3),
        ]
        for bm, bn, bk, swap, unpack, nw, ns in big:
            yield dict(kernel="gemm", block_m=bm, block_n=bn, block_k=bk, swap_ab=swap,
                       unpack="split" if unpack == "ptx" else unpack, ptx_dequant=unpack == "ptx",
                       num_warps=nw, num_stages=ns, group_m=8)


def sweep(weights, rotations, m, shape_names, rep_ms):
    """Best config for bucket ``m``: lowest summed time over ``shape_names`` (wrong results skipped)."""
    best = None
    for cfg in candidates(m):
        total = 0.0
        try:
            for name in shape_names:
                k, n = SHAPES[name]
                _, qw, s, z = weights[name]
                x = torch.randn(m, k, device="cuda", dtype=torch.float16)
                y = w4a16_matmul(x, qw, s, z, config=cfg)
                ref = w4a16_linear_reference(x[:, :], qw, s, z).float() if m <= 64 or name == "o" else None
                if ref is not None and (y.float() - ref).abs().max() > 1e-2 * ref.abs().max():
                    raise RuntimeError("wrong result")
                total += timed(m, lambda a, b, c: (lambda: w4a16_matmul(x, a, b, c, config=cfg)), rotations[name])
        except Exception as e:  # out of shared memory / registers, or wrong: skip the candidate
            print(f"  skip {cfg}: {type(e).__name__}: {str(e)[:80]}")
            continue
        print(f"  M={m} {total * 1e3:9.1f} us  {cfg}")
        if best is None or total < best[0]:
            best = (total, cfg)
    print(f"  M={m}: best {best[1]} ({best[0] * 1e3:.1f} us over {shape_names})", flush=True)
    return best[1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    args = ap.parse_args()
    ms = [int(v) for v in args.ms.split(",")]
    ms = sorted(ms, key=lambda v: (v < 2048, -v))  # sweep the largest M first; smaller prefill M reuse it
    torch.manual_seed(0)
    weights = {name: make_weights(*SHAPES[name]) for name in SHAPES}
    rotations = {name: copies_of(weights[name][1:], weights[name][1].numel() * 4) for name in SHAPES}
    rotations16 = {name: copies_of(weights[name][:1], weights[name][0].numel() * 2) for name in SHAPES}
    env = environment()
    print(env, flush=True)

    tuned = {}
    if args.sweep:
        for m in ms:
            if m >= 2048 and 4096 in tuned:
                tuned[m] = tuned[4096]
                continue
            names = ["qkv", "o", "gate_up", "down"] if m <= 256 else ["o", "gate_up"]
            tuned[m] = sweep(weights, rotations, m, names, rep_ms=60)

    tinygemm_weights = {}
    rows = []
    for m in ms:
        for name, (k, n) in SHAPES.items():
            w16, qw, s, z = weights[name]
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            cfg = tuned.get(m) or select_config(m, x.device)
            # correctness on this exact shape before timing it
            y = w4a16_matmul(x, qw, s, z, config=cfg)
            ref = w4a16_linear_reference(x, qw, s, z).float()
            rel = ((y.float() - ref).abs().max() / ref.abs().max()).item()
            t_q = timed(m, lambda a, b, c: (lambda: w4a16_matmul(x, a, b, c, config=cfg)), rotations[name])
            t_fp16 = timed(m, lambda w: (lambda: F.linear(x, w)), rotations16[name])
            if name not in tinygemm_weights:
                packed = tinygemm_pack(w16)
                tinygemm_weights[name] = None if packed is None else copies_of(packed, packed[0].numel() * 4)
            tg_variants = tinygemm_weights[name]
            if tg_variants is not None and tinygemm_fn(tg_variants[0], x) is not None:
                t_tg = timed(m, lambda wp, sz: tinygemm_fn((wp, sz), x), tg_variants)
            else:
                t_tg = float("nan")
            wbytes = qw.numel() * 4 + s.numel() * 2 + z.numel() * 2
            io = (m * k + m * n) * 2
            rows.append(dict(m=m, shape=name, k=k, n=n, config=cfg, max_rel_err=rel, tinyq_us=t_q * 1e3,
                             cublas_fp16_us=t_fp16 * 1e3, tinygemm_us=t_tg * 1e3,
                             tinyq_gbps=(wbytes + io) / t_q / 1e6, tinyq_tflops=2 * m * n * k / t_q / 1e9,
                             cublas_tflops=2 * m * n * k / t_fp16 / 1e9))
            print(f"M={m:5d} {name:8s} tinyq {t_q*1e3:9.1f} us  fp16 {t_fp16*1e3:9.1f}  tinygemm {t_tg*1e3:9.1f}"
                  f"  {rows[-1]['tinyq_gbps']:7.0f} GB/s {rows[-1]['tinyq_tflops']:6.1f} TF  err {rel:.1e}", flush=True)

    # fp16 accumulation vs fp32 accumulation at prefill sizes
    acc_rows = []
    for m in [v for v in ms if v >= 2048]:
        for name in ("o", "gate_up"):
            k, n = SHAPES[name]
            w16, qw, s, z = weights[name]
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            cfg = tuned.get(m) or select_config(m, x.device)
            t32 = bench_ms(lambda: w4a16_matmul(x, qw, s, z, config=cfg, acc_fp16=False))
            t16 = bench_ms(lambda: w4a16_matmul(x, qw, s, z, config=cfg, acc_fp16=True))
            g32 = bench_ms(lambda: fp16acc_gemm(x, w16, acc_fp16=False))
            g16 = bench_ms(lambda: fp16acc_gemm(x, w16, acc_fp16=True))
            cub = bench_ms(lambda: F.linear(x, w16))
            acc_rows.append(dict(m=m, shape=name, w4a16_acc32_us=t32 * 1e3, w4a16_acc16_us=t16 * 1e3,
                                 gemm_acc32_us=g32 * 1e3, gemm_acc16_us=g16 * 1e3, cublas_us=cub * 1e3))

    summary = {}
    for m in ms:
        sel = [r for r in rows if r["m"] == m and r["shape"] != "lm_head"]
        summary[m] = {k: sum(r[k] for r in sel) for k in ("tinyq_us", "cublas_fp16_us", "tinygemm_us")}
    write_json(args.out, dict(env=env, group_size=G, timing=f"M <= {GRAPH_MAX_M}: CUDA-graph replays over weight "
                              f"copies > {ROTATE_BYTES / 1e6:.0f} MB; larger M: do_bench median, L2 flushed", rows=rows, fp16_accumulate=acc_rows, tuned=tuned,
                              summary_without_lm_head=summary))
    if tuned:
        print("\ntuned configs (w4a16_configs.py format):")
        for m, cfg in tuned.items():
            print(f"    ({m}, dict({', '.join(f'{k}={v!r}' for k, v in cfg.items())})),")
    print("\nfp16 vs fp32 accumulation (us):")
    for r in acc_rows:
        print(f"  M={r['m']} {r['shape']:8s} w4a16 acc32 {r['w4a16_acc32_us']:8.1f} acc16 {r['w4a16_acc16_us']:8.1f} | "
              f"fp16 gemm acc32 {r['gemm_acc32_us']:8.1f} acc16 {r['gemm_acc16_us']:8.1f} cuBLAS {r['cublas_us']:8.1f}")
    print(f"\n{env.get('gpu')} torch {env['torch']} triton {env['triton']}; sum of qkv+o+gate_up+down (us):")
    print(f"{'M':>6} {'tinyq':>9} {'cuBLAS':>9} {'tinygemm':>9} {'vs cuBLAS':>9} {'vs tg':>7}  target")
    for m, sm in summary.items():
        target = {1: "<= 55 us", 4096: "<= cuBLAS/0.95"}.get(m, "")
        met = ""
        if m == 1:
            met = "MET" if sm["tinyq_us"] <= 55 else "missed"
        elif m == 4096:
            met = "MET" if sm["tinyq_us"] <= sm["cublas_fp16_us"] / 0.95 else "missed"
        print(f"{m:6d} {sm['tinyq_us']:9.1f} {sm['cublas_fp16_us']:9.1f} {sm['tinygemm_us']:9.1f} "
              f"{sm['cublas_fp16_us'] / sm['tinyq_us']:8.2f}x {sm['tinygemm_us'] / sm['tinyq_us']:6.2f}x  {target} {met}")


if __name__ == "__main__":
    main()
