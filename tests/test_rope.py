"""RoPE: inv_freq and rotation vs transformers' LlamaRotaryEmbedding; the fused RoPE + cache-write
Triton kernel vs the float32 reference."""
import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from tests.tolerances import assert_close_rel
from tinyq.kernels.rope import RopeConfig, apply_rope_reference, rope_cache_write

DEV = "cuda" if torch.cuda.is_available() else "cpu"
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}
VARIANTS = {
    "default": (10000.0, None),
    "linear": (100000.0, {"rope_type": "linear", "factor": 4.0}),
    "llama3": (500000.0, LLAMA3),
}


def hf_config(variant, head_dim=64):
    theta, scaling = VARIANTS[variant]
    kw = dict(hidden_size=head_dim * 4, num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim,
              max_position_embeddings=131072, rope_theta=theta)
    if scaling is not None:
        kw["rope_scaling"] = dict(scaling)
    return LlamaConfig(**kw)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("head_dim", [64, 72, 128])
def test_inv_freq_matches_transformers(variant, head_dim):
    cfg = hf_config(variant, head_dim)
    ours = RopeConfig.from_hf(cfg).inv_freq("cpu")
    theirs = LlamaRotaryEmbedding(cfg).inv_freq
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_from_hf_reads_both_config_styles(variant):
    """transformers 5.x ``rope_parameters`` and the older ``rope_theta`` + ``rope_scaling`` dict
    (config.json of older checkpoints, "type" instead of "rope_type") give one RopeConfig."""
    theta, scaling = VARIANTS[variant]
    new_style = dict(hf_config(variant).to_dict())
    old_style = {"hidden_size": 256, "num_attention_heads": 4, "rope_theta": theta}
    if scaling is not None:
        old = dict(scaling)
        old["type"] = old.pop("rope_type")
        old_style["rope_scaling"] = old
    a, b = RopeConfig.from_hf(new_style), RopeConfig.from_hf(old_style)
    assert a == b
    assert a.rope_type == variant and a.theta == theta and a.head_dim == 64


def test_from_hf_rejects_unsupported():
    with pytest.raises(ValueError, match="not supported"):
        RopeConfig.from_hf({"head_dim": 64, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    # transformers' scaled rules read partial_rotary_factor (and then fail in the model); default RoPE ignores it
    with pytest.raises(ValueError, match="partial_rotary_factor=0.5 with rope_type 'linear'"):
        RopeConfig.from_hf({"head_dim": 64, "partial_rotary_factor": 0.5,
                            "rope_scaling": {"rope_type": "linear", "factor": 4.0}})
    with pytest.raises(ValueError, match="even head_dim"):
        RopeConfig(head_dim=63)


# A config re-saved by transformers 5 holds rope_parameters {"rope_type": "default"}; a rope_scaling block
# added to it (Qwen2.5's long-context recipe) is what transformers applies.
RESAVED = {"hidden_size": 256, "num_attention_heads": 4, "max_position_embeddings": 4096,
           "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}


@pytest.mark.parametrize("scaling", [
    {"type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 512},
    {"rope_type": "linear", "factor": 2.0, "rope_theta": 500000.0},
])
@pytest.mark.parametrize("theta", [10000.0, 1e6])
def test_rope_scaling_wins_over_rope_parameters(scaling, theta):
    """transformers: ``rope_parameters = rope_scaling or rope_parameters``: the rope_parameters dict is
    dropped whole, its rope_theta too (then the top-level rope_theta, else 10000, is used)."""
    hf = {**RESAVED, "rope_parameters": {"rope_type": "default", "rope_theta": theta}, "rope_scaling": dict(scaling)}
    ours = RopeConfig.from_hf(hf)
    assert ours.rope_type == scaling.get("rope_type", scaling.get("type"))
    theirs = LlamaRotaryEmbedding(LlamaConfig.from_dict(hf)).inv_freq
    torch.testing.assert_close(ours.inv_freq("cpu"), theirs.float(), rtol=1e-6, atol=0)


def test_rope_scaling_null_or_empty_keeps_rope_parameters():
    for scaling in (None, {}):
        hf = {**RESAVED, "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
              "rope_scaling": scaling}
        assert RopeConfig.from_hf(hf) == RopeConfig(head_dim=64, theta=1e6, rope_type="linear", factor=2.0)


def test_unsupported_rope_scaling_is_refused_over_default_rope_parameters():
    hf = {**RESAVED, "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}}
    with pytest.raises(ValueError, match="rope type 'yarn' is not supported"):
        RopeConfig.from_hf(hf)


@pytest.mark.parametrize("in_dict", [True, False])
def test_top_level_original_max_position_embeddings_wins(in_dict):
    """Phi-3 style: transformers' standardize_rope_params gives a top-level original_max_position_embeddings
    priority over the one in the llama3 dict (and over max_position_embeddings when the dict has none)."""
    llama3 = {k: v for k, v in LLAMA3.items() if in_dict or k != "original_max_position_embeddings"}
    hf = {"hidden_size": 256, "num_attention_heads": 4, "max_position_embeddings": 131072, "rope_theta": 500000.0,
          "rope_scaling": llama3, "original_max_position_embeddings": 2048}
    ours = RopeConfig.from_hf(hf)
    assert ours.original_max_position_embeddings == 2048
    theirs = LlamaRotaryEmbedding(LlamaConfig.from_dict(hf)).inv_freq
    torch.testing.assert_close(ours.inv_freq("cpu"), theirs.float(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("where", ["top", "rope_parameters"])
def test_partial_rotary_factor_is_ignored_with_default_rope(where):
    """transformers' Llama/Qwen2/Mistral rotate the whole head with default RoPE whatever the factor."""
    hf = {"hidden_size": 256, "num_attention_heads": 4, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}}
    if where == "top":
        hf["partial_rotary_factor"] = 0.5
    else:
        hf["rope_parameters"]["partial_rotary_factor"] = 0.5
    ours = RopeConfig.from_hf(hf)
    theirs = LlamaRotaryEmbedding(LlamaConfig.from_dict(hf)).inv_freq
    assert ours.head_dim == 64
    torch.testing.assert_close(ours.inv_freq("cpu"), theirs.float(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_rotation_matches_transformers(variant):
    cfg = hf_config(variant)
    B, L, H, D = 2, 7, 3, 64
    x = torch.randn(B, L, H, D)
    pos = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [100, 2000, 9000, 9001, 30000, 65000, 131071]])
    cos, sin = LlamaRotaryEmbedding(cfg)(x, pos)  # [B, L, D]
    theirs, _ = apply_rotary_pos_emb(x.transpose(1, 2), x.transpose(1, 2), cos, sin)  # [B, H, L, D]
    ours = apply_rope_reference(x, pos, RopeConfig.from_hf(cfg))
    torch.testing.assert_close(ours, theirs.transpose(1, 2), rtol=1e-5, atol=1e-5)


def make_cache(B, HKV, S, D, dtype):
    # stale entries are NaN: the kernel must write exactly the new positions and nothing else
    return (torch.full((B, HKV, S, D), float("nan"), dtype=dtype, device=DEV),
            torch.full((B, HKV, S, D), float("nan"), dtype=dtype, device=DEV))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D,HQ,HKV,L,pos", [(64, 4, 1, 7, 0), (72, 6, 2, 1, 29), (128, 8, 8, 3, 5), (80, 3, 3, 5, 11)])
@pytest.mark.parametrize("variant", ["default", "llama3"])
def test_rope_cache_write_kernel(dtype, D, HQ, HKV, L, pos, variant):
    from tinyq.backend import force_backend

    B, S = 2, 40
    rope = RopeConfig.from_hf(hf_config(variant, D))
    q = torch.randn(B, L, HQ, D, dtype=dtype, device=DEV)
    k = torch.randn(B, L, HKV, D, dtype=dtype, device=DEV)
    v = torch.randn(B, L, HKV, D, dtype=dtype, device=DEV)
    kc, vc = make_cache(B, HKV, S, D, dtype)
    q_out = torch.full_like(q, float("nan"))
    seq_pos = torch.tensor([pos], dtype=torch.int32, device=DEV)
    with force_backend("triton"):
        rope_cache_write(q, k, v, kc, vc, seq_pos, rope.inv_freq(DEV), q_out=q_out)
    positions = torch.arange(pos, pos + L)
    assert_close_rel(q_out, apply_rope_reference(q, positions, rope), dtype)
    assert_close_rel(kc[:, :, pos:pos + L], apply_rope_reference(k, positions, rope).transpose(1, 2), dtype)
    assert torch.equal(vc[:, :, pos:pos + L], v.transpose(1, 2))
    untouched = torch.ones(S, dtype=torch.bool)
    untouched[pos:pos + L] = False
    assert torch.isnan(kc[:, :, untouched]).all() and torch.isnan(vc[:, :, untouched]).all()


def test_rope_kernel_far_positions():
    """Angles of ~1e5 rad (position 120k, llama3): the in-kernel range reduction keeps cos/sin
    as accurate as the float32 reference's."""
    from tinyq.backend import force_backend

    D, pos, L = 128, 120_000, 4
    rope = RopeConfig.from_hf(hf_config("llama3", D))
    q = torch.randn(1, L, 2, D, dtype=torch.float16, device=DEV)
    k = torch.randn(1, L, 1, D, dtype=torch.float16, device=DEV)
    kc = torch.zeros(1, 1, pos + L, D, dtype=torch.float16, device=DEV)
    vc = torch.zeros_like(kc)
    seq_pos = torch.tensor([pos], dtype=torch.int32, device=DEV)
    with force_backend("triton"):
        q_out = rope_cache_write(q, k, k, kc, vc, seq_pos, rope.inv_freq(DEV))
    assert_close_rel(q_out, apply_rope_reference(q, torch.arange(pos, pos + L), rope), torch.float16)


def test_rope_cache_write_checks_q_out_and_inv_freq():
    """``q_out`` must be q's shape, dtype and device (a smaller one was written out of bounds);
    ``inv_freq`` is read at unit stride, so a strided view is refused here (the op copies it)."""
    from tinyq.backend import force_backend

    q = torch.randn(1, 3, 4, 64, dtype=torch.float16, device=DEV)
    k = torch.randn(1, 3, 2, 64, dtype=torch.float16, device=DEV)
    kc, vc = make_cache(1, 2, 8, 64, torch.float16)
    seq_pos = torch.tensor([0], dtype=torch.int32, device=DEV)
    inv_freq = RopeConfig(64).inv_freq(DEV)
    backing = torch.zeros(4096, dtype=torch.float16, device=DEV)
    bad_outs = [torch.zeros(1, 3, 4, 64, dtype=torch.bfloat16, device=DEV), backing[:64].view(1, 1, 1, 64),
                torch.zeros(2, 3, 4, 64, dtype=torch.float16, device=DEV)]
    with force_backend("triton"):
        for q_out in bad_outs:
            with pytest.raises(ValueError, match="rope_cache_write: q_out must be"):
                rope_cache_write(q, k, k, kc, vc, seq_pos, inv_freq, q_out=q_out)
        strided = torch.stack([inv_freq, torch.zeros_like(inv_freq)], 1)[:, 0]
        with pytest.raises(ValueError, match="rope_cache_write: inv_freq must be a contiguous"):
            rope_cache_write(q, k, k, kc, vc, seq_pos, strided)
    assert not backing.any() and kc.isnan().all()  # nothing written


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_attention_with_cache_takes_a_strided_inv_freq(backend):
    """An ``inv_freq`` that is a strided view (a column of a table) rotates like its contiguous
    copy: the Triton kernel read it at unit stride, i.e. the wrong frequencies."""
    from tinyq.backend import force_backend
    from tinyq.cache import StaticKVCache
    from tinyq.ops import attention_with_cache

    inv_freq = RopeConfig(64).inv_freq(DEV)
    strided = torch.stack([inv_freq, torch.zeros_like(inv_freq)], 1)[:, 0]
    q = torch.randn(1, 4, 2, 64, dtype=torch.float16, device=DEV)
    k, v = (torch.randn(1, 4, 1, 64, dtype=torch.float16, device=DEV) for _ in range(2))
    results = []
    for freq in (inv_freq, strided):
        cache = StaticKVCache(1, 1, 64, 8, 1, torch.float16, device=DEV)
        with force_backend(backend):
            results.append((attention_with_cache(q, k, v, cache, 0, freq), cache.k[..., :4, :].clone()))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
