"""Chunked prefill ("context streaming"): prefilling a sequence chunk by chunk through the cache
equals one full prefill, on the Triton kernels and on the torch path; and the flash kernel's
cache mode (queries at offset p, keys [0, p + L)) against the float32 reference."""
import pytest
import torch

from tests.tolerances import assert_close_rel
from tinyq.backend import force_backend
from tinyq.cache import StaticKVCache
from tinyq.kernels.flash_attention import attention_reference, flash_attention_fwd
from tinyq.kernels.rope import RopeConfig, apply_rope_reference

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def prefill(q, k, v, rope, chunks, backend, max_seq_len=48, layers=1):
    """Feed [B, S, ...] through attention_with_cache in chunks of the given sizes; all layers
    see the same inputs. Returns (outputs of layer 0 concatenated, cache)."""
    from tinyq.ops import attention_with_cache

    B, S, HQ, D = q.shape
    cache = StaticKVCache(layers, k.shape[2], D, max_seq_len, B, dtype=q.dtype, device=q.device)
    outs, start = [], 0
    with force_backend(backend):
        for n in chunks:
            sl = slice(start, start + n)
            for layer in range(layers):
                out = attention_with_cache(q[:, sl], k[:, sl], v[:, sl], cache, layer, rope)
                if layer == 0:
                    outs.append(out)
            cache.advance(n)
            start += n
    assert start == S
    return torch.cat(outs, dim=1), cache


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("chunks", [(7, 1, 9, 2, 5), (13, 11)])
def test_chunks_equal_full_prefill(dtype, group, chunks):
    B, HKV, D = 1, 1, 64
    S = sum(chunks)
    rope = RopeConfig(head_dim=D, theta=10000.0, rope_type="linear", factor=2.0)
    q = torch.randn(B, S, HKV * group, D, dtype=dtype, device=DEV)
    k = torch.randn(B, S, HKV, D, dtype=dtype, device=DEV)
    v = torch.randn(B, S, HKV, D, dtype=dtype, device=DEV)
    full, full_cache = prefill(q, k, v, rope, (S,), "triton")
    parts, part_cache = prefill(q, k, v, rope, chunks, "triton", layers=2)  # layers stay apart
    assert_close_rel(parts, full)
    for layer in (0, 1):
        assert torch.equal(part_cache.k[layer, :, :, :S], full_cache.k[0, :, :, :S])
        assert torch.equal(part_cache.v[layer, :, :, :S], full_cache.v[0, :, :, :S])
    # and both against float32 math: rotate, then plain causal attention
    pos = torch.arange(S)
    ref = attention_reference(apply_rope_reference(q, pos, rope), apply_rope_reference(k, pos, rope).transpose(1, 2),
                              v.float().transpose(1, 2), causal=True)
    assert_close_rel(parts, ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_torch_path_matches_triton_and_chunks(dtype):
    """The CPU path (used to chat on a CPU) agrees with itself chunked and with the kernels."""
    B, HQ, HKV, D, S = 2, 6, 2, 64, 20  # batch 2: rows of a batch never mix
    rope = RopeConfig(head_dim=D, theta=500000.0, rope_type="llama3", factor=8.0)
    q = torch.randn(B, S, HQ, D, dtype=dtype)
    k = torch.randn(B, S, HKV, D, dtype=dtype)
    v = torch.randn(B, S, HKV, D, dtype=dtype)
    full, _ = prefill(q, k, v, rope, (S,), "torch")
    parts, _ = prefill(q, k, v, rope, (5, 1, 1, 13), "torch")
    assert_close_rel(parts, full, dtype)
    if dtype != torch.float32:
        kernel, _ = prefill(q, k, v, rope, (18, 2), "triton")
        assert_close_rel(kernel, full, dtype)


@pytest.mark.parametrize("p,L", [(0, 7), (5, 16), (33, 9), (100, 29)])
@pytest.mark.parametrize("group", [1, 4])
def test_flash_cache_mode_matches_reference(p, L, group):
    """Flash kernel reading the cache layout with kv_len = seq_pos + L from the device; entries
    past kv_len are NaN and must never be read."""
    B, HKV, D, S = 1, 2, 64, 144
    kc = torch.full((B, HKV, S, D), float("nan"), dtype=torch.float16, device=DEV)
    vc = torch.full_like(kc, float("nan"))
    kc[:, :, :p + L] = torch.randn(B, HKV, p + L, D, device=DEV).half()
    vc[:, :, :p + L] = torch.randn(B, HKV, p + L, D, device=DEV).half()
    q = torch.randn(B, L, HKV * group, D, dtype=torch.float16, device=DEV)
    out = torch.full_like(q, float("nan"))
    seq_pos = torch.tensor([p], dtype=torch.int32, device=DEV)
    with force_backend("triton"):
        flash_attention_fwd(q, kc, vc, causal=True, seq_pos=seq_pos, out=out)
    assert_close_rel(out, attention_reference(q, kc, vc, causal=True, kv_len=p + L))


@pytest.mark.gpu
@pytest.mark.parametrize("history", [16, 1000, 4096])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_chunked_gpu_realistic(history, dtype):
    B, HQ, HKV, D, L, S = 1, 32, 8, 128, 32, 8192
    kc = torch.randn(B, HKV, S, D, dtype=dtype, device="cuda")
    vc = torch.randn_like(kc)
    q = torch.randn(B, L, HQ, D, dtype=dtype, device="cuda")
    seq_pos = torch.tensor([history], dtype=torch.int32, device="cuda")
    out = torch.full_like(q, float("nan"))
    flash_attention_fwd(q, kc, vc, causal=True, seq_pos=seq_pos, out=out)
    assert_close_rel(out, attention_reference(q, kc, vc, causal=True, kv_len=history + L))


@pytest.mark.gpu
def test_chunks_equal_full_prefill_gpu():
    B, HQ, HKV, D = 1, 32, 8, 128
    chunks = (1000, 1, 37, 512, 3)
    S = sum(chunks)
    rope = RopeConfig(head_dim=D, theta=500000.0, rope_type="llama3", factor=8.0)
    q, k, v = (torch.randn(B, S, h, D, dtype=torch.bfloat16, device="cuda") for h in (HQ, HKV, HKV))
    full, _ = prefill(q, k, v, rope, (S,), "triton", max_seq_len=2048, layers=1)
    parts, _ = prefill(q, k, v, rope, chunks, "triton", max_seq_len=2048, layers=1)
    assert_close_rel(parts, full)
