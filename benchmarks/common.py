"""Shared benchmark helpers: timing, environment record, result files."""
from __future__ import annotations

import json
import os
import platform
import statistics
import time

import torch


def require_cuda(name: str, device="cuda", hint: str = "") -> None:
    """Exit with a one-line message (plus ``hint``) when ``device`` is CUDA and this torch has no GPU."""
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"{name} needs a CUDA GPU (this torch sees none){hint}")


def bench_ms(fn, warmup_ms: float = 25, rep_ms: float = 100) -> float:
    """Median milliseconds of ``fn`` with CUDA events; L2 is flushed before every run
    (triton.testing.do_bench), so weights that would fit in L2 are still read from HBM."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def capture_graph(fn, warmups: int = 1) -> "torch.cuda.CUDAGraph":
    """``fn()`` captured in a CUDA graph, after ``warmups`` runs on a side stream (torch's capture
    rules: allocations and lazy initialization happen before the capture)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmups):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def graph_ms_rotating(fns, reps: int = 20) -> float:
    """Median ms per call over CUDA-graph replays of ``fns``, one call each.

    For kernels of a few microseconds: a graph removes the Python launch cost (which a decode
    step never pays, since it runs as a CUDA graph) for every contender alike; the callables
    should use enough distinct buffers (> 50 MB L2) that each call reads from HBM."""
    def calls():
        for fn in fns:
            fn()

    return replay_ms(capture_graph(calls), reps) / len(fns)


def replay_ms(graph: "torch.cuda.CUDAGraph", reps: int = 20) -> float:
    """Median ms of one replay of ``graph`` over ``reps`` timed replays, after an untimed one."""
    graph.replay()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def eager_vs_graph(fn, calls=200):
    """(eager us/call, graph us/call) of ``fn``: wall time of a loop of calls synchronized once at
    the end (what an eager model pays: launch-bound calls are as slow as the host), against the
    replay of the same calls captured in one CUDA graph."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    eager = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        eager.append((time.perf_counter() - t0) / calls * 1e6)
    graph_us = graph_ms_rotating([fn] * calls) * 1e3
    return sorted(eager)[len(eager) // 2], graph_us


def copies_of(tensors, nbytes, rotate_bytes=200e6):
    """``tensors`` plus clones, enough that the set holds ``rotate_bytes`` (default > 3x the H200's
    60 MB L2), so a rotation over them reads every call's operands from HBM."""
    n = max(1, int(-(-rotate_bytes // nbytes)))
    return [tensors] + [tuple(t.clone() for t in tensors) for _ in range(n - 1)]


def timed(m, make_call, variants, graph_max_m):
    """Median ms of ``make_call(*variant)``: up to ``graph_max_m`` rows from CUDA-graph replays over
    all ``variants`` (no launch cost, every call reads HBM), above it ``do_bench`` on the first."""
    if m <= graph_max_m:
        return graph_ms_rotating([make_call(*v) for v in variants])
    return bench_ms(make_call(*variants[0]))


def best_config(candidates, measure, label: str = ""):
    """``(ms, config)`` with the lowest ``measure(config)`` over ``candidates``, every one printed.
    A candidate that raises (out of shared memory or registers, a wrong result) is reported and
    skipped; None when all failed."""
    best = None
    for cfg in candidates:
        try:
            ms = measure(cfg)
        except Exception as e:  # reported, skipped
            print(f"  skip {cfg}: {type(e).__name__}: {str(e)[:80]}")
            continue
        print(f"  {label} {ms * 1e3:9.1f} us  {cfg}", flush=True)
        if best is None or ms < best[0]:
            best = (ms, cfg)
    return best


def environment() -> dict:
    import triton

    env = {
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["capability"] = "sm%d%d" % torch.cuda.get_device_capability()
        env["cuda"] = torch.version.cuda
    return env


def write_json(path: str | None, payload: dict) -> None:
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
    print(f"wrote {path}")


def random_model(hf_cfg: dict, precision: str, device, group_size: int):
    """A :class:`tinyq.models.llama.CausalLM` of ``hf_cfg`` (``config.json`` keys) with random weights made
    directly on ``device``: fp16 linears with std 0.02, or random int4 (int8) codes with scales giving the
    same spread (``precision`` "fp16", "w4a16" or "w8a8")."""
    from torch import nn

    from tinyq.models.llama import CausalLM, ModelConfig
    from tinyq.models.w8a8 import use_w8a8_layers
    from tinyq.nn.dense_linear import DenseLinear
    from tinyq.nn.w4a16_linear import W4A16Linear
    from tinyq.nn.w8a8_linear import W8A8Linear

    cfg = ModelConfig.from_hf(hf_cfg)
    with torch.device("meta"):
        model = CausalLM(cfg)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)

    def bias(n, child, dt):
        return (torch.randn(n, device=device, generator=g) * 0.02).to(dt) if child.bias is not None else None

    def fill(mod: nn.Module):
        for name, child in list(mod.named_children()):
            if isinstance(child, nn.Linear):
                n, k = child.out_features, child.in_features
                if precision == "w4a16" and name != "lm_head":
                    q = torch.randint(-2**31, 2**31 - 1, (n, k // 8), dtype=torch.int32, device=device, generator=g)
                    scales = torch.full((n, k // group_size), 0.02 / 4.6, dtype=torch.float16, device=device)
                    # std(q - z) ~ 4.6. Zeros of 7 or 8 at random: the codes average 7.5, and one zero
                    # for all would give every weight the same -0.5 s offset, which a 32-layer stack
                    # amplifies along the all-ones direction until fp16 overflows (NaN logits)
                    zeros = torch.randint(7, 9, scales.shape, device=device, generator=g).to(torch.float16)
                    setattr(mod, name, W4A16Linear.from_quantized(q, scales, zeros, bias(n, child, torch.float16)))
                elif precision == "w8a8" and name != "lm_head":  # int8 codes, std 73 -> weight std 0.02
                    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=device, generator=g)
                    setattr(mod, name, W8A8Linear.from_quantized(q, torch.full((n,), 0.02 / 73.3, device=device),
                                                                 bias(n, child, dtype)))
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
    """The transformers model of ``hf_cfg`` (``config.json`` keys): fp16, random weights, on ``device``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**{k: v for k, v in hf_cfg.items() if k != "architectures"})
    with torch.device(device):
        try:
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float16)
        except TypeError:  # transformers < 4.56 names it torch_dtype
            model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float16)
    return model.eval().requires_grad_(False)
