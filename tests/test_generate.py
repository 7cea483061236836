"""Sampling, stop conditions, streaming text and stats of tinyq.generate on a tiny random model."""
import pytest
import torch

from tests.tiny_models import make_model_dir
from tinyq.generate import (
    ContextOverflowError,
    Generator,
    SamplingConfig,
    SupersededError,
    _held_back,
    generate,
    sample_token,
    stream,
)
from tinyq.models import load_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    make_model_dir(path, "llama", seed=3)
    return load_model(str(path), precision="fp32", device="cpu")


@pytest.mark.parametrize("bad, match", [
    (dict(temperature=-1), "temperature"), (dict(top_k=-2), "top_k"), (dict(top_p=0), "top_p"),
    (dict(top_p=1.5), "top_p"), (dict(repetition_penalty=0), "repetition_penalty"),
    (dict(repetition_penalty=float("inf")), "repetition_penalty must be finite"),
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(seed="x"), "seed"), (dict(stop_strings=[""]), "stop_strings"),
    (dict(temprature=0.5), "unknown sampling setting"),
    (dict(temperature=1e-39), "too small to divide by"), (dict(seed=2 ** 64), "seed must be an int in"),
    (dict(top_k=True), "top_k must be an int"), (dict(max_new_tokens=True), "max_new_tokens must be an int"),
    (dict(stop_token_ids=["<|im_end|>"]), "stop_token_ids must be token ids"),
    (dict(stop_token_ids="\n"), "stop_token_ids must be token ids"), (dict(stop_token_ids=[True]), "stop_token_ids"),
    (dict(stop_token_ids=[-1]), "stop token id -1 is not a token"),
    (dict(stop_token_ids=[10 ** 6]), r"stop token id 1000000 is not a token of the model \(vocab_size="),
    (dict(max_seq_len=0), "max_seq_len must be a positive int"), (dict(max_seq_len=-5), "max_seq_len"),
])
def test_invalid_sampling_settings(tiny, bad, match):
    model, tok = tiny
    with pytest.raises(ValueError, match=match):
        generate(model, tok, "hi", **bad)
    assert generate(model, tok, "hi", max_new_tokens=2).token_ids  # the model is still usable


def test_sample_token_rules():
    logits = torch.tensor([1.0, 3.0, 2.0, -1.0])
    assert sample_token(logits, SamplingConfig()) == 1
    assert sample_token(logits, SamplingConfig(temperature=1.0, top_k=1), rng=torch.Generator().manual_seed(0)) == 1
    assert sample_token(logits, SamplingConfig(temperature=5.0, top_p=0.01), rng=torch.Generator().manual_seed(0)) == 1
    # repetition penalty: the seen token 1 (3.0 -> 3.0/4 = 0.75) falls behind token 2
    assert sample_token(logits, SamplingConfig(repetition_penalty=4.0), context_ids=[1]) == 2
    # top-p keeps the smallest set reaching p: {1, 2} here (p(1) = 0.66, p(1) + p(2) = 0.90)
    rng = torch.Generator().manual_seed(0)
    picks = {sample_token(logits, SamplingConfig(temperature=1.0, top_p=0.8), rng=rng) for _ in range(200)}
    assert picks == {1, 2}


def test_seeded_sampling_is_reproducible(tiny):
    model, tok = tiny
    kw = dict(max_new_tokens=12, temperature=1.0, top_k=50, top_p=0.95, seed=7)
    a = generate(model, tok, "Hello", **kw).token_ids
    assert a == generate(model, tok, "Hello", **kw).token_ids


def test_streaming_equals_non_streaming(tiny):
    model, tok = tiny
    for prompt in ["é€ 😀 multi-byte", "the end"]:
        s = stream(model, tok, prompt, max_new_tokens=40)
        deltas = list(s)
        assert "".join(deltas) == s.result.text
        assert s.result.text == generate(model, tok, prompt, max_new_tokens=40).text
        assert all(not d.endswith("\ufffd") or "\ufffd" in s.result.text for d in deltas)
        st = s.result.stats
        assert st.new_tokens == 40 and st.ttft_s > 0 and st.ms_per_token > 0 and st.prompt_tokens > 0


def test_incomplete_utf8_is_held_back():
    assert _held_back("abc\ufffd", ()) == 1
    assert _held_back("abc STO", ["STOP"]) == 3
    assert _held_back("abc", ["STOP"]) == 0
    # a byte-fallback decoder (Llama-2, Mistral) writes one U+FFFD per byte of an unfinished character
    assert _held_back("hi \ufffd\ufffd", ()) == 2
    # the unfinished character may be the next one of a stop string: what precedes it is held too
    assert _held_back("answer 42. \u7528\ufffd", ["\u7528\u6237"]) == 2
    assert _held_back("answer 42. \ufffd", ["\u7528\u6237"]) == 1


def test_one_stop_string_given_as_a_string(tiny):
    model, tok = tiny
    full = generate(model, tok, "Hello", max_new_tokens=30).text
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert generate(model, tok, "Hello", max_new_tokens=30, stop_strings=stop).text == full[:full.find(stop)]


def test_ms_per_token_counts_the_step_that_ended_the_answer(tiny):
    """Every decode step after the first token is timed and counted, the one whose token was a stop
    token included: an answer ended by a stop token is not charged one step short."""
    model, tok = tiny
    ids = generate(model, tok, "Hello", max_new_tokens=6).token_ids
    r = generate(model, tok, "Hello", max_new_tokens=6)
    assert r.stats.decode_steps == len(r.token_ids) - 1 == 5 and r.finish_reason == "length"
    k = next(i for i in range(1, len(ids)) if ids[i] not in ids[:i])
    r = generate(model, tok, "Hello", max_new_tokens=6, stop_token_ids=[ids[k]])
    assert r.token_ids == ids[:k] and r.stats.decode_steps == k and r.finish_reason == "stop"
    assert r.stats.ms_per_token == pytest.approx(1e3 * r.stats.decode_s / k)


def test_stop_strings_and_stop_ids(tiny):
    model, tok = tiny
    full = generate(model, tok, "Hello", max_new_tokens=30)
    # a stop string taken from the middle of the greedy text cuts it there
    text = full.text
    mid = len(text) // 2
    stop = text[mid: mid + 3]
    cut = text.find(stop)
    s = stream(model, tok, "Hello", max_new_tokens=30, stop_strings=[stop])
    streamed = "".join(s)
    assert s.result.text == text[:cut] == streamed
    assert s.result.finish_reason == "stop"
    # a stop token id ends generation before that token
    ids = full.token_ids
    k = next(i for i in range(3, len(ids)) if ids[i] not in ids[:i])
    r = generate(model, tok, "Hello", max_new_tokens=30, stop_token_ids=[ids[k]])
    assert r.token_ids == ids[:k] and r.finish_reason == "stop"


def test_context_limits_and_bad_prompts(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="empty"):
        generate(model, tok, "")
    with pytest.raises(ContextOverflowError, match="max_seq_len=16"):
        generate(model, tok, "x" * 40, max_seq_len=16)
    r = generate(model, tok, "abc", max_seq_len=8, max_new_tokens=50)
    # 3 prompt tokens + 5 fed-back tokens fill the 8 slots; the 6th sampled token is never fed
    assert r.finish_reason == "context_full" and len(r.token_ids) == 8 - 3 + 1


def test_generator_reuses_cached_prefix(tiny):
    model, tok = tiny
    gen = Generator(model, tok, max_seq_len=128, prefill_chunk=4)
    ids = tok.encode("one two three")
    first = gen.stream(ids, max_new_tokens=5)
    first.text()
    longer = ids + first.result.token_ids + tok.encode(" four")
    second = gen.stream(longer, max_new_tokens=8)
    second.text()
    assert second.result.stats.prefilled_tokens < len(longer)
    fresh = Generator(model, tok, max_seq_len=128).stream(longer, max_new_tokens=8)
    fresh.text()
    assert second.result.token_ids == fresh.result.token_ids
    assert gen.cached_ids == longer + second.result.token_ids[:-1]
    assert gen.cache.length == len(gen.cached_ids)


@pytest.mark.parametrize("chunk", [0, -1, 2.5, True, "8", None])
def test_prefill_chunk_must_be_a_positive_int(tiny, chunk):
    """0 would never advance through the prompt, -1 and 2.5 broke deep in the prefill: all are refused
    when the Generator is made, naming the setting."""
    model, tok = tiny
    with pytest.raises(ValueError, match=rf"prefill_chunk must be a positive int .*got {chunk!r}"):
        Generator(model, tok, 64, prefill_chunk=chunk)
    s = Generator(model, tok, 64, prefill_chunk=1).stream([5, 6, 7], temperature=0, max_new_tokens=3)
    s.text()
    assert s.result.token_ids  # a one-token chunk, the smallest, works


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp16", "w4a16"])
def test_cuda_graph_decode_matches_eager(tmp_path, precision):
    """On the GPU: the captured decode step gives the same greedy tokens as eager steps, and the
    Triton path stays close to the CPU torch path's logits."""
    make_model_dir(tmp_path, "llama", seed=4)
    model, tok = load_model(str(tmp_path), precision=precision, group_size=32, device="cuda")
    ids = tok.encode("The quick brown fox")
    graph = Generator(model, tok, 64, cuda_graph=True).stream(ids, max_new_tokens=24)
    eager = Generator(model, tok, 64, cuda_graph=False).stream(ids, max_new_tokens=24)
    graph.text()
    eager.text()
    assert graph.result.token_ids == eager.result.token_ids
    cpu, _ = load_model(str(tmp_path), precision=precision, group_size=32, device="cpu", dtype=torch.float32)
    x = torch.tensor([ids])
    with torch.inference_mode():
        ref = cpu(x, cpu.new_cache(64)).float()
        out = model(x.cuda(), model.new_cache(64)).float().cpu()
    assert (out - ref).abs().max() <= 2e-2 * ref.abs().max()


def test_cpu_generator_leaves_the_thread_count_alone(tiny, monkeypatch):
    """torch.set_num_threads is process-wide: a library Generator must not change it (the chat CLI
    tunes it explicitly, see tune_cpu_threads)."""
    import tinyq.generate as gen_mod

    model, tok = tiny
    calls = []
    monkeypatch.setattr(gen_mod, "_cpu_threads_tuned", False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    gen = Generator(model, tok, max_seq_len=64)
    "".join(gen.stream(tok.encode("hi"), max_new_tokens=2))
    assert calls == []
    assert gen_mod.tune_cpu_threads(model) in (1, 2) and calls  # when asked, it does tune


def test_generation_config_end_ids_stop_generation(tmp_path):
    """Instruct checkpoints (Llama-3-Instruct) list their end-of-turn ids only in
    generation_config.json: they are end ids too, as in transformers."""
    import json

    make_model_dir(tmp_path, "llama", seed=3)
    model, tok = load_model(str(tmp_path), precision="fp32", device="cpu")
    ids = generate(model, tok, "Hello", max_new_tokens=8).token_ids
    k = next(i for i in range(1, len(ids)) if ids[i] not in ids[:i])
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [ids[k], 3]}))
    model, tok = load_model(str(tmp_path), precision="fp32", device="cpu")
    assert ids[k] in model.config.eos_token_ids
    r = generate(model, tok, "Hello", max_new_tokens=8)
    assert r.token_ids == ids[:k] and r.finish_reason == "stop"


def test_one_stop_token_id_given_as_an_int(tiny):
    model, tok = tiny
    ids = generate(model, tok, "Hello", max_new_tokens=8).token_ids
    k = next(i for i in range(1, len(ids)) if ids[i] not in ids[:i])
    assert SamplingConfig(stop_token_ids=ids[k]).validate().stop_token_ids == (ids[k],)
    r = generate(model, tok, "Hello", max_new_tokens=8, stop_token_ids=ids[k])
    assert r.token_ids == ids[:k] and r.finish_reason == "stop"


def test_prompt_ids_outside_the_vocabulary_are_refused(tiny):
    """Checked once per prompt, before anything runs (on a GPU an out-of-range embedding index is a
    device-side assert that breaks the CUDA context); one prompt at a time."""
    model, tok = tiny
    vocab = model.config.vocab_size
    ref = generate(model, tok, [1, 2, 3], max_new_tokens=4).token_ids
    for bad, match in (([1, 2, vocab], rf"prompt token id {vocab} \(position 2\).*vocab_size={vocab}"),
                       ([1, -1, 2], r"prompt token id -1 \(position 1\)"),
                       (torch.tensor([[1, 2], [3, 4]]), r"one sequence of token ids.*shape \(2, 2\)"),
                       (torch.tensor([1.0, 2.0]), "integer dtype"), ([1, 2.5], "int token ids"), ([], "empty")):
        with pytest.raises(ValueError, match=match):
            generate(model, tok, bad, max_new_tokens=4)
    assert generate(model, tok, torch.tensor([[1, 2, 3]]), max_new_tokens=4).token_ids == ref  # [1, S] is one prompt
    assert generate(model, tok, torch.tensor([1, 2, 3]), max_new_tokens=4).token_ids == ref


def test_a_paused_stream_resumed_after_another_is_refused(tiny):
    """Streams share the model's Generator (one cache): a stream resumed after another generation,
    a reset or a truncate used that cache raises instead of decoding on the other one's tokens, and
    changes nothing."""
    model, tok = tiny
    kw = dict(max_new_tokens=8, temperature=1.0, seed=0)
    expected = generate(model, tok, "abc abc", **kw).token_ids
    gen = model._tinyq_generator
    for interfere in (lambda: generate(model, tok, "something else entirely", **kw), gen.reset,
                      lambda: gen.truncate(len(gen.cached_ids) - 1)):
        s1 = stream(model, tok, "abc abc", **kw)
        next(s1)  # paused after its first delta
        interfere()
        cached = list(gen.cached_ids)
        with pytest.raises(SupersededError, match="superseded by a later turn/stream"):
            next(s1)
        assert s1.result is None and gen.cached_ids == cached and gen.cache.length == len(cached)
    # a stream created but not started yet claims the cache only when it starts
    late = stream(model, tok, "abc abc", **kw)
    generate(model, tok, "something else entirely", **kw)
    late.text()
    assert late.result.token_ids == expected
    assert generate(model, tok, "abc abc", **kw).token_ids == expected


def test_generate_after_the_model_is_cast_rebuilds_its_cache(tmp_path):
    """generate() keeps a Generator on the model; after ``model.to(torch.bfloat16)`` its fp32 cache
    would be refused by attention, so the next call builds a new one in the model's dtype."""
    make_model_dir(tmp_path, "llama", seed=3)
    model, tok = load_model(str(tmp_path), precision="fp32", device="cpu")
    generate(model, tok, "hello", max_new_tokens=3, temperature=0, max_seq_len=32)
    assert model._tinyq_generator.cache.dtype == torch.float32
    model.to(torch.bfloat16)
    cast = generate(model, tok, "hello", max_new_tokens=3, temperature=0, max_seq_len=32).token_ids
    assert model._tinyq_generator.cache.dtype == torch.bfloat16
    fresh, _ = load_model(str(tmp_path), precision="fp32", device="cpu", dtype=torch.bfloat16)
    assert cast == generate(fresh, tok, "hello", max_new_tokens=3, temperature=0, max_seq_len=32).token_ids
