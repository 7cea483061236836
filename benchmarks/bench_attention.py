"""Attention benchmark: tinyq's Triton kernels vs torch SDPA (flash backend), one run.

32 query heads, 8 kv heads, d=128 (Llama-3-8B), batch 1:
- prefill, causal, S = 1024 and 4096: TFLOP/s (``2 * Hq * S^2 * D`` for the causal half);
- decode, 1 query over caches of 4096 and 32768 tokens: GB/s of K/V read;
- chunked prefill: a 32-token chunk over histories 16 ... 4096 (cache capacity 8192): us.
Timings are ``triton.testing.do_bench`` medians (L2 flushed before each run, so a 4k cache of
16 MiB is read from HBM, as in a real decode step across 32 layers). Each target is marked
met/missed. ``--sweep`` first measures a few launch configs per kernel and shape, prints the
best ones in the format of ``tinyq/kernels/attention_configs.py`` and uses them.

    python benchmarks/bench_attention.py [--sweep] [--dtype fp16|bf16] [--out benchmarks/results/attention_h100.json]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import bench_ms, best_config, environment, graph_ms_rotating, write_json  # noqa: E402
from tinyq.kernels.decode_attention import decode_attention, num_splits_for  # noqa: E402
from tinyq.kernels.flash_attention import attention_reference, flash_attention_fwd  # noqa: E402

HQ, HKV, D = 32, 8, 128
PREFILL_S = (1024, 4096)
DECODE_S = (4096, 32768)
CHUNK, HISTORIES, CHUNK_CAPACITY = 32, (16, 64, 256, 1024, 4096), 8192
PREFILL_TARGET_RATIO = 1.0
DECODE_TARGET_TBS = {4096: 1.5, 32768: 2.5}

FLASH_CANDIDATES = [(128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 3), (128, 128, 8, 2), (128, 32, 4, 4),
                    (64, 64, 4, 3), (64, 128, 4, 3), (64, 64, 4, 4)]
CHUNK_CANDIDATES = [(16, 64, 4, 3), (32, 64, 4, 3), (32, 128, 4, 3), (64, 64, 4, 3), (32, 64, 8, 4), (16, 128, 4, 4)]
DECODE_CANDIDATES = [(bn, w, st) for bn in (32, 64, 128) for w in (4, 8) for st in (2, 3, 4)]
SPLIT_FACTORS = (0.5, 1.0, 2.0)


def sdpa_flash(q, k, v, causal):
    """A zero-arg SDPA call (flash backend) on q [B, Hq, L, D], k/v [B, Hkv, S, D].

    If the flash backend rejects GQA (``enable_gqa``), K/V are expanded to Hq heads here, once,
    outside the timed call, so the baseline is never charged for the copy."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def run(kk, vv, **extra):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, kk, vv, is_causal=causal, **extra)

    try:
        run(k, v, enable_gqa=True)
        return lambda: run(k, v, enable_gqa=True)
    except (RuntimeError, TypeError):
        g = q.shape[1] // k.shape[1]
        ke, ve = k.repeat_interleave(g, 1).contiguous(), v.repeat_interleave(g, 1).contiguous()
        run(ke, ve)
        return lambda: run(ke, ve)


def check(out, ref, what):
    err = (out.float() - ref.float()).abs().max().item()
    if not err <= 2e-2 * ref.float().abs().max().item():
        raise AssertionError(f"{what}: max abs error {err:.3g} vs the reference")


def best_of(candidates, make_fn):
    """``(ms, config)`` of the fastest candidate (see ``benchmarks.common.best_config``)."""
    return best_config(candidates, lambda cfg: bench_ms(make_fn(cfg)))


def bench_prefill(dtype, sweep, rows, tuned):
    for S in PREFILL_S:
        q = torch.randn(1, S, HQ, D, dtype=dtype, device="cuda")
        k = torch.randn(1, S, HKV, D, dtype=dtype, device="cuda")
        v = torch.randn(1, S, HKV, D, dtype=dtype, device="cuda")
        kh, vh = k.transpose(1, 2), v.transpose(1, 2)
        qs, ks, vs = q.transpose(1, 2).contiguous(), kh.contiguous(), vh.contiguous()
        cfg = None
        if sweep:
            res = best_of(FLASH_CANDIDATES, lambda c: (lambda: flash_attention_fwd(q, kh, vh, causal=True, config=c)))
            cfg = res[1]
            tuned.setdefault("prefill", {})[S] = cfg
            print(f"  prefill S={S}: best {cfg} {res[0] * 1e3:.1f} us")
        out = flash_attention_fwd(q, kh, vh, causal=True, config=cfg)
        if S <= 1024:
            check(out, attention_reference(q, kh, vh, causal=True), f"prefill S={S}")
        flops = 2.0 * HQ * S * S * D  # 4 * S^2 * D per head, halved by causality
        t_ours = bench_ms(lambda: flash_attention_fwd(q, kh, vh, causal=True, config=cfg))
        t_sdpa = bench_ms(sdpa_flash(qs, ks, vs, True))
        ratio = t_sdpa / t_ours
        rows.append(dict(kind="prefill", S=S, tinyq_us=t_ours * 1e3, sdpa_us=t_sdpa * 1e3,
                         tinyq_tflops=flops / t_ours / 1e9, sdpa_tflops=flops / t_sdpa / 1e9, ratio=ratio,
                         config=cfg, target=f">= {PREFILL_TARGET_RATIO}x SDPA", met=ratio >= PREFILL_TARGET_RATIO))


def bench_decode(dtype, sweep, rows, tuned):
    for S in DECODE_S:
        nbytes = 2 * HKV * S * D * torch.tensor([], dtype=dtype).element_size()
        copies = max(1, -(-200_000_000 // nbytes))  # >= 200 MB of caches in rotation
        caches = [(torch.randn(1, HKV, S, D, dtype=dtype, device="cuda"),
                   torch.randn(1, HKV, S, D, dtype=dtype, device="cuda")) for _ in range(copies)]
        kc, vc = caches[0]
        q = torch.randn(1, 1, HQ, D, dtype=dtype, device="cuda")
        seq_pos = torch.tensor([S - 1], dtype=torch.int32, device="cuda")
        kw = {}
        if sweep:
            base = num_splits_for(HKV, S, 64, q.device)
            cands = [(c, max(1, int(base * f))) for c in DECODE_CANDIDATES for f in SPLIT_FACTORS]
            grid = [dict(block_n=bn, num_warps=w, num_stages=st, num_splits=splits) for (bn, w, st), splits in cands]
            res = best_config(grid, lambda c_kw: graph_ms_rotating([
                (lambda k=k, v=v: decode_attention(q, k, v, seq_pos, **c_kw)) for k, v in caches]))
            kw = res[1]
            tuned.setdefault("decode", {})[S] = kw
            print(f"  decode S={S}: best {kw} {res[0] * 1e3:.1f} us (default splits {base})")
        out = decode_attention(q, kc, vc, seq_pos, **kw)
        check(out, attention_reference(q, kc, vc, causal=True, kv_len=S), f"decode S={S}")
        t_ours = graph_ms_rotating([(lambda k=k, v=v: decode_attention(q, k, v, seq_pos, **kw)) for k, v in caches])
        qs = q.transpose(1, 2)
        t_sdpa = graph_ms_rotating([sdpa_flash(qs, k, v, False) for k, v in caches])
        tbs = nbytes / t_ours / 1e9
        rows.append(dict(kind="decode", S=S, tinyq_us=t_ours * 1e3, sdpa_us=t_sdpa * 1e3, tinyq_tbs=tbs,
                         sdpa_tbs=nbytes / t_sdpa / 1e9, ratio=t_sdpa / t_ours, config=kw or None,
                         timing="CUDA graph, rotating caches",
                         target=f">= {DECODE_TARGET_TBS[S]} TB/s", met=tbs >= DECODE_TARGET_TBS[S]))


def bench_chunked(dtype, sweep, rows, tuned):
    kc = torch.randn(1, HKV, CHUNK_CAPACITY, D, dtype=dtype, device="cuda")
    vc = torch.randn_like(kc)
    q = torch.randn(1, CHUNK, HQ, D, dtype=dtype, device="cuda")
    cfg = None
    if sweep:
        pos = torch.tensor([HISTORIES[-1]], dtype=torch.int32, device="cuda")
        res = best_of(CHUNK_CANDIDATES, lambda c: (lambda: flash_attention_fwd(q, kc, vc, seq_pos=pos, config=c)))
        cfg = res[1]
        tuned["chunked"] = cfg
        print(f"  chunked (history {HISTORIES[-1]}): best {cfg} {res[0] * 1e3:.1f} us")
    for hist in HISTORIES:
        pos = torch.tensor([hist], dtype=torch.int32, device="cuda")
        out = flash_attention_fwd(q, kc, vc, seq_pos=pos, config=cfg)
        check(out, attention_reference(q, kc, vc, causal=True, kv_len=hist + CHUNK), f"chunk at {hist}")
        t_ours = bench_ms(lambda: flash_attention_fwd(q, kc, vc, seq_pos=pos, config=cfg))
        qs = q.transpose(1, 2)
        ks, vs = kc[:, :, :hist + CHUNK], vc[:, :, :hist + CHUNK]
        mask = torch.arange(hist + CHUNK, device="cuda")[None, :] <= hist + torch.arange(CHUNK, device="cuda")[:, None]
        t_sdpa = bench_ms(lambda: F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, enable_gqa=True))
        rows.append(dict(kind="chunked", S=hist, tinyq_us=t_ours * 1e3, sdpa_us=t_sdpa * 1e3,
                         ratio=t_sdpa / t_ours, config=cfg, target="grows slowly with history", met=None))


def print_table(rows):
    print(f"\n{'kind':8} {'S/hist':>7} {'tinyq us':>9} {'SDPA us':>9} {'tinyq':>14} {'SDPA':>14} {'ratio':>6}  target")
    for r in rows:
        if r["kind"] == "prefill":
            a, b = f"{r['tinyq_tflops']:.0f} TFLOP/s", f"{r['sdpa_tflops']:.0f} TFLOP/s"
        elif r["kind"] == "decode":
            a, b = f"{r['tinyq_tbs']:.2f} TB/s", f"{r['sdpa_tbs']:.2f} TB/s"
        else:
            a = b = ""
        met = {True: "met", False: "MISSED", None: ""}[r["met"]]
        print(f"{r['kind']:8} {r['S']:>7} {r['tinyq_us']:>9.1f} {r['sdpa_us']:>9.1f} {a:>14} {b:>14} "
              f"{r['ratio']:>5.2f}x  {r['target']} {met}")
    chunk = [r for r in rows if r["kind"] == "chunked"]
    if chunk:
        print(f"chunked: time at history {chunk[-1]['S']} / at {chunk[0]['S']} = "
              f"{chunk[-1]['tinyq_us'] / chunk[0]['tinyq_us']:.2f}x")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweep", action="store_true", help="measure launch-config candidates first")
    ap.add_argument("--dtype", choices=("fp16", "bf16"), default="fp16")
    ap.add_argument("--only", choices=("prefill", "decode", "chunked"), default=None)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_attention needs a CUDA GPU")
        return 1
    dtype = torch.float16 if args.dtype == "fp16" else torch.bfloat16
    torch.manual_seed(0)
    rows, tuned = [], {}
    for name, fn in (("prefill", bench_prefill), ("decode", bench_decode), ("chunked", bench_chunked)):
        if args.only in (None, name):
            print(f"{name} ...")
            fn(dtype, args.sweep, rows, tuned)
    print_table(rows)
    if tuned:
        print("\nbest configs (FLASH: BLOCK_M, BLOCK_N, num_warps, num_stages; DECODE: BLOCK_N, num_warps, "
              f"num_stages; splits):\n{tuned}")
    write_json(args.out, dict(env=environment(), dtype=args.dtype, heads=(HQ, HKV, D), rows=rows,
                              tuned={k: {str(kk): vv for kk, vv in v.items()} if isinstance(v, dict) else v
                                     for k, v in tuned.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
