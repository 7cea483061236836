"""Profile helper: run the M=1 W4A16 GEMV on one Llama-3-8B shape and dump its compile report.

    ncu --kernel-name regex:gemv --launch-skip 5 --launch-count 1 python3 scripts/profile_gemv.py [--out DIR]
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tinyq.kernels.w4a16_matmul import w4a16_matmul  # noqa: E402
from tinyq.quant.format import quantize_weight  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--k", type=int, default=4096)
ap.add_argument("--n", type=int, default=28672)
ap.add_argument("--out", default=None)
args = ap.parse_args()
qw, s, z = quantize_weight(torch.randn(args.n, args.k, device="cuda") * 0.02, 128, torch.float16)
x = torch.randn(1, args.k, device="cuda", dtype=torch.float16)
for _ in range(10):
    w4a16_matmul(x, qw, s, z)
torch.cuda.synchronize()
from tinyq.kernels.w4a16_gemv import _w4a16_gemv_kernel  # noqa: E402

try:
    caches = _w4a16_gemv_kernel.device_caches
    for dev, entry in caches.items():
        kcache = entry[0]
        for sig, ck in kcache.items():
            print("n_regs", ck.n_regs, "n_spills", ck.n_spills, "shared", ck.metadata.shared)
            if args.out:
                with open(os.path.join(args.out, "gemv.ptx"), "w") as f:
                    f.write(ck.asm["ptx"])
except Exception as e:  # the cache layout differs across Triton versions
    print("no compile report:", type(e).__name__, e)
