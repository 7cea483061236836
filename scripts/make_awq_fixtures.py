"""Regenerate tests/fixtures/awq/: AutoAWQ-made and AutoAWQ-read reference checkpoints (not run by CI).

Three steps, in two environments (see tests/fixtures/awq/README.md for the versions used)::

    # 1. in a throwaway venv with torch (CPU), transformers 4.51.3, autoawq 0.2.9 (--no-deps), accelerate:
    /tmp/venv-awq/bin/python scripts/make_awq_fixtures.py autoawq
    # 2. in tinyq's own environment: tinyq's `--format awq` export of the same float model
    PYTHONPATH=$PWD .venv/bin/python scripts/make_awq_fixtures.py export
    # 3. back in the AutoAWQ venv: what transformers 4.51 / AutoAWQ read from tinyq's export
    /tmp/venv-awq/bin/python scripts/make_awq_fixtures.py read-export

Two more steps compare AutoAWQ and tinyq on a real export (SmolLM2-135M-Instruct, not committed)::

    PYTHONPATH=$PWD .venv/bin/python -m tinyq quantize --model default --method rtn --format awq \
        --group-size 64 --out /tmp/smol-awq
    /tmp/venv-awq/bin/python scripts/make_awq_fixtures.py smollm2-autoawq
    PYTHONPATH=$PWD .venv/bin/python scripts/make_awq_fixtures.py smollm2-compare

Step 1 writes ``float/`` (a tiny tied-embedding Llama, fp16, rope_theta 100000 like SmolLM2),
``autoawq/`` (that model quantized by AutoAWQ's own quantizer) and ``autoawq_reference.safetensors``
(AutoAWQ's ``dequantize_gemm`` of every linear, and logits). It refuses to write a quantized model that
fails a sanity check against the float one, since AutoAWQ's CPU quantizer was seen to produce broken
models. Step 3 writes ``tinyq_export_reference.safetensors`` and ``tinyq_export_reads.json``.
"""
from __future__ import annotations

import json
import random
import shutil
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "awq"
GROUP_SIZE = 32
WORDS = [f"w{i}" for i in range(124)]
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }} {{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant{% endif %}")
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def input_ids() -> torch.Tensor:
    return torch.randint(4, 128, (1, 24), generator=torch.Generator().manual_seed(7))


def calibration_lines(n: int = 128) -> list:
    rng = random.Random(1)
    return [" ".join(rng.choice(WORDS[:40]) if rng.random() < 0.7 else rng.choice(WORDS) for _ in range(12))
            for _ in range(n)]


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def float_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, head_dim=32,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=256, rope_theta=100000.0,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:  # salient input channels, as in real models (what AWQ protects)
            layer.input_layernorm.weight[:3] *= 8
            layer.post_attention_layernorm.weight[5:8] *= 8
        for p in model.parameters():
            p.copy_(p.half().float())  # the float checkpoint stores fp16: keep it lossless
    return model


def rtn_dequant(w: torch.Tensor) -> torch.Tensor:
    """Plain min-max asymmetric 4-bit round-to-nearest, the yardstick for AutoAWQ's error."""
    g = w.float().reshape(w.shape[0], -1, GROUP_SIZE)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    s = (hi - lo).clamp(min=1e-5) / 15
    z = (-lo / s).round()
    return ((torch.clamp((g / s).round() + z, 0, 15) - z) * s).reshape(w.shape)


def dequantized_linears(model, dequant) -> dict:
    return {f"model.layers.{i}.{n}": dequant(model.model.layers[i].get_submodule(n))
            for i in range(len(model.model.layers)) for n in LINEARS}


def float_with(weights: dict, checkpoint=None, dtype=torch.float32):
    """The float model (fp32) with its decoder linears replaced by ``weights`` and, from the quantized
    ``checkpoint`` directory, its other tensors (AWQ divided the norms by its scales)."""
    from safetensors.torch import load_file

    model = float_model().to(dtype)
    params = {f"{n}.weight": w for n, w in weights.items()}
    if checkpoint is not None:
        params.update({k: v for k, v in load_file(str(Path(checkpoint) / "model.safetensors")).items()
                       if not k.endswith((".qweight", ".qzeros", ".scales"))})
    with torch.no_grad():
        for name, w in params.items():
            model.get_parameter(name).copy_(w.to(dtype))
    return model


def step_autoawq():
    import awq
    import awq.models.base as awq_base
    import awq.quantize.quantizer as awq_quantizer
    import transformers
    from awq import AutoAWQForCausalLM
    from awq.utils.packing_utils import dequantize_gemm
    from safetensors.torch import save_file

    ROOT.mkdir(parents=True, exist_ok=True)
    fp_dir, q_dir = ROOT / "float", ROOT / "autoawq"
    model, tok = float_model(), word_tokenizer()
    model.to(torch.float16).save_pretrained(str(fp_dir))
    tok.save_pretrained(str(fp_dir))

    scales = {}  # linear name -> AWQ's per-input-channel scale, recorded as AutoAWQ applies it
    real_apply_scale = awq_quantizer.apply_scale

    def recording_apply_scale(module, scales_list, input_feat_dict=None):
        layer_idx = next(i for i, m in enumerate(awq_model.model.model.layers) if m is module)
        for _prev, names, s in scales_list:
            for n in names:
                scales[f"model.layers.{layer_idx}.{n}"] = s.detach().float().cpu().clone()
        return real_apply_scale(module, scales_list, input_feat_dict=input_feat_dict)

    awq_quantizer.apply_scale = recording_apply_scale
    awq_model = AutoAWQForCausalLM.from_pretrained(str(fp_dir), torch_dtype=torch.float32, device_map="cpu")
    quant_config = {"zero_point": True, "q_group_size": GROUP_SIZE, "w_bit": 4, "version": "GEMM"}
    awq_model.quantize(tok, quant_config=quant_config, calib_data=calibration_lines(), max_calib_seq_len=64,
                       n_parallel_calib_samples=8)
    awq_model.save_quantized(str(q_dir))
    tok.save_pretrained(str(q_dir))

    # AutoAWQ's own modules, through WQLinear_GEMM's plain-torch path (dequantize_gemm + fp16 matmul):
    # from_quantized insists on intel-extension-for-pytorch on a CPU, so that device check is bypassed.
    awq_base.get_best_device = lambda: "cpu-naive"
    loaded = AutoAWQForCausalLM.from_quantized(str(q_dir), torch_dtype=torch.float16, device_map={"": "cpu"},
                                               fuse_layers=False)
    ids = input_ids()
    with torch.no_grad():
        logits_awq = loaded.model(ids).logits.float()
    dq = dequantized_linears(loaded.model, lambda m: dequantize_gemm(m.qweight, m.qzeros, m.scales, 4, GROUP_SIZE).t())
    with torch.no_grad():
        fp = float_model()
        logits_fp = fp(ids).logits
        logits_ref = float_with(dq, q_dir)(ids).logits  # AutoAWQ's dequantized weights through transformers' float model
        logits_rtn = float_with({n: rtn_dequant(fp.get_submodule(n).weight) for n in dq})(ids).logits

    report = {"linears": {}}
    for name, w in dq.items():  # AWQ multiplied the input channels of the weight by s (and divided the previous op): undo it
        w_float = fp.get_submodule(name).weight
        eff = w.float() / scales[name][None, :] if name in scales else w.float()
        err = ((eff - w_float).norm() / w_float.norm()).item()
        rtn = ((rtn_dequant(w_float) - w_float).norm() / w_float.norm()).item()
        report["linears"][name] = {"awq_rel_err": round(err, 4), "rtn_rel_err": round(rtn, 4), "scaled": name in scales}
        if not err < 2 * rtn:
            sys.exit(f"AutoAWQ's {name} is far from the float weight (rel. err {err:.3f}, RTN {rtn:.3f}): not saved")
    rel = lambda a: ((a - logits_fp).norm() / logits_fp.norm()).item()  # noqa: E731
    report.update(logits_rel_err_awq=rel(logits_ref), logits_rel_err_rtn=rel(logits_rtn),
                  awq_fp16_vs_fp32=(logits_awq - logits_ref).abs().max().item())
    if not rel(logits_ref) < 2 * rel(logits_rtn):
        sys.exit(f"AutoAWQ's logits are far from the float model's: {report}")
    tensors = {f"{n}.weight": w.contiguous() for n, w in dq.items()}
    tensors.update(input_ids=ids, logits_autoawq_fp16=logits_awq[0], logits_dequant_fp32=logits_ref[0])
    save_file(tensors, str(ROOT / "autoawq_reference.safetensors"),
              metadata={"autoawq": awq.__version__, "transformers": transformers.__version__, "torch": torch.__version__})
    (ROOT / "autoawq_sanity.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


def step_export():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tinyq.quant.checkpoint import save_quantized

    model = AutoModelForCausalLM.from_pretrained(str(ROOT / "float"), dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(ROOT / "float"))
    save_quantized(model, ROOT / "tinyq_export", GROUP_SIZE, tok, fmt="awq")


def step_read_export():
    import awq
    import awq.models.base as awq_base
    import transformers
    from awq import AutoAWQForCausalLM
    from awq.utils.packing_utils import dequantize_gemm
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = str(ROOT / "tinyq_export")
    cfg = AutoConfig.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    reads = {
        "config_class": type(cfg).__name__, "rope_theta": cfg.rope_theta, "rope_scaling": cfg.rope_scaling,
        "torch_dtype": str(cfg.torch_dtype), "quantization_config": cfg.quantization_config,
        "tokenizer_class": type(tok).__name__, "chat_template": tok.chat_template,
        "encoded": tok("w1 w2 w3").input_ids,
        "chat": tok.apply_chat_template([{"role": "user", "content": "w5"}], tokenize=False, add_generation_prompt=True),
        "versions": {"transformers": transformers.__version__, "autoawq": awq.__version__, "torch": torch.__version__},
    }
    with tempfile.TemporaryDirectory() as old_style:  # as transformers < 4.49 sees it: no chat_template.jinja
        for f in Path(path).iterdir():
            if f.name != "chat_template.jinja":
                shutil.copy(f, old_style)
        reads["chat_template_from_tokenizer_config"] = AutoTokenizer.from_pretrained(old_style).chat_template
    try:  # transformers' own AWQ integration: on a CPU it wants intel-extension-for-pytorch
        AutoModelForCausalLM.from_pretrained(path, device_map="cpu")
        reads["transformers_awq_load"] = "ok"
    except Exception as exc:  # noqa: BLE001 - recorded, not handled
        reads["transformers_awq_load"] = f"{type(exc).__name__}: {exc}"[:300]
    awq_base.get_best_device = lambda: "cpu-naive"  # as in step 1: AutoAWQ's plain-torch GEMM path on a CPU
    loaded = AutoAWQForCausalLM.from_quantized(path, torch_dtype=torch.float16, device_map={"": "cpu"}, fuse_layers=False)
    ids = input_ids()
    dq = dequantized_linears(loaded.model, lambda m: dequantize_gemm(m.qweight, m.qzeros, m.scales, 4, GROUP_SIZE).t())
    with torch.no_grad():
        logits_awq = loaded.model(ids).logits.float()
        logits_ref = float_with(dq, path)(ids).logits
    reads["awq_fp16_vs_fp32"] = (logits_awq - logits_ref).abs().max().item()
    save_file({"input_ids": ids, "logits_autoawq_fp16": logits_awq[0], "logits_dequant_fp32": logits_ref[0]},
              str(ROOT / "tinyq_export_reference.safetensors"))
    (ROOT / "tinyq_export_reads.json").write_text(json.dumps(reads, indent=1, default=str) + "\n")
    print(json.dumps(reads, indent=1, default=str))


SMOL_DIR, SMOL_LOGITS = Path("/tmp/smol-awq"), Path("/tmp/smol-awq-autoawq-logits.pt")


def _smol_ids(tok):
    return tok((ROOT.parent.parent.parent / "README.md").read_text(), return_tensors="pt").input_ids[:, :512]


def step_smollm2_autoawq():
    """Not a fixture (114 MB): AutoAWQ's logits for `tinyq quantize --model default --method rtn --format awq
    --group-size 64 --out /tmp/smol-awq`, on the first 512 tokens of README.md."""
    import awq.models.base as awq_base
    from awq import AutoAWQForCausalLM
    from transformers import AutoTokenizer

    ids = _smol_ids(AutoTokenizer.from_pretrained(str(SMOL_DIR)))
    awq_base.get_best_device = lambda: "cpu-naive"  # as in step 1
    model = AutoAWQForCausalLM.from_quantized(str(SMOL_DIR), torch_dtype=torch.float16, device_map={"": "cpu"},
                                              fuse_layers=False)
    with torch.no_grad():
        torch.save({"ids": ids, "logits": model.model(ids).logits.float()[0]}, SMOL_LOGITS)


def step_smollm2_compare():
    from tinyq.models import load_model

    ref = torch.load(SMOL_LOGITS)
    ids = ref["ids"]
    model, tok = load_model(str(SMOL_DIR), precision="w4a16", device="cpu", dtype=torch.float32)
    assert _smol_ids(tok).tolist() == ids.tolist(), "the two tokenizers disagree"
    with torch.no_grad():
        out = model(ids)[0].float()
    ppl = lambda logits: torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:]).exp().item()  # noqa: E731
    print(json.dumps({"tinyq_ppl": ppl(out), "autoawq_ppl": ppl(ref["logits"]),
                      "top1_agreement": (out.argmax(-1) == ref["logits"].argmax(-1)).float().mean().item(),
                      "max_abs_logit_diff": (out - ref["logits"]).abs().max().item()}))


if __name__ == "__main__":
    steps = {"autoawq": step_autoawq, "export": step_export, "read-export": step_read_export,
             "smollm2-autoawq": step_smollm2_autoawq, "smollm2-compare": step_smollm2_compare}
    if len(sys.argv) != 2 or sys.argv[1] not in steps:
        sys.exit(f"usage: {sys.argv[0]} {{{'|'.join(steps)}}}")
    steps[sys.argv[1]]()
