"""Profile helper: where the vision tower's GPU time goes, fp16 and SmoothQuant W8A8 side by side.

    python3 scripts/profile_tower.py [--tiles 17] [--steps 5] [--out tower_profile.json]

Builds the SigLIP so400m-448 tower of ``benchmarks/bench_vlm.py`` with random weights, runs
``--tiles`` random 448 tiles through it as the VLMs do (CUDA graphs, ``BatchGraphs``), first in
fp16 and then W8A8 (calibrated on 4 tiles), and prints each kernel's launches and time per forward,
sorted by time, with the wall time per forward: the table that says which kernels keep the W8A8
tower from its int8 speed. ``--int8-gemm 128x128x128x4x3,256x128x128x8x4`` profiles the W8A8 tower
once per config of the int8 GEMM's open-ended M bucket (block_m x block_n x block_k x warps x
stages, in place of the shipped one; ``tma:...x2`` names the tensor-descriptor GEMM with its programs per
SM): the tower's chunks of 8 tiles are M = 8192 rows, of 1 tile 1024.
"""
import argparse
import copy
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.bench_vlm import TOWERS, hf_tower  # noqa: E402
from scripts.profile_decode import kernel_table  # noqa: E402
from tinyq.graphs import BatchGraphs  # noqa: E402
from tinyq.kernels import int8_configs  # noqa: E402
from tinyq.models.loader import TensorSource  # noqa: E402
from tinyq.models.vision import VisionConfig, load_vision_tower  # noqa: E402
from tinyq.models.vision_w8a8 import quantize_tower_w8a8_  # noqa: E402


@torch.inference_mode()
def profile_forward(name, forward, px, steps):
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        forward(px)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        forward(px)
    torch.cuda.synchronize()
    wall_ms = 1e3 * (time.perf_counter() - t0) / steps
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            forward(px)
        torch.cuda.synchronize()
    rows = kernel_table(prof, steps)
    kernels_ms = sum(r[2] for r in rows) / 1e3
    print(f"\n== {name}: {wall_ms:.2f} ms wall per forward of {len(px)} tiles, {kernels_ms:.2f} ms of kernels")
    print(f"{'kernel':70s} {'n/fwd':>6s} {'ms/fwd':>8s} {'us/call':>8s}")
    for r in rows:
        print(f"{r[0]:70s} {r[1]:6.0f} {r[2] / 1e3:8.3f} {r[3]:8.1f}")
    return {"name": name, "wall_ms": wall_ms, "kernels_ms": kernels_ms,
            "kernels": [dict(zip(("name", "per_forward", "us_per_forward", "us_per_call"), r)) for r in rows]}


def int8_gemm_spec(spec: str) -> dict:
    """``BMxBNxBKxWARPSxSTAGES`` -> a pointer-GEMM config; ``tma:BMxBNxBKxWARPSxSTAGESxPROGRAMS_PER_SM``
    -> a tensor-descriptor GEMM config (tinyq.kernels.int8_configs format)."""
    kind, _, dims = spec.rpartition(":")
    if kind not in ("", "tma"):
        raise ValueError(f"--int8-gemm {spec!r}: the kind before ':' must be 'tma' (or none, the pointer GEMM)")
    vals = [int(v) for v in dims.split("x")]
    cfg = dict(zip(("block_m", "block_n", "block_k", "num_warps", "num_stages"), vals[:5]))
    if kind == "tma":
        return dict(kernel="tma", **cfg, swap_ab=False, group_m=8, programs_per_sm=vals[5] if len(vals) > 5 else 2)
    return dict(kernel="gemm", **cfg, swap_ab=False, group_m=8)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiles", type=int, default=17)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--int8-gemm", default="", help="open-bucket int8 GEMM configs to run in turn, e.g. 128x128x128x4x3,tma:128x256x128x8x3x1")
    ap.add_argument("--out")
    args = ap.parse_args()
    device, dtype = torch.device("cuda"), torch.float16
    cfg = TOWERS["so400m-448"]
    tower = load_vision_tower(VisionConfig.from_hf(cfg), TensorSource(tensors=hf_tower(cfg, device, dtype).state_dict()),
                              "", dtype, device)
    torch.manual_seed(0)
    px = torch.randn(args.tiles, 3, cfg["image_size"], cfg["image_size"], device=device, dtype=dtype)
    res = [profile_forward("fp16 tower", BatchGraphs(tower.last_hidden_state), px, args.steps)]
    w8 = copy.deepcopy(tower)
    with torch.inference_mode():
        quantize_tower_w8a8_(w8, lambda: w8.last_hidden_state(px[:4]))
    table = int8_configs.CONFIGS[int8_configs.device_arch(device)]
    for spec in [v for v in args.int8_gemm.split(",") if v] or [None]:
        label = "W8A8 tower"
        if spec is not None:
            table[-1] = (None, int8_gemm_spec(spec))
            label += f" (int8 GEMM {spec})"
        res.append(profile_forward(label, BatchGraphs(w8.last_hidden_state), px, args.steps))
        print(f"\n{label} / fp16 wall: {res[-1]['wall_ms'] / res[0]['wall_ms']:.3f}, "
              f"kernels: {res[-1]['kernels_ms'] / res[0]['kernels_ms']:.3f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
