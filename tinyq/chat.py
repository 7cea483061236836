"""Multi-turn chat over one KV cache, with context streaming.

Each turn, the whole conversation is rendered with the tokenizer's chat template and compared
with the token ids already in the cache; only the new suffix (the new user turn, plus whatever of
the last answer re-tokenized differently) is prefilled, in chunks, over the cached history. So a
question after a 4k-token history costs about what it costs after a short one.

Invariants: ``messages`` holds only complete turns; the cache holds a prefix of some valid
conversation and ``Generator.cached_ids`` says exactly which. An exception or Ctrl-C in the middle
of a turn rolls the cache back to what it held before the turn and leaves ``messages`` unchanged.
A turn is valid for the conversation and cache it was sent against: resumed (or started) after
another turn, ``reset``, ``drop_oldest_turns`` or anything else changed them, it raises
:class:`tinyq.generate.SupersededError` and commits nothing.
"""
from __future__ import annotations

from typing import Dict, List, Optional

from tinyq.generate import (
    ContextOverflowError, DeltaStream, GenerationResult, Generator, SamplingConfig, SupersededError, make_config,
)


def render_chat(tokenizer, messages: List[Dict[str, str]]) -> List[int]:
    """Token ids of ``messages`` in the tokenizer's chat template, ending with the assistant prompt."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template; use tinyq.generate.generate() for plain completion")
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    # The template writes BOS itself where the model wants one: no special tokens added here.
    return list(tokenizer.encode(text, add_special_tokens=False))


def check_message(text) -> None:
    """A ValueError unless ``text`` is a message to send: a non-empty str of valid text."""
    if not isinstance(text, str):
        raise ValueError(f"a message is a str, got {type(text).__name__}")
    if not text.strip():
        raise ValueError("empty message: type something to send")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate: bytes that were not UTF-8, kept by Python
        raise ValueError(f"the message is not valid text ({exc.reason} at character {exc.start})") from exc


class ChatSession:
    """A conversation with ``model``: ``send(text)`` streams the answer, ``ask(text)`` returns it.

    ``max_seq_len`` bounds the cache (default: the model's). When a turn would not fit,
    :class:`ContextOverflowError` is raised and nothing changes; call :meth:`reset` or
    :meth:`drop_oldest_turns` and send again. With a ``generator``, its cache sets the context
    length: a ``max_seq_len`` that differs from it is refused (a ValueError), not ignored.
    """

    def __init__(self, model, tokenizer, max_seq_len: Optional[int] = None, system_prompt: Optional[str] = None,
                 sampling: Optional[SamplingConfig] = None, generator: Optional[Generator] = None, **settings):
        if sampling is not None and settings:
            raise ValueError("pass either sampling=SamplingConfig(...) or keyword settings, not both")
        if generator is not None and max_seq_len is not None and max_seq_len != generator.max_seq_len:
            raise ValueError(f"max_seq_len={max_seq_len!r} differs from the given generator's "
                             f"max_seq_len={generator.max_seq_len}, which its cache fixes: pass one of them")
        sampling = (sampling or make_config(**settings)).validate()  # before a cache is allocated
        self.gen = generator or Generator(model, tokenizer, max_seq_len)
        self.sampling = sampling.validate(self.gen.vocab_size)
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.messages: List[Dict[str, str]] = []
        self._active_turn = None  # the turn streaming now (started, not finished), if any
        self.reset()
        self.last_result: Optional[GenerationResult] = None

    @property
    def max_seq_len(self) -> int:
        return self.gen.max_seq_len

    @property
    def turns(self) -> int:
        return sum(m["role"] == "user" for m in self.messages)

    def reset(self) -> None:
        """Forget the conversation (keeps the system prompt) and empty the cache."""
        self.messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        self.gen.reset()

    def drop_oldest_turns(self, n: int = 1) -> int:
        """Remove the ``n`` oldest user/assistant exchanges; returns how many were removed. The cache
        is re-prefilled from the first changed token at the next turn; a turn sent (or paused) before
        is superseded: it was rendered with the dropped history."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        head = 1 if self.messages and self.messages[0]["role"] == "system" else 0
        dropped = 0
        while dropped < n and any(m["role"] == "user" for m in self.messages[head:]):
            del self.messages[head]  # the user message ...
            while len(self.messages) > head and self.messages[head]["role"] != "user":
                del self.messages[head]  # ... and its answer
            dropped += 1
        if dropped:  # a turn sent or paused before this was rendered with the dropped history
            self.gen.supersede()
        return dropped

    def prompt_ids(self, text: str) -> List[int]:
        """The full conversation's ids if ``text`` were sent now (validates ``text``)."""
        check_message(text)
        return render_chat(self.tokenizer, self.messages + [{"role": "user", "content": text}])

    def send(self, text: str, sampling: Optional[SamplingConfig] = None):
        """Stream the answer to ``text`` (an iterator of text deltas; ``.result`` when done)."""
        if sampling is not None and not isinstance(sampling, SamplingConfig):
            raise ValueError(f"sampling must be a SamplingConfig (tinyq.sampling.make_config(...) builds one), "
                             f"got {type(sampling).__name__}")
        ids = self.prompt_ids(text)
        if len(ids) + 1 > self.max_seq_len:  # the prompt and the answer's first token
            raise ContextOverflowError(
                f"this turn needs {len(ids) + 1} tokens of context (the conversation so far, this message and the "
                f"answer's first token; history: {self.turns} turns) but max_seq_len is {self.max_seq_len}; the "
                "history is kept: reset() or drop_oldest_turns() and send again"
            )
        return _Turn(self, text, ids, (sampling or self.sampling).validate(self.gen.vocab_size))

    def ask(self, text: str, sampling: Optional[SamplingConfig] = None) -> GenerationResult:
        turn = self.send(text, sampling)
        turn.text()
        return turn.result


class _Turn(DeltaStream):
    """One answer being streamed; commits the turn to the history when it completes. It belongs to
    the conversation and cache as they were at ``send``: if anything changed them before it starts
    or while it is paused, it raises :class:`SupersededError` and commits nothing."""

    def __init__(self, session: ChatSession, text: str, ids: List[int], sampling: SamplingConfig):
        self.session, self.user_text = session, text
        self._epoch = session.gen.epoch  # what the ids were rendered against
        self._it = self._run(ids, sampling)

    def _run(self, ids, sampling):
        s = self.session
        gen = s.gen
        if gen.epoch != self._epoch:  # another turn ran, or the history was reset or cut, since send()
            raise SupersededError()
        before = len(gen.cached_ids)
        stream = gen.stream(ids, sampling)
        s._active_turn = self
        try:
            yield from stream
        except BaseException:  # includes KeyboardInterrupt and GeneratorExit (a stream dropped mid-way)
            # Keep only what was valid before this turn (and is still a prefix of the conversation),
            # if the cache is still as this turn's last step left it. A turn dropped unfinished is
            # closed whenever the garbage collector gets to it, maybe while a later turn streams, and
            # a superseded one finds another's cache: that cache stays as it is.
            if gen.epoch == stream.epoch:
                gen.truncate(min(before, len(gen.cached_ids), gen.cache.length))
            raise
        finally:
            if s._active_turn is self:
                s._active_turn = None
        self.result = stream.result
        s.last_result = stream.result
        s.messages.append({"role": "user", "content": self.user_text})
        s.messages.append({"role": "assistant", "content": stream.result.text})
