"""Shipped launch configs for the attention kernels, so nobody waits for autotuning.

``FLASH[arch][head_dim_pad]`` -> (BLOCK_M, BLOCK_N, num_warps, num_stages) of the prefill /
chunked-prefill kernel (an exact head_dim key, such as 72, wins over its padded width); ``DECODE[arch][head_dim_pad]`` -> (BLOCK_N, num_warps, num_stages) of the
split-KV decode kernel. ``benchmarks/bench_attention.py --sweep`` measures candidates on a GPU and
prints winners in this format. Shared-memory budget of the sm90 entries: q tile + num_stages x
(K + V tiles), e.g. d=128: 128x128x2 + 3 x 2 x 64x128x2 = 128 KiB of the H100's 227 KiB.
``default`` (pre-Hopper, consumer parts with ~100 KiB) stays at two stages and 64-row tiles.
The interpreter (CPU tests) uses small tiles so that short test sequences still span many blocks.
"""
from __future__ import annotations

import torch

from tinyq.backend import gpu_arch, interpreting

FLASH = {
    "sm90": {
        32: (128, 64, 4, 3),
        64: (64, 64, 4, 3),
        # SigLIP's 72 (64 + 16 columns, the last 8 masked) takes 134 registers a thread on 8 warps,
        # one CTA an SM; on 4 warps two fit (docs/perf_notes.md, 2026-12-06)
        72: (128, 64, 4, 3),
        128: (128, 64, 8, 3),
        256: (64, 32, 4, 2),
    },
    "default": {
        32: (64, 64, 4, 2),
        64: (64, 64, 4, 2),
        128: (64, 64, 4, 2),
        256: (32, 32, 4, 2),
    },
    "interpret": {32: (16, 16, 1, 1), 64: (16, 16, 1, 1), 128: (16, 16, 1, 1), 256: (16, 16, 1, 1)},
}

DECODE = {
    # H200 sweep (bench_attention --sweep --only decode, d=128): 64-key blocks on 8 warps, 3 stages
    "sm90": {32: (64, 4, 2), 64: (64, 4, 2), 128: (64, 8, 3), 256: (32, 4, 2)},
    "default": {32: (64, 4, 2), 64: (64, 4, 2), 128: (64, 4, 2), 256: (32, 4, 2)},
    "interpret": {32: (16, 1, 1), 64: (16, 1, 1), 128: (16, 1, 1), 256: (16, 1, 1)},
}


def attention_arch(device: torch.device) -> str:
    """``"interpret"`` under the interpreter, else :func:`tinyq.backend.gpu_arch` (``"sm90"``...)."""
    if device.type != "cuda" and interpreting():
        return "interpret"
    return gpu_arch(device)


def _dim_key(head_dim_pad: int) -> int:
    return max(32, min(256, head_dim_pad))


def flash_config(head_dim_pad: int, device: torch.device, head_dim: int = 0):
    """The entry for the exact ``head_dim`` where the table has one, else for the padded width."""
    table = FLASH.get(attention_arch(device), FLASH["default"])
    return table.get(head_dim) or table[_dim_key(head_dim_pad)]


def decode_config(head_dim_pad: int, device: torch.device):
    return DECODE.get(attention_arch(device), DECODE["default"])[_dim_key(head_dim_pad)]


_SM_COUNT = {}


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of the device (4 for the interpreter: a few splits to test)."""
    if device.type != "cuda":
        return 4
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]
