""""Last program finishes the job": a per-group arrival counter that lets the last program of a
group of programs reduce what the others wrote, saving the second launch of a two-pass kernel.

Protocol, per group ``g`` of ``n`` programs (``n`` may be a device value, e.g. the slices that
hold cache positions): each program stores its partial result, then calls :func:`arrive`.
The barrier orders the whole CTA's stores before the release of the counter increment (PTX
release is cumulative); the one program that sees ``n - 1`` acquires, so its later loads see
every partial. It resets the counter to 0 for the next launch. Partials written by other SMs
must be read past L1 (``cache_modifier=".cg"``).

The counters live in one zeroed int32 buffer per device that only grows (:func:`counters`);
kernels leave it zeroed. Launches that use it must not run concurrently on two streams.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_COUNTERS = {}
MIN_COUNTERS = 4096  # the first buffer's size: launches needing no more never grow it (safe under graph capture)


def counters(device: torch.device, n: int) -> torch.Tensor:
    """A zeroed int32 buffer of at least ``n`` counters on ``device``, reused by every launch
    (allocated at the first eager call, before any CUDA graph captures a kernel that uses it)."""
    key = torch.device(device)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < n:
        size = max(n, MIN_COUNTERS, 2 * (buf.numel() if buf is not None else 0))
        buf = torch.zeros(size, dtype=torch.int32, device=key)
        _COUNTERS[key] = buf
    return buf


@triton.jit
def arrive(counter_ptr, n):
    """Count this program in; True for the last of ``n`` (whose counter is then reset to 0)."""
    tl.debug_barrier()
    seen = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
    last = seen == n - 1
    if last:
        tl.atomic_xchg(counter_ptr, 0, sem="relaxed", scope="gpu")
    return last
