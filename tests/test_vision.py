"""CLIP / SigLIP towers vs transformers' CLIPVisionModel / SiglipVisionModel hidden states (fp32)."""
import pytest
import torch

from tests.vlm_tiny import tiny_tower
from tinyq.backend import force_backend
from tinyq.models.loader import TensorSource
from tinyq.models.vision import VisionConfig, load_vision_tower


def _ours(hf, prefix=""):
    sd = {prefix + k: v for k, v in hf.state_dict().items()}
    cfg = VisionConfig.from_hf(hf.config.to_dict())
    return load_vision_tower(cfg, TensorSource(tensors=sd), dtype=torch.float32)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("prefix", ["", "vision_model."])
def test_hidden_states_match_transformers(kind, prefix):
    hf = tiny_tower(kind)
    tower = _ours(hf, prefix)
    px = torch.randn(2, 3, hf.config.image_size, hf.config.image_size)
    with torch.no_grad():
        ref = hf(px, output_hidden_states=True)
        hs = tower.hidden_states(px)
        last = tower.last_hidden_state(px)
    assert len(hs) == len(ref.hidden_states) == hf.config.num_hidden_layers + 1
    for i, (a, b) in enumerate(zip(hs, ref.hidden_states)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=f"hidden_states[{i}]")
    torch.testing.assert_close(last, ref.last_hidden_state, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layer,strategy", [(-2, "default"), (-1, "full"), ([-3, -1], "default"), ([1, 2], "full")])
def test_feature_selection_follows_llava(layer, strategy):
    hf = tiny_tower("clip")
    tower = _ours(hf)
    px = torch.randn(1, 3, hf.config.image_size, hf.config.image_size)
    with torch.no_grad():
        hs = hf(px, output_hidden_states=True).hidden_states
        got = tower.features(px, layer, strategy)
    layers = [layer] if isinstance(layer, int) else layer
    want = torch.cat([hs[i][:, 1:] if strategy == "default" else hs[i] for i in layers], dim=-1)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_triton_path_matches_torch_path():
    """Flash attention and LayerNorm through the interpreted Triton kernels, fp16."""
    hf = tiny_tower("siglip")
    tower = _ours(hf).half()
    px = torch.randn(1, 3, hf.config.image_size, hf.config.image_size)
    with torch.no_grad():
        ref = tower.float().features(px, -2, "full")
        tower.half()
        with force_backend("triton"):
            out = tower.features(px.half(), -2, "full")
    err = (out.float() - ref).abs().max() / ref.abs().max()
    assert torch.isfinite(out).all() and err < 3e-3, err  # fp16 tower (measured 7.3e-4)


def test_bad_input():
    hf = tiny_tower("clip")
    tower = _ours(hf)
    with pytest.raises(ValueError, match="pixel_values must be"):
        tower.features(torch.randn(1, 3, 10, 10))
    with pytest.raises(ValueError, match="out of range"):
        tower.features(torch.randn(1, 3, 28, 28), layer=7)
    with pytest.raises(ValueError, match="select_strategy"):
        tower.features(torch.randn(1, 3, 28, 28), strategy="cls")
    with pytest.raises(ValueError, match="no vision tower"):
        load_vision_tower(tower.config, TensorSource(tensors={}), prefix="model.vision_tower.")
    with pytest.raises(ValueError, match="unsupported vision tower"):
        VisionConfig.from_hf({"model_type": "dinov2"})


def test_batch_graphs_chunking():
    """Tiles run as chunks of 8, 4, 2, 1 (largest first); the result is the whole batch's."""
    from tinyq.graphs import BatchGraphs

    seen = []

    def rowwise(x):
        seen.append(x.shape[0])
        return x * 2 + x.sum(dim=1, keepdim=True)

    g = BatchGraphs(rowwise, capture=False)
    assert g.split(17) == [8, 8, 1] and g.split(7) == [4, 2, 1] and g.split(0) == []
    x = torch.randn(15, 3)
    torch.testing.assert_close(g(x), x * 2 + x.sum(dim=1, keepdim=True), rtol=0, atol=0)
    assert seen == [8, 4, 2, 1]
    assert g(x[:0]).shape == (0, 3)
    with pytest.raises(ValueError, match="must include 1"):
        BatchGraphs(rowwise, chunks=(8, 4), capture=False)


def test_encode_off_cuda_is_features():
    hf = tiny_tower("siglip")
    tower = _ours(hf)
    px = torch.randn(3, 3, hf.config.image_size, hf.config.image_size)
    with torch.no_grad():
        torch.testing.assert_close(tower.encode(px, -2, "full"), tower.features(px, -2, "full"), rtol=0, atol=0)
    assert tower.graph_count == 0
