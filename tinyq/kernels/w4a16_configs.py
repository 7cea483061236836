"""Shipped launch plans for the W4A16 op, bucketed by M, so nobody waits for autotuning.

``PLANS[arch]`` is a list of ``(max_m, kind, kwargs)`` in increasing ``max_m``; the first bucket
with ``m <= max_m`` wins (``None``: open-ended). ``kind`` names the path of
:func:`tinyq.kernels.w4a16_matmul.w4a16_matmul_checked` (``gemv``, ``gemm`` or ``dequant``) and
``kwargs`` go to its launcher. ``benchmarks/bench_w4a16.py --sweep`` measures candidates and prints
the winners in this format; where each entry came from is in ``docs/perf_notes.md``. Other
architectures use ``default``: the same plans with fewer pipeline stages, to fit ~100 KB of shared
memory.

:func:`launch_plan` resolves (M, dtype, device) once and caches it: the per-call cost is one dict
lookup, not a device query.
"""
from __future__ import annotations

import torch

from tinyq.backend import gpu_arch, ptx_supported
from tinyq.kernels.attention_configs import sm_count

# A GEMM plan's split_below_tiles: the device's SM count, filled in when the plan is resolved. The
# plans split K only for layers with fewer output tiles than SMs (Llama-3-8B's qkv, o and down):
# gate/up's 224-448 tiles fill the GPU already, and 4-8 splits only cut each program's K loop to a
# few steps and add fp32 partials (4-14% on the four linears at M = 4..128, H100;
# scripts/ab_split_k.py, docs/perf_notes.md).
SMS = "sms"


def _gemm(block_m, block_n, unpack, split_k, num_stages=4, tma=False, split_below_tiles=SMS):
    return dict(block_m=block_m, block_n=block_n, block_k=128, swap_ab=True, unpack=unpack, ptx_dequant=True,
                split_k=split_k, split_below_tiles=split_below_tiles, tma=tma, num_warps=4, num_stages=num_stages)


_SM90 = [  # the sweeps' winners (bench_w4a16.py --sweep; H200, the M <= 128 entry H100; docs/perf_notes.md)
    (1, "gemv", dict(block_n=8, block_k=1024, num_warps=8, num_stages=3, ptx_dequant=True)),
    (16, "gemm", _gemm(16, 128, "frag", 8)),
    (32, "gemm", _gemm(32, 64, "natural", 4)),
    (64, "gemm", _gemm(64, 64, "natural", 4)),
    # x and the words through tensor descriptors: 220.2 against 231.6 us (H100, graph-timed sweep)
    (128, "gemm", _gemm(128, 64, "natural", 4, num_stages=3, tma=True)),
    (256, "gemm", _gemm(128, 64, "natural", 1, num_stages=3)),
    # from M = 257 dequantize + cuBLAS beats the fused GEMM (the measured crossover: docs/perf_notes.md)
    (None, "dequant", dict(block_n=16, block_k=512, num_warps=4)),
]

def _portable(kind: str, cfg: dict) -> dict:
    """An sm90 plan for GPUs without tuned entries: at most 3 pipeline stages (~100 KB of shared
    memory) and, for the fused GEMM, pointer loads (tensor descriptors are sm90's)."""
    if kind == "dequant":
        return cfg
    out = dict(cfg, num_stages=min(cfg["num_stages"], 3))
    if kind == "gemm":
        out["tma"] = False
    return out


PLANS = {
    "sm90": _SM90,
    "default": [(m, kind, _portable(kind, cfg)) for m, kind, cfg in _SM90],
}


# Whether the fused decode ops write each GEMV's input in the GEMV's paired layout
# (tinyq.kernels.paired: 16-byte coalesced x loads instead of 8-byte ones at a 64-byte
# lane stride). On for sm90: Llama-3-8B W4A16 decode 2.834 / 2.803 ms/token against 2.913 / 2.905
# unpaired (H100, alternating runs; docs/perf_notes.md).
PAIRED_DECODE = {"sm90": True, "default": False}

# Changes to the M = 1 plan of the plain GEMV (not the fused decode GEMVs) when its x comes in the
# paired layout, per pair dtype, on every arch. bf16 pairs (PAIRED_BF16_AS_FP16 off) with 16 rows a
# program: 63.5 against 66.8 us for the four Llama-3-8B linears (fp16: 53.0 against 51.6; natural x:
# 83.8 against 74.2), H100, alternating rounds (docs/perf_notes.md). The fused GEMVs keep 8 rows:
# untimed at 16, and the RoPE one spills there.
PAIRED_GEMV = {torch.bfloat16: dict(block_n=16)}

# The row counts that a plain call pairs inside a CUDA-graph capture (where paired_decode holds) and
# sends to the paired GEMV, with the plan changes for each. Two rows a program, each weight word
# unpacked once: 78.1 us against the M = 2 GEMM's 89.3 in fp16, 82.6 against 90.2 in bf16 (four
# Llama-3-8B linears, pairing included, H100). Unpaired, two rows tie the GEMM in fp16 (88.7) and
# lose in bf16 (103.8), and three or four rows lose even paired (scripts/ab_small_m.py), so eager
# calls and other rows keep the plans above.
PAIRED_GEMV_ROWS = {1: {}, 2: dict(rows=2)}

# Whether bf16 rows paired for the plain GEMV are stored as fp16 over a per-row power of two
# (tinyq.kernels.pair_rows, ``scaled``), so that the GEMV runs the fp16 dot (2.75 instructions a
# weight against ~4 for bf16) and takes the fp16 plan: 60.3 against 66.3 us (bf16 pairs, 16 rows)
# for the four Llama-3-8B linears at M = 1, pairing included; tinygemm 71.2 (H100, same process).
PAIRED_BF16_AS_FP16 = True


def device_arch(device: torch.device) -> str:
    key = gpu_arch(device)
    return key if key in PLANS else "default"


def fp16_accumulate_default(device: torch.device) -> bool:
    """fp16 accumulation is the default only where it is faster: GeForce parts run fp16-accumulate
    MMA at twice the fp32-accumulate rate (a product-line cap, per NVIDIA's spec sheets; not
    measured here). H100/A100 and workstation parts run both at one rate, so fp32 stays."""
    if device.type != "cuda":
        return False
    return "GeForce" in torch.cuda.get_device_name(device)


def _resolve(m: int, dtype: torch.dtype, device: torch.device):
    for max_m, kind, cfg in PLANS[device_arch(device)]:
        if max_m is None or m <= max_m:
            cfg = dict(cfg)
            if "ptx_dequant" in cfg:
                cfg["ptx_dequant"] = cfg["ptx_dequant"] and ptx_supported(device)
            if kind == "gemm":
                cfg["acc_fp16"] = dtype == torch.float16 and fp16_accumulate_default(device)
                if cfg.get("split_below_tiles") == SMS:  # the interpreter splits always: CPU tests cover it
                    cfg["split_below_tiles"] = sm_count(device) if device.type == "cuda" else 0
            return kind, cfg
    raise AssertionError("the last bucket must be open-ended")


_ARCHS: dict = {}  # CUDA device index -> device_arch: a device query costs microseconds a call


def _arch_of(device_index: int) -> str:
    if device_index < 0:
        return device_arch(torch.device("cpu"))
    arch = _ARCHS.get(device_index)
    if arch is None:
        arch = _ARCHS[device_index] = device_arch(torch.device("cuda", device_index))
    return arch


def paired_decode(device_index: int) -> bool:
    """Whether GEMV inputs on CUDA device ``device_index`` (-1: the interpreter) come paired: the
    fused decode ops write theirs so, and a plain W4A16 call of 1 or 2 rows (:data:`PAIRED_GEMV_ROWS`)
    inside a CUDA-graph capture pairs its own first (one small kernel; four Llama-3-8B linears at
    M = 1, fp16: 56.7 us against 69.1 natural, H100). ``PAIRED_DECODE`` is read on every call, so a
    patched table takes effect at once."""
    return PAIRED_DECODE[_arch_of(device_index)]


_CACHE: dict = {}
_LAST_FINITE = max(m for m, _, _ in _SM90 if m is not None)


def launch_plan(m: int, dtype: torch.dtype, device_index: int):
    """``(kind, kwargs)`` for ``m`` rows of ``dtype`` on CUDA device ``device_index`` (-1: CPU, the
    interpreter). Cached per (M bucket, dtype, device); the result must not be mutated."""
    key = (m if m <= _LAST_FINITE else -1, dtype, device_index)
    plan = _CACHE.get(key)
    if plan is None:
        device = torch.device("cpu") if device_index < 0 else torch.device("cuda", device_index)
        plan = _CACHE[key] = _resolve(m, dtype, device)
    return plan


def paired_gemv_plan(m: int, dtype: torch.dtype, device_index: int) -> dict:
    """The launch kwargs of the plain GEMV of ``m`` rows (a key of :data:`PAIRED_GEMV_ROWS`) reading
    x in the paired layout with pairs of ``dtype``: the M = 1 GEMV plan with the changes of
    :data:`PAIRED_GEMV` and :data:`PAIRED_GEMV_ROWS`; cached like :func:`launch_plan`, not to be mutated."""
    key = ("paired", m, dtype, device_index)
    plan = _CACHE.get(key)
    if plan is None:
        if m not in PAIRED_GEMV_ROWS:
            raise ValueError(f"the paired W4A16 GEMV takes {sorted(PAIRED_GEMV_ROWS)} rows, not {m}")
        kind, cfg = launch_plan(1, dtype, device_index)
        if kind != "gemv":  # the shipped plans send M = 1 to the GEMV; a custom table must too
            raise RuntimeError(f"the paired W4A16 GEMV needs a GEMV plan at M=1, got {kind!r}")
        plan = _CACHE[key] = dict(cfg, **PAIRED_GEMV.get(dtype, {}), **PAIRED_GEMV_ROWS[m])
    return plan
