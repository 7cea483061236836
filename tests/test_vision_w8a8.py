"""W8A8 SmoothQuant vision towers (tinyq.models.vision_w8a8) against the floating-point tower.

The towers are random, with outlier channels planted the way real ViTs have them: a few LayerNorm
output channels 40x larger than the rest, the linears they feed scaled down to match, so the
floating-point function is unchanged but per-token int8 activations lose those tokens' detail.
"""
import copy
import re

import pytest
import torch

from tests.vlm_tiny import randomize_
from tinyq.backend import force_backend
from tinyq.models.vision import VisionConfig, VisionTower
from tinyq.models.vision_w8a8 import (
    W8A8VisionLayer, cosine_similarity, quantize_tower_w8a8_, record_tower_inputs, smooth_tower_,
)
from tinyq.nn.w8a8_linear import W8A8Linear

OUTLIERS, FACTOR = (3, 17, 40), 40.0


def planted_tower(kind: str = "siglip", seed: int = 0) -> VisionTower:
    act = "gelu_pytorch_tanh" if kind == "siglip" else "quick_gelu"
    cfg = VisionConfig(kind=kind, hidden_size=64, intermediate_size=192, num_layers=4, num_heads=4, image_size=56,
                       patch_size=7, layer_norm_eps=1e-6, hidden_act=act)
    torch.manual_seed(seed)
    tower = randomize_(VisionTower(cfg), std=0.15).float().eval()
    with torch.no_grad():
        for layer in tower.layers:
            for norm, lin in ((layer.layer_norm1, layer.qkv_proj), (layer.layer_norm2, layer.fc1)):
                for c in OUTLIERS:
                    norm.weight[c] *= FACTOR
                    norm.bias[c] *= FACTOR
                    lin.weight[:, c] /= FACTOR
    return tower


def pixels(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 56, 56, generator=g)


def quantized(tower, calib, alpha=0.3, smooth=True):
    q = copy.deepcopy(tower)
    with torch.no_grad():
        quantize_tower_w8a8_(q, (lambda: q.last_hidden_state(calib)) if smooth else None, alpha)
    return q


def test_smoothing_keeps_the_float_function():
    tower = planted_tower()
    px = pixels(2, 1)
    with torch.no_grad():
        ref = tower.last_hidden_state(px)
        with record_tower_inputs(tower) as stats:
            tower.last_hidden_state(pixels(4, 2))
        assert set(stats) == {f"layers.{i}.{n}" for i in range(4) for n in ("qkv_proj", "out_proj", "fc1", "fc2")}
        assert stats["layers.0.qkv_proj"][list(OUTLIERS)].min() > 10 * stats["layers.0.qkv_proj"].median()
        smooth_tower_(tower, stats, alpha=0.3)
        torch.testing.assert_close(tower.last_hidden_state(px), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["siglip", "clip"])
def test_w8a8_tower_accuracy_and_smoothing_helps(kind):
    """Output cosine similarity to the float tower >= 0.99 with smoothing (calibrated on other
    images than those evaluated), and smoothing beats plain per-token W8A8."""
    tower = planted_tower(kind)
    calib, px = pixels(8, 3), pixels(4, 4)
    with torch.no_grad():
        ref = tower.last_hidden_state(px)
        smoothed = quantized(tower, calib).last_hidden_state(px)
        plain = quantized(tower, calib, smooth=False).last_hidden_state(px)
    cos_s, cos_p = cosine_similarity(smoothed, ref), cosine_similarity(plain, ref)
    assert cos_s >= 0.99, cos_s
    assert cos_s > cos_p, (cos_s, cos_p)


def test_layers_are_int8_and_fused():
    q = quantized(planted_tower(), pixels(2, 5))
    for layer in q.layers:
        assert isinstance(layer, W8A8VisionLayer)
        assert all(isinstance(getattr(layer, n), W8A8Linear) for n in ("qkv_proj", "out_proj", "fc1", "fc2"))
        assert layer.gelu == "tanh"
    assert planted_tower("clip").layers[0].act is not None and quantized(planted_tower("clip"), None,
                                                                          smooth=False).layers[0].gelu is None


def test_triton_kernels_match_the_cpu_path():
    """The fused LayerNorm/GELU+quant and int8 GEMM kernels (interpreted) give the CPU path's tower."""
    q = quantized(planted_tower(), pixels(4, 6))
    px = pixels(1, 7)
    with torch.no_grad():
        ref = q.last_hidden_state(px)  # the CPU path in float32
        q.half()  # the kernels take fp16/bf16 activations (the W8A8 scales stay float32)
        with force_backend("triton"):
            out = q.last_hidden_state(px.half())
    assert torch.isfinite(out).all()
    assert cosine_similarity(out, ref) > 0.999


def test_bad_input():
    tower = planted_tower()
    with pytest.raises(ValueError, match="no statistics"):
        smooth_tower_(tower, {})
    with pytest.raises(ValueError, match="alpha"):
        smooth_tower_(tower, {}, alpha=1.5)
    with torch.no_grad(), record_tower_inputs(tower) as stats:
        tower.last_hidden_state(pixels(1, 8))
    q = quantized(tower, None, smooth=False)
    with pytest.raises(ValueError, match="smooth the floating-point tower"):
        smooth_tower_(q, stats)


@pytest.mark.parametrize("bad", ["missing", "nan"])
def test_a_refused_smoothing_leaves_every_layer_unchanged(bad):
    """Statistics missing, or holding NaN, for the last layer are refused before the first layer is
    folded (each layer used to be folded as it was checked, so a retry folded them twice)."""
    tower = planted_tower()
    with torch.no_grad(), record_tower_inputs(tower) as stats:
        tower.last_hidden_state(pixels(2, 3))
    last = f"layers.{len(tower.layers) - 1}.fc1"
    if bad == "missing":
        del stats[last]
    else:
        stats[last] = stats[last].clone().fill_(float("nan"))
    before = {k: v.clone() for k, v in tower.state_dict().items()}
    with pytest.raises(ValueError, match=re.escape(last) if bad == "missing" else "inf/NaN"):
        smooth_tower_(tower, stats)
    assert all(torch.equal(before[k], v) for k, v in tower.state_dict().items())


@pytest.mark.gpu
def test_gpu_w8a8_tower_matches_the_float_tower():
    """The fused kernels on the GPU (fp16 activations): the smoothed W8A8 tower stays at the float
    tower's output, as on the CPU path."""
    tower = planted_tower()
    calib, px = pixels(8, 9), pixels(4, 10)
    with torch.no_grad():
        ref = tower.last_hidden_state(px)
        q = quantized(tower, calib).half().cuda()
        out = q.last_hidden_state(px.half().cuda())
    torch.cuda.synchronize()
    assert torch.isfinite(out).all() and cosine_similarity(out.cpu(), ref) >= 0.99
