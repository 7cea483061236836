"""Attention benchmark: tinyq's Triton kernels vs every torch SDPA backend a user could pick, one run.

Cases (fp16 by default):
- prefill, causal GQA (32 q / 8 kv heads, d=128, Llama-3-8B), batch 1, S = 1024 and 4096:
  ``flash_attention_fwd``; TFLOP/s = ``2 * Hq * S^2 * D`` (the causal half);
- vision towers, non-causal, 16 heads, no GQA: d=64 S=577 (CLIP ViT-L/14-336), d=72 S=1024
  (SigLIP so400m-448), d=80 S=1025 (32x32 patches + CLS), batch 1 and 16 (tiles);
- decode, 1 query over caches of 4096 and 32768 tokens: ``attend_cache`` (what the runtime runs);
  TB/s of K/V read (the GQA cache's bytes, for every contender);
- chunked prefill: a 32-token chunk over histories 16 ... 4096 in a cache of capacity 8192:
  ``attend_cache`` vs SDPA over the cache prefix with a ``causal_lower_right`` mask.

Baselines: ``F.scaled_dot_product_attention`` under default dispatch and under each of
``sdpa_kernel(CUDNN_ATTENTION | FLASH_ATTENTION | EFFICIENT_ATTENTION)``. A backend first gets the
GQA call (``enable_gqa=True``); if it rejects that, K/V are expanded to Hq heads once, outside the
timing ("expanded"); if it rejects both it is recorded as unavailable with torch's reason. Every
baseline's output is compared with tinyq's (itself checked against the float32 reference), so a
misconfigured baseline cannot win. Targets compare against the FASTEST available backend, named.

Timing: every contender is replayed from a CUDA graph (medians), so no one is charged the host
cost of its launches (the runtime replays graphs too; a Triton launch costs ~15-20 us of Python
time, which do_bench would count for tinyq's small cases). Decode and chunks rotate over cache
copies larger than L2 (> 200 MB), so each call reads HBM as a layer of a real model does. Beside
them, each row records the eager time (one call launched from Python, do_bench) of tinyq and of
every backend: what an uncaptured caller, such as the vision tower, pays. ``--sweep`` first
measures launch configs of tinyq's kernels per shape, prints the winners (format of
``tinyq/kernels/attention_configs.py``) and uses them.

Targets: prefill >= 1.0x and vision >= 0.9x the fastest backend; decode >= 1.5 TB/s at 4k (2.5 at
32k); chunk time at history 4096 <= 3x at 16. ``--out`` JSON: ``env``, ``rows`` (per case: tinyq
and per-backend us with the branch that ran or the reason it could not), ``summary`` (one
``{what, value, target, met}`` per target, printed last).

    python benchmarks/bench_attention.py [--sweep] [--dtype fp16|bf16] [--only prefill|vision|decode|chunked] [--out F.json]
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import bench_ms, best_config, copies_of, environment, graph_ms_rotating, write_json  # noqa: E402
from tinyq.kernels.decode_attention import decode_attention, num_splits_for  # noqa: E402
from tinyq.kernels.flash_attention import attention_reference, flash_attention_fwd  # noqa: E402
from tinyq.ops.attention import attend_cache  # noqa: E402

HQ, HKV, D = 32, 8, 128
PREFILL_S = (1024, 4096)
VISION = ((64, 577, "CLIP ViT-L/14-336"), (72, 1024, "SigLIP so400m-448"), (80, 1025, "32x32 patches + CLS"))
VISION_HEADS, VISION_BATCHES = 16, (1, 16)
DECODE_S = (4096, 32768)
CHUNK, HISTORIES, CHUNK_CAPACITY = 32, (16, 64, 256, 1024, 4096), 8192
PREFILL_TARGET, VISION_TARGET, CHUNK_GROWTH_TARGET = 1.0, 0.9, 3.0
DECODE_TARGET_TBS = {4096: 1.5, 32768: 2.5}

BACKENDS = {"default": None, "cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION",
            "efficient": "EFFICIENT_ATTENTION"}
REF_MAX_SCORES = 2 ** 29  # float32 reference only where its score matrix stays <= 2 GiB
REASON_CHARS = 140
DEVICE = "cuda"

FLASH_CANDIDATES = [(128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 3), (128, 128, 8, 2), (128, 32, 4, 4),
                    (64, 64, 4, 3), (64, 128, 4, 3), (64, 64, 4, 4)]
SPLIT_KV_CANDIDATES = [(bn, w, st) for bn in (32, 64, 128) for w in (4, 8) for st in (2, 3, 4)]
SPLIT_FACTORS = (0.5, 1.0, 2.0)


class Unavailable(Exception):  # a backend that cannot run a case (or ran it wrongly); says why
    pass


def backend_ctx(name):
    attr = BACKENDS[name]
    return contextlib.nullcontext() if attr is None else sdpa_kernel(getattr(SDPBackend, attr))


def max_err(out, ref, rel=2e-2):
    """(max abs error, allowed error) of ``out`` against ``ref``."""
    return (out.float() - ref.float()).abs().max().item(), rel * ref.float().abs().max().item()


def check_if_cheap(out, q, k, v, what, **kw):
    """Raise unless tinyq's ``out`` matches ``attention_reference`` (skipped above REF_MAX_SCORES)."""
    if q.shape[0] * q.shape[1] * q.shape[2] * (kw.get("kv_len") or k.shape[2]) <= REF_MAX_SCORES:
        err, tol = max_err(out, attention_reference(q, k, v, **kw))
        if not err <= tol:  # NaN fails too
            raise AssertionError(f"{what}: tinyq max abs error {err:.3g} vs the float32 reference (allowed {tol:.3g})")


def why(exc, caught):
    """torch's own reason from the warnings it raises before "No available kernel", else the error."""
    lines = [str(w.message).split(" (Triggered internally")[0].strip() for w in caught]
    lines = [s for s in lines if s and "runtime disabled" not in s and not s.endswith("because:")]
    return (" / ".join(dict.fromkeys(lines)) or str(exc).strip().splitlines()[0])[:REASON_CHARS]


def expand(t, g):  # kv head h // g serves q head h, as with enable_gqa
    return t.repeat_interleave(g, dim=1).contiguous()


def discover(q, k, v, ref, kw):
    """Run SDPA once under the current backend context on q ``[B, Hq, L, D]``, k/v ``[B, Hkv, S, D]``:
    the branch that ran ("mha", "gqa", else "expanded"); compares with ``ref`` ``[B, L, Hq, D]``."""
    g = q.shape[1] // k.shape[1]
    reasons = []
    for branch in (("mha",) if g == 1 else ("gqa", "expanded")):
        kk, vv = (expand(k, g), expand(v, g)) if branch == "expanded" else (k, v)
        extra = {"enable_gqa": True} if branch == "gqa" else {}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                out = F.scaled_dot_product_attention(q, kk, vv, **kw, **extra)
            except (RuntimeError, TypeError, ValueError) as e:
                reasons.append((branch, why(e, caught)))
                continue
        err, tol = max_err(out.transpose(1, 2), ref, rel=4e-2)
        if not err <= tol:
            raise Unavailable(f"{branch}: WRONG result, max abs error {err:.3g} vs tinyq (allowed {tol:.3g})")
        return branch
    if len({r for _, r in reasons}) == 1:
        raise Unavailable(reasons[0][1])
    raise Unavailable("; ".join(f"{b}: {r}" for b, r in reasons))


def sdpa_contest(q, kvs, timer, ref, per_backend=None, **kw):
    """``{backend: {"us", "branch"[, "reason"]}}`` of ``F.scaled_dot_product_attention(q, k, v, **kw)``
    over the pairs ``kvs`` (one, or rotating decode caches), ``timer(calls)`` run inside the backend's
    context (which so costs no time); expanded K/V are built here, outside the timing.
    ``per_backend[name]`` replaces keyword arguments for that backend (its branch is then suffixed
    with ``+`` and the replaced names)."""
    g = q.shape[1] // kvs[0][0].shape[1]
    res = {}
    for name in BACKENDS:
        own = (per_backend or {}).get(name, {})
        kw_b = dict(kw, **own)
        with backend_ctx(name):
            try:
                branch = discover(q, *kvs[0], ref, kw_b)
                pairs = [(expand(k, g), expand(v, g)) for k, v in kvs] if branch == "expanded" else kvs
                extra = {"enable_gqa": True} if branch == "gqa" else {}
                fns = [(lambda k=k, v=v: F.scaled_dot_product_attention(q, k, v, **kw_b, **extra)) for k, v in pairs]
                # eager: one call timed as issued from Python (do_bench), host launch cost included
                res[name] = dict(us=timer(fns) * 1e3, eager_us=bench_ms(fns[0]) * 1e3,
                                 branch=branch + "".join(f"+{key}" for key in own))
            except RuntimeError as e:  # e.g. a backend that cannot be captured in a CUDA graph
                res[name] = dict(us=None, branch="unavailable", reason=f"failed: {str(e).strip()[:REASON_CHARS]}")
            except Unavailable as e:
                res[name] = dict(us=None, branch="unavailable", reason=str(e))
    return res


def make_row(kind, case, tinyq_ms, sdpa, eager_call, **extra):
    """One case; ``ratio`` = fastest backend's time / tinyq's (> 1: tinyq faster), also vs default;
    the eager times (tinyq's ``eager_call`` and each backend's, launched from Python) beside them."""
    t = tinyq_ms * 1e3
    avail = {n: r["us"] for n, r in sdpa.items() if r["us"] is not None}
    best = min(avail, key=avail.get) if avail else None
    dflt = sdpa["default"]["us"]
    return dict(kind=kind, case=case, tinyq_us=t, tinyq_eager_us=bench_ms(eager_call) * 1e3, sdpa=sdpa,
                best_backend=best,
                best_us=avail.get(best), ratio=avail[best] / t if best else None,
                ratio_vs_default=dflt / t if dflt else None, **extra)


def sweep_flash(label, call, tuned, key):
    """Fastest FLASH_CANDIDATES config of ``call(config)``; None (shipped table) if all failed."""
    res = best_config(FLASH_CANDIDATES, lambda c: bench_ms(lambda: call(c)), label)
    if res:
        tuned[key] = res[1]
        print(f"  {label}: best {res[1]} {res[0] * 1e3:.1f} us")
    return res[1] if res else None


def cache_call(q, kc, vc, pos, kw):
    """tinyq over the cache: ``attend_cache`` (the runtime's dispatch), or with swept overrides the
    split-KV kernel it dispatches to for these shapes."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    if kw:
        return lambda: decode_attention(q, kc, vc, pos, scale, **kw)
    return lambda: attend_cache(q, kc, vc, pos, scale)


def sweep_split_kv(label, q, caches, pos, timer, tuned, key):
    """Fastest split-KV overrides (tile, warps, stages, splits) for ``q`` over ``caches``; {} if none."""
    base = num_splits_for(HKV, caches[0][0].shape[2], 64, q.device)
    grid = [dict(block_n=bn, num_warps=w, num_stages=st, num_splits=max(1, int(base * f)))
            for bn, w, st in SPLIT_KV_CANDIDATES for f in SPLIT_FACTORS]
    res = best_config(grid, lambda kw: timer([cache_call(q, k, v, pos, kw) for k, v in caches]), label)
    if not res:
        return {}
    tuned[key] = res[1]
    print(f"  {label}: best {res[1]} {res[0] * 1e3:.1f} us (default splits {base})")
    return res[1]


def randn(*shape, dtype):
    return torch.randn(*shape, dtype=dtype, device=DEVICE)


def bench_flash_case(kind, case, q, k, v, causal, flops, sweep, tuned):
    """tinyq ``flash_attention_fwd`` on q ``[B, S, H, D]``, k/v ``[B, S, Hkv, D]`` vs SDPA in its own
    ``[B, H, S, D]`` layout (contiguous copies made here, outside the timing)."""
    kh, vh = k.transpose(1, 2), v.transpose(1, 2)  # heads-first views, as the kernel takes them
    call = lambda cfg: flash_attention_fwd(q, kh, vh, causal=causal, config=cfg)  # noqa: E731
    cfg = sweep_flash(f"{kind} {case}", call, tuned.setdefault(kind, {}), case) if sweep else None
    out = call(cfg)
    check_if_cheap(out, q, kh, vh, f"{kind} {case}", causal=causal)
    t = graph_ms_rotating([lambda: call(cfg)])
    qs, ks, vs = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    sdpa = sdpa_contest(qs, [(ks, vs)], graph_ms_rotating, out, is_causal=causal)
    row = make_row(kind, case, t, sdpa, lambda: call(cfg), config=cfg)
    row.update(tinyq_tflops=flops / t / 1e9, best_tflops=flops / row["best_us"] / 1e6 if row["best_us"] else None)
    return row


def bench_prefill(dtype, sweep, rows, tuned):
    for S in PREFILL_S:
        q, k, v = randn(1, S, HQ, D, dtype=dtype), randn(1, S, HKV, D, dtype=dtype), randn(1, S, HKV, D, dtype=dtype)
        rows.append(bench_flash_case("prefill", f"S={S}", q, k, v, True, 2.0 * HQ * S * S * D, sweep, tuned))


def bench_vision(dtype, sweep, rows, tuned):
    for d, S, model in VISION:
        for B in VISION_BATCHES:
            q, k, v = (randn(B, S, VISION_HEADS, d, dtype=dtype) for _ in range(3))
            flops = 4.0 * B * VISION_HEADS * S * S * d
            row = bench_flash_case("vision", f"d={d} S={S} B={B}", q, k, v, False, flops, sweep, tuned)
            rows.append(dict(row, model=model))


def bench_decode(dtype, sweep, rows, tuned):
    for S in DECODE_S:
        nbytes = 2 * HKV * S * D * torch.tensor([], dtype=dtype).element_size()
        caches = copies_of((randn(1, HKV, S, D, dtype=dtype), randn(1, HKV, S, D, dtype=dtype)), nbytes)
        q = randn(1, 1, HQ, D, dtype=dtype)
        pos = torch.tensor([S - 1], dtype=torch.int32, device=DEVICE)
        kw = sweep_split_kv(f"decode S={S}", q, caches, pos, graph_ms_rotating,
                            tuned.setdefault("decode", {}), f"S={S}") if sweep else {}
        out = cache_call(q, *caches[0], pos, kw)()
        check_if_cheap(out, q, *caches[0], f"decode S={S}", causal=True, kv_len=S)
        t = graph_ms_rotating([cache_call(q, k, v, pos, kw) for k, v in caches])
        sdpa = sdpa_contest(q.transpose(1, 2).contiguous(), caches, graph_ms_rotating, out)
        row = make_row("decode", f"S={S}", t, sdpa, cache_call(q, *caches[0], pos, kw), config=kw or None,
                       timing="CUDA graph, rotating caches")
        row.update(tinyq_tbs=nbytes / t / 1e9, best_tbs=nbytes / row["best_us"] / 1e6 if row["best_us"] else None)
        rows.append(row)


def bench_chunked(dtype, sweep, rows, tuned):
    from torch.nn.attention.bias import causal_lower_right

    kc, vc = randn(1, HKV, CHUNK_CAPACITY, D, dtype=dtype), randn(1, HKV, CHUNK_CAPACITY, D, dtype=dtype)
    caches = copies_of((kc, vc), 2 * kc.numel() * kc.element_size())  # > L2: every layer reads its own cache
    q, kw = randn(1, CHUNK, HQ, D, dtype=dtype), {}
    qs = q.transpose(1, 2).contiguous()
    if sweep:  # tuned at the longest history, where the kernel's launch shape matters most
        pos = torch.tensor([HISTORIES[-1]], dtype=torch.int32, device=DEVICE)
        kw = sweep_split_kv(f"chunked history {HISTORIES[-1]}", q, caches, pos, graph_ms_rotating, tuned, "chunked")
    for hist in HISTORIES:
        n = hist + CHUNK
        pos = torch.tensor([hist], dtype=torch.int32, device=DEVICE)
        call = cache_call(q, kc, vc, pos, kw)
        out = call()
        check_if_cheap(out, q, kc, vc, f"chunk at {hist}", causal=True, kv_len=n)
        t = graph_ms_rotating([cache_call(q, k, v, pos, kw) for k, v in caches])
        mask = causal_lower_right(CHUNK, n)  # the chunk's queries sit at the end of the keys
        # torch runs a lower-right causal bias on the flash or efficient kernel; with only cuDNN enabled
        # it would build a dense boolean mask inside every call (and SDPA would turn it into an
        # additive one): give cuDNN the additive mask built once, here, outside the timing (its branch
        # reads "+attn_mask")
        allowed = torch.ones(CHUNK, n, dtype=torch.bool, device=DEVICE).tril(n - CHUNK)
        dense = {"attn_mask": torch.zeros(CHUNK, n, dtype=dtype, device=DEVICE).masked_fill(~allowed, float("-inf"))}
        sdpa = sdpa_contest(qs, [(k[:, :, :n], v[:, :, :n]) for k, v in caches], graph_ms_rotating, out,
                            per_backend={"cudnn": dense}, attn_mask=mask)
        rows.append(make_row("chunked", f"hist={hist}", t, sdpa, call, config=kw or None,
                             timing="CUDA graph, rotating caches"))


def fmt(x, spec=".1f"):
    return "-" if x is None else format(x, spec)


def print_table(rows):
    names = list(BACKENDS)
    print(f"\n{'kind':8} {'case':18} {'tinyq us':>9} " + " ".join(f"{n + ' us':>13}" for n in names)
          + f" {'best':>9} {'ratio':>6} {'vs dflt':>7} {'eager: tinyq':>12} {'dflt':>7}  tinyq / best")
    reasons = {}
    for r in rows:
        cells = []
        for n in names:
            s = r["sdpa"][n]
            if s["us"] is None:
                reasons.setdefault((n, s["reason"]), []).append(f"{r['kind']} {r['case']}")
            cells.append(f"{'n/a' if s['us'] is None else fmt(s['us']) + ('*' if s['branch'] == 'expanded' else ''):>13}")
        metric = (f"{r['tinyq_tflops']:.0f} / {fmt(r['best_tflops'], '.0f')} TFLOP/s" if "tinyq_tflops" in r else
                  f"{r['tinyq_tbs']:.2f} / {fmt(r['best_tbs'], '.2f')} TB/s" if "tinyq_tbs" in r else "")
        print(f"{r['kind']:8} {r['case']:18} {r['tinyq_us']:>9.1f} " + " ".join(cells)
              + f" {r['best_backend'] or '-':>9} {fmt(r['ratio'], '.2f'):>5}x {fmt(r['ratio_vs_default'], '.2f'):>6}x"
              + f" {r['tinyq_eager_us']:>12.1f} {fmt(r['sdpa']['default'].get('eager_us')):>7}  {metric}")
    print("ratio = fastest SDPA backend time / tinyq time (> 1: tinyq faster), both replayed from CUDA graphs; "
          "eager = one call launched from Python (do_bench), host cost included; * = K/V expanded to Hq heads "
          "outside the timing (the backend rejects enable_gqa)")
    for (n, reason), cases in reasons.items():
        more = f", ... ({len(cases)} cases)" if len(cases) > 3 else ""
        print(f"  {n} n/a for {', '.join(cases[:3])}{more}: {reason}")


def target(what, value, op, goal):
    met = value is not None and (value >= goal if op == ">=" else value <= goal)
    return dict(what=what, value=None if value is None else round(value, 3), target=f"{op} {goal}", met=met)


def summarize(rows):
    """One row per target: prefill and vision speedups over the fastest backend, decode TB/s, chunk growth."""
    out = []
    for r in rows:
        vs = f"vs fastest SDPA ({r['best_backend']})"
        if r["kind"] == "prefill":
            out.append(target(f"prefill causal {r['case']} {vs}", r["ratio"], ">=", PREFILL_TARGET))
        elif r["kind"] == "vision":
            out.append(target(f"vision {r['case']} ({r['model']}) {vs}", r["ratio"], ">=", VISION_TARGET))
        elif r["kind"] == "decode":
            S = int(r["case"].split("=")[1])
            out.append(target(f"decode {r['case']} TB/s of K/V (fastest SDPA {r['best_backend']}: "
                              f"{fmt(r['best_tbs'], '.2f')})", r["tinyq_tbs"], ">=", DECODE_TARGET_TBS[S]))
    chunk = [r for r in rows if r["kind"] == "chunked"]
    if chunk:
        out.append(target(f"chunked tinyq time at {chunk[-1]['case']} / at {chunk[0]['case']} (fastest SDPA at "
                           f"{chunk[-1]['case']}: {chunk[-1]['best_backend']}, {fmt(chunk[-1]['ratio'], '.2f')}x)",
                           chunk[-1]["tinyq_us"] / chunk[0]["tinyq_us"], "<=", CHUNK_GROWTH_TARGET))
    return out


def print_summary(summary):
    print(f"\n{'value':>8} {'target':>8}  {'':6}  summary (bench_attention)")
    for s in summary:
        print(f"{fmt(s['value'], '.2f'):>8} {s['target']:>8}  {'met' if s['met'] else 'MISSED':6}  {s['what']}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweep", action="store_true", help="measure launch-config candidates first")
    ap.add_argument("--dtype", choices=("fp16", "bf16"), default="fp16")
    ap.add_argument("--only", choices=("prefill", "vision", "decode", "chunked"), default=None)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_attention needs a CUDA GPU")
        return 1
    dtype = torch.float16 if args.dtype == "fp16" else torch.bfloat16
    torch.manual_seed(0)
    rows, tuned = [], {}
    parts = (("prefill", bench_prefill), ("vision", bench_vision), ("decode", bench_decode), ("chunked", bench_chunked))
    for name, fn in parts:
        if args.only in (None, name):
            print(f"{name} ...", flush=True)
            fn(dtype, args.sweep, rows, tuned)
    print_table(rows)
    if tuned:
        print("\nbest configs (flash: BLOCK_M, BLOCK_N, num_warps, num_stages; split-KV: overrides):")
        print("\n".join(f"  {kind}: {v}" for kind, v in tuned.items()))
    summary = summarize(rows)
    write_json(args.out, dict(env=environment(), dtype=args.dtype, backends=list(BACKENDS), rows=rows,
                              tuned=tuned, summary=summary))
    print_summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
