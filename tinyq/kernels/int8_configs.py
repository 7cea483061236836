"""Shipped launch configs for the int8 (W8A8) kernels, bucketed by M, so nobody waits for autotuning.

``CONFIGS[arch]`` is a list of ``(max_m, config)`` in increasing ``max_m``; the first bucket with
``m <= max_m`` wins (``None``: open-ended). ``kernel`` is ``"gemv"`` (:mod:`tinyq.kernels.int8_gemv`)
or ``"gemm"`` (:mod:`tinyq.kernels.int8_gemm`). ``benchmarks/bench_w8a8.py --sweep`` measures the
candidates of :func:`sweep_candidates` per bucket on the four Llama-3-8B linears and prints the
winners in this format.
"""
from __future__ import annotations

import itertools

import torch

GEMV_MAX_M = 4  # up to 4 rows the GEMV re-reads each weight block from L2, cheaper than MMA padding

# sm90: starting points (not yet measured on a GPU; replace with the --sweep winners): int8 tiles
# twice as deep in K as fp16 ones for the same bytes per stage.
_SM90 = [
    (GEMV_MAX_M, dict(kernel="gemv", block_n=8, block_k=512, num_warps=4, num_stages=3)),
    (16, dict(kernel="gemm", block_m=16, block_n=64, block_k=256, swap_ab=True, num_warps=4, num_stages=4)),
    (64, dict(kernel="gemm", block_m=64, block_n=64, block_k=256, swap_ab=False, num_warps=4, num_stages=4)),
    (256, dict(kernel="gemm", block_m=64, block_n=128, block_k=128, swap_ab=False, num_warps=4, num_stages=4)),
    (None, dict(kernel="gemm", block_m=128, block_n=256, block_k=128, swap_ab=False, num_warps=8, num_stages=3,
                group_m=8)),
]

CONFIGS = {
    "sm90": _SM90,
    # Elsewhere: one pipeline stage less and no 256-wide tile, to fit ~100 KB of shared memory.
    "default": [(m, dict(cfg, num_stages=min(cfg["num_stages"], 3), block_n=min(cfg.get("block_n", 8), 128)))
                for m, cfg in _SM90],
}

BUCKETS = tuple(m for m, _ in _SM90)


def device_arch(device: torch.device) -> str:
    if device.type != "cuda":
        return "default"
    major, minor = torch.cuda.get_device_capability(device)
    key = f"sm{major}{minor}"
    return key if key in CONFIGS else "default"


def select_config(m: int, device: torch.device) -> dict:
    for max_m, cfg in CONFIGS[device_arch(device)]:
        if max_m is None or m <= max_m:
            return dict(cfg)
    raise AssertionError("the last bucket must be open-ended")


def sweep_candidates(max_m):
    """Launch configs the benchmark's ``--sweep`` tries for the bucket ending at ``max_m``."""
    if max_m is not None and max_m <= GEMV_MAX_M:
        return [dict(kernel="gemv", block_n=bn, block_k=bk, num_warps=w, num_stages=s)
                for bn, bk, w, s in itertools.product((4, 8, 16), (256, 512, 1024), (4, 8), (2, 3))]
    small = max_m is not None and max_m <= 64
    out = []
    for bm, bn, bk, swap, w, s in itertools.product(
        (16, 32, 64) if small else (64, 128), (32, 64, 128) if small else (128, 256), (128, 256),
        (False, True) if small else (False,), (4, 8), (3, 4, 5),
    ):
        if (bm + bn) * bk * s > 200 * 1024:  # shared memory per CTA on sm90 is 227 KB
            continue
        out.append(dict(kernel="gemm", block_m=bm, block_n=bn, block_k=bk, swap_ab=swap, num_warps=w, num_stages=s,
                        group_m=8))
    return out
