"""Shipped launch configs for the W4A16 kernels, bucketed by M, so nobody waits for autotuning.

``CONFIGS[arch]`` is a list of ``(max_m, config)`` in increasing ``max_m``; the first bucket with
``m <= max_m`` wins. ``kernel`` is ``"gemv"`` (:mod:`tinyq.kernels.w4a16_gemv`) or ``"gemm"``
(:mod:`tinyq.kernels.w4a16_gemm`). ``benchmarks/bench_w4a16.py --sweep`` measures candidates and
prints the winners in this format; ``sm90`` below comes from that sweep on the H100 (see
``benchmarks/results/``). Other architectures use ``default`` (untuned, chosen to be safe on
~100 KB of shared memory).
"""
from __future__ import annotations

import torch

GEMV_MAX_M = 4  # up to 4 rows the GEMV re-reads each weight block from L2, cheaper than MMA padding

_SM90 = [
    (GEMV_MAX_M, dict(kernel="gemv", block_n=4, block_k=1024, num_warps=4, num_stages=3, ptx_dequant=True)),
    (16, dict(kernel="gemm", block_m=16, block_n=64, block_k=128, swap_ab=False, unpack="split", ptx_dequant=True,
              num_warps=4, num_stages=3)),
    (64, dict(kernel="gemm", block_m=32, block_n=64, block_k=128, swap_ab=True, unpack="split", num_warps=4,
              num_stages=4)),
    (256, dict(kernel="gemm", block_m=32, block_n=128, block_k=128, swap_ab=True, unpack="split", ptx_dequant=True,
               num_warps=4, num_stages=4)),
    (None, dict(kernel="gemm", block_m=128, block_n=128, block_k=64, swap_ab=False, unpack="reshape", num_warps=4,
                num_stages=4, group_m=8)),
]

CONFIGS = {
    # H100 SXM, torch 2.11 + triton 3.6, from `bench_w4a16.py --sweep` (benchmarks/results/). Sums
    # over the four Llama-3-8B linears (M <= 16 timed from CUDA graphs): M=1 75 us (PTX dequant,
    # 16-byte weight loads; the first reshape-unpack GEMV took 314 us in eager timing); M=16 168 us
    # (PTX dequant; 216 without); M=64 457 us; M=256 753 us (PTX; 841 without); M=4096 o + gate_up
    # 4.1 ms (20 other tilings, PTX dequant included, were no faster: dequant ALU is not its limit).
    "sm90": _SM90,
    # Untuned elsewhere: the same tilings with one pipeline stage less, to fit ~100 KB of shared memory.
    "default": [(m, dict(cfg, num_stages=min(cfg["num_stages"], 3))) for m, cfg in _SM90],
}


def device_arch(device: torch.device) -> str:
    if device.type != "cuda":
        return "default"
    major, minor = torch.cuda.get_device_capability(device)
    key = f"sm{major}{minor}"
    return key if key in CONFIGS else "default"


def fp16_accumulate_default(device: torch.device) -> bool:
    """fp16 accumulation is the default only where it is faster: GeForce parts run fp16-accumulate
    MMA at twice the fp32-accumulate rate (a product-line cap, per NVIDIA's spec sheets; not
    measured here). H100/A100 and workstation parts run both at one rate, so fp32 stays."""
    if device.type != "cuda":
        return False
    return "GeForce" in torch.cuda.get_device_name(device)


def select_config(m: int, device: torch.device) -> dict:
    for max_m, cfg in CONFIGS[device_arch(device)]:
        if max_m is None or m <= max_m:
            return dict(cfg)
    raise AssertionError("the last bucket must be open-ended")
