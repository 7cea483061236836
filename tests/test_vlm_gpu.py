"""VLM paths on a CUDA GPU: the fp16 SigLIP tower (Triton LayerNorm + flash attention) at so400m
widths vs transformers, LayerNorm at the projector's 13824 width, and LLaVA / NVILA fp16 and
W4A16 sessions agreeing with the fp32 CPU model."""
import pytest
import torch

from tests.tolerances import assert_close_rel
from tests.vlm_tiny import make_llava_dir, make_nvila_dir
from tinyq.kernels.layernorm import layernorm, layernorm_reference
from tinyq.models.loader import TensorSource
from tinyq.models.vision import VisionConfig, load_vision_tower
from tinyq.models.vlm import load_vlm
from tinyq.vlm.session import VLMChatSession

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("n", [1152, 13824])
def test_layernorm_kernel_wide_rows(n):
    x = torch.randn(300, n, device="cuda", dtype=torch.float16)
    r = torch.randn_like(x)
    w, b = torch.rand(n, device="cuda") + 0.5, torch.randn(n, device="cuda")
    out, h = layernorm(x, w, b, 1e-6, r)
    ref, ref_h = layernorm_reference(x, w, b, 1e-6, r)
    assert torch.equal(h, ref_h)
    assert_close_rel(out, ref)


def _so400m_width_towers(layers):
    """(transformers fp32 CPU, tinyq fp16 CUDA) SigLIP towers of so400m widths, same random weights."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    cfg = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=layers,
                             num_attention_heads=16, image_size=448, patch_size=14, vision_use_head=False)
    torch.manual_seed(0)
    hf = SiglipVisionModel(cfg).float().eval()
    return hf, load_vision_tower(VisionConfig.from_hf(cfg.to_dict()), TensorSource(tensors=hf.state_dict()), "",
                                 torch.float16, "cuda")


@torch.no_grad()
def test_so400m_width_tower_fp16_matches_transformers():
    hf, ours = _so400m_width_towers(4)
    px = torch.randn(3, 3, 448, 448)
    ref = hf(px, output_hidden_states=True).hidden_states[-2]
    out = ours.features(px.cuda().half(), -2, "full")
    err = (out.float().cpu() - ref).abs().max() / ref.abs().max()
    assert torch.isfinite(out).all() and err < 2e-2, err


@torch.no_grad()
def test_tower_graphs_replay_the_eager_tower():
    """encode() replays CUDA graphs in chunks of 8, 4, 2, 1 tiles: bit-identical to the eager tower
    on the same chunks, captured once per chunk size, dropped when the linears become W8A8."""
    from tinyq.models.vision_w8a8 import quantize_tower_w8a8_

    _, tower = _so400m_width_towers(2)
    px = torch.randn(9, 3, 448, 448, device="cuda", dtype=torch.float16)
    eager = torch.cat([tower.features(px[:8], -2, "full"), tower.features(px[8:], -2, "full")])
    out = tower.encode(px, -2, "full")
    assert torch.equal(out, eager) and tower.graph_count == 2  # chunk sizes 8 and 1
    assert torch.equal(tower.encode(px, -2, "full"), eager) and tower.graph_count == 2
    quantize_tower_w8a8_(tower, calibrate=lambda: tower.encode(px[:2], -2, "full"))
    assert tower.graph_count == 0
    w8 = torch.cat([tower.features(px[:8], -2, "full"), tower.features(px[8:], -2, "full")])
    assert torch.equal(tower.encode(px, -2, "full"), w8) and not torch.equal(w8, eager)


def _images(n):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    return [Image.fromarray((torch.rand(40 + 9 * i, 50, 3, generator=g) * 255).byte().numpy()) for i in range(n)]


@pytest.mark.parametrize("family", ["llava", "nvila"])
@pytest.mark.parametrize("precision", ["fp16", "w4a16"])
def test_gpu_session_agrees_with_fp32_cpu(tmp_path, family, precision):
    if family == "llava":
        make_llava_dir(tmp_path, "clip", "llama")
    else:
        make_nvila_dir(tmp_path)
    cpu, tok = load_vlm(str(tmp_path), "fp32", device="cpu", max_seq_len=512)
    gpu, _ = load_vlm(str(tmp_path), precision, device="cuda", max_seq_len=512, group_size=32)
    images = _images(1)
    feats_cpu, feats_gpu = cpu.encode_images(images), gpu.encode_images(images)
    ids = torch.tensor([[5] + gpu.placeholder_ids(feats_gpu[0], tok) + [6, 7]])
    a = cpu.logits(ids, features=feats_cpu).flatten()
    b = gpu.logits(ids, features=feats_gpu).float().cpu().flatten()
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > (0.999 if precision == "fp16" else 0.98)
    s = VLMChatSession(gpu, tok, max_seq_len=512, max_new_tokens=8)
    s.add_images(images)
    r1 = s.ask("what?")
    r2 = s.ask("more?")
    assert r1.stats.new_tokens >= 1 and r2.stats.prefilled_tokens <= r2.stats.prompt_tokens - r1.stats.prompt_tokens
