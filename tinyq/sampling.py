"""Token sampling on the device, in torch ops and tinyq's one-launch argmax, so a CUDA graph can
capture it with the decode step.

Math, for logits ``l [V]`` (float32) and a :class:`tinyq.generate.SamplingConfig`:

1. repetition penalty ``r`` (HF's rule): for every token already in the context,
   ``l_i <- l_i / r`` if ``l_i > 0`` else ``l_i * r``; the context is a boolean mask ``seen [V]``
   on the device, set from the prompt once and updated by every sampled token;
2. ``temperature == 0``: ``argmax l`` (greedy);
3. else ``l <- l / T``; top-k keeps the ``k`` largest; top-p keeps the smallest set of the
   most likely tokens whose probability reaches ``p``; then the exponential race
   ``argmax_i exp(l_i) / E_i`` with ``E_i ~ Exp(1)`` (``argmax l_i - log E_i``, the Gumbel-max
   trick), which draws token ``i`` with probability ``softmax(l)_i`` exactly.

A NaN logit (a model whose activations overflowed) makes the token -1 (the argmax's NaN marker), so
the host, which reads the token anyway, can say so instead of decoding garbage:
:func:`checked_token`.

The noise ``E`` is drawn outside the graph, from the generation's own ``torch.Generator`` (so a
seed reproduces a generation and nothing global changes), into a buffer the graph reads.

A :class:`Sampler` owns the static tensors a captured graph reads (``inv_temperature``,
``top_p``, ``penalty``, ``seen``, ``noise``); :meth:`Sampler.load` points it at a new generation
by writing them, so one captured graph serves every generation with the same :func:`sampler_key`.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from tinyq.ops.reduce import argmax


def sampler_key(cfg, vocab_size: int) -> tuple:
    """What the sampling ops' shapes and branches depend on (a captured graph is valid per key)."""
    greedy = cfg.temperature == 0
    top_k = cfg.top_k if (not greedy and 0 < cfg.top_k < vocab_size) else 0
    return greedy, top_k, (not greedy) and cfg.top_p < 1.0, cfg.repetition_penalty != 1.0, vocab_size


class Sampler:
    """Device-side sampling for one :func:`sampler_key`; see the module docstring for the math."""

    def __init__(self, key: tuple, device: torch.device):
        self.key = key
        self.greedy, self.top_k, self.use_top_p, self.use_penalty, vocab = key
        f32 = dict(dtype=torch.float32, device=device)
        self.inv_temperature = torch.ones(1, **f32)
        self.top_p = torch.ones(1, **f32)
        self.penalty = torch.ones(1, **f32)
        self.seen = torch.zeros(vocab, dtype=torch.bool, device=device)
        self.noise = torch.ones(vocab, **f32)
        self.rng: Optional[torch.Generator] = None
        self.device = device

    def load(self, cfg, context_ids: Sequence[int] = (), rng: Optional[torch.Generator] = None) -> "Sampler":
        """Set this generation's temperature, top-p, penalty, context and random stream."""
        if sampler_key(cfg, self.key[-1]) != self.key:
            raise ValueError(f"sampling settings {cfg} do not match this sampler's key {self.key}")
        if not self.greedy:
            self.inv_temperature.fill_(1.0 / cfg.temperature)
            self.top_p.fill_(cfg.top_p)
            if rng is None:
                rng = torch.Generator(device=self.device)
                rng.manual_seed(cfg.seed) if cfg.seed is not None else rng.seed()
            self.rng = rng
        if self.use_penalty:
            self.penalty.fill_(cfg.repetition_penalty)
            self.seen.zero_()
            if len(context_ids):
                idx = torch.tensor(sorted(set(int(t) for t in context_ids)), dtype=torch.long)
                self.seen[idx.to(self.device)] = True
        return self

    def draw_noise(self) -> None:
        """Fill the noise for the next token (outside a graph; nothing to do when greedy)."""
        if not self.greedy:
            self.noise.exponential_(generator=self.rng)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """The next token, an int64 tensor ``[1]`` on the device, from ``logits [V]``; marks it seen.
        No host synchronization: safe inside a CUDA graph."""
        lg = logits if self.greedy and not self.use_penalty else logits.float()
        if self.use_penalty:
            lg = torch.where(self.seen, torch.where(lg > 0, lg / self.penalty, lg * self.penalty), lg)
        if self.greedy:
            token = argmax(lg, nan_marker=True)
        else:
            lg = lg * self.inv_temperature
            if self.top_k:
                kth = torch.topk(lg, self.top_k).values[-1]
                lg = lg.masked_fill(lg < kth, float("-inf"))
            if self.use_top_p:
                ordered, order = torch.sort(lg, descending=True)
                probs = torch.softmax(ordered, dim=-1)
                drop = probs.cumsum(-1) - probs >= self.top_p  # keep the smallest set reaching top_p
                lg = lg.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
            # noise 0 (probability 2^-24 per draw) would turn a masked -inf into NaN, which argmax picks
            token = argmax(lg - torch.log(self.noise.clamp_min(1e-30)), nan_marker=True)
        if self.use_penalty:
            self.seen.index_fill_(0, token.clamp_min(0), True)  # -1 (NaN logits) must not index
        return token


def checked_token(token: int) -> int:
    """``token`` as read on the host; ValueError for the NaN marker (-1) the sampler leaves."""
    if token < 0:
        raise ValueError("the model's logits are NaN: its activations overflowed or its weights hold NaN "
                         "(an fp16 model that overflows runs in bf16 or fp32: precision='bf16')")
    return token
