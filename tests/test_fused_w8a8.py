"""The fused one-token W8A8 op: int8 q/k/v GEMV + RoPE + KV-cache write. Kernel outputs and the cache
start poisoned (NaN); results are compared with the unfused math on exact int32 products, and a
whole W8A8 model's decode logits with the unfused path's (separate GEMV and RoPE launches)."""
import pytest
import torch

from tests.tolerances import assert_close_rel
from tinyq.backend import force_backend
from tinyq.cache import StaticKVCache
from tinyq.kernels.int8_configs import select_config
from tinyq.kernels.int8_gemv_rope import int8_gemv_rope_reference, launch_int8_gemv_rope
from tinyq.kernels.rope import RopeConfig
from tinyq.ops.fused_w8a8 import w8a8_qkv_attention
from tinyq.ops.w8a8 import QuantizedActivation

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def case(hq, hkv, d, k, dtype, bias, max_seq, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = (hq + 2 * hkv) * d
    xq = torch.randint(-127, 128, (1, k), dtype=torch.int8, generator=g)
    wq = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    s_x = torch.rand(1, generator=g) * 0.02 + 1e-3
    s_w = torch.rand(n, generator=g) * 1e-3 + 1e-4
    b = (torch.randn(n, generator=g) * 0.3).to(dtype) if bias else None
    kc = torch.full((1, hkv, max_seq, d), float("nan"), dtype=dtype)
    to = lambda t: None if t is None else t.to(DEV)  # noqa: E731
    return to(xq), to(s_x), to(wq), to(s_w), to(b), to(kc), to(kc.clone())


def run_and_check(hq, hkv, d, k, dtype, bias, cfg, max_seq=40, pos=29):
    xq, s_x, wq, s_w, b, kc, vc = case(hq, hkv, d, k, dtype, bias, max_seq)
    inv_freq = RopeConfig(head_dim=d, theta=10000.0).inv_freq(DEV)
    q = torch.full((1, 1, hq, d), float("nan"), dtype=dtype, device=DEV)
    seq_pos = torch.tensor([pos], dtype=torch.int32, device=DEV)
    with force_backend("triton"):
        launch_int8_gemv_rope(xq, s_x, wq, s_w, b, q, kc, vc, seq_pos, inv_freq, hq, hkv, **cfg)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    q_ref = int8_gemv_rope_reference(xq, s_x, wq, s_w, b, kc_ref, vc_ref, pos, inv_freq, hq, hkv)
    assert_close_rel(q, q_ref)
    assert_close_rel(kc[0, :, pos], kc_ref[0, :, pos].float())
    assert_close_rel(vc[0, :, pos], vc_ref[0, :, pos].float())
    others = torch.arange(max_seq, device=DEV) != pos
    assert kc[:, :, others].isnan().all() and vc[:, :, others].isnan().all()  # nothing else written


@pytest.mark.parametrize("hq,hkv,d", [(4, 2, 64), (9, 3, 64), (4, 1, 128), (3, 3, 32)])
@pytest.mark.parametrize("k,block_n,block_k", [(192, 8, 64), (100, 4, 64), (256, 16, 128)])
@pytest.mark.parametrize("dtype,bias", [(torch.float16, False), (torch.bfloat16, True)])
def test_qkv_rope_cache_write_matches_reference(hq, hkv, d, k, block_n, block_k, dtype, bias):
    """Odd K (100: a masked last step), rotation pairs split across programs, a v region that does
    not fill its last program (3 kv heads of 32 against 16 rows)."""
    run_and_check(hq, hkv, d, k, dtype, bias, dict(block_n=block_n, block_k=block_k, num_warps=4))


def test_odd_block_n_is_refused():
    with pytest.raises(ValueError, match="even block_n"):
        run_and_check(4, 2, 32, 64, torch.float16, False, dict(block_n=3, block_k=64))


@pytest.mark.gpu
@pytest.mark.parametrize("hq,hkv,d,k,bias", [(32, 8, 128, 4096, False), (28, 4, 128, 3584, True),
                                             (9, 3, 64, 576, False)])
def test_gpu_qkv_rope_shipped_config(hq, hkv, d, k, bias):
    """The shipped M=1 config (dp4a) at Llama-3-8B, Qwen2-7B and SmolLM2 widths."""
    cfg = select_config(1, torch.device(DEV))
    assert cfg.pop("kernel") == "gemv"
    run_and_check(hq, hkv, d, k, torch.float16, bias, cfg, max_seq=300, pos=257)


def test_qkv_attention_checks_its_arguments():
    xq, s_x, wq, s_w, _, _, _ = case(4, 2, 16, 64, torch.float16, False, 8)
    cache = StaticKVCache(2, 2, 16, 8, 1, dtype=torch.float16, device=DEV)
    rope = RopeConfig(head_dim=16)
    x = QuantizedActivation(xq.view(1, 1, 64), s_x.view(1, 1), torch.float16)
    with force_backend("triton"):
        with pytest.raises(ValueError, match="kv heads"):
            w8a8_qkv_attention(x, wq, s_w, None, cache, 0, rope, 4, 1)
        with pytest.raises(ValueError, match="layer_idx"):
            w8a8_qkv_attention(x, wq, s_w, None, cache, 2, rope, 4, 2)
        with pytest.raises(ValueError, match="bfloat16"):
            w8a8_qkv_attention(x._replace(dtype=torch.bfloat16), wq, s_w, None, cache, 0, rope, 4, 2)
        with pytest.raises(ValueError, match="one token"):
            w8a8_qkv_attention(QuantizedActivation(xq.view(1, 1, 64).repeat(1, 2, 1), s_x.view(1, 1).repeat(1, 2),
                                                   torch.float16), wq, s_w, None, cache, 0, rope, 4, 2)
        cache.advance(8)
        with pytest.raises(ValueError, match="room|full|exceed"):
            w8a8_qkv_attention(x, wq, s_w, None, cache, 0, rope, 4, 2)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_model_decode_fused_equals_unfused(tmp_path, kind, monkeypatch):
    """A W8A8 model's prefill + decode logits and cache on the Triton path are the same with the
    fused qkv op as with the separate GEMV and RoPE/cache-write launches."""
    import tinyq.models.w8a8 as w8a8
    from tests.tiny_models import make_model_dir, prefill_then_decode
    from tinyq.models import load_model

    make_model_dir(tmp_path, kind, seed=3)
    model, tok = load_model(str(tmp_path), precision="w8a8", device=DEV, dtype=torch.float16)
    ids = torch.tensor([tok.encode("The quick brown fox jumps")], device=DEV)

    def run():
        return prefill_then_decode(model, ids)

    calls = []
    fn = w8a8.w8a8_qkv_attention
    monkeypatch.setattr(w8a8, "w8a8_qkv_attention", lambda *a, **kw: calls.append(1) or fn(*a, **kw))
    with force_backend("triton"), torch.inference_mode():
        fused, cache_f = run()
        assert len(calls) == 3 * model.config.num_layers  # decode only
        monkeypatch.setattr(w8a8, "fused_w8a8_decode", lambda x: False)
        plain, cache_p = run()
    assert len(calls) == 3 * model.config.num_layers
    n = cache_p.length
    pairs = [(fused, plain), (cache_f.k[:, :, :, :n], cache_p.k[:, :, :, :n]),
             (cache_f.v[:, :, :, :n], cache_p.v[:, :, :, :n])]
    for got, want in pairs:
        if DEV == "cpu":  # the interpreter does not contract multiply-adds: the same arithmetic, bit for bit
            assert torch.equal(got, want)
        else:
            assert_close_rel(got, want, torch.float16)
