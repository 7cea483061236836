"""Shipped launch configs for the int8 (W8A8) kernels, bucketed by M, so nobody waits for autotuning.

``CONFIGS[arch]`` is a list of ``(max_m, config)`` in increasing ``max_m``; the first bucket with
``m <= max_m`` wins (``None``: open-ended). ``kernel`` is ``"gemv"`` (:mod:`tinyq.kernels.int8_gemv`),
``"gemm"`` (:mod:`tinyq.kernels.int8_gemm`) or ``"tma"`` (:mod:`tinyq.kernels.int8_gemm_tma`, sm90 and
later; the pointer GEMM where an operand is not 16-byte aligned). ``benchmarks/bench_w8a8.py --sweep`` measures the
candidates of :func:`sweep_candidates` per bucket on the four Llama-3-8B linears and prints the
winners in this format.
"""
from __future__ import annotations

import itertools

import torch

from tinyq.backend import gpu_arch

GEMV_MAX_M = 4  # the largest M the sweep tries the GEMV at

# sm90: the winners of `bench_w8a8.py --sweep` on an H200 (torch 2.11, triton 3.6), summed over the four
# Llama-3-8B linears, int8 GEMM alone: M=1 65 us (dp4a GEMV, 3.4 TB/s of weights; 71 us without dp4a;
# cuBLAS fp16 127-134), M=4 81 us (16-row GEMM tiles
# beat the GEMV's 4 L2 re-reads: 156 us), M=16 76 us, M=64 90 us, M=256 147 us (cuBLAS fp16 193),
# M=4096 o + gate_up 977 us. See benchmarks/results/w8a8_h200.json.
_SM90 = [
    (1, dict(kernel="gemv", block_n=8, block_k=512, num_warps=8, num_stages=3, dp4a=True)),
    (16, dict(kernel="gemm", block_m=16, block_n=64, block_k=256, swap_ab=True, num_warps=4, num_stages=5, group_m=8)),
    (64, dict(kernel="gemm", block_m=64, block_n=64, block_k=256, swap_ab=True, num_warps=4, num_stages=5, group_m=8)),
    # M = 65..: tensor-descriptor tiles (H100 sweeps, 2026-12-05: 139.0 against 157.5 us at M = 256 for
    # the pointer GEMM's best; the SigLIP tower's four linears at M = 8192: 310.4 against 339.1 us)
    (256, dict(kernel="tma", block_m=64, block_n=128, block_k=256, swap_ab=False, num_warps=4, num_stages=4,
               group_m=8, programs_per_sm=1)),
    (None, dict(kernel="tma", block_m=128, block_n=128, block_k=128, swap_ab=False, num_warps=4, num_stages=3,
                group_m=8, programs_per_sm=2)),
]


def _portable(cfg: dict) -> dict:
    """An sm90 config for GPUs without tuned entries: at most 3 pipeline stages and ~100 KB of shared
    memory (K steps halved until the tiles fit), and no tensor descriptors (the pointer GEMM)."""
    out = dict(cfg, num_stages=min(cfg["num_stages"], 3))
    if out["kernel"] == "gemv":
        return out
    while (out["block_m"] + out["block_n"]) * out["block_k"] * out["num_stages"] > 100 * 1024 and out["block_k"] > 64:
        out["block_k"] //= 2
    if out["kernel"] == "tma":
        out["kernel"] = "gemm"
        out.pop("programs_per_sm", None)
    return out


CONFIGS = {
    "sm90": _SM90,
    "default": [(m, _portable(cfg)) for m, cfg in _SM90],
}

BUCKETS = (1, GEMV_MAX_M, 16, 64, 256, None)  # the --sweep buckets (the shipped list may merge some)


def device_arch(device: torch.device) -> str:
    key = gpu_arch(device)
    return key if key in CONFIGS else "default"


def select_config(m: int, device: torch.device) -> dict:
    for max_m, cfg in CONFIGS[device_arch(device)]:
        if max_m is None or m <= max_m:
            return dict(cfg)
    raise AssertionError("the last bucket must be open-ended")


def sweep_candidates(max_m):
    """Launch configs the benchmark's ``--sweep`` tries for the bucket ending at ``max_m``."""
    out = []
    if max_m is not None and max_m <= GEMV_MAX_M:  # the GEMV, and the GEMM's 16-row tiles against it
        out = [dict(kernel="gemv", block_n=bn, block_k=bk, num_warps=w, num_stages=s, dp4a=d)
               for bn, bk, w, s, d in itertools.product((2, 4, 8, 16), (512, 1024, 2048), (4, 8), (1, 2, 3),
                                                        (True, False))
               if bn * bk <= 16384 and (d or bn * bk <= 8192)]  # [BN, BK(/4)] int32 accumulator in registers
        max_m = 16
    if max_m is not None and max_m <= 64:
        space = itertools.product((16, 32, 64) if max_m <= 16 else (32, 64), (32, 64, 128), (128, 256), (False, True),
                                  (4,), (3, 4, 5))
    else:
        space = itertools.product((64, 128, 256), (128, 256), (128, 256), (False,), (4, 8), (3, 4))
    for bm, bn, bk, swap, w, s in space:
        if max_m is not None and bm > max_m:
            continue
        if (bm + bn) * bk * s > 200 * 1024:  # shared memory per CTA on sm90 is 227 KB
            continue
        out.append(dict(kernel="gemm", block_m=bm, block_n=bn, block_k=bk, swap_ab=swap, num_warps=w, num_stages=s,
                        group_m=8))
        # from M = 65 the same tiles through tensor descriptors: one program per tile, or 1-2 persistent
        # programs per SM (two fit in shared memory up to ~110 KB each)
        if max_m is not None and max_m <= 64:
            continue
        for pps in (0, 1, 2) if (bm + bn) * bk * s <= 110 * 1024 else (0, 1):
            out.append(dict(kernel="tma", block_m=bm, block_n=bn, block_k=bk, swap_ab=swap, num_warps=w,
                            num_stages=s, group_m=8, programs_per_sm=pps))
    return out
