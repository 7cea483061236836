"""Warm-up at load and compile-free stats (issue: first use on a GPU)."""
import time

import pytest
import torch

from tests.tiny_models import make_model_dir
from tinyq.generate import GenerationStats, Generator
from tinyq.models import load_model
from tinyq.warmup import CompileCount, CompileTracker, warm_up


@pytest.fixture(scope="module")
def model_and_tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    make_model_dir(path, "llama", seed=3)
    return load_model(str(path), precision="fp32", device="cpu")


def test_warm_up_leaves_an_empty_cache_and_same_answers(model_and_tok):
    model, tok = model_and_tok
    cold = Generator(model, tok, 64).stream([5, 6, 7], max_new_tokens=5).text()
    gen = Generator(model, tok, 64)
    report = warm_up(gen, lengths=(1, 3, 17, 200))  # 200 is clipped to the cache
    assert gen.cache.length == 0 and gen.cached_ids == []
    assert report.seconds > 0 and "warm-up" in report.summary()
    assert gen.stream([5, 6, 7], max_new_tokens=5).text() == cold


def test_stats_exclude_compilation_and_say_so(model_and_tok, monkeypatch):
    """A kernel compiled during a generation (simulated by a slow prefill that counts as one) is
    taken out of TTFT and named in the summary."""
    model, tok = model_and_tok
    gen = Generator(model, tok, 64)
    real_prefill = gen.prefill

    def prefill_with_compile(ids):
        start = time.perf_counter()
        time.sleep(0.3)
        CompileTracker.total = CompileCount(CompileTracker.total.kernels + 2,
                                            CompileTracker.total.seconds + time.perf_counter() - start)
        return real_prefill(ids)

    monkeypatch.setattr(gen, "prefill", prefill_with_compile)
    stream = gen.stream([5, 6, 7], max_new_tokens=3)
    stream.text()
    stats = stream.result.stats
    assert stats.compiled_kernels == 2 and stats.compile_s >= 0.3
    assert stats.ttft_s < 0.3, "compile time must not be counted in TTFT"
    assert "2 kernels compiled" in stats.summary()
    assert "compiled" not in GenerationStats(prompt_tokens=1, new_tokens=2).summary()


@pytest.mark.gpu
def test_gpu_first_answer_after_warm_up_compiles_nothing(tmp_path):
    make_model_dir(tmp_path, "llama", seed=4)
    model, tok = load_model(str(tmp_path), precision="w4a16", group_size=32, device="cuda")
    gen = Generator(model, tok, 256)
    report = warm_up(gen)
    assert report.kernels > 0 or report.compile_s == 0  # a warm disk cache may still count loads
    before = CompileTracker.snapshot()
    stream = gen.stream(list(range(3, 40)), max_new_tokens=8)
    stream.text()
    assert CompileTracker.since(before).kernels == 0
    assert stream.result.stats.compiled_kernels == 0
    torch.cuda.synchronize()
