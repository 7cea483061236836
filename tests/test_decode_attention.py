"""Split-KV decode kernel vs the float32 reference; decode == the last row of a prefill."""
import pytest
import torch

from tests.out_buffers import WRONG_OUTS, wrong_out
from tests.tolerances import assert_close_rel
from tinyq.backend import force_backend
from tinyq.cache import StaticKVCache
from tinyq.kernels.decode_attention import decode_attention, decode_attention_reference
from tinyq.kernels.paired import PairedRows, paired_plane, unpair_rows_reference
from tinyq.kernels.rope import RopeConfig
from tinyq.ops import attention_with_cache

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def make_cache(B, HKV, S, D, kv_len, dtype, device=DEV):
    """Random entries in [0, kv_len); NaN past it (stale entries must never be read)."""
    kc = torch.full((B, HKV, S, D), float("nan"), dtype=dtype, device=device)
    vc = torch.full_like(kc, float("nan"))
    kc[:, :, :kv_len] = torch.randn(B, HKV, kv_len, D, device=device).to(dtype)
    vc[:, :, :kv_len] = torch.randn(B, HKV, kv_len, D, device=device).to(dtype)
    return kc, vc


def run(q, kc, vc, kv_len, **kw):
    L = q.shape[1]
    seq_pos = torch.tensor([kv_len - L], dtype=torch.int32, device=q.device)
    out = torch.full_like(q, float("nan"))
    with force_backend("triton"):
        decode_attention(q, kc, vc, seq_pos, out=out, **kw)
    return out


@pytest.mark.parametrize("kv_len", [1, 7, 129])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("L", [1, 3])
def test_decode_matches_reference(kv_len, group, L):
    kv_len = max(kv_len, L)  # L == kv_len: every key is one of the new tokens
    B, HKV, S, D = 2, 2, 160, 64
    kc, vc = make_cache(B, HKV, S, D, kv_len, torch.float16)
    q = torch.randn(B, L, HKV * group, D, dtype=torch.float16, device=DEV)
    ref = decode_attention_reference(q, kc, vc, kv_len)
    assert_close_rel(run(q, kc, vc, kv_len), ref)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", [72, 128])
@pytest.mark.parametrize("num_splits", [1, 3, 64])
def test_decode_splits_dims_dtypes(dtype, D, num_splits):
    """One slice, a few ragged slices, and more slices than filled blocks (most exit early)."""
    B, HQ, HKV, S, kv_len, L = 1, 4, 1, 96, 50, 4
    kc, vc = make_cache(B, HKV, S, D, kv_len, dtype)
    q = torch.randn(B, L, HQ, D, dtype=dtype, device=DEV)
    ref = decode_attention_reference(q, kc, vc, kv_len)
    assert_close_rel(run(q, kc, vc, kv_len, num_splits=num_splits), ref)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group,D,num_splits", [(4, 64, 1), (4, 72, 3), (32, 64, 3)])
def test_decode_paired_output(dtype, group, D, num_splits):
    """One token's output written in the o_proj GEMV's paired layout, from the single slice, the
    in-kernel merge and (32-head groups) the combine kernel; the plane padding stays untouched."""
    HKV, S, kv_len = 1, 96, 90  # 16-key blocks: 1 slice, or 3 slices of 32 keys, all used
    kc, vc = make_cache(1, HKV, S, D, kv_len, dtype)
    q = torch.randn(1, 1, HKV * group, D, dtype=dtype, device=DEV)
    n = HKV * group * D
    out = PairedRows(torch.full((1, 4 * paired_plane(n)), float("nan"), dtype=dtype, device=DEV), n)
    seq_pos = torch.tensor([kv_len - 1], dtype=torch.int32, device=DEV)
    with force_backend("triton"):
        decode_attention(q, kc, vc, seq_pos, num_splits=num_splits, block_n=16, out=out)
    assert_close_rel(unpair_rows_reference(out), decode_attention_reference(q, kc, vc, kv_len).reshape(1, n))
    assert out.data.isnan().sum() == 4 * paired_plane(n) - n
    with pytest.raises(ValueError, match="paired output"):
        decode_attention(q.expand(2, 1, -1, -1).contiguous(), kc.expand(2, -1, -1, -1).contiguous(),
                         vc.expand(2, -1, -1, -1).contiguous(), seq_pos, out=out)


@pytest.mark.parametrize("L,group", [(32, 4), (16, 8), (127, 1)])
@pytest.mark.parametrize("kv_len", [130, 250])
def test_chunk_rows_fill_one_tile(L, group, kv_len):
    """A chat turn's chunk (L * G up to 128 rows) through the split kernel, with more slices than
    the fill needs: the empty slices write nothing and the merge reads only the filled ones
    (their partial buffers start as NaN here, so a stray read shows)."""
    B, HKV, S, D = 1, 2, 256, 64
    kc, vc = make_cache(B, HKV, S, D, kv_len, torch.float16)
    q = torch.randn(B, L, HKV * group, D, dtype=torch.float16, device=DEV)
    ref = decode_attention_reference(q, kc, vc, kv_len)
    assert_close_rel(run(q, kc, vc, kv_len, num_splits=8), ref)


@pytest.mark.parametrize("kv_len", [5, 40, 160])
def test_merge_by_the_last_slice_leaves_its_counters_at_zero(kv_len):
    """The slice that arrives last merges the others' partials and resets its (batch, kv head)
    counter, so the next launch (the next layer, the next replay) starts from zero; a context of
    one slice writes the output directly."""
    from tinyq.kernels.semaphore import counters

    B, HKV, S, D, group = 2, 3, 160, 64, 2
    kc, vc = make_cache(B, HKV, S, D, kv_len, torch.float16)
    for _ in range(2):
        q = torch.randn(B, 1, HKV * group, D, dtype=torch.float16, device=DEV)
        assert_close_rel(run(q, kc, vc, kv_len, num_splits=5), decode_attention_reference(q, kc, vc, kv_len))
        assert int(counters(q.device, B * HKV)[:B * HKV].abs().sum()) == 0


@pytest.mark.parametrize("group", [1, 4, 8])
def test_decode_equals_last_row_of_prefill(group):
    """Prefill S tokens then decode one, through attention_with_cache (RoPE + cache write + split
    kernel) == row S of one prefill of S + 1 tokens."""
    B, HKV, D, S = 1, 1, 64, 12
    HQ = HKV * group
    rope = RopeConfig(head_dim=D, theta=10000.0)
    q = torch.randn(B, S + 1, HQ, D, dtype=torch.float16, device=DEV)
    k = torch.randn(B, S + 1, HKV, D, dtype=torch.float16, device=DEV)
    v = torch.randn(B, S + 1, HKV, D, dtype=torch.float16, device=DEV)
    with force_backend("triton"):
        whole = StaticKVCache(1, HKV, D, 32, B, dtype=torch.float16, device=DEV)
        full = attention_with_cache(q, k, v, whole, 0, rope)
        inc = StaticKVCache(1, HKV, D, 32, B, dtype=torch.float16, device=DEV)
        attention_with_cache(q[:, :S], k[:, :S], v[:, :S], inc, 0, rope)
        inc.advance(S)
        last = attention_with_cache(q[:, S:], k[:, S:], v[:, S:], inc, 0, rope)
    assert_close_rel(last, full[:, S:])
    assert torch.equal(inc.k[:, :, :, :S + 1], whole.k[:, :, :, :S + 1])


def test_decode_bad_input():
    kc, vc = make_cache(1, 1, 16, 64, 4, torch.float16)
    seq_pos = torch.tensor([3], dtype=torch.int32, device=DEV)
    with force_backend("triton"):
        with pytest.raises(ValueError, match="rows"):
            decode_attention(torch.randn(1, 5, 32, 64, dtype=torch.float16, device=DEV), kc, vc, seq_pos)
        with pytest.raises(ValueError, match="not a multiple"):
            decode_attention(torch.randn(1, 1, 3, 64, dtype=torch.float16, device=DEV),
                             *make_cache(1, 2, 16, 64, 4, torch.float16), seq_pos)
        with pytest.raises(ValueError, match="fp16 or bf16"):
            decode_attention(torch.randn(1, 1, 2, 64, dtype=torch.bfloat16, device=DEV), kc, vc, seq_pos)


@pytest.mark.parametrize("bad", WRONG_OUTS)
def test_decode_out_is_checked(bad):
    """A wrong ``out=`` is refused before the launch (a smaller one was written out of bounds,
    another dtype or shape accepted silently)."""
    kc, vc = make_cache(1, 2, 16, 64, 5, torch.float16)
    q = torch.randn(1, 1, 4, 64, dtype=torch.float16, device=DEV)
    seq_pos = torch.tensor([4], dtype=torch.int32, device=DEV)
    backing = torch.zeros(4096, dtype=torch.float16, device=DEV)
    out = wrong_out(bad, (1, 1, 4, 64), torch.float16, backing)
    with force_backend("triton"), pytest.raises(ValueError, match="decode_attention: out (must be|needs)"):
        decode_attention(q, kc, vc, seq_pos, out=out)
    assert not backing.any()


def test_seq_pos_must_be_an_integer():
    """The cache fill is read on the device as an integer: a float seq_pos is a clear error in
    every launcher that reads it (it failed inside the compiler), int64 works like int32."""
    from tinyq.kernels.flash_attention import flash_attention_fwd
    from tinyq.kernels.rope import rope_cache_write

    kc, vc = make_cache(1, 2, 16, 64, 5, torch.float16)
    q = torch.randn(1, 1, 4, 64, dtype=torch.float16, device=DEV)
    k = torch.randn(1, 1, 2, 64, dtype=torch.float16, device=DEV)
    inv_freq = RopeConfig(64).inv_freq(DEV)
    pos = torch.tensor([4.0], device=DEV)
    with force_backend("triton"):
        with pytest.raises(ValueError, match="decode_attention: seq_pos must hold one int32"):
            decode_attention(q, kc, vc, pos)
        with pytest.raises(ValueError, match="flash_attention: seq_pos must hold one int32"):
            flash_attention_fwd(q, kc, vc, seq_pos=pos)
        with pytest.raises(ValueError, match="rope_cache_write: seq_pos must hold one int32"):
            rope_cache_write(q, k, k, kc, vc, pos, inv_freq)
        with pytest.raises(ValueError, match="seq_pos must hold one int32"):
            decode_attention(q, kc, vc, torch.tensor([4, 4], dtype=torch.int32, device=DEV))
    assert_close_rel(run(q, kc, vc, 5), decode_attention_reference(q, kc, vc, 5))
    out = torch.full_like(q, float("nan"))
    with force_backend("triton"):
        decode_attention(q, kc, vc, torch.tensor([4], device=DEV), out=out)  # int64
    assert_close_rel(out, decode_attention_reference(q, kc, vc, 5))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kv_len,S", [(4096, 4096), (32768, 32768), (1000, 32768), (1, 2048)])
@pytest.mark.parametrize("L", [1, 4])
def test_decode_gpu_realistic(dtype, kv_len, S, L):
    kv_len = max(kv_len, L)
    kc, vc = make_cache(1, 8, S, 128, kv_len, dtype, device="cuda")
    q = torch.randn(1, L, 32, 128, dtype=dtype, device="cuda")
    assert_close_rel(run(q, kc, vc, kv_len), decode_attention_reference(q, kc, vc, kv_len))


@pytest.mark.gpu
def test_decode_cuda_graph_replay_follows_seq_pos():
    """Capture one decode step (RoPE + cache write + attention + advance) once; each replay reads
    the current seq_pos on the device and matches the eager result at that position."""
    HQ, HKV, D, S = 32, 8, 128, 4096
    rope = RopeConfig(head_dim=D, theta=500000.0)
    eager = StaticKVCache(1, HKV, D, S, dtype=torch.float16, device="cuda")
    graphed = StaticKVCache(1, HKV, D, S, dtype=torch.float16, device="cuda")
    steps = [[torch.randn(1, 1, h, D, dtype=torch.float16, device="cuda") for h in (HQ, HKV, HKV)] for _ in range(5)]
    prompt = [torch.randn(1, 300, h, D, dtype=torch.float16, device="cuda") for h in (HQ, HKV, HKV)]
    for c in (eager, graphed):
        attention_with_cache(*prompt, c, 0, rope)
        c.advance(300)
    static_in = [t.clone() for t in steps[0]]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up compiles the kernels outside the capture
        attention_with_cache(*static_in, graphed, 0, rope)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = attention_with_cache(*static_in, graphed, 0, rope)
        graphed.seq_pos.add_(1)
    for q, k, v in steps:
        for dst, src in zip(static_in, (q, k, v)):
            dst.copy_(src)
        graph.replay()
        graphed.length += 1
        ref = attention_with_cache(q, k, v, eager, 0, rope)
        eager.advance(1)
        torch.testing.assert_close(static_out, ref, rtol=0, atol=0)
    assert int(graphed.seq_pos[0]) == eager.length


@pytest.mark.parametrize("bad, message", [
    (dict(hq=3), "{where}: 3 query heads are not a multiple of 2 kv heads"),
    (dict(k_dtype=torch.bfloat16), "{where}: q, k, v must share one dtype of fp16 or bf16"),
    (dict(d=36), "{where}: head_dim 36 is not supported"),
])
def test_attention_entry_points_check_alike(bad, message):
    """One shared check: the decode and flash launchers and both ops say the same thing."""
    from tinyq.kernels.flash_attention import flash_attention_fwd
    from tinyq.ops import flash_attention

    hq, d = bad.get("hq", 4), bad.get("d", 64)
    q = torch.randn(1, 1, hq, d, dtype=torch.float16, device=DEV)
    k = torch.randn(1, 1, 2, d, dtype=bad.get("k_dtype", torch.float16), device=DEV)
    v = torch.randn(1, 1, 2, d, dtype=torch.float16, device=DEV)
    kc, vc = make_cache(1, 2, 16, d, 4, torch.float16)
    kc = kc.to(k.dtype)
    seq_pos = torch.tensor([3], dtype=torch.int32, device=DEV)
    calls = {
        "decode_attention": lambda: decode_attention(q, kc, vc, seq_pos),
        "flash_attention": lambda: flash_attention_fwd(q, k.transpose(1, 2), v.transpose(1, 2)),
    }
    with force_backend("triton"):
        for where, call in calls.items():
            with pytest.raises(ValueError, match=message.format(where=where).replace("(", r"\(")):
                call()
    with pytest.raises(ValueError, match=message.format(where="flash_attention")):
        flash_attention(q, k, v)
