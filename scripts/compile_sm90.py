"""Compile tinyq's Triton kernels for sm90 (H100/H200) on a machine without a GPU, through their
real launchers, and report what the compiler made of each: registers per thread, local-memory
spill bytes, shared memory, and the SASS instruction mix (``--sass``).

    python scripts/compile_sm90.py                  # every target
    python scripts/compile_sm90.py flash-d72 --sass # one target, with the instruction mix
    python scripts/compile_sm90.py --json out.json

How: each target calls a launcher with CPU tensors of a real model's shapes and the shipped sm90
config. ``JITFunction.run`` is replaced by a recorder, so nothing runs; the recorded arguments give
the signature, the constexprs and the 16-byte divisibility hints the JIT would derive, and
``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`` builds the cubin with the
ptxas bundled in Triton's wheel. A kernel that fails to compile for Hopper fails here, without a
GPU (``tests/test_sm90_compile.py`` runs every target in the CPU suite).

Compiled by the importable Triton (3.9 on the project machine). The GPU machine has 3.6, and the two
differ in ways that matter (layouts, register counts, what gets duplicated); to compile with 3.6,
unpack its wheel beside the project's and put it first on the path (no install, no GPU needed)::

    pip download --no-deps triton==3.6.0 -d /tmp/w && python -m zipfile -e /tmp/w/triton-3.6.0-*.whl /tmp/t36
    chmod +x /tmp/t36/triton/backends/nvidia/bin/* && PYTHONPATH=/tmp/t36 python scripts/compile_sm90.py
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("compile_sm90: unset TRITON_INTERPRET (the interpreter replaces the kernels this compiles)")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402
from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tinyq.kernels as kernels_pkg  # noqa: E402
from tinyq.kernels import (  # noqa: E402
    argmax, decode_attention, flash_attention, pair_rows, paired, w4a16_gemv, w4a16_gemv_residual, w4a16_gemv_rope, w4a16_gemv_silu,
)
from tinyq.kernels import (  # noqa: E402
    gelu_quant, int8_gemv_rope, int8_matmul, int8_quant, layernorm, layernorm_quant, rmsnorm, rmsnorm_quant, silu_mul_quant,
    w4a16_dequant,
    w4a16_gemm,
)
from tinyq.kernels.attention_configs import FLASH  # noqa: E402
from tinyq.kernels.int8_configs import CONFIGS as INT8_CONFIGS  # noqa: E402
from tinyq.kernels.w4a16_configs import PAIRED_GEMV, PLANS, SMS  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
POINTER_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.int32: "i32",
                 torch.int64: "i64", torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1"}
GEMV_M1 = next(cfg for m, kind, cfg in PLANS["sm90"] if kind == "gemv")
H100_SMS = 132


def _m1(dtype, pair):
    """The shipped plain M = 1 GEMV plan for ``dtype``, x paired or not (w4a16_configs.PAIRED_GEMV;
    the fused GEMVs keep ``GEMV_M1``)."""
    return dict(GEMV_M1, **(PAIRED_GEMV.get(dtype, {}) if pair else {}))


class _Recorder:
    """Stands in for ``JITFunction.run``: keeps each launch's kernel and arguments, runs nothing."""

    def __init__(self):
        self.launches = []

    def __call__(self, fn, *args, grid, warmup, **kwargs):
        self.launches.append((fn, args, kwargs))


def _arg_type(value):
    """(signature type, constexpr value or None, 16-divisible) as the JIT would specialize."""
    if isinstance(value, torch.Tensor):
        return "*" + POINTER_TYPES[value.dtype], None, value.data_ptr() % 16 == 0
    if isinstance(value, TensorDescriptor):
        return f"tensordesc<{POINTER_TYPES[value.base.dtype]}{list(value.block_shape)}>", None, False
    if value is None:
        return "constexpr", None, False
    if isinstance(value, bool):
        return "i1", None, False
    if isinstance(value, int):
        if value == 1:
            return "constexpr", 1, False
        return ("i32" if -2**31 <= value < 2**31 else "i64"), None, value % 16 == 0
    if isinstance(value, float):
        return "fp32", None, False
    raise TypeError(f"compile_sm90: no signature type for {type(value).__name__}")


def compile_launch(fn: JITFunction, args, kwargs):
    """The cubin of one recorded launch."""
    names = [p.name for p in fn.params]
    bound = dict(zip(names, args))
    bound.update({k: v for k, v in kwargs.items() if k in names})
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        value = bound.get(p.name, p.default)
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            constexprs[p.name] = value
            continue
        kind, const, div16 = _arg_type(value)
        signature[p.name] = kind
        if kind == "constexpr":
            constexprs[p.name] = const
        elif div16:
            attrs[(i,)] = [["tt.divisibility", 16]]
    options = {k: v for k, v in kwargs.items() if k not in names}
    return triton.compile(ASTSource(fn, signature, constexprs=constexprs, attrs=attrs), target=TARGET,
                          options=options)


def _tool(name):
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def report(compiled, sass: bool = False) -> dict:
    """Registers, spill/stack bytes, shared memory, wgmma ops, global loads narrower than 4 bytes
(``narrow_loads``: an operand the compiler could not vectorize), asynchronous copies narrower than
16 bytes (``narrow_copies``: only 16-byte ``cp.async`` bypasses L1, and an 8-byte one means the
compiler could not prove 16-byte alignment) and, with ``sass``, the top SASS opcodes."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", path], capture_output=True,
                               text=True, check=True).stdout
        dump = subprocess.run([_tool("cuobjdump"), "--dump-sass", path], capture_output=True, text=True,
                              check=True).stdout if sass else ""
    out = {"regs": int(re.search(r"REG:(\d+)", usage).group(1)),
           "stack": int(re.search(r"STACK:(\d+)", usage).group(1)),
           "shared": compiled.metadata.shared,
           "wgmma": compiled.asm["ttgir"].count("warp_group_dot "),
           "narrow_loads": len(re.findall(r"ld\.global(?:\.[a-z0-9:_]+)*\.[bsuf](?:8|16)\b", compiled.asm["ptx"])),
           "narrow_copies": len(re.findall(r"cp\.async\.c[ag]\.shared\.global[^;]*\], (?:0x[48]|[48]),",
                                           compiled.asm["ptx"]))}
    words = _words_lanes(compiled.asm["ttgir"])
    if words:
        out["words_tile"], out["words_lanes"] = words
    if sass:
        ops = re.findall(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]+)", dump, re.M)
        out["sass_count"] = len(ops)
        out["sass_top"] = Counter(ops).most_common(10)
    return out


def _words_lanes(ttgir: str):
    """``(tile shape, lanes a warp gives each dim)`` of the GEMVs' 4-D load of packed int32 words
    (``[..., 4 words]`` tiles), or None for kernels without one: which tile dims a warp's lanes walk
    is a layout choice of Triton's coalescing, not visible in the kernel source."""
    load = re.search(r"tt\.load [^:]*: tensor<(\d+)x(\d+)x(\d+)x4x!tt\.ptr<i32>, #(\w+)>", ttgir)
    if load is None:
        return None
    layout = re.search(rf"#{load.group(4)} = #ttg\.blocked<{{[^}}]*threadsPerWarp = \[([\d, ]+)\]", ttgir)
    return [int(load.group(i)) for i in (1, 2, 3)] + [4], [int(v) for v in layout.group(1).split(",")]


# ---- targets: real shapes, shipped configs ----

def _w4(n, k, dtype, group=128):
    return (torch.zeros(n, k // 8, dtype=torch.int32), torch.ones(n, k // group, dtype=dtype),
            torch.zeros(n, k // group, dtype=dtype))


def _flash(d, causal, hq=16, hkv=16, s=1024, dtype=torch.float16):
    def launch():
        q = torch.zeros(1, s, hq, d, dtype=dtype)
        kv = torch.zeros(1, hkv, s, d, dtype=dtype)
        d_hi, d_lo = flash_attention.head_dim_split(d)
        cfg = FLASH["sm90"].get(d) or FLASH["sm90"][max(32, triton.next_power_of_2(d_hi + d_lo))]
        flash_attention.flash_attention_fwd(q, kv, kv, causal=causal, config=cfg)
    return launch


def _decode(d=128, hq=32, hkv=8, s=4096, dtype=torch.float16, tokens=1, pair=False):
    def launch():
        q = torch.zeros(1, tokens, hq, d, dtype=dtype)
        kv = torch.zeros(1, hkv, s, d, dtype=dtype)
        out = paired.empty_paired_rows(1, hq * d, dtype, "cpu") if pair else None
        decode_attention.decode_attention(q, kv, kv, torch.zeros(1, dtype=torch.int32), out=out)
    return launch


def _gemv_silu(hidden, inter, dtype, prenorm, group=128, pair=False):
    def launch():
        x = torch.zeros(1, hidden, dtype=dtype)
        y = torch.zeros(1, inter, dtype=dtype)
        x, y = (paired.pair_rows_reference(x), paired.pair_rows_reference(y)) if pair else (x, y)
        pre = (torch.zeros(hidden, dtype=dtype), 1e-5) if prenorm else None
        w4a16_gemv_silu.launch_w4a16_gemv_silu(x, *_w4(2 * inter, hidden, dtype, group), None, y, prenorm=pre, **GEMV_M1)
    return launch


def _gemv_rope(hidden, hq, hkv, d, dtype, prenorm, group=128, pair=False):
    def launch():
        x = torch.zeros(1, hidden, dtype=dtype)
        x = paired.pair_rows_reference(x) if pair else x
        q = torch.zeros(1, hq * d, dtype=dtype)
        cache = torch.zeros(1, hkv, 4096, d, dtype=dtype)
        pre = (torch.zeros(hidden, dtype=dtype), 1e-5) if prenorm else None
        w4a16_gemv_rope.launch_w4a16_gemv_rope(
            x, *_w4((hq + 2 * hkv) * d, hidden, dtype, group), None, q, cache, cache, torch.zeros(1, dtype=torch.int32),
            torch.zeros(d // 2, dtype=torch.float32), hq, hkv, prenorm=pre, **GEMV_M1)
    return launch


def _gemv_residual(n, k, dtype, norm, group=128, pair=False):
    def launch():
        x = torch.zeros(1, k, dtype=dtype)
        h = torch.zeros(1, n, dtype=dtype)
        w = torch.ones(n, dtype=dtype) if norm else None
        hw = torch.empty_like(h) if norm else None
        if pair:
            x, hw = paired.pair_rows_reference(x), paired.pair_rows_reference(h)
        w4a16_gemv_residual.launch_w4a16_gemv_residual(x, *_w4(n, k, dtype, group), None, h, w, torch.empty_like(h),
                                                       hw, **GEMV_M1)
    return launch


def _gemv(n, k, dtype, warp_blocks=None, pair=False, scaled=False, m=1, rows=1):
    def launch():
        x = torch.zeros(m, k, dtype=dtype)
        x = pair_rows.pair_rows_scaled_reference(x) if scaled else paired.pair_rows_reference(x) if pair else x
        w4a16_gemv.launch_w4a16_gemv(x, *_w4(n, k, dtype), None, torch.zeros(m, n, dtype=dtype),
                                     **dict(_m1(torch.float16 if scaled else dtype, pair), warp_blocks=warp_blocks,
                                            rows=rows))
    return launch


def _pair_rows(k, dtype=torch.float16, scaled=False):
    return lambda: pair_rows.pair_rows(torch.zeros(1, k, dtype=dtype), scaled=scaled)


def _w4a16_gemm(m, n, k, cfg=None, dtype=torch.float16):
    """The fused W4A16 GEMM (and its split-K reduce) with the sm90 plan of M's bucket, or ``cfg``."""
    def launch():
        plan = dict(cfg or next(c for max_m, kind, c in PLANS["sm90"] if kind == "gemm" and m <= max_m))
        if plan.get("split_below_tiles") == SMS:
            plan["split_below_tiles"] = H100_SMS  # as resolved on an H100
        w4a16_gemm.launch_w4a16_gemm(torch.zeros(m, k, dtype=dtype), *_w4(n, k, dtype), None,
                                     torch.zeros(m, n, dtype=dtype), **plan)
    return launch


def _w4a16_dequant(n, k):
    """The dequantize kernel of the large-M path, with the sm90 plan's launch shape."""
    def launch():
        cfg = next(c for max_m, kind, c in PLANS["sm90"] if kind == "dequant")
        w4a16_dequant.launch_w4a16_dequant(*_w4(n, k, torch.float16), torch.zeros(n, k, dtype=torch.float16), **cfg)
    return launch


def _int8_linear(m, n, k, cfg=None):
    """The W8A8 linear at ``m`` tokens with the sm90 config of that M bucket, or ``cfg``."""
    def launch():
        cfg_ = cfg or next(c for max_m, c in INT8_CONFIGS["sm90"] if max_m is None or m <= max_m)
        int8_matmul.int8_matmul_checked(torch.zeros(m, k, dtype=torch.int8), torch.zeros(n, k, dtype=torch.int8),
                                        torch.ones(m, 1), torch.ones(n), None, torch.float16, config=cfg_)
    return launch


def _int8_gemv_rope(hidden, hq, hkv, d, bias):
    """The W8A8 decode's fused qkv GEMV + RoPE + cache write with the sm90 M=1 config."""
    def launch():
        cfg = dict(INT8_CONFIGS["sm90"][0][1])
        assert cfg.pop("kernel") == "gemv"
        n = (hq + 2 * hkv) * d
        cache = torch.zeros(1, hkv, 4096, d, dtype=torch.float16)
        int8_gemv_rope.launch_int8_gemv_rope(
            torch.zeros(1, hidden, dtype=torch.int8), torch.ones(1), torch.zeros(n, hidden, dtype=torch.int8),
            torch.ones(n), torch.zeros(n, dtype=torch.float16) if bias else None, torch.zeros(hq * d, dtype=torch.float16),
            cache, cache, torch.zeros(1, dtype=torch.int32), torch.zeros(d // 2), hq, hkv, **cfg)
    return launch


def _layernorm_quant(m, k):
    return lambda: layernorm_quant.layernorm_quant(torch.zeros(m, k, dtype=torch.float16), torch.ones(k, dtype=torch.float16),
                                                   torch.zeros(k, dtype=torch.float16), 1e-6)


def _layernorm(m, k):
    x = torch.zeros(m, k, dtype=torch.float16)
    return lambda: layernorm.layernorm(x, torch.ones(k, dtype=torch.float16), torch.zeros(k, dtype=torch.float16),
                                       1e-6, residual=x)


def _quant_rows(m, k):
    return lambda: int8_quant.quantize_per_token(torch.zeros(m, k, dtype=torch.float16))


def _rmsnorm(n, paired):
    x = torch.zeros(1, n, dtype=torch.float16)
    return lambda: rmsnorm.rmsnorm(x, torch.ones(n, dtype=torch.float16), 1e-5, residual=x, paired=paired)


def _rmsnorm_quant(n):
    x = torch.zeros(1, n, dtype=torch.float16)
    return lambda: rmsnorm_quant.rmsnorm_quant(x, torch.ones(n, dtype=torch.float16), 1e-5, residual=x)


def _silu_mul_quant(m, i):
    return lambda: silu_mul_quant.silu_mul_quant(torch.zeros(m, 2 * i, dtype=torch.float16))


def _gelu_quant(m, k):
    return lambda: gelu_quant.gelu_quant(torch.zeros(m, k, dtype=torch.float16), "tanh")


def _argmax(v, dtype):
    return lambda: argmax.argmax(torch.zeros(v, dtype=dtype))


TARGETS = {
    "flash-d128-causal": _flash(128, True, hq=32, hkv=8),
    "flash-d64": _flash(64, False),
    "flash-d72": _flash(72, False),  # SigLIP so400m: 64 + 16 columns
    "flash-d80": _flash(80, False),
    "decode-attention-d128": _decode(),
    "decode-attention-d128-paired": _decode(pair=True),  # the fused decode path's o_proj input
    "decode-attention-chunk32-d128": _decode(tokens=32),  # a chat turn: split kernel + combine kernel
    "gemv-llama3-8b-gate-up-fp16": _gemv(28672, 4096, torch.float16),
    "gemv-llama3-8b-gate-up-bf16": _gemv(28672, 4096, torch.bfloat16),
    "gemv-llama3-8b-gate-up-fp16-warp-rows": _gemv(28672, 4096, torch.float16, warp_blocks=4),
    "gemv-llama3-8b-gate-up-fp16-paired": _gemv(28672, 4096, torch.float16, pair=True),
    "gemv-llama3-8b-gate-up-bf16-paired": _gemv(28672, 4096, torch.bfloat16, pair=True),
    "gemv-silu-llama3-8b-fp16": _gemv_silu(4096, 14336, torch.float16, False),
    "gemv-silu-llama3-8b-fp16-paired": _gemv_silu(4096, 14336, torch.float16, False, pair=True),
    "gemv-silu-smollm2-prenorm-bf16": _gemv_silu(576, 1536, torch.bfloat16, True, group=64),
    "gemv-silu-llama3-8b-bf16-paired": _gemv_silu(4096, 14336, torch.bfloat16, False, pair=True),
    "gemv-rope-llama3-8b-bf16-paired": _gemv_rope(4096, 32, 8, 128, torch.bfloat16, True, pair=True),
    "gemv-residual-llama3-8b-bf16-paired": _gemv_residual(4096, 14336, torch.bfloat16, True, pair=True),
    "pair-rows-llama3-8b-down": _pair_rows(14336),
    "pair-rows-llama3-8b-down-bf16": _pair_rows(14336, torch.bfloat16),
    # bf16 rows as fp16 over a power of two, and the GEMV that applies the row scale
    "pair-rows-scaled-llama3-8b-down-bf16": _pair_rows(14336, torch.bfloat16, scaled=True),
    "pair-rows-scaled-llama3-8b-o-bf16": _pair_rows(4096, torch.bfloat16, scaled=True),
    "pair-rows-scaled-llama3-70b-down-bf16": _pair_rows(28672, torch.bfloat16, scaled=True),  # 32768 a program
    "gemv-llama3-8b-gate-up-bf16-paired-scaled": _gemv(28672, 4096, torch.bfloat16, pair=True, scaled=True),
    # two activation rows a program, each word unpacked once (a plain M = 2 call inside a graph)
    "gemv-rows2-llama3-8b-gate-up-fp16-paired": _gemv(28672, 4096, torch.float16, pair=True, m=2, rows=2),
    "gemv-rows2-llama3-8b-gate-up-bf16-paired-scaled": _gemv(28672, 4096, torch.bfloat16, pair=True, scaled=True,
                                                             m=2, rows=2),
    "gemv-rope-llama3-8b-fp16": _gemv_rope(4096, 32, 8, 128, torch.float16, False),
    "gemv-rope-smollm2-prenorm-fp16": _gemv_rope(576, 9, 3, 64, torch.float16, True, group=64),
    "gemv-residual-llama3-8b-fp16": _gemv_residual(4096, 14336, torch.float16, False),
    "gemv-residual-llama3-8b-fp16-paired": _gemv_residual(4096, 14336, torch.float16, True, pair=True),
    "gemv-residual-smollm2-norm-bf16": _gemv_residual(576, 1536, torch.bfloat16, True, group=64),
    "argmax-llama3-vocab-fp32": _argmax(128256, torch.float32),
    "w4a16-gemm-m16-llama3-8b-gate-up": _w4a16_gemm(16, 28672, 4096),
    "w4a16-gemm-m64-llama3-8b-gate-up": _w4a16_gemm(64, 28672, 4096),
    "w4a16-gemm-m32-llama3-8b-gate-up": _w4a16_gemm(32, 28672, 4096),
    "w4a16-gemm-m32-llama3-8b-gate-up-bf16": _w4a16_gemm(32, 28672, 4096, dtype=torch.bfloat16),
    "w4a16-gemm-m128-llama3-8b-gate-up": _w4a16_gemm(128, 28672, 4096),
    "w4a16-gemm-m128-llama3-8b-gate-up-bf16": _w4a16_gemm(128, 28672, 4096, dtype=torch.bfloat16),
    "w4a16-gemm-m16-fused-reduce-llama3-8b-o": _w4a16_gemm(16, 4096, 4096, dict(
        next(c for max_m, kind, c in PLANS["sm90"] if kind == "gemm"), fused_reduce=True)),
    "w4a16-dequant-llama3-8b-gate-up": _w4a16_dequant(28672, 4096),
    # x and the packed words through tensor descriptors (the sweep's `tma` plans)
    "w4a16-gemm-m256-tma-llama3-8b-gate-up": _w4a16_gemm(256, 28672, 4096, dict(
        next(c for max_m, kind, c in PLANS["sm90"] if kind == "gemm" and 256 <= max_m), tma=True)),
    "w4a16-gemm-m32-tma-llama3-8b-gate-up": _w4a16_gemm(32, 28672, 4096, dict(
        next(c for max_m, kind, c in PLANS["sm90"] if kind == "gemm" and 32 <= max_m), tma=True)),
    # the SigLIP so400m tower in W8A8 (hidden 1152, MLP 4304), 17 tiles of 1024 patches
    "int8-tower-qkv": _int8_linear(17408, 3456, 1152),
    "int8-tower-fc2": _int8_linear(17408, 1152, 4304),
    "int8-llama3-8b-gate-up-m16": _int8_linear(16, 28672, 4096),
    "int8-llama3-8b-down-m256": _int8_linear(256, 4096, 14336),  # the shipped M <= 256 config
    # the persistent tensor-descriptor GEMM (int8_gemm_tma.py) in the sweeps' tile shapes
    "int8-tma-llama3-8b-down-m256": _int8_linear(256, 4096, 14336, dict(
        kernel="tma", block_m=64, block_n=128, block_k=128, num_warps=4, num_stages=4, group_m=8)),
    "int8-tma-tower-fc2": _int8_linear(8192, 1152, 4304, dict(
        kernel="tma", block_m=128, block_n=256, block_k=128, num_warps=8, num_stages=3, group_m=8)),
    "int8-tma-llama3-8b-gate-up-m16-swap": _int8_linear(16, 28672, 4096, dict(
        kernel="tma", block_m=16, block_n=64, block_k=256, swap_ab=True, num_warps=4, num_stages=5, group_m=8)),
    "int8-llama3-8b-gate-up-m1": _int8_linear(1, 28672, 4096),
    "int8-gemv-rope-llama3-8b": _int8_gemv_rope(4096, 32, 8, 128, False),
    "int8-gemv-rope-qwen2-7b-bias": _int8_gemv_rope(3584, 28, 4, 128, True),
    "layernorm-quant-tower": _layernorm_quant(17408, 1152),
    "gelu-quant-tower": _gelu_quant(17408, 4304),
    "layernorm-residual-tower": _layernorm(17408, 1152),
    "quant-rows-tower": _quant_rows(17408, 1152),
    "silu-mul-quant-qwen2-7b-m4096": _silu_mul_quant(4096, 18944),
    "rmsnorm-llama3-8b-decode": _rmsnorm(4096, False),
    "rmsnorm-paired-llama3-8b-decode": _rmsnorm(4096, True),
    "rmsnorm-quant-llama3-8b-decode": _rmsnorm_quant(4096),
}


def record(launch):
    """The (kernel, args, kwargs) of every launch ``launch()`` makes, with the device checks off."""
    recorder = _Recorder()
    saved_run = JITFunction.run
    patched = [m for m in list(sys.modules.values())
               if getattr(m, "__name__", "").startswith(kernels_pkg.__name__) and hasattr(m, "check_kernel_device")]
    saved_checks = [(m, m.check_kernel_device) for m in patched]
    JITFunction.run = lambda fn, *a, **kw: recorder(fn, *a, **kw)
    for m in patched:
        m.check_kernel_device = lambda *a, **kw: None
    try:
        launch()
    finally:
        JITFunction.run = saved_run
        for m, check in saved_checks:
            m.check_kernel_device = check
    return recorder.launches


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", help=f"targets (default all): {', '.join(TARGETS)}")
    ap.add_argument("--sass", action="store_true", help="also count SASS instructions")
    ap.add_argument("--json", help="write the reports here")
    args = ap.parse_args(argv)
    unknown = [n for n in args.names if n not in TARGETS]
    if unknown:
        ap.error(f"unknown targets {unknown}; known: {', '.join(TARGETS)}")
    results, failed = {}, []
    for name in args.names or TARGETS:
        try:
            for fn, a, kw in record(TARGETS[name]):
                rep = report(compile_launch(fn, a, kw), sass=args.sass)
                results[f"{name}:{fn.__name__}"] = rep
                extra = f" sass {rep['sass_count']} {rep['sass_top'][:6]}" if args.sass else ""
                print(f"{name:34s} {fn.__name__:32s} regs {rep['regs']:3d} stack {rep['stack']:5d} "
                      f"smem {rep['shared']:6d} wgmma {rep['wgmma']} narrow loads {rep['narrow_loads']} copies {rep['narrow_copies']}{extra}", flush=True)
        except Exception as e:  # report every target, then fail
            failed.append(name)
            print(f"{name:34s} FAILED: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "target": "sm90", "results": results}, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
