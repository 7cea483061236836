"""Shared benchmark helpers: timing, environment record, result files."""
from __future__ import annotations

import json
import os
import platform
import statistics

import torch


def bench_ms(fn, warmup_ms: float = 25, rep_ms: float = 100) -> float:
    """Median milliseconds of ``fn`` with CUDA events; L2 is flushed before every run
    (triton.testing.do_bench), so weights that would fit in L2 are still read from HBM."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def graph_ms_rotating(fns, reps: int = 20) -> float:
    """Median ms per call over CUDA-graph replays of ``fns``, one call each.

    For kernels of a few microseconds: a graph removes the Python launch cost (which a decode
    step never pays, since it runs as a CUDA graph) for every contender alike; the callables
    should use enough distinct buffers (> 50 MB L2) that each call reads from HBM."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for fn in fns:
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for fn in fns:
            fn()
    g.replay()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / len(fns))
    return statistics.median(times)


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
