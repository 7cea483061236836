"""Launch-order and operand-layout helpers shared by the tiled GEMM kernels."""
import functools

import triton
import triton.language as tl


@triton.jit
def grouped_pid(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Map a 1-D program id to (pid_m, pid_n) in groups of GROUP_M row blocks, so the programs
    running at once share their column (weight) tiles in L2 (the Triton matmul tutorial's order)."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pids_per_group = GROUP_M * num_pid_n
    first_pid_m = (pid // pids_per_group) * GROUP_M
    group_rows = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % pids_per_group) % group_rows)
    pid_n = (pid % pids_per_group) // group_rows
    return pid_m, pid_n


def tma_eligible(*tensors) -> bool:
    """Whether every tensor meets the tensor descriptors' alignment rules: a 16-byte aligned base and
    a row stride that is a multiple of 16 bytes (the last dim contiguous is the callers' own check)."""
    return all(t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0 for t in tensors)


def _triton_minor() -> tuple:
    major, minor = triton.__version__.split(".")[:2]
    return int(major), int(minor)


# Triton versions whose Hopper warp-specialization pass (``tl.range(..., warp_specialize=True)``) runs
# the descriptor-fed GEMMs correctly: none so far. On the H100 with 3.6 the specialized int8 GEMM made
# an illegal memory access, the W4A16 GEMM failed to compile ("PassManager::run failed") or took
# minutes per tile; 3.9's pass splits each consumer's share of a host descriptor's block and fails
# to compile them (docs/perf_notes.md). A version goes in here only after the GPU tests pass on it.
WARP_SPECIALIZE_TRITON: frozenset = frozenset()


@functools.cache
def warp_specialize_supported() -> bool:
    """Whether this Triton can warp-specialize tinyq's descriptor-fed GEMMs; launchers asked to
    specialize run the same tile unspecialized where it cannot."""
    return _triton_minor() in WARP_SPECIALIZE_TRITON
