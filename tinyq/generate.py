"""Text generation over a static KV cache: sampling, stop conditions, streaming text, timing.

``generate(model, tokenizer, prompt, ...)`` returns a :class:`GenerationResult`;
``stream(model, tokenizer, prompt, ...)`` returns a :class:`TextStream` that yields text deltas
(their concatenation equals the non-streamed text) and holds the result once exhausted.

A :class:`Generator` owns one cache and remembers which token ids it holds (``cached_ids``), so a
new prompt that extends the cached one (the next chat turn) prefills only its new suffix. Its
``epoch`` counts changes to the cache: a stream paused while something else used the cache (another
stream or chat turn, ``reset``, ``truncate``) raises :class:`SupersededError` when resumed instead
of decoding on tokens that are not its own.
Prefill runs in chunks over the cache. On CUDA every chunk replays a CUDA graph captured for its
padded length, and every decode step replays a graph that also samples the next token on the
device (:mod:`tinyq.graphs`, :mod:`tinyq.sampling`): a prompt, a turn or a token costs GPU time
and a handful of host calls. On CPU the same steps run eagerly.
"""
from __future__ import annotations

import operator
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch

from tinyq.graphs import PREFILL_BUCKETS, DecodeGraph, PrefillGraphs
from tinyq.sampling import (  # SamplingConfig and make_config re-exported: the public API names them here
    SamplingConfig, Sampler, checked_token, is_int, make_config, sampler_key,
)
from tinyq.warmup import CompileTracker

# Tokens per prefill forward: bounds activation memory (Llama-3-8B's gate/up output is 235 MB at
# 4096 tokens) while keeping the W4A16 GEMMs at large M, where they run near cuBLAS; every chunk
# dequantizes every weight again (H200, Llama-3-8B W4A16: TTFT@4096 146 ms in 512-token chunks
# vs 97 ms in 2048; Qwen2-7B, 3122 tokens: 77.7 ms as one forward vs 89.1 ms cut at 2048).
PREFILL_CHUNK = 4096


class ContextOverflowError(ValueError):
    """The prompt (plus one generated token) does not fit in the cache's ``max_seq_len``."""


class SupersededError(RuntimeError):
    """A paused stream or chat turn was resumed after something else changed its generator's cache."""

    def __init__(self):
        super().__init__(
            "this generation was superseded by a later turn/stream, reset(), truncate() or drop_oldest_turns() on "
            "the same Generator, which changed its KV cache; nothing of it was committed (to the cache or a chat "
            "history): start it again"
        )


@dataclass
class GenerationStats:
    prompt_tokens: int = 0  # tokens of the prompt
    prefilled_tokens: int = 0  # of which actually prefilled (the rest were already in the cache)
    new_tokens: int = 0
    ttft_s: float = 0.0  # start -> first token sampled (prefill + one sample), compilation excluded
    decode_s: float = 0.0  # the decode steps after the first token (the one that produced a stop token included)
    decode_steps: int = 0  # how many: new_tokens - 1, plus 1 when a stop token ended the answer
    compiled_kernels: int = 0  # Triton kernels compiled during this generation (a shape seen for the first time)
    compile_s: float = 0.0  # the time they took, excluded from ttft_s / decode_s
    capture_s: float = 0.0  # CUDA graphs captured for a first-seen chunk length or sampler, also excluded

    @property
    def ms_per_token(self) -> float:
        """Mean latency of a decode step after the first token (0 when there was none)."""
        return 1e3 * self.decode_s / self.decode_steps if self.decode_steps else 0.0

    def summary(self) -> str:
        line = (f"TTFT {1e3 * self.ttft_s:.0f} ms ({self.prefilled_tokens} prompt tokens prefilled) | "
                f"{self.ms_per_token:.1f} ms/token ({self.new_tokens} tokens)")
        if self.compiled_kernels or self.capture_s:
            line += (f" | first use of a new shape: {self.compiled_kernels} kernels compiled in "
                     f"{self.compile_s:.1f} s, graphs captured in {self.capture_s:.2f} s, not counted above")
        return line


@dataclass
class GenerationResult:
    text: str
    token_ids: List[int]
    finish_reason: str  # "stop" (stop token/string), "length" (max_new_tokens), "context_full"
    stats: GenerationStats = field(default_factory=GenerationStats)


def sample_token(logits: torch.Tensor, cfg: SamplingConfig, context_ids: Sequence[int] = (), rng=None) -> int:
    """Pick one token from ``logits [V]`` (any float dtype; the math runs in float32) with the
    device sampler of :mod:`tinyq.sampling` (``rng``: a ``torch.Generator`` on logits' device)."""
    sampler = Sampler(sampler_key(cfg, logits.numel()), logits.device).load(cfg, context_ids, rng)
    sampler.draw_noise()
    return checked_token(int(sampler(logits)))


_cpu_threads_tuned = False


@torch.inference_mode()
def tune_cpu_threads(model, reps: int = 2) -> int:
    """On CPU, keep torch's thread count or drop to one thread, whichever runs a one-token forward
    faster; done once per process. It changes the process-wide ``torch.set_num_threads``, so only
    a program that owns the process calls it (the chat CLI does); a :class:`Generator` does not. Why: when other processes keep the cores busy, every
    multi-threaded op waits for a descheduled OpenMP thread; measured on 2 busy cores with the
    default model: 2 threads 815-1200 ms/token, 1 thread 73-80 ms/token (idle: 2 threads ~50)."""
    global _cpu_threads_tuned
    n = torch.get_num_threads()
    if _cpu_threads_tuned or n == 1 or model.device.type != "cpu":
        return n
    ids = torch.zeros(1, 1, dtype=torch.long)
    best = None
    for threads in (n, 1):
        torch.set_num_threads(threads)
        model(ids)  # warm
        t0 = time.perf_counter()
        for _ in range(reps):
            model(ids)
        dt = time.perf_counter() - t0
        if best is None or dt < best[0]:
            best = (dt, threads)
    torch.set_num_threads(best[1])
    _cpu_threads_tuned = True
    return best[1]


class Generator:
    """Generation over one persistent :class:`tinyq.cache.StaticKVCache` for ``model``.

    ``cached_ids`` are the token ids whose keys/values the cache holds, in order. Anything that
    fails mid-way (an exception, Ctrl-C) can be undone with :meth:`truncate` to a length saved
    before; :meth:`stream` does that itself when a prefill fails.

    ``epoch`` goes up with every completed change to the cache (:meth:`truncate`, :meth:`reset`,
    :meth:`prefill`, :meth:`decode`, :meth:`decode_next`; a call that fails part way leaves that to
    the truncate that undoes it) and with :meth:`supersede`. A stream remembers the epoch its own
    last step left and compares it (one int) each time it is resumed, so a stream or chat turn
    paused while anything else used the cache raises :class:`SupersededError` rather than decoding
    on another generation's tokens. ``max_seq_len``: a positive int, or None for the model's own.
    """

    def __init__(self, model, tokenizer, max_seq_len: Optional[int] = None, cuda_graph: Optional[bool] = None,
                 prefill_chunk: int = PREFILL_CHUNK, embed_fn: Optional[Callable] = None,
                 prefill_buckets: Sequence[int] = PREFILL_BUCKETS):
        check_max_seq_len(max_seq_len)
        check_prefill_chunk(prefill_chunk)
        self.model, self.tokenizer = model, tokenizer
        # (ids [1, S] on the device, position of ids[0]) -> inputs_embeds [1, S, hidden]: how a VLM
        # splices image features into the prefill (tinyq.vlm.session); None embeds the ids.
        self.embed_fn = embed_fn
        self.cache = model.new_cache(max_seq_len)
        self.cached_ids: List[int] = []
        self.epoch = 0
        self.prefill_chunk = prefill_chunk
        self.cuda_graph = self.cache.device.type == "cuda" if cuda_graph is None else cuda_graph
        self._decode_graphs: Dict[Optional[tuple], DecodeGraph] = {}  # per sampler key (None: logits only)
        self._samplers: Dict[tuple, Sampler] = {}
        self.prefill_graphs: Optional[PrefillGraphs] = None
        if self.cuda_graph:
            buckets = [b for b in prefill_buckets if b <= prefill_chunk] or [prefill_chunk]
            self.prefill_graphs = PrefillGraphs(model, self.cache, buckets)
        self.decode_capture_s = 0.0
        CompileTracker.install()
        cfg = model.config
        eos = set(cfg.eos_token_ids)
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        self.eos_ids = eos

    @property
    def max_seq_len(self) -> int:
        return self.cache.max_seq_len

    @property
    def vocab_size(self) -> int:
        """Token ids this model embeds and samples: ``0 .. vocab_size - 1``."""
        return self.model.config.vocab_size

    @property
    def graph_count(self) -> int:
        """CUDA graphs captured so far (prefill buckets and decode steps)."""
        return len(self._decode_graphs) + (len(self.prefill_graphs.graphs) if self.prefill_graphs else 0)

    @property
    def capture_s(self) -> float:
        """Seconds spent capturing CUDA graphs so far (first uses, not steady-state cost)."""
        return self.decode_capture_s + (self.prefill_graphs.capture_s if self.prefill_graphs else 0.0)

    def truncate(self, n: int) -> None:
        self.cache.truncate(n)
        del self.cached_ids[n:]
        self.epoch += 1

    def reset(self) -> None:
        self.truncate(0)

    def supersede(self) -> None:
        """Make every stream started so far raise :class:`SupersededError` at its next step, the
        cache left as it is: for a change to what the cached tokens are for (a chat's history)."""
        self.epoch += 1

    def check_prompt(self, prompt_ids) -> List[int]:
        """``prompt_ids`` as a non-empty list of ints, each an id of the model's vocabulary, or a
        ValueError naming the first bad one. Checked once per prompt: an out-of-range id would be an
        IndexError on a CPU and, on a GPU, a device-side assert that breaks the CUDA context."""
        try:
            ids = [operator.index(t) for t in prompt_ids]
        except TypeError as exc:
            raise ValueError(f"a prompt is a sequence of int token ids; {exc}") from None
        if not ids:
            raise ValueError("the prompt is empty: nothing to generate from")
        lo, hi = min(ids), max(ids)
        if lo < 0 or hi >= self.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"prompt token id {bad} (position {ids.index(bad)}) is not a token of the model: "
                             f"vocab_size={self.vocab_size}, ids 0..{self.vocab_size - 1}")
        return ids

    def check_fits(self, prompt_ids: Sequence[int]) -> None:
        """Raise :class:`ContextOverflowError` unless the prompt and one new token fit the cache."""
        if len(prompt_ids) + 1 > self.max_seq_len:
            raise ContextOverflowError(
                f"the prompt has {len(prompt_ids)} tokens; with one new token that exceeds max_seq_len="
                f"{self.max_seq_len}"
            )

    @torch.inference_mode()
    def prefill(self, ids: Sequence[int]) -> torch.Tensor:
        """Append ``ids`` (non-empty) to the cache in chunks; returns the last position's logits ``[V]``."""
        self.cache.check_room(len(ids))
        dev = self.cache.device
        logits = None
        for start in range(0, len(ids), self.prefill_chunk):
            chunk = list(ids[start : start + self.prefill_chunk])
            x = torch.tensor([chunk], device=dev)
            if self.embed_fn is None:
                embeds = self.model.model.embed_tokens(x)
            else:
                embeds = self.embed_fn(x, self.cache.length)
            logits = self.prefill_graphs.run(embeds) if self.prefill_graphs is not None else None
            if logits is None:  # no graph: CPU, or no bucket fits (chunk too long, cache nearly full)
                logits = self.model(None, self.cache, last_only=True, inputs_embeds=embeds)[0, -1]
            self.cached_ids.extend(chunk)
        self.epoch += 1
        return logits

    def _decode_graph(self, sampler: Optional[Sampler]) -> DecodeGraph:
        key = None if sampler is None else sampler.key
        graph = self._decode_graphs.get(key)
        if graph is None:
            t0 = time.perf_counter()
            graph = self._decode_graphs[key] = DecodeGraph(self.model, self.cache, sampler)
            self.decode_capture_s += time.perf_counter() - t0
        return graph

    @torch.inference_mode()
    def decode(self, token: int) -> torch.Tensor:
        """Feed one token; returns the logits ``[V]`` for the next one."""
        if self.cuda_graph:
            logits = self._decode_graph(None).step(token)
        else:
            logits = self.model(torch.tensor([[token]], device=self.cache.device), self.cache)[0, -1]
        self.cached_ids.append(token)
        self.epoch += 1
        return logits

    @torch.inference_mode()
    def sampler(self, cfg: SamplingConfig, context_ids: Sequence[int] = (), rng=None) -> Sampler:
        """The device sampler for ``cfg``, loaded with this generation's context and random stream
        (one per sampler key, reused: a captured decode graph reads its tensors)."""
        key = sampler_key(cfg, self.model.config.vocab_size)
        sampler = self._samplers.get(key)
        if sampler is None:
            sampler = self._samplers[key] = Sampler(key, self.cache.device)
        return sampler.load(cfg, context_ids, rng)

    @torch.inference_mode()
    def first_token(self, logits: torch.Tensor, sampler: Sampler) -> int:
        """Sample the token that follows a prefill's ``logits``."""
        sampler.draw_noise()
        return checked_token(int(sampler(logits)))

    @torch.inference_mode()
    def decode_next(self, token: int, sampler: Sampler) -> int:
        """Feed ``token``; returns the next token, sampled on the device (on CUDA: one graph replay
        and one host read)."""
        if self.cuda_graph:
            nxt = checked_token(self._decode_graph(sampler).step_sample(token))
        else:
            logits = self.model(torch.tensor([[token]], device=self.cache.device), self.cache)[0, -1]
            nxt = self.first_token(logits, sampler)
        self.cached_ids.append(token)
        self.epoch += 1
        return nxt

    def reuse_prefix(self, prompt_ids: Sequence[int]) -> int:
        """Keep the longest cached prefix of ``prompt_ids`` (at least one token is left to prefill,
        which produces the logits); returns how many tokens are kept."""
        n = 0
        limit = min(len(self.cached_ids), len(prompt_ids) - 1)
        while n < limit and self.cached_ids[n] == prompt_ids[n]:
            n += 1
        self.truncate(n)
        return n

    def stream(self, prompt_ids: Sequence[int], config: Optional[SamplingConfig] = None, **kwargs) -> "TextStream":
        """A :class:`TextStream` of the continuation of ``prompt_ids``; settings and ids are checked
        here (a ValueError), before anything touches the cache."""
        if config is not None and kwargs:
            raise ValueError("pass either a SamplingConfig or keyword settings, not both")
        config = (config or make_config(**kwargs)).validate(self.vocab_size)
        prompt_ids = self.check_prompt(prompt_ids)
        self.check_fits(prompt_ids)
        return TextStream(self, prompt_ids, config)


class DeltaStream:
    """Iterator of text deltas over the generator ``self._it``; ``.result`` (a
    :class:`GenerationResult`) is set when it is exhausted. Base of :class:`TextStream` and of a
    chat turn (:meth:`tinyq.chat.ChatSession.send`)."""

    result: Optional[GenerationResult] = None
    _it = None

    def __iter__(self):
        return self

    def __next__(self) -> str:
        return next(self._it)

    def text(self) -> str:
        """Consume the stream; return the whole text."""
        for _ in self:
            pass
        return self.result.text


class TextStream(DeltaStream):
    """Iterator of text deltas for one generation; ``.result`` is set when it is exhausted.

    Text is produced by decoding the whole generated id list after each token and emitting the
    new suffix, holding back (1) trailing U+FFFDs (an incomplete UTF-8 sequence the next byte
    tokens complete) and (2) any tail that could be the start of a stop string. So the deltas
    concatenate to exactly the final text, whatever the tokenizer's merges.
    """

    def __init__(self, gen: Generator, prompt_ids: List[int], cfg: SamplingConfig):
        self.gen, self.prompt_ids, self.cfg = gen, prompt_ids, cfg
        self.epoch = gen.epoch  # the generator's epoch as this stream's own last step left it
        self._it = self._run()

    def _run(self):
        gen, cfg = self.gen, self.cfg
        tok = gen.tokenizer
        stops = gen.eos_ids | set(cfg.stop_token_ids)
        stats = GenerationStats(prompt_tokens=len(self.prompt_ids))
        compiles, captured = CompileTracker.snapshot(), gen.capture_s
        t0 = time.perf_counter()
        sampler = gen.sampler(cfg, self.prompt_ids if cfg.repetition_penalty != 1.0 else ())
        kept = gen.reuse_prefix(self.prompt_ids)
        stats.prefilled_tokens = len(self.prompt_ids) - kept
        try:
            logits = gen.prefill(self.prompt_ids[kept:])
        except BaseException:
            gen.truncate(kept)  # a half-prefilled prompt is not a valid cache state
            raise
        self.epoch = gen.epoch  # the cache is this stream's now
        token = gen.first_token(logits, sampler)
        t_first = time.perf_counter()
        first_setup = CompileTracker.since(compiles).seconds + gen.capture_s - captured
        stats.ttft_s = t_first - t0 - first_setup
        out_ids: List[int] = []
        emitted, text, finish = "", "", "length"
        while True:
            if token in stops:
                finish = "stop"
                break
            out_ids.append(token)
            text = tok.decode(out_ids, skip_special_tokens=True)
            cut = _find_stop(text, cfg.stop_strings)
            if cut is not None:
                text, finish = text[:cut], "stop"
                break
            stable = len(text) - _held_back(text, cfg.stop_strings)
            if stable > len(emitted):
                delta = text[len(emitted):stable]
                emitted = text[:stable]
                yield delta
                if gen.epoch != self.epoch:  # paused while something else used the cache
                    raise SupersededError()
            if len(out_ids) >= cfg.max_new_tokens:
                break
            if gen.cache.length + 1 > gen.max_seq_len:
                finish = "context_full"
                break
            token = gen.decode_next(token, sampler)
            self.epoch = gen.epoch
            stats.decode_steps += 1
        stats.new_tokens = len(out_ids)
        total_compile = CompileTracker.since(compiles)
        stats.compiled_kernels, stats.compile_s = total_compile.kernels, total_compile.seconds
        stats.capture_s = gen.capture_s - captured
        stats.decode_s = time.perf_counter() - t_first - (total_compile.seconds + stats.capture_s - first_setup)
        if len(text) > len(emitted) and text.startswith(emitted):
            yield text[len(emitted):]
            if gen.epoch != self.epoch:  # the result may be committed (a chat turn): not on another's cache
                raise SupersededError()
        self.result = GenerationResult(text=text, token_ids=out_ids, finish_reason=finish, stats=stats)


def _find_stop(text: str, stop_strings) -> Optional[int]:
    hits = [i for i in (text.find(s) for s in stop_strings) if i >= 0]
    return min(hits) if hits else None


def _held_back(text: str, stop_strings) -> int:
    """Characters at the end of ``text`` not safe to emit yet: every trailing U+FFFD (a byte-fallback
    decoder gives one per byte of an unfinished character) and, before them, the longest tail that
    could begin a stop string (the unfinished character may be its next one)."""
    body = text.rstrip("\ufffd")
    hold = 0
    for s in stop_strings:
        for n in range(min(len(s) - 1, len(body)), 0, -1):  # longest proper prefix of s ending the text
            if body.endswith(s[:n]):
                hold = max(hold, n)
                break
    return len(text) - len(body) + hold


def _prompt_ids(tokenizer, prompt) -> list:
    """The ids of one prompt (a string, a sequence of ids, or a ``[S]`` / ``[1, S]`` integer tensor);
    :meth:`Generator.check_prompt` checks them against the vocabulary."""
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError("the prompt is empty: nothing to generate from")
        return list(tokenizer.encode(prompt, add_special_tokens=True))
    if isinstance(prompt, torch.Tensor):
        if prompt.dim() > 2 or (prompt.dim() == 2 and prompt.shape[0] != 1):
            raise ValueError(f"a tensor prompt is one sequence of token ids, [S] or [1, S]; got shape "
                             f"{tuple(prompt.shape)} (generate one prompt at a time)")
        if prompt.is_floating_point() or prompt.is_complex():
            raise ValueError(f"a tensor prompt holds token ids (an integer dtype), got {prompt.dtype}")
        return prompt.reshape(-1).tolist()
    return list(prompt)


def check_max_seq_len(max_seq_len) -> None:
    """None (the model's own) or a positive int; a ValueError otherwise (0 is not "the default")."""
    if max_seq_len is not None and (not is_int(max_seq_len) or max_seq_len < 1):
        raise ValueError(f"max_seq_len must be a positive int, or None for the model's own; got {max_seq_len!r}")


def check_prefill_chunk(prefill_chunk) -> None:
    """A positive int: the prefill's step through the prompt (0 would never advance, a float cannot
    slice it), checked before a cache is allocated."""
    if not is_int(prefill_chunk) or prefill_chunk < 1:
        raise ValueError(f"prefill_chunk must be a positive int (tokens per prefill step); got {prefill_chunk!r}")


def _generator_for(model, tokenizer, max_seq_len: Optional[int]) -> Generator:
    """One Generator (cache + CUDA graph) kept on the model and reused across calls."""
    check_max_seq_len(max_seq_len)
    want = int(model.max_seq_len if max_seq_len is None else max_seq_len)
    gen = getattr(model, "_tinyq_generator", None)
    if gen is None or not _still_fits(gen, model, tokenizer, want):
        gen = Generator(model, tokenizer, want)
        model._tinyq_generator = gen
    return gen


def _still_fits(gen: Generator, model, tokenizer, max_seq_len: int) -> bool:
    """Whether the kept Generator can serve this call. A model cast (``.to(torch.bfloat16)``) or moved
    (``.to("cuda")``) since it was built leaves its cache in the old dtype/device, which attention
    refuses, and its CUDA graphs bound to the old weights: such a Generator is rebuilt."""
    return (gen.max_seq_len == max_seq_len and gen.tokenizer is tokenizer
            and gen.cache.dtype == model.dtype and gen.cache.device == model.device)


def stream(model, tokenizer, prompt, max_seq_len: Optional[int] = None, **sampling) -> TextStream:
    """Stream the continuation of ``prompt`` (a string, or token ids) as text deltas."""
    gen = _generator_for(model, tokenizer, max_seq_len)
    return gen.stream(_prompt_ids(tokenizer, prompt), make_config(**sampling))


def generate(model, tokenizer, prompt, max_seq_len: Optional[int] = None, **sampling) -> GenerationResult:
    """Generate the continuation of ``prompt``; settings as in :class:`SamplingConfig`."""
    s = stream(model, tokenizer, prompt, max_seq_len, **sampling)
    s.text()
    return s.result
