"""Persistent int8 GEMM whose tiles arrive through tensor descriptors (TMA on Hopper and later).

Same math, tensors and epilogue (:func:`tinyq.kernels.int8_gemm.store_scaled`) as :mod:`tinyq.kernels.int8_gemm`::

    acc[m, n] = sum_k xq[m, k] * wq[n, k]                       (int32)
    y[m, n]   = acc[m, n] * s_x[m] * s_w[n] (+ bias[n])          (float32, stored in y's dtype)

What differs is how the tiles get there:
- **Tensor descriptors.** One thread issues each ``[BLOCK, BLOCK_K]`` copy and the copy engine
  computes the addresses, so the warps' issue slots go to the MMAs and the epilogue instead of
  per-thread address arithmetic and ``cp.async``. Rows past M or N and the K tail read as zeros,
  which add nothing to ``acc``, so no step is masked.
- **Persistent programs.** ``programs_per_sm`` x SMs programs (1-2 shipped; 0 launches one per tile)
  stride over the tiles in the grouped order of :func:`tinyq.kernels.tiling.grouped_pid`, and the
  tile loop is flattened into the K loop, so the next tile's first copies are in flight during this
  tile's epilogue. That matters where K is short (a vision tower's K = 1152 is 9 steps of 128).

Requirements (:func:`tinyq.kernels.tiling.tma_eligible`): 16-byte aligned ``xq`` and ``wq`` and row
strides that are multiples of 16 bytes (K % 16 == 0 for contiguous rows). The dispatcher falls back
to the pointer kernel otherwise. ``SWAP_AB`` computes ``y.T = W @ x.T``, as in the pointer kernel,
for skinny M.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from tinyq.kernels.attention_configs import sm_count
from tinyq.kernels.int8_gemm import store_scaled
from tinyq.kernels.tiling import grouped_pid


@triton.jit
def _int8_gemm_tma_kernel(
    x_desc, w_desc, sx_ptr, sw_ptr, bias_ptr, y_ptr,
    M, N, K,
    stride_ym, num_programs,
    HAS_BIAS: tl.constexpr,
    RAW_INT32: tl.constexpr,
    SWAP_AB: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    tl.static_assert(BLOCK_K >= 32, "int8 MMA consumes K in steps of 32")
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    k_steps = tl.cdiv(K, BLOCK_K)
    # The epilogue recomputes its tile from its own counter (as Triton's persistent-matmul tutorial does)
    # rather than reusing the loads' indices, which would keep them live across the flattened, pipelined
    # loop: a register-pressure choice, not a correctness one.
    epilogue_tile = tl.program_id(0) - num_programs
    for tile in tl.range(tl.program_id(0), num_tiles, num_programs, flatten=True):
        pid_m, pid_n = grouped_pid(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        if SWAP_AB:
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.int32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for ks in range(k_steps):
            x = x_desc.load([off_m, ks * BLOCK_K])
            w = w_desc.load([off_n, ks * BLOCK_K])
            if SWAP_AB:
                acc = tl.dot(w, tl.trans(x), acc, out_dtype=tl.int32)
            else:
                acc = tl.dot(x, tl.trans(w), acc, out_dtype=tl.int32)

        epilogue_tile += num_programs
        pid_m, pid_n = grouped_pid(epilogue_tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        if SWAP_AB:
            acc = tl.trans(acc)  # [BM, BN]
        store_scaled(acc, pid_m * BLOCK_M + tl.arange(0, BLOCK_M), pid_n * BLOCK_N + tl.arange(0, BLOCK_N), M, N,
                     sx_ptr, sw_ptr, bias_ptr, y_ptr, stride_ym, HAS_BIAS, RAW_INT32)


def launch_int8_gemm_tma(xq, wq, s_x, s_w, bias, y, *, block_m: int, block_n: int, block_k: int, group_m: int = 8,
                         swap_ab: bool = False, num_warps: int = 4, num_stages: int = 3, programs_per_sm: int = 2):
    """Launch on already-validated tensors that pass :func:`tinyq.kernels.tiling.tma_eligible`; an
    int32 ``y`` receives the raw accumulator. ``programs_per_sm`` = 0 launches one program per tile (not persistent).

    Why more than one program per SM: Triton keeps a wgmma in flight across K steps only for float32
    accumulators, so an int32 one waits for each step's MMAs before the next copies are issued. A
    second program on the SM issues its MMAs during that wait."""
    m, k = xq.shape
    n = wq.shape[0]
    x_desc = TensorDescriptor(xq, [m, k], [xq.stride(0), 1], [block_m, block_k])
    w_desc = TensorDescriptor(wq, [n, k], [wq.stride(0), 1], [block_n, block_k])
    programs = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    if programs_per_sm > 0:
        programs = min(programs, programs_per_sm * sm_count(xq.device))
    _int8_gemm_tma_kernel[(programs,)](
        x_desc, w_desc, s_x, s_w, bias if bias is not None else s_w, y,
        m, n, k,
        y.stride(0), programs,
        HAS_BIAS=bias is not None,
        RAW_INT32=y.dtype == torch.int32,
        SWAP_AB=swap_ab,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        GROUP_M=group_m,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return y
