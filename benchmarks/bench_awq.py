"""AWQ search time: one Llama-3-8B-shaped decoder layer (random weights) on the GPU, extrapolated to 32 layers.

The layer is searched exactly as ``tinyq quantize`` does (128 x 512 calibration tokens by default, all
blocks in the losses, duo scaling, clip search), with the model on the CPU and one layer on the
device. Reports seconds per layer, the 32-layer estimate and peak GPU memory (which is what bounds
an 8B model on a 24 GB GPU). ``--cpu`` times the real SmolLM2-135M search on the CPU instead.

    python benchmarks/bench_awq.py --gpu [--layers 2] [--out benchmarks/results/awq_search_h100.json]
    python benchmarks/bench_awq.py --cpu [--calib-blocks 16 --calib-len 256 --search-blocks 4]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import environment, require_cuda, write_json  # noqa: E402
from tinyq.quant.awq import AwqConfig, awq_search  # noqa: E402

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                 rope_theta=500000.0, max_position_embeddings=8192)


def llama8b_shaped(layers: int, vocab: int = 1024):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(num_hidden_layers=layers, vocab_size=vocab, tie_word_embeddings=False, **LLAMA3_8B)
    with torch.device("cpu"):
        model = LlamaForCausalLM(cfg).to(torch.float16).eval()
    return model


def run_gpu(args) -> dict:
    if not torch.cuda.is_available():
        raise SystemExit("--gpu needs a CUDA GPU")
    model = llama8b_shaped(args.layers)
    blocks = torch.randint(0, 1024, (args.calib_blocks, args.calib_len))
    cfg = AwqConfig(w_bit=4, group_size=args.group_size, search_blocks=args.search_blocks)
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.synchronize()
    t0 = time.time()
    awq_search(model, blocks, cfg, device="cuda", progress=True)
    torch.cuda.synchronize()
    seconds = time.time() - t0
    per_layer = seconds / args.layers
    return {"per_layer_s": per_layer, "estimated_32_layers_s": per_layer * 32, "layers_timed": args.layers,
            "peak_gpu_memory_gb": torch.cuda.max_memory_allocated() / 2**30}


def run_cpu(args) -> dict:
    from tinyq.quant import calib
    from tinyq.quant.model_io import load_fp_model

    model, tok = load_fp_model("default", dtype=torch.float32)
    text, what = calib.default_calibration_text()
    blocks = calib.calibration_blocks(tok, text, args.calib_blocks, args.calib_len)
    cfg = AwqConfig(w_bit=4, group_size=args.group_size, search_blocks=args.search_blocks)
    t0 = time.time()
    awq_search(model, blocks, cfg, device="cpu", progress=True)
    return {"model": "SmolLM2-135M-Instruct", "search_s": time.time() - t0, "calibration": what,
            "threads": torch.get_num_threads()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--gpu", action="store_true", help="8B-shaped layers on CUDA")
    mode.add_argument("--cpu", action="store_true", help="SmolLM2-135M on the CPU")
    p.add_argument("--layers", type=int, default=2, help="layers timed on the GPU (default 2)")
    p.add_argument("--calib-blocks", type=int, default=128)
    p.add_argument("--calib-len", type=int, default=512)
    p.add_argument("--search-blocks", type=int, default=None, help="blocks in the losses (default: all)")
    p.add_argument("--group-size", type=int, default=None, help="default: 128 on the GPU, 64 on the CPU "
                   "(SmolLM2's 576 is not a multiple of 128)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    args.group_size = args.group_size or (128 if args.gpu else 64)
    if args.gpu:
        require_cuda("bench_awq --gpu")
    result = run_gpu(args) if args.gpu else run_cpu(args)
    result.update({"calib_blocks": args.calib_blocks, "calib_len": args.calib_len,
                   "search_blocks": args.search_blocks or args.calib_blocks, "group_size": args.group_size,
                   "env": environment()})
    for k, v in result.items():
        print(f"{k}: {v:.2f}" if isinstance(v, float) else f"{k}: {v}")
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
