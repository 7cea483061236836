"""A W4A16 model at Llama-3-8B widths (random weights) against its own dequantized fp16 twin, on a
GPU, through the paths a user takes: the eager forward, the prefill graphs and the fused one-token
decode. The kernel tests use small shapes; this one runs the shipped plans at the real ones."""
import copy

import pytest
import torch
from torch import nn

from benchmarks.bench_e2e import SHAPES
from benchmarks.common import random_model
from tinyq.generate import Generator
from tinyq.nn.w4a16_linear import W4A16Linear

pytestmark = pytest.mark.gpu


def dequantized_twin(model):
    """A copy of ``model`` whose W4A16 linears are ``nn.Linear`` (the model's dtype) holding the dequantized weights."""
    twin = copy.deepcopy(model)
    for parent in list(twin.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, W4A16Linear):
                lin = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                device=child.qweight.device, dtype=model.dtype)
                with torch.no_grad():
                    lin.weight.copy_(child.dequantized_weight())
                    if child.bias is not None:
                        lin.bias.copy_(child.bias)
                setattr(parent, name, lin)
    return twin


def cosine(a, b):
    return float(nn.functional.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0))


@pytest.mark.parametrize("layers", [2, 32])
@torch.inference_mode()
def test_llama3_8b_widths_w4a16_agrees_with_its_fp16_twin(layers):
    model = random_model(dict(SHAPES["llama3-8b"], num_hidden_layers=layers), "w4a16", torch.device("cuda"), 128)
    twin = dequantized_twin(model)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (5,), generator=g).tolist()
    got, want = {}, {}
    for out, m in ((got, model), (want, twin)):
        out["eager"] = m(torch.tensor([ids], device="cuda"))[0, -1]
        gen = Generator(m, None, max_seq_len=64)
        out["prefill"] = gen.prefill(ids).clone()
        out["decode"] = gen.decode(ids[0]).clone()
        out["decode 2"] = gen.decode(ids[1]).clone()
    for path in got:  # the random weights keep activations O(1) (benchmarks.common.random_model)
        assert torch.isfinite(want[path]).all() and torch.isfinite(got[path]).all(), path
        assert cosine(got[path], want[path]) > 0.999, (path, cosine(got[path], want[path]))
