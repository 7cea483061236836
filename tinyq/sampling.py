"""Token sampling on the device, in torch ops and tinyq's one-launch argmax, so a CUDA graph can
capture it with the decode step.

Math, for logits ``l [V]`` (float32) and a :class:`SamplingConfig` (the settings, checked once by
:meth:`SamplingConfig.validate`):

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

import numbers
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch

from tinyq.ops.reduce import argmax


def is_int(x) -> bool:
    """An integer, not a bool (``True`` is an int to Python, but never a meant count or token id)."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass
class SamplingConfig:
    """How to pick tokens and when to stop. ``temperature == 0`` is greedy decoding."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    repetition_penalty: float = 1.0  # 1: off; > 1 discourages tokens already in the context
    seed: Optional[int] = None
    stop_token_ids: Sequence[int] = ()  # in addition to the tokenizer's / model's EOS
    stop_strings: Sequence[str] = ()

    def validate(self, vocab_size: Optional[int] = None) -> "SamplingConfig":
        """Check every setting (a ValueError naming the bad one) and return ``self``, normalized: one
        stop string or one stop token id becomes a tuple of one. With ``vocab_size`` (a generator
        knows its model's), stop token ids must also be ids of that vocabulary."""
        def bad(msg):
            raise ValueError(f"invalid sampling setting: {msg}")

        if not is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            bad(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if not (_is_number(self.temperature) and 0 <= self.temperature < float("inf")):
            bad(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if not is_int(self.top_k) or self.top_k < 0:
            bad(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        if not (_is_number(self.top_p) and 0 < self.top_p <= 1):
            bad(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not (_is_number(self.repetition_penalty) and 0 < self.repetition_penalty < float("inf")):
            bad(f"repetition_penalty must be finite and > 0, got {self.repetition_penalty!r}")
        if 0 < self.temperature < 1e-30:  # 1 / temperature must stay a float32
            bad(f"temperature {self.temperature!r} is too small to divide by; use 0 for greedy decoding")
        if self.seed is not None and not (is_int(self.seed) and -2 ** 63 <= self.seed < 2 ** 64):
            bad(f"seed must be an int in [-2**63, 2**64), got {self.seed!r}")
        if isinstance(self.stop_strings, str):  # one stop string, not one per character
            self.stop_strings = (self.stop_strings,)
        if any(not isinstance(s, str) or not s for s in self.stop_strings):
            bad(f"stop_strings must be non-empty strings, got {list(self.stop_strings)!r}")
        ids = self.stop_token_ids
        if is_int(ids):  # one stop token id
            ids = (ids,)
        elif isinstance(ids, Iterable) and not isinstance(ids, (str, bytes)):
            ids = tuple(ids)
        if not isinstance(ids, tuple) or not all(is_int(t) for t in ids):
            bad(f"stop_token_ids must be token ids (ints; a stop text goes in stop_strings), got {ids!r}")
        self.stop_token_ids = tuple(int(t) for t in ids)
        out = [t for t in self.stop_token_ids if t < 0 or (vocab_size is not None and t >= vocab_size)]
        if out:
            bad(f"stop token id {out[0]} is not a token of the model"
                + (f" (vocab_size={vocab_size})" if vocab_size is not None else " (ids are >= 0)"))
        return self


def make_config(**settings) -> SamplingConfig:
    """A validated :class:`SamplingConfig`; an unknown setting is a ValueError naming it."""
    known = SamplingConfig.__dataclass_fields__
    unknown = sorted(k for k in settings if k not in known)
    if unknown:
        raise ValueError(f"unknown sampling setting(s) {unknown}; known: {sorted(known)}")
    return SamplingConfig(**settings).validate()


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
