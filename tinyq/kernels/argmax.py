"""Argmax of one vector in a single launch: greedy sampling over a vocabulary.

``argmax(x)`` for ``x [V]`` (fp16/bf16/fp32): the index of the largest value, the first such
index on ties; a NaN counts as larger than everything (torch's rules, so a NaN logit gives a
valid token id, never an index past the vocabulary), or, with ``nan_marker``, gives -1: a sampler
reads that as "the model's logits are NaN" with the token id it reads anyway, at no extra cost. Grid ``cdiv(V, BLOCK)``: each program writes its block's max and
first arg-max, and the last program to finish (:mod:`tinyq.kernels.semaphore`) reduces the
partials and writes the int64 index. One launch instead of torch's float copy + one-block
reduction (~13 us at V = 49k, ~24 us at 128k on an H200, each a tail of every decode step).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tinyq.backend import check_kernel_device
from tinyq.kernels.semaphore import arrive, counters

BLOCK = 2048
MAX_PARTS = 1024  # vocabularies up to 2M entries


@triton.jit
def _first_max(vals, idxs):
    """(max, index of its first occurrence) of a 1-D block; a NaN wins (its first index)."""
    is_nan = vals != vals
    nan_idx = tl.min(tl.where(is_nan, idxs, 2147483647), 0)
    clean = tl.where(is_nan, float("-inf"), vals)
    best = tl.max(clean, 0)
    idx = tl.min(tl.where(clean == best, idxs, 2147483647), 0)
    has_nan = nan_idx < 2147483647
    return tl.where(has_nan, float("nan"), best), tl.where(has_nan, nan_idx, idx)


@triton.jit
def _argmax_kernel(X, PART_VAL, PART_IDX, OUT, COUNTER, V, NUM_PARTS, BLOCK: tl.constexpr,
                   PARTS_PAD: tl.constexpr, NAN_MARKER: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    # lanes past V hold -inf at indices past every real one: never chosen over a real entry
    best, idx = _first_max(tl.load(X + offs, mask=offs < V, other=float("-inf")).to(tl.float32), offs)
    tl.store(PART_VAL + pid, best)
    tl.store(PART_IDX + pid, idx)
    if arrive(COUNTER, NUM_PARTS):
        p = tl.arange(0, PARTS_PAD)
        vals = tl.load(PART_VAL + p, mask=p < NUM_PARTS, other=float("-inf"), cache_modifier=".cg")
        idxs = tl.load(PART_IDX + p, mask=p < NUM_PARTS, other=2147483647, cache_modifier=".cg")
        top_val, top = _first_max(vals, idxs)
        if NAN_MARKER:
            top = tl.where(top_val != top_val, -1, top)
        tl.store(OUT, top.to(tl.int64))


def argmax_reference(x: torch.Tensor, nan_marker: bool = False) -> torch.Tensor:
    """int64 ``[1]``: torch's argmax of the flattened vector (-1 for a NaN with ``nan_marker``)."""
    flat = x.reshape(-1).float()
    top = torch.argmax(flat).view(1)
    return torch.where(flat[top].isnan(), -1, top) if nan_marker else top


def argmax(x: torch.Tensor, out=None, nan_marker: bool = False) -> torch.Tensor:
    """Index (int64 ``[1]`` on x's device) of the largest entry of the 1-D contiguous ``x``; with
    ``nan_marker``, -1 where that entry is NaN."""
    check_kernel_device("argmax", x)
    if x.dim() != 1 or x.stride(0) != 1 or x.numel() == 0:
        raise ValueError(f"argmax: x must be a non-empty contiguous 1-D tensor, got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"argmax: x must be fp16/bf16/fp32, got {x.dtype}")
    parts = triton.cdiv(x.numel(), BLOCK)
    if parts > MAX_PARTS:
        raise ValueError(f"argmax: {x.numel()} entries exceed {MAX_PARTS * BLOCK}")
    part_val = torch.empty(parts, dtype=torch.float32, device=x.device)
    part_idx = torch.empty(parts, dtype=torch.int32, device=x.device)
    out = torch.empty(1, dtype=torch.int64, device=x.device) if out is None else out
    _argmax_kernel[(parts,)](x, part_val, part_idx, out, counters(x.device, 1), x.numel(), parts,
                             BLOCK=BLOCK, PARTS_PAD=max(2, triton.next_power_of_2(parts)), NAN_MARKER=nan_marker,
                             num_warps=8)
    return out
