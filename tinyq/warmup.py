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

# Prompt-chunk lengths that warm every W4A16 M bucket (1, <=4, <=16, <=64, larger) and both of
# Triton's integer specializations (divisible by 16 or not) of the prefill kernels.
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
    capture_s: float = 0.0  # CUDA-graph capture of the decode step

    def summary(self) -> str:
        if self.kernels == 0 and self.capture_s == 0:
            return f"warm-up {self.seconds:.1f} s"
        return (f"warm-up {self.seconds:.1f} s: {self.kernels} kernels compiled or loaded in {self.compile_s:.1f} s, "
                f"decode graph captured in {self.capture_s:.2f} s")


@torch.inference_mode()
def warm_up(generator, lengths: Optional[Sequence[int]] = None) -> WarmupReport:
    """Run prefills of ``lengths`` (each clipped to the cache) and one decode step through
    ``generator`` so every kernel they need is compiled and the decode graph is captured, then
    leave the cache empty. Returns what it cost. ``lengths`` defaults to :data:`WARMUP_LENGTHS` on
    a GPU and to one token on a CPU, where the torch path has nothing to compile."""
    CompileTracker.install()
    start, t0 = CompileTracker.snapshot(), time.perf_counter()
    gen = generator
    if lengths is None:
        lengths = WARMUP_LENGTHS if gen.cache.device.type == "cuda" else (1,)
    gen.reset()
    room = gen.max_seq_len - 1
    vocab = gen.model.config.vocab_size
    for n in sorted({min(max(1, int(n)), room) for n in lengths}):
        ids = [(7 * i + 1) % vocab for i in range(n)]  # any valid ids: only shapes matter
        gen.prefill(ids)
        gen.reset()
    gen.prefill([1])
    before_decode, t_dec = CompileTracker.snapshot(), time.perf_counter()
    gen.decode(1)  # on CUDA: compiles the decode kernels and captures the graph (first use)
    if gen.cache.device.type == "cuda":
        torch.cuda.synchronize()
    decode_compile = CompileTracker.since(before_decode).seconds
    capture_s = time.perf_counter() - t_dec - decode_compile if gen.cuda_graph else 0.0
    gen.reset()
    compiled = CompileTracker.since(start)
    total = time.perf_counter() - t0
    return WarmupReport(seconds=total, compile_s=compiled.seconds, kernels=compiled.kernels, capture_s=capture_s)
