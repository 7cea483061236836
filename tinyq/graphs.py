"""CUDA graphs of the model's steps over a static KV cache: decode (with sampling) and padded prefill.

An eager forward of an 8B model launches ~300 kernels; on a VM where one launch costs 10-20 us of
host time, a 32-token chat turn or a 256-token prompt would cost more Python time than GPU time.
Captured once, each step replays with one call.

- :class:`DecodeGraph`: the one-token forward, optionally followed by the device sampler
  (:mod:`tinyq.sampling`), which writes the next token straight into the graph's own input: a
  decode step is one replay and one host read of the token id.
- :class:`BatchGraphs`: a function whose output rows depend only on the same input rows (a vision
  tower over a batch of tiles), run as chunks of 8, 4, 2, 1 rows with one graph per chunk size.
- :class:`PrefillGraphs`: the forward of a chunk padded up to a bucket length (16, 32, ..., 2048),
  one graph per bucket, sharing one memory pool. The chunk's embeddings go into a static buffer
  and its real length into a device scalar; the model (``valid=``) takes the logits of the last
  real row and advances the cache's device counter by the real length only. Padding rows come
  after the real ones, so causal attention keeps the real rows from seeing them, and their keys
  and values land past the fill level, where the cache treats entries as stale. Chunks long
  enough to be GPU-bound eagerly are left to the eager forward.

Graphs read the position from ``cache.seq_pos`` on the device, so one capture serves every
position. Capturing runs the step twice eagerly on a side stream first (Triton compiles, the
allocator settles), then leaves the cache as it found it.
"""
from __future__ import annotations

import time
from typing import Dict, Optional, Sequence

import torch

# Chunk lengths with a graph each. Up to 2048: a small model's eager forward is host-bound at any
# length (SmolLM2-135M: ~25 ms of launches for 1024 tokens against ~2 ms of GPU time), and a large
# one's W4A16 GEMMs want large M (re-dequantizing the weights per short chunk costs ~50% at 4k).
PREFILL_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048)

# An eager forward costs the host ~1.2 ms per decoder layer on the lent H200 VM (~15 launches
# through Python and the op wrappers). A chunk whose linears need at least that much GPU time per
# layer (at the ~525 TFLOP/s W4A16 prefill reached there) runs eagerly: the GPU hides the host.
# 7-8B models cross it at ~1400 tokens; SmolLM2-135M (3.5M linear weights a layer) never does.
EAGER_MIN_LAYER_FLOP = 1.2e-3 * 525e12


def _linear_flop_per_token(layer) -> float:
    """2 x the weights of ``layer``'s linear modules (anything with in/out_features and no children)."""
    return 2.0 * sum(m.in_features * m.out_features for m in layer.modules()
                     if hasattr(m, "in_features") and hasattr(m, "out_features") and not any(m.children()))


def _warm_then_capture(run, cache, graph: torch.cuda.CUDAGraph, pool=None):
    """Run ``run()`` twice on a side stream, then capture it into ``graph``; the cache, if any
    (contents past its fill level aside), and its counters are left as they were. Returns the
    captured output."""
    length = cache.length if cache is not None else None
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            run()
            if cache is not None:
                cache.truncate(length)
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(graph, pool=pool):
        out = run()
    if cache is not None:
        cache.truncate(length)  # capture ran no kernel, but host-side bookkeeping may have moved
    return out


class DecodeGraph:
    """The one-token forward of ``model`` over ``cache`` (and, with a ``sampler``, the choice of
    the next token), captured as a CUDA graph."""

    def __init__(self, model, cache, sampler=None, pool=None):
        self.model, self.cache, self.sampler = model, cache, sampler
        self.ids = torch.zeros(1, 1, dtype=torch.long, device=cache.device)
        self._ids_hold: Optional[int] = None  # the token id the graph left in self.ids, if known
        cache.check_room(1)

        def run():
            logits = model(self.ids, cache)[0, -1]  # [V]
            if sampler is None:
                return logits
            token = sampler(logits)
            # the next step's input, without a host round trip; the NaN marker (-1) is no token id,
            # and the warm-up runs feed it back before any host could refuse it
            torch.clamp(token, min=0, out=self.ids.view(1))  # one kernel: the clamp writes the copy
            return token

        self.graph = torch.cuda.CUDAGraph()
        # the warm-up runs sample for real and would leave their tokens in the repetition-penalty mask
        seen = sampler.seen.clone() if sampler is not None and sampler.use_penalty else None
        self.out = _warm_then_capture(run, cache, self.graph, pool)
        if seen is not None:
            sampler.seen.copy_(seen)

    def _replay(self, token: int) -> None:
        self.cache.check_room(1)
        if token != self._ids_hold:
            self.ids.fill_(token)
        self.graph.replay()
        self.cache.length += 1  # the replay advanced seq_pos on the device

    def step(self, token: int) -> torch.Tensor:
        """Feed ``token``; returns the logits ``[V]`` (a static buffer). Without a sampler only."""
        self._replay(token)
        return self.out

    def step_sample(self, token: int) -> int:
        """Feed ``token``; returns the sampled next token (one host read)."""
        self.sampler.draw_noise()
        self._replay(token)
        nxt = int(self.out)
        self._ids_hold = max(nxt, 0)  # what the graph wrote into self.ids
        return nxt


class BatchGraphs:
    """``fn(x)`` for a batch ``x [B, ...]`` whose output row ``i`` depends on input row ``i`` only
    (a vision tower's tiles or frames), as CUDA graph replays: the batch is cut into chunks of the
    sizes in ``chunks`` (largest first: 17 tiles run as 8 + 8 + 1), each size captured once, on first
    use, for the input's row shape and dtype. All sizes share one memory pool; replays are
    sequential and each chunk's output is copied out before the next, so sharing is safe.

    Why chunks and not one graph per batch size: a graph holds its activations for good, and each
    new size would cost a capture; a 448-pixel tile is already 1024 tokens, so chunks of 8 keep the
    GEMMs large. ``capture=False`` runs the same chunks eagerly (CPU tests of the chunking)."""

    def __init__(self, fn, chunks: Sequence[int] = (8, 4, 2, 1), capture: bool = True):
        if not chunks or min(chunks) != 1:
            raise ValueError(f"BatchGraphs chunks must include 1 (any batch size must be reachable), got {chunks}")
        self.fn = fn
        self.chunks = tuple(sorted({int(c) for c in chunks}, reverse=True))
        self.capture = capture
        self.graphs: Dict[tuple, tuple] = {}  # (size, row shape, dtype) -> (graph, static input, static output)
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self.capture_s = 0.0

    def split(self, n: int) -> list:
        """Chunk sizes that add up to ``n``, largest first."""
        sizes = []
        for c in self.chunks:
            sizes += [c] * (n // c)
            n %= c
        return sizes

    @torch.inference_mode()  # the static buffers are inference tensors whatever mode the caller is in
    def _replay(self, x: torch.Tensor) -> torch.Tensor:
        key = (x.shape[0], tuple(x.shape[1:]), x.dtype)
        entry = self.graphs.get(key)
        if entry is None:
            t0 = time.perf_counter()
            static = x.clone()
            graph = torch.cuda.CUDAGraph()
            out = _warm_then_capture(lambda: self.fn(static), None, graph, self.pool)
            entry = self.graphs[key] = (graph, static, out)
            self.capture_s += time.perf_counter() - t0
        graph, static, out = entry
        static.copy_(x)
        graph.replay()
        return out.clone()  # the next replay of this size overwrites ``out``

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 0:
            return self.fn(x)
        run = self._replay if self.capture else self.fn
        outs, start = [], 0
        for size in self.split(x.shape[0]):
            outs.append(run(x[start:start + size]))
            start += size
        return outs[0] if len(outs) == 1 else torch.cat(outs)


class PrefillGraphs:
    """Padded-chunk prefill graphs for ``model`` over ``cache`` (see the module docstring).

    ``run(embeds)`` prefills a chunk ``[1, n, hidden]`` (n up to the largest bucket) and returns
    the logits ``[V]`` of its last token, or None when no bucket fits (n too large, or the cache
    has no room for the padded length): the caller then runs the eager forward. With
    ``capture=False`` the same padded forward runs eagerly (CPU tests of the padding logic).

    A chunk whose bucket would pad more than ``split_waste`` rows runs as pieces instead
    (:meth:`pieces`): 1074 tokens as 1024 + 50 (padded to 64), not as 2048. Each piece costs a pass
    over the weights (for a W4A16 model at M > 128, dequantizing each one again): on Qwen2-7B
    shapes the 50-token piece took ~5 ms, the 974 padding rows ~18 ms.

    A chunk long enough that its linears keep the GPU busier than an eager forward keeps the
    host (:meth:`gpu_bound`) gets None: the caller's eager forward at the exact length then costs
    GPU time only, with no padding and one pass over the weights (Qwen2-7B W4A16, 3122 tokens:
    77.7 ms eager against 89.1 ms as graph pieces of 2048 + 1024 + 64).
    """

    def __init__(self, model, cache, buckets: Sequence[int] = PREFILL_BUCKETS, capture: bool = True,
                 split_waste: int = 256, eager_min_layer_flop: float = EAGER_MIN_LAYER_FLOP):
        self.model, self.cache = model, cache
        self.capture = capture
        self.split_waste = split_waste
        self.eager_min_layer_flop = eager_min_layer_flop
        self.layer_flop_per_token = _linear_flop_per_token(model.model.layers[0])
        # a bucket that only GPU-bound chunks would fill (at most split_waste padding rows) is never
        # replayed: no capture, no memory for it
        buckets = sorted(int(b) for b in buckets)
        self.buckets = tuple(b for b in buckets if not self.gpu_bound(max(1, b - split_waste))) or (buckets[0],)
        hidden = model.config.hidden_size
        self.embeds = torch.zeros(1, self.buckets[-1], hidden, dtype=model.dtype, device=cache.device)
        self.valid = torch.zeros(1, dtype=torch.int32, device=cache.device)
        self.graphs: Dict[int, tuple] = {}
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self.capture_s = 0.0  # seconds spent capturing, for stats that exclude first-use costs

    def bucket_for(self, n: int) -> Optional[int]:
        """The bucket a chunk of ``n`` tokens at the fill level pads to, or None (longer than every
        bucket, or no room for the padding)."""
        b = next((b for b in self.buckets if b >= n), None)
        if b is None or self.cache.length + b > self.cache.max_seq_len:
            return None
        return b

    def gpu_bound(self, n: int) -> bool:
        """Whether an eager forward of ``n`` tokens is GPU-bound: its linears' work per layer is at
        least ``eager_min_layer_flop``."""
        return n * self.layer_flop_per_token >= self.eager_min_layer_flop

    def pieces(self, n: int) -> Optional[list]:
        """``[(real length, bucket), ...]`` that prefill ``n`` tokens from the fill level, or None
        when they cannot fit. A full smaller bucket is cut off while the rest's bucket would pad
        more than ``split_waste`` rows, or would not fit in the cache."""
        out, start, room = [], self.cache.length, self.cache.max_seq_len
        while n > 0:
            b = next((c for c in self.buckets if c >= n), None)
            fits = b is not None and start + b <= room
            below = [c for c in self.buckets if c < n]
            take = n
            if (not fits or b - n > self.split_waste) and below:
                take = b = below[-1]
                fits = start + b <= room
            if not fits:
                return None
            out.append((take, b))
            start += take
            n -= take
        return out

    def _forward(self, bucket: int) -> torch.Tensor:
        return self.model(None, self.cache, inputs_embeds=self.embeds[:, :bucket], valid=self.valid)[0, -1]

    def ensure(self, bucket: int) -> None:
        """Capture the graph of ``bucket`` if it is not there yet (largest first shares the pool best)."""
        if not self.capture or bucket in self.graphs:
            return
        t0 = time.perf_counter()
        self.valid.fill_(bucket)
        graph = torch.cuda.CUDAGraph()
        out = _warm_then_capture(lambda: self._forward(bucket), self.cache, graph, self.pool)
        self.graphs[bucket] = (graph, out)
        self.capture_s += time.perf_counter() - t0

    def run(self, embeds: torch.Tensor) -> Optional[torch.Tensor]:
        """Prefill ``embeds [1, n, hidden]`` through the bucket graphs; returns the last real row's
        logits, or None for the caller's eager forward (no fitting plan, or :meth:`gpu_bound`)."""
        n_all = embeds.shape[1]
        if self.gpu_bound(n_all):
            return None
        plan = self.pieces(n_all)
        if plan is None:  # a split that does not fit may still leave room for one padded bucket
            bucket = self.bucket_for(n_all)
            plan = None if bucket is None else [(n_all, bucket)]
        if plan is None:
            return None
        # every capture first (largest first shares the pool best): a capture that fails must not
        # leave earlier pieces in the cache; warm-up runs also overwrite the static inputs
        for bucket in sorted({b for _, b in plan}, reverse=True):
            self.ensure(bucket)
        start, logits = 0, None
        for n, bucket in plan:
            self.embeds[:, :n].copy_(embeds[:, start:start + n])
            self.valid.fill_(n)
            if self.capture:
                graph, logits = self.graphs[bucket]
                graph.replay()
            else:
                logits = self._forward(bucket)
            self.cache.length += n  # the forward advanced seq_pos on the device by n
            start += n
        return logits
