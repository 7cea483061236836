"""int8 GEMV of a fused gate/up projection with the SiLU-gated product and its per-token int8
quantization in one launch (W8A8 decode MLP: the input of the int8 ``down_proj``).

Math, for one token's int8 row ``xq [K]`` with scale ``s_x`` and ``W = [W_gate; W_up]`` int8
``[2I, K]`` with per-row scales ``s_w``::

    g = round(xq @ W_gate.T * s_x * s_w (+ b)),  u = round(xq @ W_up.T ...)     rounded to the activation dtype
    v[i] = g[i] / (1 + exp(-g[i])) * u[i]                                       float32
    vq, scale = quantize(v)                         (dynamic per token, or one static scale; int8_quant.py)

The unfused step is this GEMV writing ``[g | u]`` in the activation dtype and
:mod:`tinyq.kernels.silu_mul_quant` over it: one program for the whole row of ``I`` products (4.1 us
for Llama-3-8B's 14336 on the H200, issue-bound on one SM). Here each GEMV program computes the
products of its ``BLOCK_N / 2`` outputs (gate row ``i`` and up row ``I + i`` interleaved, as in
:mod:`tinyq.kernels.w4a16_gemv_silu`) and stores them in float32 to ``v``; the per-token scale
needs the whole row, so the last program to finish (:mod:`tinyq.kernels.semaphore`) quantizes it
(:func:`tinyq.kernels.int8_quant.quantize_store_chunks`). ``g`` and ``u`` are rounded as the
unfused GEMV's output is, so the integers and the scale are the unfused path's, bit for bit.

Tensors: ``xq`` int8 ``[1, K]``, ``s_x`` float32 ``[1]``, ``wq`` int8 ``[2I, K]``, ``s_w`` float32
``[2I]``, bias ``[2I]`` or none; ``v`` float32 ``[I]`` (scratch); outputs ``vq`` int8 ``[1, I]`` and
``scale`` float32 ``[1]``; ``static_scale`` float32 ``[1]`` or none.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tinyq.kernels.int8_gemv import dp4a_operands, int8_row_dots
from tinyq.kernels.int8_matmul import int8_matmul_reference
from tinyq.kernels.int8_quant import quantize_store_chunks
from tinyq.kernels.semaphore import arrive, counters
from tinyq.kernels.silu_mul_quant import silu_mul_quant_reference
from tinyq.quant.int8_format import MIN_ABSMAX

QUANT_CHUNK = 2048  # the last program's pass width: 8 float32 a thread at 8 warps, few registers kept


@triton.jit
def _int8_gemv_silu_quant_kernel(
    xq_ptr, sx_ptr, wq_ptr, sw_ptr, bias_ptr, v_ptr, vq_ptr, scale_ptr, static_ptr, counter_ptr,
    I, K, stride_wn, PROGRAMS,
    HAS_BIAS: tl.constexpr, STATIC: tl.constexpr, MIN_AMAX: tl.constexpr, EVEN_K: tl.constexpr,
    DP4A: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, CHUNK: tl.constexpr,
    ACT_DTYPE: tl.constexpr,
):
    HALF: tl.constexpr = BLOCK_N // 2
    pid = tl.program_id(0)
    r = tl.arange(0, BLOCK_N)
    i = pid * HALF + r // 2
    ok = i < I
    rows = tl.where(ok, i + (r % 2) * I, 0)  # gate row i, then up row I + i
    dots = int8_row_dots(xq_ptr, wq_ptr, rows, K, stride_wn, EVEN_K, DP4A, BLOCK_N, BLOCK_K)
    out = dots.to(tl.float32) * tl.load(sx_ptr) * tl.load(sw_ptr + rows, mask=ok, other=0.0)
    if HAS_BIAS:
        out += tl.load(bias_ptr + rows, mask=ok, other=0.0).to(tl.float32)
    out = out.to(ACT_DTYPE).to(tl.float32)  # the unfused GEMV's output rounding
    gate, up = tl.split(tl.reshape(out, (HALF, 2)))
    i_out = pid * HALF + tl.arange(0, HALF)
    tl.store(v_ptr + i_out, gate / (1.0 + tl.exp(-gate)) * up, mask=i_out < I)
    if arrive(counter_ptr, PROGRAMS):
        tl.store(scale_ptr, quantize_store_chunks(v_ptr, I, vq_ptr, static_ptr, STATIC, MIN_AMAX, CHUNK))


_ACT_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def launch_int8_gemv_silu_quant(xq, s_x, wq, s_w, bias, act_dtype, static_scale=None, *, block_n: int, block_k: int,
                                num_warps: int = 4, num_stages: int = 3, dp4a: bool = True, **_gemm_only):
    """Launch on arguments already checked (see :func:`tinyq.ops.fused_w8a8.w8a8_gate_up_silu_quant`);
    takes the int8 GEMV's M=1 config (:mod:`tinyq.kernels.int8_configs`). Returns
    ``(vq int8 [1, I], scale float32 [1])``."""
    inter = wq.shape[0] // 2
    device = xq.device
    v = torch.empty(inter, dtype=torch.float32, device=device)
    vq = torch.empty((1, inter), dtype=torch.int8, device=device)
    scale = torch.empty(1, dtype=torch.float32, device=device)
    xq, wq, k, block_k, use_dp4a = dp4a_operands(xq, wq, block_k, dp4a)
    programs = triton.cdiv(inter, block_n // 2)
    _int8_gemv_silu_quant_kernel[(programs,)](
        xq, s_x, wq, s_w, bias if bias is not None else s_w, v, vq, scale,
        static_scale if static_scale is not None else scale, counters(device, 1),
        inter, k, wq.stride(0), programs,
        HAS_BIAS=bias is not None, STATIC=static_scale is not None, MIN_AMAX=MIN_ABSMAX, EVEN_K=k % block_k == 0,
        DP4A=use_dp4a, BLOCK_N=block_n, BLOCK_K=block_k, CHUNK=QUANT_CHUNK, ACT_DTYPE=_ACT_DTYPES[act_dtype],
        num_warps=num_warps, num_stages=num_stages,
    )
    return vq, scale


def int8_gemv_silu_quant_reference(xq, s_x, wq, s_w, bias, act_dtype, static_scale=None):
    """The unfused math: the int8 linear rounded to ``act_dtype``, then SiLU·mul + quantization."""
    return silu_mul_quant_reference(int8_matmul_reference(xq, wq, s_x, s_w, bias, act_dtype), static_scale)
