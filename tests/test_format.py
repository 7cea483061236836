"""tinyq's int4 format: the quantizer's error bound, packing, and bit-exact AWQ conversion."""
import pytest
import torch

from tinyq.quant.format import (
    AWQ_ORDER,
    dequantize_weight,
    from_awq_gemm,
    pack_int4,
    quantize_groupwise,
    quantize_weight,
    to_awq_gemm,
    unpack_int4,
)


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_quantize_error_bound(group_size, dtype):
    w = torch.randn(24, 384) * 0.05
    qweight, scales, zeros = quantize_weight(w, group_size, dtype)
    assert qweight.shape == (24, 48) and qweight.dtype == torch.int32
    assert scales.shape == (24, 384 // group_size) and scales.dtype == dtype
    err = (dequantize_weight(qweight, scales, zeros) - w).abs()
    # Rounding to the nearest level costs at most half a step; clamping the zero point to an
    # integer can add up to another half step; the scale is rounded to fp16/bf16 on top.
    step = scales.float().repeat_interleave(group_size, dim=1)
    assert (err <= step * 1.01 + 1e-7).all()
    assert err.mean() < 0.35 * step.mean()


def test_quantizer_matches_awq_formula():
    w = torch.randn(8, 64)
    q, s, z = quantize_groupwise(w, 32, 4, torch.float16)
    g = w.reshape(8, 2, 32)
    s_ref = ((g.amax(-1) - g.amin(-1)).clamp(min=1e-5) / 15).half().float()
    z_ref = (-torch.round(g.amin(-1) / s_ref)).clamp(0, 15)
    q_ref = (torch.round(g / s_ref[..., None]) + z_ref[..., None]).clamp(0, 15)
    assert torch.equal(s.float(), s_ref)
    assert torch.equal(z.float(), z_ref)
    assert torch.equal(q.float(), q_ref.reshape(8, 64))


def test_pack_bit_order():
    q = (torch.arange(64) % 16).to(torch.uint8).repeat(3, 1)  # k -> k % 16
    words = pack_int4(q)
    assert words.shape == (3, 8)
    w = words.to(torch.int64) & 0xFFFFFFFF
    for c in range(8):
        b, wi = divmod(c, 4)
        for i in range(8):
            assert (w[0, c] >> (4 * i)) & 0xF == (32 * b + 4 * i + wi) % 16
    # word 0 holds k = 0, 4, 8, ..., 28 in nibbles 0..7 (lowest first)
    assert w[0, 0].item() == 0xC840C840
    assert torch.equal(unpack_int4(words), q)
    rnd = torch.randint(0, 16, (5, 96), dtype=torch.uint8)
    assert torch.equal(unpack_int4(pack_int4(rnd)), rnd)
    with pytest.raises(ValueError, match="multiple of 32"):
        pack_int4(torch.zeros(2, 48, dtype=torch.uint8))


def test_awq_packing_order_and_roundtrip():
    n, k, g = 32, 256, 64
    w = torch.randn(n, k)
    qweight, scales, zeros = quantize_weight(w, g, torch.float16)
    aq, az, ascale = to_awq_gemm(qweight, scales, zeros)
    assert aq.shape == (k, n // 8) and az.shape == (k // g, n // 8) and ascale.shape == (k // g, n)
    # AWQ nibble i of word c holds column 8c + AWQ_ORDER[i]
    q = unpack_int4(qweight)
    word = aq[5, 1].item() & 0xFFFFFFFF
    for i, col in enumerate(AWQ_ORDER):
        assert (word >> (4 * i)) & 0xF == q[8 + col, 5].item()
    back = from_awq_gemm(aq, az, ascale)
    assert torch.equal(back[0], qweight) and torch.equal(back[1], scales) and torch.equal(back[2], zeros)
    # and the other direction, starting from random AWQ words
    aq2 = torch.randint(-(2**31), 2**31 - 1, (k, n // 8), dtype=torch.int32)
    az2 = torch.randint(-(2**31), 2**31 - 1, (k // g, n // 8), dtype=torch.int32)
    s2 = torch.rand(k // g, n, dtype=torch.float16)
    again = to_awq_gemm(*from_awq_gemm(aq2, az2, s2))
    assert torch.equal(again[0], aq2) and torch.equal(again[1], az2) and torch.equal(again[2], s2)


def test_awq_dequant_matches():
    n, k, g = 16, 128, 32
    qweight, scales, zeros = quantize_weight(torch.randn(n, k), g, torch.float16)
    aq, az, ascale = to_awq_gemm(qweight, scales, zeros)
    shifts = torch.tensor([4 * AWQ_ORDER.index(j) for j in range(8)], dtype=torch.int32)
    q = ((aq.unsqueeze(-1) >> shifts) & 0xF).reshape(k, n).float()
    z = ((az.unsqueeze(-1) >> shifts) & 0xF).reshape(k // g, n).float()
    w_awq = (q - z.repeat_interleave(g, 0)) * ascale.float().repeat_interleave(g, 0)  # [K, N]
    assert torch.equal(w_awq.t(), dequantize_weight(qweight, scales, zeros))


def test_bad_group_size_and_shape():
    with pytest.raises(ValueError, match="K=576 is not divisible by group_size=128"):
        quantize_weight(torch.randn(8, 576), 128)
    with pytest.raises(ValueError, match="group_size=48 is not supported"):
        quantize_weight(torch.randn(8, 96), 48)
    with pytest.raises(ValueError, match="out_features divisible by 8"):
        to_awq_gemm(*quantize_weight(torch.randn(12, 64), 32))


def test_one_sided_groups_keep_their_range():
    """A group of only positive (or only negative) weights gets a grid from 0 to its far end (the
    integer zero point puts 0 on every grid), not one clamped to [0, hi - lo]."""
    w = torch.cat([torch.rand(4, 64) * 0.5 + 0.5, -(torch.rand(4, 64) * 0.5 + 0.5)])
    q, s, z = quantize_groupwise(w, 32, 4, torch.float16)
    back = (q.float().reshape(8, 2, 32) - z.float()[..., None]) * s.float()[..., None]
    assert (back.reshape(8, 64) - w).abs().max() <= 0.5 * s.float().max() + 1e-6  # half a grid step
    assert torch.equal(z[:4], torch.zeros_like(z[:4])) and torch.equal(z[4:], torch.full_like(z[4:], 15))
