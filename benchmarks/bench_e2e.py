"""End-to-end LLM benchmark, TinyChat's method (mit-han-lab/llm-awq, `tinychat/benchmark.py` and `benchmark_context.py`), with HF
transformers fp16 measured in the same run as the baseline.

Random weights in Llama-3-8B and Qwen2-7B shapes, built directly on the GPU (no checkpoint files):

* decode: 4-token context, then greedy steps (256 by default), batch 1: ms/token;
* TTFT: one forward over N prompt tokens through the last token's logits, mean of 10, synced;
* context streaming: prefill a history untimed, then time a 32-token question at its end;
* peak GPU memory of W4A16 Llama-3-8B holding a 4k context (load + 4k prefill + decode).

    python benchmarks/bench_e2e.py                          # everything, ~5 min on an H100
    python benchmarks/bench_e2e.py --models llama3-8b --precisions w4a16 --tests decode --skip-hf
    python benchmarks/bench_e2e.py --out benchmarks/results/e2e_h100.json
    python benchmarks/bench_e2e.py --tiny --device cpu      # smoke test of the script itself
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tinyq.generate import Generator  # noqa: E402
from tinyq.models.llama import CausalLM, ModelConfig  # noqa: E402
from tinyq.nn.dense_linear import DenseLinear  # noqa: E402
from tinyq.models.w8a8 import use_w8a8_layers  # noqa: E402
from tinyq.nn.w4a16_linear import W4A16Linear  # noqa: E402
from tinyq.nn.w8a8_linear import W8A8Linear  # noqa: E402

SHAPES = {
    "llama3-8b": dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256, hidden_size=4096,
                      intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=8192),
    "qwen2-7b": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=152064, hidden_size=3584,
                     intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                     rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=32768, attention_bias=True),
    "tiny": dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=512, hidden_size=128,
                 intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=8192),
}
TARGETS = {  # (metric, limit, "<=" or ">=") from the issue
    "decode_ms_w4a16": 2.0, "decode_ms_fp16": 6.0, "ttft_speedup": 1.3, "stream_ratio": 1.2, "peak_gb_w4a16": 6.5,
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def random_model(hf_cfg: dict, precision: str, device, group_size: int) -> CausalLM:
    """A :class:`CausalLM` with random weights made directly on ``device``: fp16 linears with
    std 0.02, or random int4 codes with scales giving the same spread."""
    cfg = ModelConfig.from_hf(hf_cfg)
    with torch.device("meta"):
        model = CausalLM(cfg)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)

    def fill(mod: nn.Module):
        for name, child in list(mod.named_children()):
            if isinstance(child, nn.Linear):
                n, k = child.out_features, child.in_features
                quant = precision == "w4a16" and not name == "lm_head"
                if quant:
                    q = torch.randint(-2**31, 2**31 - 1, (n, k // 8), dtype=torch.int32, device=device, generator=g)
                    groups = k // group_size
                    scales = torch.full((n, groups), 0.02 / 4.6, dtype=torch.float16, device=device)  # std(q-z)~4.6
                    zeros = torch.full((n, groups), 8.0, dtype=torch.float16, device=device)
                    bias = (torch.randn(n, device=device, generator=g) * 0.02).to(torch.float16) \
                        if child.bias is not None else None
                    setattr(mod, name, W4A16Linear.from_quantized(q, scales, zeros, bias))
                elif precision == "w8a8" and name != "lm_head":  # int8 codes, std 73 -> weight std 0.02
                    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=device, generator=g)
                    bias = (torch.randn(n, device=device, generator=g) * 0.02).to(dtype) \
                        if child.bias is not None else None
                    setattr(mod, name, W8A8Linear.from_quantized(q, torch.full((n,), 0.02 / 73.3, device=device), bias))
                else:
                    new = DenseLinear(k, n, bias=child.bias is not None, device=device, dtype=dtype)
                    with torch.no_grad():
                        new.weight.normal_(0, 0.02, generator=g)
                        if new.bias is not None:
                            new.bias.normal_(0, 0.02, generator=g)
                    setattr(mod, name, new)
            elif isinstance(child, nn.Embedding):
                e = nn.Embedding(child.num_embeddings, child.embedding_dim, device=device, dtype=dtype)
                with torch.no_grad():
                    e.weight.normal_(0, 0.02, generator=g)
                setattr(mod, name, e)
            else:
                fill(child)
        for pname, p in list(mod.named_parameters(recurse=False)):  # RMSNorm weights
            setattr(mod, pname, nn.Parameter(torch.ones(p.shape, dtype=dtype, device=device), requires_grad=False))

    fill(model)
    model.tie_weights()
    if precision == "w8a8":
        use_w8a8_layers(model)
    return model.eval().requires_grad_(False)


def hf_model(hf_cfg: dict, device):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**{k: v for k, v in hf_cfg.items() if k != "architectures"})
    with torch.device(device):
        try:
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float16)
        except TypeError:  # transformers < 4.56 names it torch_dtype
            model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float16)
    return model.eval().requires_grad_(False)


def rand_ids(n, vocab, device):
    return torch.randint(0, vocab, (1, n), device=device)


@torch.inference_mode()
def tinyq_decode(model, device, steps):
    gen = Generator(model, None, max_seq_len=4 + steps + 8)
    logits = gen.prefill(rand_ids(4, model.config.vocab_size, device)[0].tolist())
    tok = int(logits.argmax())
    for _ in range(3):  # capture the graph, warm up
        tok = int(gen.decode(tok).argmax())
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps - 3):
        tok = int(gen.decode(tok).argmax())
    sync(device)
    return 1e3 * (time.perf_counter() - t0) / (steps - 3)


@torch.inference_mode()
def hf_decode(model, device, steps):
    ids = rand_ids(4, model.config.vocab_size, device)
    out = model(ids, use_cache=True)
    past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
    for _ in range(2):
        out = model(tok, past_key_values=past, use_cache=True)
        past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        out = model(tok, past_key_values=past, use_cache=True)
        past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        int(tok)  # a real generation loop reads every token on the host
    sync(device)
    return 1e3 * (time.perf_counter() - t0) / steps


def mean_ms(fn, device, reps, before=None, warmup=2):
    """Mean wall-clock ms of ``fn()`` over ``reps`` synchronized runs after ``warmup`` runs
    (TinyChat's TTFT convention); ``before()`` runs untimed ahead of each run."""
    times = []
    for i in range(reps + warmup):
        if before is not None:
            before()
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return 1e3 * sum(times) / len(times)


@torch.inference_mode()
def tinyq_ttft(model, device, n, reps):
    cache = model.new_cache(n + 8)
    ids = rand_ids(n, model.config.vocab_size, device)
    return mean_ms(lambda: int(model(ids, cache, last_only=True)[0, -1].argmax()), device, reps, before=cache.reset)


@torch.inference_mode()
def hf_ttft(model, device, n, reps):
    ids = rand_ids(n, model.config.vocab_size, device)
    def forward():
        try:
            logits = model(ids, use_cache=False, logits_to_keep=1).logits
        except TypeError:
            logits = model(ids, use_cache=False).logits
        int(logits[0, -1].argmax())

    return mean_ms(forward, device, reps)


@torch.inference_mode()
def tinyq_streaming(model, device, histories, reps, question=32):
    cache = model.new_cache(max(histories) + question + 8)
    out = {}
    vocab = model.config.vocab_size
    for h in histories:
        cache.reset()
        for s in range(0, h, 512):  # the history, untimed, in chunks as a chat session would
            model(rand_ids(min(512, h - s), vocab, device), cache, last_only=True)
        q = rand_ids(question, vocab, device)
        out[h] = mean_ms(lambda: int(model(q, cache, last_only=True)[0, -1].argmax()), device, reps,
                         before=lambda: cache.truncate(h))
    return out


@torch.inference_mode()
def peak_memory_4k(hf_cfg, device, group_size):
    """GB of GPU memory at peak: load W4A16 + a 4k cache + 4k chunked prefill + 32 decode steps."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    model = random_model(hf_cfg, "w4a16", device, group_size)
    gen = Generator(model, None, max_seq_len=4096 + 64)
    logits = gen.prefill(rand_ids(4096, model.config.vocab_size, device)[0].tolist())
    tok = int(logits.argmax())
    for _ in range(32):
        tok = int(gen.decode(tok).argmax())
    sync(device)
    peak = (torch.cuda.max_memory_allocated() - base) / 1e9
    del gen, model
    return peak


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="llama3-8b,qwen2-7b")
    ap.add_argument("--precisions", default="w4a16,fp16")
    ap.add_argument("--tests", default="decode,ttft,stream,memory")
    ap.add_argument("--skip-hf", action="store_true", help="no transformers baseline")
    ap.add_argument("--steps", type=int, default=256, help="greedy decode steps (tinyq)")
    ap.add_argument("--hf-steps", type=int, default=64, help="decode steps for HF (~0.1 s each)")
    ap.add_argument("--ttft-lengths", default="256,1024,4096")
    ap.add_argument("--histories", default="16,64,256,1024,4096")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (smoke test)")
    ap.add_argument("--out", default=None, help="write results JSON here")
    args = ap.parse_args()
    device = torch.device(args.device)
    models = ["tiny"] if args.tiny else args.models.split(",")
    tests = set(args.tests.split(","))
    lengths = [int(x) for x in args.ttft_lengths.split(",")]
    histories = [int(x) for x in args.histories.split(",")]
    results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "group_size": args.group_size, "models": {}}
    for name in models:
        cfg = SHAPES[name]
        r = results["models"].setdefault(name, {})
        if "memory" in tests and device.type == "cuda" and "w4a16" in args.precisions:
            r["peak_gb_w4a16_4k"] = peak_memory_4k(cfg, device, args.group_size)
            print(f"[{name}] W4A16 peak GPU memory at 4k context: {r['peak_gb_w4a16_4k']:.2f} GB", flush=True)
            gc.collect()
            torch.cuda.empty_cache()
        for prec in args.precisions.split(","):
            t0 = time.perf_counter()
            model = random_model(cfg, prec, device, args.group_size)
            print(f"[{name} {prec}] built in {time.perf_counter() - t0:.1f} s", flush=True)
            rr = r.setdefault(prec, {})
            if "decode" in tests:
                rr["decode_ms"] = tinyq_decode(model, device, args.steps)
                print(f"[{name} {prec}] decode {rr['decode_ms']:.2f} ms/token", flush=True)
            if "ttft" in tests:
                rr["ttft_ms"] = {n: tinyq_ttft(model, device, n, args.reps) for n in lengths}
                print(f"[{name} {prec}] TTFT {rr['ttft_ms']}", flush=True)
            if "stream" in tests:
                rr["stream_ms"] = tinyq_streaming(model, device, histories, args.reps)
                print(f"[{name} {prec}] context streaming (32-token question) {rr['stream_ms']}", flush=True)
            del model
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if not args.skip_hf:
            model = hf_model(cfg, device)
            rr = r.setdefault("hf_fp16", {})
            if "decode" in tests:
                rr["decode_ms"] = hf_decode(model, device, args.hf_steps)
                print(f"[{name} HF fp16] decode {rr['decode_ms']:.2f} ms/token", flush=True)
            if "ttft" in tests:
                rr["ttft_ms"] = {n: hf_ttft(model, device, n, args.reps) for n in lengths}
                print(f"[{name} HF fp16] TTFT {rr['ttft_ms']}", flush=True)
            del model
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    results["summary"] = summarize(results)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1, default=str)
        print(f"wrote {args.out}")


def summarize(results):
    """Print a table of the measured numbers against the issue's targets; return its rows."""
    rows = []

    def row(what, value, target, ok):
        rows.append({"what": what, "value": value, "target": target, "met": ok})

    for name, r in results["models"].items():
        hf = r.get("hf_fp16", {})
        for prec in ("w4a16", "fp16"):
            rr = r.get(prec, {})
            if "decode_ms" in rr:
                lim = TARGETS[f"decode_ms_{prec}"]
                row(f"{name} {prec} decode ms/token", rr["decode_ms"], f"<= {lim}", rr["decode_ms"] <= lim)
            for n, ms in rr.get("ttft_ms", {}).items():
                base = hf.get("ttft_ms", {}).get(n)
                speed = base / ms if base else None
                row(f"{name} {prec} TTFT@{n} ms (HF {base and round(base, 1)})", ms, ">= 1.3x HF",
                    None if speed is None else speed >= TARGETS["ttft_speedup"])
            s = rr.get("stream_ms")
            if s:
                lo, hi = min(s), max(s)
                ratio = s[hi] / s[lo]
                row(f"{name} {prec} streaming TTFT({hi})/TTFT({lo})", ratio, "<= 1.2", ratio <= TARGETS["stream_ratio"])
        w8, fp = r.get("w8a8", {}), r.get("fp16", {})
        if "decode_ms" in w8 and "decode_ms" in fp:
            ratio = w8["decode_ms"] / fp["decode_ms"]
            row(f"{name} W8A8 / tinyq fp16 decode time", ratio, "<= 0.6", ratio <= 0.6)
        for n, ms in w8.get("ttft_ms", {}).items():
            if n in fp.get("ttft_ms", {}):
                speed = fp["ttft_ms"][n] / ms
                row(f"{name} tinyq fp16 / W8A8 TTFT@{n}", speed, ">= 1.4" if n == 4096 else "-",
                    speed >= 1.4 if n == 4096 else None)
        if "decode_ms" in hf:
            row(f"{name} HF fp16 decode ms/token", hf["decode_ms"], "baseline", None)
        if "peak_gb_w4a16_4k" in r:
            v = r["peak_gb_w4a16_4k"]
            row(f"{name} W4A16 peak GPU GB @4k", v, "<= 6.5", v <= TARGETS["peak_gb_w4a16"])
    print(f"\n{'measurement':58s} {'value':>10s}  {'target':>12s}  met")
    for x in rows:
        met = "-" if x["met"] is None else ("yes" if x["met"] else "NO")
        print(f"{x['what']:58s} {x['value']:10.2f}  {x['target']:>12s}  {met}")
    return rows


if __name__ == "__main__":
    main()
