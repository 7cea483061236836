"""Perplexity over non-overlapping windows.

The token stream is cut into consecutive windows of ``window`` tokens (the tail shorter than a window
is dropped); inside each window token ``t+1`` is predicted from tokens ``0..t``, so a window scores
``window - 1`` tokens. ``PPL = exp(total NLL / scored tokens)``.
"""
from __future__ import annotations

import math
import sys
import time

import torch


def windows(ids, window: int, max_windows: int = None) -> torch.Tensor:
    """``[n, window]`` int64 windows cut from the token ids ``ids`` (first ``max_windows`` if given);
    a window predicts its tokens after the first, so it needs at least 2."""
    if window < 2 or (max_windows is not None and max_windows < 1):
        raise ValueError(f"windows need window >= 2 and max_windows >= 1, got {window} and {max_windows}")
    ids = torch.as_tensor(ids, dtype=torch.long).flatten()
    n = ids.numel() // window
    if max_windows is not None:
        n = min(n, max_windows)
    if n < 1:
        raise ValueError(f"evaluation text has {ids.numel()} tokens, fewer than one window of {window}")
    return ids[: n * window].view(n, window)


def _logits(model, x):
    out = model(x)
    return getattr(out, "logits", out)


@torch.no_grad()
def perplexity(model, wins: torch.Tensor, batch: int = 1, device=None, progress: bool = False) -> float:
    """Perplexity of ``model`` (``model(ids) -> logits`` or an HF output with ``.logits``) over ``wins``."""
    if device is None:
        first = next(iter(model.parameters()), None)
        first = first if first is not None else next(iter(model.buffers()), None)
        device = first.device if first is not None else "cpu"
    total, count, t0 = 0.0, 0, time.time()
    for start in range(0, wins.shape[0], batch):
        x = wins[start : start + batch].to(device)
        logits = _logits(model, x)[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum")
        total += nll.item()
        count += x[:, 1:].numel()
        if progress:
            done = min(start + batch, wins.shape[0])
            print(f"  ppl windows {done}/{wins.shape[0]}: {math.exp(total / count):.3f} ({time.time() - t0:.0f}s)",
                  file=sys.stderr, flush=True)
    return math.exp(total / count)
