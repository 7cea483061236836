"""First-use costs made visible: Triton compilation tracking and a warm-up at load.

A Triton kernel is compiled the first time it meets a new specialization (a new launch config,
a new M bucket, a new prompt length class), and a CUDA graph is captured once per cache. Both
cost seconds, so they happen here, at load, behind a reported step, instead of inside the first
answer's TTFT. :class:`CompileTracker` counts every compilation (Triton's ``jit_cache_hook`` runs
before a compile and ``jit_post_compile_hook`` after it), so a generation can subtract compile
time from its stats and say that it happened.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import torch

# Without CUDA graphs: prompt-chunk lengths that warm every W4A16 M bucket (1, <=4, <=16, <=64,
# larger) and both of Triton's integer specializations (divisible by 16 or not) of the prefill kernels.
WARMUP_LENGTHS = (1, 3, 16, 17, 48, 64, 65, 96)


@dataclass
class CompileCount:
    kernels: int = 0
    seconds: float = 0.0


class CompileTracker:
    """Process-wide count of Triton compilations and the seconds they took (0 on CPU)."""

    _lock = threading.Lock()
    _installed = False
    total = CompileCount()
    _started: Dict[int, float] = {}

    @classmethod
    def install(cls) -> None:
        with cls._lock:
            if cls._installed:
                return
            try:
                from triton import knobs
            except ImportError:  # a Triton without knobs: nothing is counted
                cls._installed = True
                return
            prev_pre, prev_post = knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook

            def pre(*args, **kwargs):
                cls._started[threading.get_ident()] = time.perf_counter()
                return prev_pre(*args, **kwargs) if prev_pre else None

            def post(*args, **kwargs):
                t0 = cls._started.pop(threading.get_ident(), None)
                if t0 is not None:
                    cls.total.kernels += 1
                    cls.total.seconds += time.perf_counter() - t0
                return prev_post(*args, **kwargs) if prev_post else None

            knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook = pre, post
            cls._installed = True

    @classmethod
    def snapshot(cls) -> CompileCount:
        return CompileCount(cls.total.kernels, cls.total.seconds)

    @classmethod
    def since(cls, start: CompileCount) -> CompileCount:
        return CompileCount(cls.total.kernels - start.kernels, cls.total.seconds - start.seconds)


@dataclass
class WarmupReport:
    seconds: float = 0.0  # the whole warm-up, wall time
    compile_s: float = 0.0  # of which Triton compilation (or loading compiled kernels from disk)
    kernels: int = 0
    capture_s: float = 0.0  # CUDA-graph capture (prefill buckets, decode step, vision tower chunks), compilation excluded
    graphs: int = 0

    def summary(self) -> str:
        if self.kernels == 0 and self.capture_s == 0:
            return f"warm-up {self.seconds:.1f} s"
        return (f"warm-up {self.seconds:.1f} s: {self.kernels} kernels compiled or loaded in {self.compile_s:.1f} s, "
                f"{self.graphs} CUDA graphs captured in {self.capture_s:.2f} s")


@torch.inference_mode()
def warm_up(generator, lengths: Optional[Sequence[int]] = None, sampling=None) -> WarmupReport:
    """Compile every kernel the generator's steps need and capture their CUDA graphs, then leave
    the cache empty. Returns what it cost.

    With CUDA graphs (the default on a GPU) that means one padded-prefill graph per chunk bucket
    that fits the cache and the decode graph for ``sampling`` (a :class:`tinyq.generate.SamplingConfig`;
    default greedy). Without, prefills of ``lengths`` (each clipped to the cache; default
    :data:`WARMUP_LENGTHS` on a GPU, one token on a CPU, where the torch path has nothing to
    compile) and one decode step."""
    from tinyq.generate import make_config

    CompileTracker.install()
    start, t0 = CompileTracker.snapshot(), time.perf_counter()
    gen = generator
    gen.reset()
    captured = gen.capture_s
    graphs_before = gen.graph_count
    if gen.prefill_graphs is not None:
        fitting = [b for b in gen.prefill_graphs.buckets if b < gen.max_seq_len]
        for b in sorted(fitting, reverse=True):  # largest first: the shared memory pool fits the rest
            gen.prefill_graphs.ensure(b)
    else:
        if lengths is None:
            lengths = WARMUP_LENGTHS if gen.cache.device.type == "cuda" else (1,)
        room = gen.max_seq_len - 1
        vocab = gen.model.config.vocab_size
        for n in sorted({min(max(1, int(n)), room) for n in lengths}):
            gen.prefill([(7 * i + 1) % vocab for i in range(n)])  # any valid ids: only shapes matter
            gen.reset()
    gen.prefill([1])
    sampler = gen.sampler(sampling if sampling is not None else make_config(temperature=0.0))
    gen.decode_next(1, sampler)  # on CUDA: compiles the decode kernels and captures its graph
    if gen.cache.device.type == "cuda":
        torch.cuda.synchronize()
    gen.reset()
    compiled = CompileTracker.since(start)
    capture_s = max(0.0, gen.capture_s - captured - compiled.seconds)
    return WarmupReport(seconds=time.perf_counter() - t0, compile_s=compiled.seconds, kernels=compiled.kernels,
                        capture_s=capture_s, graphs=gen.graph_count - graphs_before)
