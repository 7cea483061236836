"""Launch-order and operand-layout helpers shared by the tiled GEMM kernels."""
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
