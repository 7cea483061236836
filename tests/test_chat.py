"""ChatSession: context streaming, overflow handling, rollback on interruption."""
import dataclasses
import gc

import pytest
from tests.tiny_models import make_model_dir
from tinyq.chat import ChatSession, render_chat
from tinyq.generate import ContextOverflowError, Generator, SupersededError
from tinyq.models import load_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen2")
    make_model_dir(path, "qwen2", seed=5)
    return load_model(str(path), precision="fp32", device="cpu")


def test_multi_turn_prefills_only_the_new_turn(tiny):
    model, tok = tiny
    chat = ChatSession(model, tok, max_seq_len=256, system_prompt="be brief", max_new_tokens=12,
                       generator=Generator(model, tok, 256, prefill_chunk=5))
    r1 = chat.ask("first question")
    cached_before = list(chat.gen.cached_ids)
    r2 = chat.ask("and a second one")
    assert chat.turns == 2 and chat.messages[-1] == {"role": "assistant", "content": r2.text}
    # the same second turn, re-prefilling the whole conversation in one go, gives the same tokens
    convo = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "first question"},
             {"role": "assistant", "content": r1.text}, {"role": "user", "content": "and a second one"}]
    ids = render_chat(tok, convo)
    fresh = Generator(model, tok, 256).stream(ids, max_new_tokens=12)
    fresh.text()
    assert fresh.result.token_ids == r2.token_ids
    assert r2.stats.prompt_tokens == len(ids)
    # only the suffix after the longest cached prefix was prefilled; the first turn's prompt was reused
    lcp = next((i for i, (a, b) in enumerate(zip(cached_before, ids)) if a != b), min(len(cached_before), len(ids)))
    first_prompt = render_chat(tok, convo[:2])
    assert lcp >= len(first_prompt)
    assert r2.stats.prefilled_tokens == len(ids) - lcp


def test_overflow_keeps_history_then_drop_or_reset(tiny):
    model, tok = tiny
    chat = ChatSession(model, tok, max_seq_len=120, max_new_tokens=6)
    chat.ask("hello there")
    chat.ask("again")
    before = [dict(m) for m in chat.messages]
    # a message that overflows with the whole history but fits without the oldest turn
    fits_alone = lambda msg: len(render_chat(tok, before[2:] + [{"role": "user", "content": msg}])) + 1 <= 120
    msg = next(m for m in ("word " * k for k in range(1, 60)) if len(chat.prompt_ids(m)) + 1 > 120)
    assert fits_alone(msg)
    with pytest.raises(ContextOverflowError, match="max_seq_len is 120"):
        chat.send(msg)
    assert chat.messages == before
    assert chat.gen.cache.length == len(chat.gen.cached_ids)
    assert chat.drop_oldest_turns(1) == 1 and chat.turns == 1 and chat.messages == before[2:]
    r = chat.ask(msg)
    assert r.token_ids and chat.turns == 2
    chat.reset()
    assert chat.messages == [] and chat.gen.cache.length == 0
    with pytest.raises(ContextOverflowError):
        chat.send("x" * 200)  # too long even alone: still a clear error
    with pytest.raises(ValueError, match="empty message"):
        chat.send("   ")
    with pytest.raises(ValueError, match="a message is a str, got bytes"):
        chat.send(b"hi")
    with pytest.raises(ValueError, match="sampling must be a SamplingConfig"):
        chat.send("hi", {"temperature": 0})
    assert chat.messages == []


def test_overflow_message_counts_the_first_answer_token(tiny):
    """At a max_seq_len equal to the prompt's length the turn does not fit (the answer's first token
    needs a slot): the error says it needs one more than max_seq_len, not exactly max_seq_len."""
    model, tok = tiny
    n = len(ChatSession(model, tok, max_seq_len=256).prompt_ids("Hello there"))
    chat = ChatSession(model, tok, max_seq_len=n)
    with pytest.raises(ContextOverflowError, match=rf"needs {n + 1} tokens of context .* max_seq_len is {n};"):
        chat.send("Hello there")


def test_interrupt_mid_answer_rolls_back(tiny, monkeypatch):
    model, tok = tiny
    chat = ChatSession(model, tok, max_seq_len=256, max_new_tokens=10)
    chat.ask("first question")
    messages, length = [dict(m) for m in chat.messages], chat.gen.cache.length

    calls = {"n": 0}
    real_decode = Generator.decode_next

    def flaky_decode(self, token, sampler):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the answer
        return real_decode(self, token, sampler)

    monkeypatch.setattr(Generator, "decode_next", flaky_decode)
    turn = chat.send("second question")
    with pytest.raises(KeyboardInterrupt):
        for _ in turn:
            pass
    monkeypatch.setattr(Generator, "decode_next", real_decode)
    assert chat.messages == messages
    assert chat.gen.cache.length == len(chat.gen.cached_ids) <= length
    # the session goes on, answering exactly as one that was never interrupted
    again = chat.ask("second question")
    ref = ChatSession(model, tok, max_seq_len=256, max_new_tokens=10)
    ref.ask("first question")
    assert again.token_ids == ref.ask("second question").token_ids


def test_exception_inside_forward_rolls_back(tiny, monkeypatch):
    model, tok = tiny
    chat = ChatSession(model, tok, max_seq_len=256, max_new_tokens=4)
    chat.ask("hi")
    length = chat.gen.cache.length
    real = type(model).forward

    def boom(self, *args, **kwargs):
        real(self, *args, **kwargs)  # the cache has advanced ...
        raise RuntimeError("simulated failure")  # ... but the caller never sees the logits

    monkeypatch.setattr(type(model), "forward", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        chat.ask("next")
    monkeypatch.setattr(type(model), "forward", real)
    assert chat.turns == 1 and chat.gen.cache.length == len(chat.gen.cached_ids) <= length
    assert chat.ask("next").token_ids


@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=0.8, top_p=0.9, repetition_penalty=1.2)])
def test_nan_logits_are_an_error_not_tokens(tiny, monkeypatch, sampling):
    """An overflowing model's NaN logits stop the turn with an error naming the cause (the sampler's
    NaN marker), on the first token and mid-answer, and the conversation is kept."""
    model, tok = tiny
    chat = ChatSession(model, tok, max_seq_len=256, max_new_tokens=6)
    chat.ask("hi", dataclasses.replace(chat.sampling, **sampling))
    length, turns = chat.gen.cache.length, chat.turns
    real = type(model).forward
    for nan_after in (0, 2):  # calls before the logits turn NaN: the first token, then mid-answer
        calls = []

        def overflow(self, *args, **kwargs):
            out = real(self, *args, **kwargs)
            calls.append(1)
            return out * float("nan") if len(calls) > nan_after else out

        monkeypatch.setattr(type(model), "forward", overflow)
        with pytest.raises(ValueError, match="logits are NaN"):
            chat.ask("next", dataclasses.replace(chat.sampling, **sampling))
        monkeypatch.setattr(type(model), "forward", real)
        assert chat.turns == turns and chat.gen.cache.length == len(chat.gen.cached_ids) <= length
    assert chat.ask("next").token_ids


def test_a_turn_streams_like_a_text_stream(tiny):
    """A chat turn and a plain generation are the same kind of iterator: deltas, .text(), .result."""
    from tinyq.generate import DeltaStream, Generator

    model, tok = tiny
    chat = ChatSession(model, tok, max_seq_len=256, max_new_tokens=6, temperature=0)
    turn = chat.send("hello there")
    assert isinstance(turn, DeltaStream)
    first = next(turn)
    text = turn.text()
    assert text.startswith(first) and text == turn.result.text
    assert chat.messages[-1] == {"role": "assistant", "content": text}
    assert isinstance(Generator(model, tok, 64).stream(tok.encode("hi"), max_new_tokens=2), DeltaStream)


def test_a_dropped_turn_closed_later_leaves_the_new_turn_alone(tmp_path):
    """A turn abandoned mid-stream is closed whenever the garbage collector gets to it (it sits in a
    reference cycle), perhaps while a later turn streams: it must not roll that turn's cache back."""
    make_model_dir(tmp_path, "llama", seed=3)  # a model whose answers here run past two deltas
    model, tok = load_model(str(tmp_path), precision="fp32", device="cpu")
    ref = ChatSession(model, tok, max_seq_len=256, max_new_tokens=16)
    ref.ask("The quick brown fox")
    expect = ref.ask("jumps over the lazy dog").token_ids
    chat = ChatSession(model, tok, max_seq_len=256, max_new_tokens=16)
    chat.ask("The quick brown fox")
    old = chat.send("something else")
    next(old), next(old)
    new = chat.send("jumps over the lazy dog")
    next(new)
    length = chat.gen.cache.length
    del old
    gc.collect()  # the collector closes the abandoned turn's generator now
    assert chat.gen.cache.length == length
    list(new)
    assert new.result.token_ids == expect


def test_a_turn_superseded_by_another_commits_nothing(tiny):
    """A turn belongs to the conversation and cache it was sent against. Resumed after another turn
    ran (or started after one ran since it was sent), or after reset / drop_oldest_turns / a truncate,
    it raises instead of decoding on the other turn's cache and appending its answer out of order;
    the history and the cache stay as the later change left them."""
    model, tok = tiny
    kw = dict(max_seq_len=256, max_new_tokens=8, temperature=1.0, seed=0)
    chat = ChatSession(model, tok, **kw)
    chat.ask("an earlier question")
    interferences = {
        "another turn": lambda: chat.ask("second question"),
        "reset": chat.reset,
        "drop_oldest_turns": lambda: chat.drop_oldest_turns(1),
        "truncate": lambda: chat.gen.truncate(len(chat.gen.cached_ids) - 1),
    }
    for name, interfere in interferences.items():
        if not chat.turns:
            chat.ask("an earlier question")
        paused = chat.send("first question")
        next(paused)  # paused after its first delta
        unstarted = chat.send("never started")
        interfere()
        messages, cached = [dict(m) for m in chat.messages], list(chat.gen.cached_ids)
        for turn in (paused, unstarted):
            with pytest.raises(SupersededError, match="nothing of it was committed"):
                list(turn)
            assert turn.result is None, name
            assert chat.messages == messages and chat.gen.cached_ids == cached, name
    # the session goes on, answering as one that never saw the superseded turns
    chat.reset()
    chat.ask("second question")
    ref = ChatSession(model, tok, **kw)
    ref.ask("second question")
    assert chat.ask("third").token_ids == ref.ask("third").token_ids
    assert chat.messages == ref.messages


def test_a_generator_and_another_max_seq_len_are_refused(tiny):
    """A given generator's cache fixes the context length: a different max_seq_len is an error, not ignored."""
    model, tok = tiny
    gen = Generator(model, tok, 128)
    with pytest.raises(ValueError, match="max_seq_len=64 differs from the given generator's max_seq_len=128"):
        ChatSession(model, tok, max_seq_len=64, generator=gen)
    assert ChatSession(model, tok, max_seq_len=128, generator=gen).max_seq_len == 128
    assert ChatSession(model, tok, generator=gen).max_seq_len == 128
    with pytest.raises(ValueError, match="stop token id"):  # checked against the model's vocabulary at once
        ChatSession(model, tok, generator=gen, stop_token_ids=[model.config.vocab_size])
