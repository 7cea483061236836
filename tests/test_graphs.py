"""Padded-chunk prefill and device-side sampling (tinyq.graphs, tinyq.sampling).

On the CPU the padded forward runs eagerly (``PrefillGraphs(capture=False)``): the padding logic
is exactly what the CUDA graphs replay. GPU tests check the captured graphs against eager runs.
"""
import pytest
import torch

from tests.tiny_models import make_model_dir
from tinyq.generate import Generator, make_config, sample_token
from tinyq.graphs import PrefillGraphs
from tinyq.models import load_model
from tinyq.sampling import Sampler, sampler_key


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    make_model_dir(path, "llama", seed=5)
    return load_model(str(path), precision="fp32", device="cpu")


def _prefill_eager(model, cache, ids):
    with torch.inference_mode():
        return model(torch.tensor([ids]), cache, last_only=True)[0, -1]


@pytest.mark.parametrize("history,n", [(0, 1), (0, 16), (3, 5), (7, 17), (20, 32)])
def test_padded_chunk_equals_unpadded(tiny, history, n):
    """A chunk padded up to its bucket gives the last real row's logits, fills the cache exactly
    as the unpadded chunk does (up to the fill level) and moves both counters by the real length."""
    model, _ = tiny
    vocab = model.config.vocab_size
    hist = [(5 * i + 2) % vocab for i in range(history)]
    ids = [(11 * i + 7) % vocab for i in range(n)]
    ref_cache = model.new_cache(96)
    if hist:
        _prefill_eager(model, ref_cache, hist)
    ref = _prefill_eager(model, ref_cache, ids)

    cache = model.new_cache(96)
    if hist:
        _prefill_eager(model, cache, hist)
    # poison everything past the fill level: the padding may write there, the real rows must not read it
    cache.k[:, :, :, cache.length:] = float("nan")
    cache.v[:, :, :, cache.length:] = float("nan")
    graphs = PrefillGraphs(model, cache, buckets=(16, 32), capture=False)
    with torch.inference_mode():
        out = graphs.run(model.model.embed_tokens(torch.tensor([ids])))
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)
    assert cache.length == ref_cache.length == history + n and int(cache.seq_pos[0]) == cache.length
    L = cache.length
    assert torch.allclose(cache.k[:, :, :, :L], ref_cache.k[:, :, :, :L], atol=1e-6)
    assert torch.allclose(cache.v[:, :, :, :L], ref_cache.v[:, :, :, :L], atol=1e-6)


def test_chunk_that_would_pad_a_lot_runs_as_pieces(tiny):
    """Past ``split_waste`` padded rows, a full bucket is cut off first (18 -> 16 + 2 padded to 4);
    the pieces give the unpadded chunk's logits and cache, and a piece that does not fit refuses
    the whole chunk before anything runs."""
    model, _ = tiny
    vocab = model.config.vocab_size
    ids = [(7 * i + 3) % vocab for i in range(18)]
    ref_cache = model.new_cache(96)
    ref = _prefill_eager(model, ref_cache, ids)
    cache = model.new_cache(96)
    graphs = PrefillGraphs(model, cache, buckets=(4, 16, 32), capture=False, split_waste=5)
    assert graphs.pieces(18) == [(16, 16), (2, 4)]
    assert graphs.pieces(30) == [(30, 32)]  # 2 padded rows: one piece
    assert graphs.pieces(40) == [(32, 32), (4, 4), (4, 4)]  # longer than every bucket: cut as well
    with torch.inference_mode():
        out = graphs.run(model.model.embed_tokens(torch.tensor([ids])))
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)
    assert cache.length == 18 and int(cache.seq_pos[0]) == 18
    assert torch.allclose(cache.k[:, :, :, :18], ref_cache.k[:, :, :, :18], atol=1e-6)
    small = model.new_cache(34)
    small.advance(14)
    graphs = PrefillGraphs(model, small, buckets=(4, 16, 32), capture=False, split_waste=100)
    assert graphs.pieces(18) == [(16, 16), (2, 4)]  # 14 + 32 > 34: split although padding is cheap
    assert graphs.pieces(21) is None  # 14 + 16 + 4, then 1 more token padded to 4: 38 > 34
    with torch.inference_mode():
        assert graphs.run(model.model.embed_tokens(torch.tensor([ids + [1, 2, 3]]))) is None
    assert small.length == 14  # nothing ran
    odd = PrefillGraphs(model, model.new_cache(24), buckets=(16, 24), capture=False, split_waste=4)
    assert odd.pieces(17) is None and odd.bucket_for(17) == 24  # 16 + 1 padded to 16 > 24; 24 alone fits
    with torch.inference_mode():
        assert odd.run(model.model.embed_tokens(torch.tensor([ids[:17]]))) is not None
    assert odd.cache.length == 17


def test_no_bucket_when_chunk_or_cache_too_large(tiny):
    model, _ = tiny
    cache = model.new_cache(40)
    graphs = PrefillGraphs(model, cache, buckets=(16, 32), capture=False)
    assert graphs.bucket_for(33) is None  # longer than every bucket
    assert graphs.bucket_for(17) == 32
    cache.advance(10)
    assert graphs.bucket_for(17) is None  # 10 + 32 > 40: the padding would not fit
    assert graphs.bucket_for(5) == 16


def test_gpu_bound_chunk_is_left_to_the_eager_forward(tiny):
    """A chunk whose linear work per layer reaches ``eager_min_layer_flop`` gets None (the caller runs
    it eagerly at its exact length) before anything runs; shorter chunks still take the buckets."""
    model, _ = tiny
    cfg = model.config
    hidden, inter = cfg.hidden_size, cfg.intermediate_size
    qkv = hidden * (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
    per_token = 2.0 * (qkv + cfg.num_heads * cfg.head_dim * hidden + 3 * hidden * inter)
    cache = model.new_cache(96)
    graphs = PrefillGraphs(model, cache, buckets=(4, 16, 32), capture=False, split_waste=5,
                           eager_min_layer_flop=20 * per_token)
    assert graphs.layer_flop_per_token == per_token
    assert not graphs.gpu_bound(19) and graphs.gpu_bound(20)
    assert graphs.buckets == (4, 16)  # 32 would only hold chunks of 27+ tokens: never replayed
    vocab = cfg.vocab_size
    with torch.inference_mode():
        assert graphs.run(model.model.embed_tokens(torch.tensor([[(3 * i) % vocab for i in range(24)]]))) is None
        assert cache.length == 0 and int(cache.seq_pos[0]) == 0
        assert graphs.run(model.model.embed_tokens(torch.tensor([[1, 2, 3, 4, 5]]))) is not None
    assert cache.length == 5


def test_generator_through_padded_prefill_matches_eager(tiny):
    """Whole generations (sampled, with a repetition penalty, over two turns) are the same when
    every prefill chunk goes through the padded path."""
    model, tok = tiny
    settings = dict(max_new_tokens=6, temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.3, seed=7)
    prompt = tok.encode("one two three four five six seven")
    results = []
    for padded in (False, True):
        gen = Generator(model, tok, 128, prefill_chunk=16)
        if padded:
            gen.prefill_graphs = PrefillGraphs(model, gen.cache, buckets=(4, 16), capture=False)
        first = gen.stream(prompt, **settings)
        first.text()
        second = gen.stream(prompt + first.result.token_ids + tok.encode(" eight"), **settings)
        second.text()
        results.append((first.result.token_ids, second.result.token_ids, gen.cached_ids))
    assert results[0] == results[1]


def test_device_sampler_rules():
    logits = torch.tensor([1.0, 3.0, 2.0, -1.0, 0.5])
    greedy = Sampler(sampler_key(make_config(), 5), logits.device).load(make_config())
    assert int(greedy(logits)) == 1
    cfg = make_config(temperature=1.0, top_k=2, seed=1)
    s = Sampler(sampler_key(cfg, 5), logits.device).load(cfg)
    picks = set()
    for _ in range(100):
        s.draw_noise()
        picks.add(int(s(logits)))
    assert picks == {1, 2}  # top-k 2 keeps exactly the two best
    # repetition penalty marks every sampled token: greedy with a strong penalty never repeats here
    cfg = make_config(repetition_penalty=100.0)
    s = Sampler(sampler_key(cfg, 5), logits.device).load(cfg, context_ids=[1])
    assert [int(s(logits)) for _ in range(3)] == [2, 0, 4]
    with pytest.raises(ValueError, match="do not match"):
        s.load(make_config())


def test_seeded_sampling_reproduces_and_tracks_probabilities():
    """The exponential race draws softmax(l / T): frequencies over many draws match it."""
    logits = torch.tensor([0.0, 1.0, 2.0])
    cfg = make_config(temperature=1.0, seed=3)
    counts = torch.zeros(3)
    s = Sampler(sampler_key(cfg, 3), logits.device).load(cfg)
    for _ in range(4000):
        s.draw_noise()
        counts[int(s(logits))] += 1
    assert torch.allclose(counts / counts.sum(), torch.softmax(logits, 0), atol=0.03)
    again = [sample_token(logits, cfg, rng=torch.Generator().manual_seed(5)) for _ in range(5)]
    assert again == [sample_token(logits, cfg, rng=torch.Generator().manual_seed(5)) for _ in range(5)]


def _warm_runs_only(monkeypatch, model, gen, sampler, runs: int) -> tuple:
    """Build a DecodeGraph on the CPU with its capture stubbed: only the warm-up runs happen, each
    sampling for real. Returns ``(graph, tokens the runs picked)``."""
    import tinyq.graphs as graphs

    picked = []

    def warm_runs(run, cache, graph, pool=None):
        n = cache.length
        for _ in range(runs):
            sampler.draw_noise()
            picked.append(int(run()))
            cache.truncate(n)

    monkeypatch.setattr(graphs.torch.cuda, "CUDAGraph", lambda: None)
    monkeypatch.setattr(graphs, "_warm_then_capture", warm_runs)
    with torch.inference_mode():  # as Generator.decode_next builds it
        return graphs.DecodeGraph(model, gen.cache, sampler), picked


def test_decode_graph_capture_leaves_the_penalty_mask_alone(tmp_path, monkeypatch):
    """Capturing a decode graph runs the step eagerly first, sampling for real; the tokens those runs
    pick must not stay in the repetition-penalty mask. (CPU: the capture itself is stubbed.)"""
    make_model_dir(tmp_path, "llama", seed=6)
    model, _ = load_model(str(tmp_path), precision="fp32", device="cpu")
    gen = Generator(model, None, 64, cuda_graph=False)
    gen.prefill([5, 6])
    sampler = gen.sampler(make_config(temperature=1.5, repetition_penalty=1.3, seed=1), [5, 6])
    before = sampler.seen.clone()
    _, picked = _warm_runs_only(monkeypatch, model, gen, sampler, 3)
    assert set(picked) - {5, 6}  # the runs did pick tokens outside the context ...
    assert torch.equal(sampler.seen, before)  # ... and the mask forgot them


def test_decode_graph_warm_up_survives_nan_logits(tmp_path, monkeypatch):
    """A model whose logits are NaN from the start (an fp16 overflow) reaches the host's error: the
    capture's warm-up runs feed the sampled token back as the next input, and the NaN marker (-1)
    must not index the embedding. (CPU: the capture itself is stubbed.)"""
    make_model_dir(tmp_path, "llama", seed=6)
    model, _ = load_model(str(tmp_path), precision="fp32", device="cpu")
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))
    gen = Generator(model, None, 64, cuda_graph=False)
    gen.prefill([5, 6])
    for cfg in (make_config(temperature=0.0), make_config(temperature=0.7, repetition_penalty=1.2, seed=1)):
        g, tokens = _warm_runs_only(monkeypatch, model, gen, gen.sampler(cfg, [5, 6]), 2)
        assert tokens == [-1, -1] and int(g.ids) == 0  # the marker reached the host, not the embedding
    with pytest.raises(ValueError, match="logits are NaN"):
        gen.first_token(gen.prefill([7]), gen.sampler(make_config(temperature=0.0)))


@pytest.mark.gpu
def test_gpu_sampled_decode_graph_matches_eager(tmp_path):
    """Temperature, top-k, top-p and the repetition penalty inside the captured decode graph draw the
    tokens the eager path draws from the same seed. The prompt fills the 16-token prefill bucket
    exactly, so both paths run the same kernels on the same inputs."""
    make_model_dir(tmp_path, "llama", seed=6)
    model, _ = load_model(str(tmp_path), precision="fp16", device="cuda")
    cfg = make_config(temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.2, seed=11)
    ids = [(7 * i + 3) % model.config.vocab_size for i in range(16)]
    runs = []
    for cuda_graph in (True, False):
        gen = Generator(model, None, 256, cuda_graph=cuda_graph)
        sampler = gen.sampler(cfg, ids)
        out = [gen.first_token(gen.prefill(ids), sampler)]
        for _ in range(12):
            out.append(gen.decode_next(out[-1], sampler))
        runs.append(out)
    assert runs[0] == runs[1]
    assert len(set(runs[0])) > 3  # sampled: not one token repeated


@pytest.mark.gpu
@pytest.mark.parametrize("settings", [dict(temperature=0.0), dict(temperature=0.8, top_p=0.9, repetition_penalty=1.2)])
def test_gpu_nan_logits_in_the_decode_graph_are_an_error(tmp_path, settings):
    """Logits that turn NaN inside a captured decode step (here lm_head poisoned after capture, in
    place, so the graph reads it) give the sampler's NaN marker, which the host turns into an error."""
    make_model_dir(tmp_path, "llama", seed=6)
    model, _ = load_model(str(tmp_path), precision="fp16", device="cuda")
    gen = Generator(model, None, 256)
    sampler = gen.sampler(make_config(**settings, seed=3))
    ids = [(7 * i + 3) % model.config.vocab_size for i in range(16)]
    token = gen.decode_next(gen.first_token(gen.prefill(ids), sampler), sampler)  # captures the graph
    with torch.no_grad():
        model.lm_head.weight[5].fill_(float("nan"))
    with pytest.raises(ValueError, match="logits are NaN"):
        gen.decode_next(token, sampler)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp16", "w4a16", "w8a8"])
def test_gpu_prefill_graphs_match_eager(tmp_path, precision):
    """Captured padded-prefill graphs give the eager forward's logits for chunks of every bucket
    (and lengths between), over a growing history; decode replays after them agree too."""
    make_model_dir(tmp_path, "llama", seed=6)
    model, _ = load_model(str(tmp_path), precision=precision, group_size=32, device="cuda")
    vocab = model.config.vocab_size
    graph_gen = Generator(model, None, 1024)
    eager_gen = Generator(model, None, 1024, cuda_graph=False)
    for n in (1, 16, 17, 40, 128, 300, 512):
        ids = [(13 * i + n) % vocab for i in range(n)]
        a, b = graph_gen.prefill(ids), eager_gen.prefill(ids)
        torch.cuda.synchronize()
        assert torch.allclose(a.float(), b.float(), atol=2e-2, rtol=2e-2), n
    assert len(graph_gen.prefill_graphs.graphs) >= 5
    sampler = graph_gen.sampler(make_config())
    tok_g = tok_e = int(a.argmax())
    for _ in range(8):
        tok_g = graph_gen.decode_next(tok_g, sampler)
        tok_e = int(eager_gen.decode(tok_e).argmax())
        assert tok_g == tok_e
