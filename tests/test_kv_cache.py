"""StaticKVCache bookkeeping and the bad-input contract of attention_with_cache (cache untouched)."""
import pytest
import torch

from tinyq.backend import force_backend
from tinyq.cache import StaticKVCache
from tinyq.kernels.rope import RopeConfig
from tinyq.ops import attention_with_cache

BACKENDS = ["torch", "triton"]


def snapshot(cache):
    return cache.k.clone(), cache.v.clone(), cache.length, int(cache.seq_pos[0])


def assert_unchanged(cache, snap):
    k, v, length, pos = snap
    assert torch.equal(cache.k, k) and torch.equal(cache.v, v)
    assert cache.length == length and int(cache.seq_pos[0]) == pos


def qkv(L, hq=4, hkv=2, d=64, dtype=torch.float16, b=1):
    return (torch.randn(b, L, hq, d, dtype=dtype), torch.randn(b, L, hkv, d, dtype=dtype),
            torch.randn(b, L, hkv, d, dtype=dtype))


def test_layout_and_counters():
    c = StaticKVCache(num_layers=3, num_kv_heads=2, head_dim=64, max_seq_len=16, batch_size=2, dtype=torch.bfloat16)
    assert c.k.shape == c.v.shape == (3, 2, 2, 16, 64) and c.k.is_contiguous()
    assert c.dtype == torch.bfloat16 and c.seq_pos.dtype == torch.int32 and c.seq_pos.shape == (1,)
    assert c.layer(1)[0].shape == (2, 2, 16, 64)
    c.advance(5)
    c.advance(11)
    assert c.length == 16 and int(c.seq_pos[0]) == 16
    c.check_room(0)
    with pytest.raises(ValueError, match="KV cache full"):
        c.check_room(1)
    with pytest.raises(ValueError, match="KV cache full"):
        c.advance(1)
    assert c.length == 16 and int(c.seq_pos[0]) == 16
    c.truncate(9)
    assert c.length == 9 and int(c.seq_pos[0]) == 9
    with pytest.raises(ValueError, match="truncate"):
        c.truncate(10)
    with pytest.raises(ValueError, match="truncate"):
        c.truncate(-1)
    c.reset()
    assert c.length == 0 and int(c.seq_pos[0]) == 0


def test_constructor_errors():
    with pytest.raises(ValueError, match="max_seq_len"):
        StaticKVCache(1, 1, 64, 0)
    with pytest.raises(ValueError, match="dtype"):
        StaticKVCache(1, 1, 64, 8, dtype=torch.int8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_write_past_capacity_is_an_error_and_changes_nothing(backend):
    rope = RopeConfig(head_dim=64)
    c = StaticKVCache(2, 2, 64, 8, dtype=torch.float16)
    with force_backend(backend):
        q, k, v = qkv(6)
        attention_with_cache(q, k, v, c, 0, rope)
        c.advance(6)
        snap = snapshot(c)
        q, k, v = qkv(3)
        with pytest.raises(ValueError, match="KV cache full"):
            attention_with_cache(q, k, v, c, 0, rope)
        assert_unchanged(c, snap)
        # exactly filling the cache is fine
        q, k, v = qkv(2)
        out = attention_with_cache(q, k, v, c, 1, rope)
        assert torch.isfinite(out).all()


def test_truncate_then_rewrite_matches_fresh_cache():
    """Rolling back a half-finished turn: truncate, write another turn; same as never having
    written the abandoned one (stale entries past the length are never read)."""
    rope = RopeConfig(head_dim=64)
    a, b, c = qkv(5), qkv(4), qkv(3)
    rolled = StaticKVCache(1, 2, 64, 16, dtype=torch.float16)
    fresh = StaticKVCache(1, 2, 64, 16, dtype=torch.float16)
    with force_backend("triton"):
        attention_with_cache(*a, rolled, 0, rope)
        rolled.advance(5)
        attention_with_cache(*b, rolled, 0, rope)
        rolled.advance(4)
        rolled.truncate(5)
        out_rolled = attention_with_cache(*c, rolled, 0, rope)
        attention_with_cache(*a, fresh, 0, rope)
        fresh.advance(5)
        out_fresh = attention_with_cache(*c, fresh, 0, rope)
    assert torch.equal(out_rolled, out_fresh)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_is_a_clear_error_and_leaves_the_cache(backend):
    rope = RopeConfig(head_dim=64)
    c = StaticKVCache(2, 2, 64, 16, dtype=torch.float16)
    snap = snapshot(c)
    q, k, v = qkv(3)
    cases = [
        ((q, k, v, c, 2, rope), "layer_idx"),
        ((q, k, v, c, True, rope), "layer_idx True"),  # a bool is an int to isinstance, not a layer
        ((q.float(), k.float(), v.float(), c, 0, rope), "cache dtype"),
        ((q, k, v.to(torch.bfloat16), c, 0, rope), "share one dtype"),
        ((q[:, :, :3], k, v, c, 0, rope), "not a multiple"),
        ((q, k[:, :2], v[:, :2], c, 0, rope), "do not match"),
        ((q, k[:, :, :1], v[:, :, :1], c, 0, rope), "does not fit the cache"),
        ((q, k, v, c, 0, RopeConfig(head_dim=128)), "rope head_dim"),
        ((q, k, v, c, 0, torch.ones(32, dtype=torch.float64)), "inv_freq"),
        ((q.to("meta"), k.to("meta"), v.to("meta"), c, 0, rope), "cache is on cpu"),
        ((q, k.to("meta"), v, c, 0, rope), "different devices"),
        ((q[:, :0], k[:, :0], v[:, :0], c, 0, rope), "zero tokens"),
    ]
    with force_backend(backend):
        for args, msg in cases:
            with pytest.raises(ValueError, match=msg):
                attention_with_cache(*args)
            assert_unchanged(c, snap)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [-0.125, 0.0])
def test_any_scale_over_the_cache(backend, scale):
    """Chunks at position 0 (plain causal) and later, with a scale <= 0, match the float32
    reference: the CPU path's first chunk was all NaN (torch's CPU SDPA masks before it scales)."""
    from tests.tolerances import assert_close_rel
    from tinyq.kernels.flash_attention import attention_reference
    from tinyq.kernels.rope import apply_rope_reference

    rope = RopeConfig(head_dim=64)
    c = StaticKVCache(1, 2, 64, 16, dtype=torch.float16)
    q, k, v = qkv(7)
    positions = torch.arange(7)
    kr = apply_rope_reference(k, positions, rope).half().transpose(1, 2)  # as the cache holds them
    qr = apply_rope_reference(q, positions, rope)
    with force_backend(backend):
        for lo, hi in ((0, 4), (4, 7)):
            out = attention_with_cache(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], c, 0, rope, scale)
            c.advance(hi - lo)
            expected = attention_reference(qr[:, lo:hi], kr[:, :, :hi], v[:, :hi].transpose(1, 2), True, scale)
            assert_close_rel(out, expected, torch.float16)


def test_unsupported_head_dim():
    c = StaticKVCache(1, 1, 36, 8, dtype=torch.float16)
    q, k, v = qkv(2, hq=1, hkv=1, d=36)
    with pytest.raises(ValueError, match="head_dim 36 is not supported"):
        attention_with_cache(q, k, v, c, 0, RopeConfig(head_dim=36))


def test_custom_ops_pass_opcheck():
    """Schema (declared cache mutation), fake implementations and torch.compile tracing."""
    from tinyq.ops.attention import _attention_with_cache_op, _flash_attention_op

    q, k, v = (t.float() for t in qkv(5))
    assert set(torch.library.opcheck(_flash_attention_op, (q, k, v, True, 0.125)).values()) == {"SUCCESS"}
    c = StaticKVCache(2, 2, 64, 16, dtype=torch.float32)
    c.advance(3)
    args = (q, k, v, c.k, c.v, c.seq_pos, RopeConfig(head_dim=64).inv_freq("cpu"), 1, 0.125)
    assert set(torch.library.opcheck(_attention_with_cache_op, args).values()) == {"SUCCESS"}
