"""tinyq's checkpoints against what the real tools made and read (fixtures in tests/fixtures/awq/, made once
with autoawq 0.2.9 + transformers 4.51.3 by scripts/make_awq_fixtures.py; see the README there).

Tolerances: AutoAWQ's ``dequantize_gemm`` computes ``(q - z) * s`` in fp16, so its weights are the exact
values rounded to fp16 (relative error <= 2**-11); its fp32 logits come from those rounded weights and
differ from tinyq's (exact dequantization, fp32) by about 2e-4 on logits of magnitude ~0.7. A wrong
nibble order, zero point or rope_theta moves them by orders of magnitude more.
"""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tinyq.quant import checkpoint as ck
from tinyq.quant.format import dequantize_weight

FIXTURES = Path(__file__).parent / "fixtures" / "awq"
READS = json.loads((FIXTURES / "tinyq_export_reads.json").read_text())  # what transformers 4.51 read


def _tinyq_logits(path, ids):
    from tinyq.models import load_model

    model, _tok = load_model(str(path), precision="w4a16", device="cpu", dtype=torch.float32)
    with torch.no_grad():
        return model(ids)[0].float()


def test_autoawq_checkpoint_is_sane():
    """The fixture AutoAWQ made is close to its float model (AutoAWQ's CPU quantizer has made broken models)."""
    from transformers import AutoModelForCausalLM

    ref = load_file(str(FIXTURES / "autoawq_reference.safetensors"))
    fp = AutoModelForCausalLM.from_pretrained(str(FIXTURES / "float"), dtype=torch.float32)
    with torch.no_grad():
        logits = fp(ref["input_ids"]).logits[0]
    err = (ref["logits_dequant_fp32"] - logits).norm() / logits.norm()
    assert err < 0.15, f"AutoAWQ fixture logits are {err:.3f} (relative) from the float model's"


def test_tinyq_reads_autoawq_checkpoint():
    ref = load_file(str(FIXTURES / "autoawq_reference.safetensors"))
    _, quantized, other = ck.read_quantized_state(FIXTURES / "autoawq")
    assert len(quantized) == 14 and "lm_head.weight" not in other  # tied embeddings
    for prefix, (qweight, scales, zeros, _bias) in quantized.items():
        torch.testing.assert_close(dequantize_weight(qweight, scales, zeros).float(), ref[f"{prefix}.weight"].float(),
                                   rtol=1e-3, atol=1e-7, msg=prefix)
    out = _tinyq_logits(FIXTURES / "autoawq", ref["input_ids"])
    torch.testing.assert_close(out, ref["logits_dequant_fp32"], rtol=0, atol=1e-3)
    torch.testing.assert_close(out, ref["logits_autoawq_fp16"], rtol=0, atol=2e-3)


def test_autoawq_reads_tinyq_export_as_tinyq_does():
    """The committed export, as AutoAWQ's WQLinear_GEMM (fp16) and AutoAWQ's unpack + transformers 4.51 (fp32)
    computed it, against tinyq's runtime and tinyq's transformers path."""
    ref = load_file(str(FIXTURES / "tinyq_export_reference.safetensors"))
    out = _tinyq_logits(FIXTURES / "tinyq_export", ref["input_ids"])
    torch.testing.assert_close(out, ref["logits_dequant_fp32"], rtol=0, atol=1e-3)
    torch.testing.assert_close(out, ref["logits_autoawq_fp16"], rtol=0, atol=2e-3)
    hf = ck.load_quantized_model(FIXTURES / "tinyq_export", dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(hf(ref["input_ids"]).logits[0], ref["logits_dequant_fp32"], rtol=0, atol=1e-3)


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """Today's `--format awq` export of the fixture's float model (what the committed export was made from)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(FIXTURES / "float"), dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(FIXTURES / "float"))
    return ck.save_quantized(model, tmp_path_factory.mktemp("x") / "export", 32, tok, fmt="awq")


def test_export_still_writes_what_autoawq_read(export):
    new = load_file(str(export / "model.safetensors"))
    old = load_file(str(FIXTURES / "tinyq_export" / "model.safetensors"))
    assert sorted(new) == sorted(old)
    for key in old:
        assert new[key].dtype == old[key].dtype and torch.equal(new[key], old[key]), key


def test_config_fields_both_generations_read(export):
    cfg = json.loads((export / "config.json").read_text())
    assert cfg["rope_theta"] == READS["rope_theta"] == 100000.0  # 4.x: top level (else it silently uses 10000)
    assert cfg["rope_parameters"] == {"rope_type": "default", "rope_theta": 100000.0}  # 5.x
    assert cfg["rope_scaling"] is READS["rope_scaling"] is None
    assert cfg["torch_dtype"] == cfg["dtype"] == "float16" and READS["torch_dtype"] == "torch.float16"
    assert cfg["quantization_config"] == READS["quantization_config"] == {
        "quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm",
        "modules_to_not_convert": ["lm_head"]}
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(str(export)).rope_parameters["rope_theta"] == 100000.0  # transformers 5.x


def test_tokenizer_files_both_generations_read(export):
    from transformers import AutoTokenizer

    tok_cfg = json.loads((export / "tokenizer_config.json").read_text())
    assert tok_cfg["tokenizer_class"] == READS["tokenizer_class"] == "PreTrainedTokenizerFast"
    template = (export / "chat_template.jinja").read_text()
    assert tok_cfg["chat_template"] == template == READS["chat_template"] == READS["chat_template_from_tokenizer_config"]
    tok = AutoTokenizer.from_pretrained(str(export))  # transformers 5.x
    assert tok("w1 w2 w3").input_ids == READS["encoded"]
    chat = tok.apply_chat_template([{"role": "user", "content": "w5"}], tokenize=False, add_generation_prompt=True)
    assert chat == READS["chat"]


@pytest.mark.parametrize("source", ["4.x", "5.x"])
def test_portable_config_rope_scaling(source):
    """A Llama-3.1 rope-scaled config, written either way, comes out with both spellings."""
    scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    if source == "4.x":
        cfg = {"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", **scaling}}
    else:
        cfg = {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, **scaling}}
    out = ck.portable_config(cfg, torch.bfloat16)
    assert out["rope_theta"] == 500000.0 and out["torch_dtype"] == out["dtype"] == "bfloat16"
    assert out["rope_scaling"] == {"rope_type": "llama3", "type": "llama3", **scaling}
    assert out["rope_parameters"] == {"rope_type": "llama3", "rope_theta": 500000.0, **scaling}


def test_portable_config_keeps_rope_scaling_added_to_resaved_parameters():
    """A transformers-5 config (``rope_parameters`` of the default type) with a ``rope_scaling`` block
    added by hand: the block wins, as in the reader and transformers, so the export keeps it."""
    from tinyq.kernels.rope import RopeConfig

    cfg = {"rope_theta": 10000.0, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
           "rope_scaling": {"rope_type": "linear", "factor": 4.0}, "hidden_size": 64, "num_attention_heads": 4}
    out = ck.portable_config(cfg, torch.float16)
    assert out["rope_scaling"] == {"rope_type": "linear", "type": "linear", "factor": 4.0}
    assert out["rope_parameters"] == {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}
    assert RopeConfig.from_hf(out) == RopeConfig.from_hf(cfg)


def test_loaders_refuse_unindexed_extra_safetensors(tmp_path):
    """An index-less directory with two *.safetensors (an old export's awq_search.safetensors) is refused by both
    readers instead of merged; tinyq's own exports keep search results in a subfolder."""
    from tinyq.models import load_model

    path = tmp_path / "ckpt"
    shutil.copytree(FIXTURES / "tinyq_export", path)
    shutil.copy(path / "model.safetensors", path / "awq_search.safetensors")
    with pytest.raises(ValueError, match=r"2 \*\.safetensors files \(awq_search\.safetensors, model\.safetensors\).*"
                                         r"move it to awq_search/results\.safetensors"):
        ck.read_quantized_state(path)
    with pytest.raises(ValueError, match=r"2 \*\.safetensors files"):
        load_model(str(path), precision="w4a16", device="cpu", dtype=torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["autoawq", "tinyq_export"])
def test_fixtures_through_the_gpu_kernels(name):
    """tinyq's Triton W4A16 kernels in fp16 on the same checkpoints against AutoAWQ's fp16 logits (on a GPU the
    logits differ from fp32 by fp16 rounding of activations, ~1e-3 here)."""
    from tinyq.models import load_model

    ref_file = "autoawq_reference" if name == "autoawq" else "tinyq_export_reference"
    ref = load_file(str(FIXTURES / f"{ref_file}.safetensors"))
    model, _tok = load_model(str(FIXTURES / name), precision="w4a16", device="cuda", dtype=torch.float16)
    with torch.no_grad():
        out = model(ref["input_ids"].cuda())[0].float().cpu()
    torch.testing.assert_close(out, ref["logits_autoawq_fp16"], rtol=0, atol=5e-3)
