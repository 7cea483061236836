"""Fused one-token W4A16 ops: qkv GEMV + RoPE + cache write, gate/up GEMV + SiLU-gated product.

Kernel outputs and untouched cache entries start poisoned (NaN); every result is compared with the
float32 references, and a whole model's decode logits with the unfused path's."""
import pytest
import torch

from tests.tolerances import assert_close_rel
from tinyq.backend import force_backend
from tinyq.cache import StaticKVCache
from tinyq.kernels.rope import RopeConfig
from tinyq.kernels.w4a16_configs import PAIRED_DECODE, launch_plan
from tinyq.kernels.paired import PairedRows, pair_rows_reference, paired_plane, unpair_rows_reference
from tinyq.kernels.w4a16_gemv_residual import launch_w4a16_gemv_residual, w4a16_gemv_residual_reference
from tinyq.kernels.w4a16_gemv_rope import launch_w4a16_gemv_rope, w4a16_gemv_rope_reference
from tinyq.kernels.w4a16_gemv_silu import launch_w4a16_gemv_silu, w4a16_gemv_silu_reference
from tinyq.ops.fused import w4a16_qkv_attention
from tinyq.quant.format import quantize_weight

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def quantized(n, k, group, dtype, bias=False):
    w = torch.randn(n, k) * 0.05
    qw, s, z = quantize_weight(w, group, dtype)
    b = (torch.randn(n) * 0.3).to(dtype) if bias else None
    return [t.to(DEV) if t is not None else None for t in (qw, s, z, b)]


def plan(x, warp_blocks=None):
    """The shipped M=1 plan; ``warp_blocks`` set: rows sharing a warp (tinyq.kernels.w4a16_gemv.gemv_rows)."""
    cfg = launch_plan(1, x.dtype, x.get_device())[1]
    return cfg if warp_blocks is None else dict(cfg, warp_blocks=warp_blocks)


@pytest.mark.parametrize("inter,k,group", [(37, 192, 64), (300, 576, 64), (64, 256, 128), (5, 96, 32)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bias,warp_blocks", [(False, None), (True, None), (False, 4)])
def test_gate_up_silu_matches_reference(inter, k, group, dtype, bias, warp_blocks):
    qw, s, z, b = quantized(2 * inter, k, group, dtype, bias)
    x = torch.randn(1, k, device=DEV).to(dtype)
    y = torch.full((1, inter), float("nan"), dtype=dtype, device=DEV)
    with force_backend("triton"):
        launch_w4a16_gemv_silu(x, qw, s, z, b, y, **plan(x, warp_blocks))
    assert_close_rel(y, w4a16_gemv_silu_reference(x, qw, s, z, b))


def poisoned_paired(n, dtype):
    return PairedRows(torch.full((1, 4 * paired_plane(n)), float("nan"), dtype=dtype, device=DEV), n)


@pytest.mark.parametrize("inter,k,group", [(64, 192, 64), (32, 576, 64), (96, 96, 32), (32, 1024, 128)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("x_paired,y_paired", [(True, False), (False, True), (True, True)])
def test_gate_up_silu_paired_in_and_out(inter, k, group, dtype, x_paired, y_paired):
    """Paired x (as the residual GEMV writes it) and a paired output (as the down GEMV reads it):
    the same numbers as the natural layout's, and nothing written outside the paired entries."""
    qw, s, z, b = quantized(2 * inter, k, group, dtype, True)
    x = torch.randn(1, k, device=DEV).to(dtype)
    y = poisoned_paired(inter, dtype) if y_paired else torch.full((1, inter), float("nan"), dtype=dtype, device=DEV)
    with force_backend("triton"):
        launch_w4a16_gemv_silu(pair_rows_reference(x) if x_paired else x, qw, s, z, b, y, **plan(x))
    ref = w4a16_gemv_silu_reference(x, qw, s, z, b)
    if y_paired:
        assert_close_rel(unpair_rows_reference(y), ref)
        assert y.data.isnan().sum() == 4 * paired_plane(inter) - inter  # only the padding left
    else:
        assert_close_rel(y, ref)


@pytest.mark.parametrize("hq,hkv,d", [(4, 2, 64), (9, 3, 64), (4, 1, 128), (3, 3, 32)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bias,warp_blocks,paired", [(False, None, False), (True, None, False), (True, 4, False),
                                                     (True, None, True)])
def test_qkv_rope_cache_write_matches_reference(hq, hkv, d, dtype, bias, warp_blocks, paired):
    # K = 1024 with the paired input: whole steps (EVEN_K); 192 otherwise
    k, group, max_seq, pos = (1024, 128, 40, 29) if paired else (192, 64, 40, 29)
    qw, s, z, b = quantized((hq + 2 * hkv) * d, k, group, dtype, bias)
    x = torch.randn(1, k, device=DEV).to(dtype)
    inv_freq = RopeConfig(head_dim=d, theta=10000.0).inv_freq(DEV)
    kc = torch.full((1, hkv, max_seq, d), float("nan"), dtype=dtype, device=DEV)
    vc = torch.full_like(kc, float("nan"))
    q = torch.full((1, 1, hq, d), float("nan"), dtype=dtype, device=DEV)
    seq_pos = torch.tensor([pos], dtype=torch.int32, device=DEV)
    with force_backend("triton"):
        launch_w4a16_gemv_rope(pair_rows_reference(x) if paired else x, qw, s, z, b, q, kc, vc, seq_pos, inv_freq, hq,
                               hkv, **plan(x, warp_blocks))
    kc_ref, vc_ref = kc.clone(), vc.clone()
    q_ref = w4a16_gemv_rope_reference(x, qw, s, z, b, kc_ref, vc_ref, pos, inv_freq, hq, hkv)
    assert_close_rel(q, q_ref)
    assert_close_rel(kc[0, :, pos], kc_ref[0, :, pos].float())
    assert_close_rel(vc[0, :, pos], vc_ref[0, :, pos].float())
    others = torch.arange(max_seq, device=DEV) != pos
    assert kc[:, :, others].isnan().all() and vc[:, :, others].isnan().all()  # nothing else written


@pytest.mark.parametrize("n,k,group", [(64, 192, 64), (576, 1536, 64), (300, 256, 128), (9, 96, 32)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bias,norm,warp_blocks", [(False, True, None), (True, True, None), (False, False, None),
                                                   (False, True, 8)])
def test_linear_residual_matches_reference(n, k, group, dtype, bias, norm, warp_blocks):
    qw, s, z, b = quantized(n, k, group, dtype, bias)
    x = torch.randn(1, k, device=DEV).to(dtype)
    residual = torch.randn(n, device=DEV).to(dtype)
    norm_w = (1 + 0.1 * torch.randn(n, device=DEV)).to(dtype) if norm else None
    h = torch.full((n,), float("nan"), dtype=dtype, device=DEV)
    hw = torch.full_like(h, float("nan")) if norm else None
    with force_backend("triton"):
        launch_w4a16_gemv_residual(x, qw, s, z, b, residual, norm_w, h, hw, **plan(x, warp_blocks))
    h_ref, hw_ref = w4a16_gemv_residual_reference(x, qw, s, z, b, residual.view(1, n), norm_w)
    assert_close_rel(h, h_ref.view(n).float())
    if norm:
        assert_close_rel(hw, hw_ref.view(n).float())


@pytest.mark.parametrize("n,k,group", [(64, 192, 64), (576, 1536, 64), (96, 2048, 128)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_linear_residual_paired_in_and_out(n, k, group, dtype):
    """The down projection's form: x paired (the SiLU GEMV's output), h natural, h * w paired; at
    K = 2048 with whole 1024-input steps (the unmasked x loads of ``EVEN_K``)."""
    qw, s, z, b = quantized(n, k, group, dtype, True)
    x = torch.randn(1, k, device=DEV).to(dtype)
    residual = torch.randn(n, device=DEV).to(dtype)
    norm_w = (1 + 0.1 * torch.randn(n, device=DEV)).to(dtype)
    h = torch.full((n,), float("nan"), dtype=dtype, device=DEV)
    hw = poisoned_paired(n, dtype)
    with force_backend("triton"):
        launch_w4a16_gemv_residual(pair_rows_reference(x), qw, s, z, b, residual, norm_w, h, hw, **plan(x))
    h_ref, hw_ref = w4a16_gemv_residual_reference(x, qw, s, z, b, residual.view(1, n), norm_w)
    assert_close_rel(h, h_ref.view(n).float())
    assert_close_rel(unpair_rows_reference(hw), hw_ref.float())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_prenorm_finishes_the_rmsnorm_in_the_gemv(dtype):
    """x = h * w with prenorm=(h, eps) gives the projection of rms_norm(h) * w: the norm costs no launch."""
    k, inter, hq, hkv, d, pos = 192, 40, 4, 2, 32, 3
    h = (3 * torch.randn(1, k, device=DEV)).to(dtype)
    w = (1 + 0.1 * torch.randn(k, device=DEV)).to(dtype)
    hw = (h.float() * w.float()).to(dtype)
    qw, s, z, _ = quantized(2 * inter, k, 64, dtype)
    y = torch.full((1, inter), float("nan"), dtype=dtype, device=DEV)
    with force_backend("triton"):
        launch_w4a16_gemv_silu(hw, qw, s, z, None, y, prenorm=(h.view(k), 1e-5), **plan(hw))
    assert_close_rel(y, w4a16_gemv_silu_reference(hw, qw, s, z, None, prenorm=(h, 1e-5)))
    normed = h.float() * torch.rsqrt(h.float().pow(2).mean(-1, keepdim=True) + 1e-5) * w.float()
    assert_close_rel(y, w4a16_gemv_silu_reference(normed, qw, s, z))  # the same math, unfused

    qw, s, z, _ = quantized((hq + 2 * hkv) * d, k, 64, dtype)
    inv_freq = RopeConfig(head_dim=d).inv_freq(DEV)
    kc = torch.full((1, hkv, 8, d), float("nan"), dtype=dtype, device=DEV)
    vc = torch.full_like(kc, float("nan"))
    q = torch.full((1, 1, hq, d), float("nan"), dtype=dtype, device=DEV)
    with force_backend("triton"):
        launch_w4a16_gemv_rope(hw, qw, s, z, None, q, kc, vc, torch.tensor([pos], dtype=torch.int32, device=DEV),
                               inv_freq, hq, hkv, prenorm=(h.view(k), 1e-5), **plan(hw))
    kc_ref, vc_ref = kc.clone(), vc.clone()
    q_ref = w4a16_gemv_rope_reference(normed, qw, s, z, None, kc_ref, vc_ref, pos, inv_freq, hq, hkv)
    assert_close_rel(q, q_ref)
    assert_close_rel(kc[0, :, pos], kc_ref[0, :, pos].float())
    assert_close_rel(vc[0, :, pos], vc_ref[0, :, pos].float())


def test_qkv_attention_checks_its_arguments():
    qw, s, z, _ = quantized((4 + 2 * 2) * 16, 64, 32, torch.float16)
    cache = StaticKVCache(2, 2, 16, 8, 1, dtype=torch.float16, device=DEV)
    rope = RopeConfig(head_dim=16)
    x = torch.randn(1, 1, 64, dtype=torch.float16, device=DEV)
    with force_backend("triton"):
        with pytest.raises(ValueError, match="kv heads"):
            w4a16_qkv_attention(x, qw, s, z, None, cache, 0, rope, 4, 1)
        with pytest.raises(ValueError, match="layer_idx"):
            w4a16_qkv_attention(x, qw, s, z, None, cache, 2, rope, 4, 2)
        with pytest.raises(ValueError, match="float32"):
            w4a16_qkv_attention(x.float(), qw, s, z, None, cache, 0, rope, 4, 2)
        cache.advance(8)
        with pytest.raises(ValueError, match="room|full|exceed"):
            w4a16_qkv_attention(x, qw, s, z, None, cache, 0, rope, 4, 2)


@pytest.mark.parametrize("kind,prenorm_max,paired", [("llama", 1024, False), ("qwen2", 1024, False),
                                                     ("llama", 0, False), ("qwen2", 1024, True), ("llama", 0, True)])
def test_model_decode_fused_equals_unfused(tmp_path, kind, prenorm_max, paired, monkeypatch):
    """A W4A16 model's prefill + decode logits on the Triton path are the same with the fused
    one-token ops as with the separate GEMV, RoPE/cache-write and SiLU launches; with the norms
    finished inside the next GEMV (tiny hidden <= PRENORM_MAX_HIDDEN) and with norm kernels (0);
    with GEMV inputs in the natural layout and paired (``PAIRED_DECODE``)."""
    import tinyq.models.llama as llama
    from tests.tiny_models import make_model_dir, prefill_then_decode
    from tinyq.models import load_model

    monkeypatch.setattr(llama, "PRENORM_MAX_HIDDEN", prenorm_max)
    monkeypatch.setitem(PAIRED_DECODE, "sm90" if DEV == "cuda" else "default", paired)
    make_model_dir(tmp_path, kind, seed=3)
    model, tok = load_model(str(tmp_path), precision="w4a16", group_size=32, device=DEV, dtype=torch.float16)
    ids = torch.tensor([tok.encode("The quick brown fox jumps")], device=DEV)

    def run():
        return prefill_then_decode(model, ids)

    calls = []
    for name in ("w4a16_qkv_attention", "w4a16_gate_up_silu", "w4a16_linear_residual"):
        fn = getattr(llama, name)
        monkeypatch.setattr(llama, name, lambda *a, _fn=fn, _name=name, **kw: calls.append(_name) or _fn(*a, **kw))
    with force_backend("triton"), torch.inference_mode():
        fused, cache_f = run()
        layers = model.config.num_layers
        assert calls.count("w4a16_qkv_attention") == calls.count("w4a16_gate_up_silu") == 3 * layers  # decode only
        assert calls.count("w4a16_linear_residual") == 2 * 3 * layers  # o_proj and down_proj
        monkeypatch.setattr(llama, "fused_decode", lambda x, scales: False)
        plain, cache_p = run()
    assert_close_rel(fused, plain, torch.float16)
    n = cache_p.length
    assert_close_rel(cache_f.k[:, :, :, :n], cache_p.k[:, :, :, :n])
    assert_close_rel(cache_f.v[:, :, :, :n], cache_p.v[:, :, :, :n])
