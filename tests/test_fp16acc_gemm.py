"""Plain fp16 GEMM with fp16 accumulation against the float32 reference."""
import pytest
import torch

from tests.tolerances import assert_close_rel
from tinyq.kernels.fp16acc_gemm import fp16acc_gemm, fp16acc_gemm_reference

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("acc_fp16", [True, False])
@pytest.mark.parametrize("m,n,k", [(1, 16, 64), (19, 40, 200), (33, 70, 128)])
def test_fp16acc_gemm(m, n, k, acc_fp16):
    x = torch.randn(m, k, dtype=torch.float16, device=DEV)
    w = (torch.randn(n, k, device=DEV) * 0.05).half()
    y = fp16acc_gemm(x, w, acc_fp16=acc_fp16, block_m=16, block_n=16, block_k=32, num_warps=4, num_stages=2)
    assert_close_rel(y, fp16acc_gemm_reference(x, w))


def test_fp16acc_gemm_bad_input():
    x = torch.randn(4, 32, dtype=torch.float16)
    with pytest.raises(ValueError, match="K mismatch"):
        fp16acc_gemm(x, torch.randn(8, 16, dtype=torch.float16))
    with pytest.raises(ValueError, match="takes fp16"):
        fp16acc_gemm(x.bfloat16(), torch.randn(8, 32, dtype=torch.bfloat16))


@pytest.mark.gpu
@pytest.mark.parametrize("acc_fp16", [True, False])
def test_fp16acc_gemm_gpu(acc_fp16):
    x = torch.randn(1000, 4096, dtype=torch.float16, device="cuda")
    w = (torch.randn(3000, 4096, device="cuda") * 0.02).half()
    assert_close_rel(fp16acc_gemm(x, w, acc_fp16=acc_fp16), fp16acc_gemm_reference(x, w))
