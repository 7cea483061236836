"""Flash-attention Triton kernel (prefill, no cache) vs the float32 reference."""
import math

import pytest
import torch
import triton
import triton.language as tl

from tests.out_buffers import WRONG_OUTS, wrong_out
from tests.tolerances import assert_close_rel
from tinyq.backend import force_backend
from tinyq.kernels.flash_attention import (
    attention_reference, flash_attention_fwd, head_dim_split, online_softmax_update,
)
from tinyq.ops import flash_attention

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float16, torch.bfloat16]


def make(B, S, HQ, HKV, D, dtype, device=DEV):
    q = torch.randn(B, S, HQ, D, dtype=dtype, device=device)
    k = torch.randn(B, S, HKV, D, dtype=dtype, device=device)
    v = torch.randn(B, S, HKV, D, dtype=dtype, device=device)
    return q, k, v


def run_kernel(q, k, v, causal, scale=None):
    out = torch.full_like(q, float("nan"))
    with force_backend("triton"):
        flash_attention_fwd(q, k.transpose(1, 2), v.transpose(1, 2), causal=causal, scale=scale, out=out)
    return out


def ref(q, k, v, causal, scale=None):
    return attention_reference(q, k.transpose(1, 2), v.transpose(1, 2), causal=causal, scale=scale)


@pytest.mark.parametrize("S", [1, 7, 129])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("causal", [True, False])
def test_flash_gqa_ratios_and_odd_lengths(S, group, causal):
    q, k, v = make(1, S, group, 1, 64, torch.float16)
    assert_close_rel(run_kernel(q, k, v, causal), ref(q, k, v, causal))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [40, 64, 72, 80, 88, 96, 128, 136])
def test_flash_head_dims_and_dtypes(dtype, D):
    q, k, v = make(2, 33, 4, 2, D, dtype)
    assert_close_rel(run_kernel(q, k, v, True), ref(q, k, v, True))


def test_head_dim_split():
    """Head dims that are not a power of two run as two power-of-two column blocks when that is
    less work than padding (72 -> 64 + 16, not 128); the rest pad as one block."""
    expected = {16: (16, 0), 24: (32, 0), 40: (32, 16), 64: (64, 0), 72: (64, 16), 80: (64, 16),
                88: (64, 32), 96: (64, 32), 112: (128, 0), 136: (128, 16), 192: (128, 64), 200: (256, 0)}
    assert {d: head_dim_split(d) for d in expected} == expected


@pytest.mark.parametrize("causal", [True, False])
def test_flash_vision_shape_and_scale(causal):
    """SigLIP-like head (d=72, MHA, non-causal) with an explicit scale."""
    q, k, v = make(1, 50, 2, 2, 72, torch.bfloat16)
    assert_close_rel(run_kernel(q, k, v, causal, scale=0.1), ref(q, k, v, causal, scale=0.1))


@pytest.mark.parametrize("scale", [-0.3, 0.0, 2.0])
@pytest.mark.parametrize("causal", [True, False])
def test_flash_any_scale(scale, causal):
    """Any float scale, as SDPA takes one: negative, zero (uniform weights) and large. 70 keys span
    several mask-free blocks of the interpreter's 16-key tiles, then the masked ones."""
    q, k, v = make(1, 70, 2, 1, 64, torch.float16)
    assert_close_rel(run_kernel(q, k, v, causal, scale=scale), ref(q, k, v, causal, scale=scale))


@pytest.mark.parametrize("row", [72, 75, 80])
def test_flash_strided_views(row):
    """q/k/v/out as views into wider rows (a fused qkv buffer, padding): strides that are multiples
    of 8 but not 16 (row 72, 80 with d=72) and strides with no common factor (75) all index right."""
    D = 72
    wide = [torch.randn(2, 40, 3, row, dtype=torch.float16, device=DEV) for _ in range(3)]
    q, k, v = (w[..., :D] for w in wide)
    out_buf = torch.full((2, 40, 3, row), float("nan"), dtype=torch.float16, device=DEV)
    with force_backend("triton"):
        flash_attention_fwd(q, k.transpose(1, 2), v.transpose(1, 2), causal=False, out=out_buf[..., :D])
    assert_close_rel(out_buf[..., :D], ref(q, k, v, False))
    assert out_buf[..., D:].isnan().all()  # nothing written past the head


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_flash_attention_op_torch_path(dtype):
    """The CPU path (torch SDPA in float32) agrees with the explicit reference."""
    q, k, v = make(2, 19, 6, 2, 64, dtype, device="cpu")
    for causal in (True, False):
        with force_backend("torch"):
            out = flash_attention(q, k, v, causal=causal)
        assert_close_rel(out, ref(q, k, v, causal), dtype)


def test_flash_attention_op_triton_path_and_reference_math():
    q, k, v = make(1, 9, 4, 2, 64, torch.float16)
    with force_backend("triton"):
        out = flash_attention(q, k, v, causal=True)
    assert_close_rel(out, ref(q, k, v, True))
    # the reference itself against the textbook formula (GQA by repeating heads)
    kr, vr = k.float().repeat_interleave(2, 2), v.float().repeat_interleave(2, 2)
    s = torch.einsum("bqhd,bkhd->bhqk", q.float(), kr) / math.sqrt(64)
    s = s.masked_fill(torch.ones(9, 9, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    textbook = torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), vr)
    torch.testing.assert_close(ref(q, k, v, True).float(), textbook, rtol=2e-3, atol=2e-3)


def test_flash_bad_input():
    q, k, v = make(1, 8, 4, 2, 64, torch.float16)
    with pytest.raises(ValueError, match="head_dim 36"):
        flash_attention(*make(1, 8, 2, 2, 36, torch.float16))
    with pytest.raises(ValueError, match="not a multiple"):
        flash_attention(q[:, :, :3], k, v)
    with pytest.raises(ValueError, match="share one dtype"):
        flash_attention(q, k.float(), v)
    with pytest.raises(ValueError, match="differ"):
        flash_attention(q, k, v[:, :4])
    with pytest.raises(ValueError, match="different devices"):
        flash_attention(q, k.to("meta"), v)
    with pytest.raises(ValueError, match="fp16 or bf16"), force_backend("triton"):
        flash_attention_fwd(q.float(), k.float().transpose(1, 2), v.float().transpose(1, 2))


@pytest.mark.parametrize("scale", [-0.3, 0.0, -50.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_flash_attention_op_torch_path_any_scale(scale, dtype):
    """The CPU path with a scale <= 0: torch's CPU SDPA applies ``is_causal``'s -inf before the
    scale (NaN rows), so causal attention takes an explicit mask there."""
    q, k, v = make(1, 17, 4, 2, 64, dtype, device="cpu")
    for causal in (True, False):
        with force_backend("torch"):
            out = flash_attention(q, k, v, causal=causal, scale=scale)
        assert_close_rel(out, ref(q, k, v, causal, scale), dtype)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("causal", [True, False])
def test_flash_attention_nan_query_row_stays_nan(backend, causal):
    """A query row holding NaN gives a NaN output row on both paths, as the float32 reference does
    (torch's fused CPU SDPA alone returned zeros there); the other rows are unaffected."""
    q, k, v = make(1, 5, 2, 1, 64, torch.float16, device=DEV if backend == "triton" else "cpu")
    q[0, 2, 0, 7] = float("nan")
    with force_backend(backend):
        out = flash_attention(q, k, v, causal=causal)
    expected = ref(q, k, v, causal)
    assert expected[0, 2, 0].isnan().all()
    assert torch.equal(out.isnan(), expected.isnan())
    keep = ~expected.isnan()
    assert_close_rel(out[keep], expected[keep])


@pytest.mark.parametrize("bad", WRONG_OUTS)
def test_flash_out_is_checked(bad):
    """A wrong ``out=`` is refused before the launch: the kernel writes the whole
    ``[B, Lq, Hq, D]`` through out's strides, so a smaller buffer was written out of bounds and
    another dtype rounded to silently."""
    q, k, v = make(1, 5, 2, 1, 64, torch.float16)
    backing = torch.zeros(4096, dtype=torch.float16, device=DEV)
    out = wrong_out(bad, (1, 5, 2, 64), torch.float16, backing)
    with force_backend("triton"), pytest.raises(ValueError, match="flash_attention: out (must be|needs)"):
        flash_attention_fwd(q, k.transpose(1, 2), v.transpose(1, 2), causal=True, out=out)
    assert not backing.any()  # nothing written


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("S,HQ,HKV,D,causal", [(1024, 32, 8, 128, True), (4096, 32, 8, 128, True),
                                                 (729, 16, 16, 72, False), (577, 16, 16, 64, False),
                                                 (333, 32, 32, 80, True), (1000, 28, 4, 128, True)])
def test_flash_gpu_realistic(dtype, S, HQ, HKV, D, causal):
    q, k, v = make(1, S, HQ, HKV, D, dtype, device="cuda")
    assert_close_rel(run_kernel(q, k, v, causal), ref(q, k, v, causal))



@triton.jit
def _softmax_blocks_kernel(S, V, O, M: tl.constexpr, N: tl.constexpr, D: tl.constexpr, NBLK: tl.constexpr):
    rows = tl.arange(0, M)
    cols = tl.arange(0, N)
    dims = tl.arange(0, D)
    m_i = tl.full([M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([M], dtype=tl.float32)
    acc = tl.zeros([M, D], dtype=tl.float32)
    for blk in range(NBLK):
        qk = tl.load(S + rows[:, None] * (N * NBLK) + blk * N + cols[None, :])
        v = tl.load(V + (blk * N + cols[:, None]) * D + dims[None, :])
        acc, l_i, m_i = online_softmax_update(acc, l_i, m_i, qk, v)
    tl.store(O + rows[:, None] * D + dims[None, :], acc / l_i[:, None])


@pytest.mark.skipif(DEV != "cpu", reason="runs the helper in the interpreter")
def test_online_softmax_update_over_blocks():
    """The update both attention kernels share, over three key blocks, equals softmax(s) @ v; a row
    whose first blocks are fully masked stays finite and ends right (the decode kernel's case)."""
    M, N, D, NBLK = 16, 16, 16, 3
    torch.manual_seed(0)
    s = torch.randn(M, N * NBLK) * 3  # log2 units
    s[3, : 2 * N] = float("-inf")  # row 3 sees keys only in the last block
    s[5, N:] = float("-inf")  # row 5 only in the first
    v = torch.randn(N * NBLK, D)
    out = torch.full((M, D), float("nan"))
    _softmax_blocks_kernel[(1,)](s, v, out, M=M, N=N, D=D, NBLK=NBLK)
    expected = torch.softmax(s * math.log(2), dim=-1) @ v
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
