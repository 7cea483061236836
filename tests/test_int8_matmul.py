"""W8A8 int8 GEMM / GEMV and the M dispatcher: the int32 product exactly, the scaled output against
the float32 epilogue of the reference. Interpreted on the CPU; the `gpu` tests run the shipped configs."""
import pytest
import torch

from tests.tolerances import assert_close_rel
from tinyq.kernels.int8_configs import CONFIGS, device_arch, select_config
from tinyq.kernels.int8_gemm import launch_int8_gemm
from tinyq.kernels.int8_gemm_tma import launch_int8_gemm_tma
from tinyq.kernels.tiling import tma_eligible
from tinyq.kernels.int8_gemv import launch_int8_gemv
from tinyq.kernels.int8_matmul import int8_matmul, int8_matmul_reference
from tinyq.quant.int8_format import MAX_K

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def make_case(m, n, k, bias=True, device=DEV, bias_dtype=torch.float16):
    xq = torch.randint(-127, 128, (m, k), dtype=torch.int8)
    wq = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    s_x = torch.rand(m) * 0.02 + 1e-3
    s_w = torch.rand(n) * 0.01 + 1e-4
    b = torch.randn(n).to(bias_dtype) if bias else None
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return to(xq), to(wq), to(s_x), to(s_w), to(b)


def exact(xq, wq):
    if xq.is_cuda:  # float64 is exact here (|acc| < 2^53) and fast on the GPU, where int64 matmuls do not run
        return (xq.double() @ wq.double().t()).to(torch.int32).cpu()
    return (xq.long() @ wq.long().t()).to(torch.int32)


def poisoned(m, n, dtype, device=DEV):
    if dtype == torch.int32:
        return torch.full((m, n), -(2**31), dtype=dtype, device=device)
    return torch.full((m, n), float("nan"), dtype=dtype, device=device)


@pytest.mark.parametrize("m,n,k", [(1, 40, 256), (3, 67, 100), (4, 9, 77), (2, 33, 512)])
def test_gemv_exact_and_scaled(m, n, k):
    xq, wq, s_x, s_w, b = make_case(m, n, k)
    acc = poisoned(m, n, torch.int32)
    launch_int8_gemv(xq, wq, s_x, s_w, None, acc, block_n=16, block_k=64)
    assert torch.equal(acc.cpu(), exact(xq, wq))
    for dtype in (torch.float16, torch.bfloat16):
        y = poisoned(m, n, dtype)
        launch_int8_gemv(xq, wq, s_x, s_w, b, y, block_n=8, block_k=128)
        assert_close_rel(y, int8_matmul_reference(xq, wq, s_x, s_w, b, torch.float32), dtype)


@pytest.mark.parametrize("swap_ab", [False, True])
@pytest.mark.parametrize("m,n,k", [(5, 40, 256), (17, 67, 100), (33, 16, 64), (3, 24, 200)])
def test_gemm_exact_and_scaled(m, n, k, swap_ab):
    xq, wq, s_x, s_w, b = make_case(m, n, k)
    acc = poisoned(m, n, torch.int32)
    launch_int8_gemm(xq, wq, s_x, s_w, None, acc, block_m=16, block_n=32, block_k=64, swap_ab=swap_ab)
    assert torch.equal(acc.cpu(), exact(xq, wq))
    y = poisoned(m, n, torch.bfloat16)
    launch_int8_gemm(xq, wq, s_x, s_w, b, y, block_m=16, block_n=16, block_k=32, swap_ab=swap_ab)
    assert_close_rel(y, int8_matmul_reference(xq, wq, s_x, s_w, b, torch.float32), torch.bfloat16)


@pytest.mark.parametrize("programs_per_sm", [0, 1])
@pytest.mark.parametrize("swap_ab", [False, True])
@pytest.mark.parametrize("m,n,k", [(17, 67, 112), (3, 40, 256), (70, 33, 48)])
def test_tma_gemm_exact_and_scaled(m, n, k, swap_ab, programs_per_sm):
    # K = 112 and 48 end inside a K step (the descriptor's zero fill); M and N that are not multiples of
    # the tiles leave ragged edges; on the interpreter an SM count of 4 makes each persistent program
    # walk several tiles
    xq, wq, s_x, s_w, b = make_case(m, n, k)
    assert tma_eligible(xq, wq)
    acc = poisoned(m, n, torch.int32)
    launch_int8_gemm_tma(xq, wq, s_x, s_w, None, acc, block_m=16, block_n=32, block_k=64, swap_ab=swap_ab,
                         programs_per_sm=programs_per_sm)
    assert torch.equal(acc.cpu(), exact(xq, wq))
    y = poisoned(m, n, torch.float16)
    launch_int8_gemm_tma(xq, wq, s_x, s_w, b, y, block_m=16, block_n=16, block_k=32, swap_ab=swap_ab,
                         programs_per_sm=programs_per_sm)
    assert_close_rel(y, int8_matmul_reference(xq, wq, s_x, s_w, b, torch.float32), torch.float16)


def test_tma_config_falls_back_on_unaligned_operands():
    cfg = dict(kernel="tma", block_m=16, block_n=16, block_k=64, num_warps=4, num_stages=2, programs_per_sm=1)
    # K = 100: rows 100 bytes apart cannot be described to the copy engine; the pointer GEMM runs instead
    xq, wq, s_x, s_w, _ = make_case(5, 24, 100)
    assert not tma_eligible(xq, wq)
    assert torch.equal(int8_matmul(xq, wq, s_x, s_w, out_dtype=torch.int32, config=cfg).cpu(), exact(xq, wq))
    # rows 128 bytes apart (an aligned stride) starting one byte into their buffer (a misaligned base)
    xq, wq, s_x, s_w, _ = make_case(5, 24, 128)
    buf = torch.empty(5 * 128 + 1, dtype=torch.int8, device=xq.device)
    shifted = buf[1:].view(5, 128)
    shifted.copy_(xq)
    assert shifted.stride(0) == 128 and shifted.data_ptr() % 16 == 1
    assert not tma_eligible(shifted, wq)
    assert torch.equal(int8_matmul(shifted, wq, s_x, s_w, out_dtype=torch.int32, config=cfg).cpu(), exact(xq, wq))


@pytest.mark.parametrize("m", [1, 3, 17, 257])
def test_dispatcher_over_m(m):
    n, k = 48, 96  # K not a multiple of any shipped block_k: the masked tail path
    xq, wq, s_x, s_w, b = make_case(m, n, k, bias_dtype=torch.float32)
    tiled = "tma" if device_arch(xq.device) == "sm90" and m > 64 else "gemm"  # descriptors on Hopper from M = 65
    assert select_config(m, xq.device)["kernel"] == ("gemv" if m == 1 else tiled)
    assert torch.equal(int8_matmul(xq, wq, s_x, s_w, out_dtype=torch.int32).cpu(), exact(xq, wq))
    y = int8_matmul(xq, wq, s_x, s_w, b, out_dtype=torch.float16)
    ref = int8_matmul_reference(xq.cpu(), wq.cpu(), s_x.cpu(), s_w.cpu(), b.cpu(), torch.float16)
    # one fp32 epilogue, two summation-free roundings: at most one fp16 ulp apart
    assert_close_rel(y.cpu(), ref.float(), torch.float16)


def test_reference_is_exact_at_large_k():
    # fp32 accumulation would round here (|acc| up to 127^2 * 4096 > 2^24); int32 must not
    k = 4096
    xq = torch.full((2, k), 127, dtype=torch.int8)
    wq = torch.full((3, k), -127, dtype=torch.int8)
    wq[1, ::2] = 127
    xq[1, 0] = 1
    acc = int8_matmul_reference(xq, wq, torch.ones(2), torch.ones(3), out_dtype=torch.int32)
    assert torch.equal(acc, exact(xq, wq))
    assert acc[0, 0].item() == -127 * 127 * k


def test_bad_input():
    xq, wq, s_x, s_w, _ = make_case(3, 8, 64, bias=False, device="cpu")
    with pytest.raises(ValueError, match="weight must be a 2-D int8"):
        int8_matmul(xq, wq.float(), s_x, s_w)
    with pytest.raises(ValueError, match="activations must be int8"):
        int8_matmul(xq.half(), wq, s_x, s_w)
    with pytest.raises(ValueError, match="expects K=64"):
        int8_matmul(xq[:, :32], wq, s_x, s_w)
    with pytest.raises(ValueError, match=r"weight scale must be float32 \[8\]"):
        int8_matmul(xq, wq, s_x, s_w.half())
    with pytest.raises(ValueError, match="weight scale must be float32"):
        int8_matmul(xq, wq, s_x, s_w[:4])
    with pytest.raises(ValueError, match="activation scale must be float32"):
        int8_matmul(xq, wq, s_x[:2], s_w)
    with pytest.raises(ValueError, match="bias must be"):
        int8_matmul(xq, wq, s_x, s_w, torch.zeros(7))
    big = torch.zeros(1, MAX_K + 1, dtype=torch.int8)
    with pytest.raises(ValueError, match="could overflow"):
        int8_matmul_reference(big, torch.zeros(2, MAX_K + 1, dtype=torch.int8), torch.ones(1), torch.ones(2))


def test_no_features():
    """K = 0: the kernel path and the reference (whose ``reshape(-1, 0)`` raised) both give the bias."""
    xq, wq = torch.empty(3, 0, dtype=torch.int8), torch.empty(4, 0, dtype=torch.int8)
    bias = torch.randn(4, dtype=torch.float16)
    y = int8_matmul(xq, wq, torch.ones(3), torch.ones(4), bias, torch.float16)
    y_ref = int8_matmul_reference(xq, wq, torch.ones(3), torch.ones(4), bias, torch.float16)
    assert torch.equal(y, y_ref) and torch.equal(y_ref, bias.expand(3, 4))
    y3 = int8_matmul_reference(xq.reshape(1, 3, 0), wq, torch.ones(1, 3), torch.ones(4), None, torch.float32)
    assert torch.equal(y3, torch.zeros(1, 3, 4))


def test_strided_bias_is_refused():
    """The kernels read the bias at unit stride: a strided view (a column of a packed tensor) gave
    wrong outputs silently; it is refused, as the W8A8 module checks its weights once."""
    xq, wq, s_x, s_w, _ = make_case(3, 8, 64, bias=False, device="cpu")
    bias = torch.randn(8, 2, dtype=torch.float16)[:, 0]
    for call in (int8_matmul, int8_matmul_reference):
        with pytest.raises(ValueError, match="bias must be contiguous"):
            call(xq, wq, s_x, s_w, bias)
    assert_close_rel(int8_matmul(xq, wq, s_x, s_w, bias.contiguous()),
                     int8_matmul_reference(xq, wq, s_x, s_w, bias.contiguous()))


@pytest.mark.gpu
@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_every_shipped_config_on_gpu(arch):
    if arch != "default" and arch != device_arch(torch.device("cuda")):
        pytest.skip(f"the {arch} table is sized for {arch}'s shared memory")
    for max_m, cfg in CONFIGS[arch]:
        m = max_m or 300
        for n, k in ((256, 512), (200, 4160), (72, 4158)):  # K % 4 != 0: the GEMV without dp4a
            xq, wq, s_x, s_w, b = make_case(m, n, k)
            acc = int8_matmul(xq, wq, s_x, s_w, out_dtype=torch.int32, config=cfg)
            assert torch.equal(acc.cpu(), exact(xq, wq)), (arch, max_m, cfg)
            y = int8_matmul(xq, wq, s_x, s_w, b, out_dtype=torch.float16, config=cfg)
            assert_close_rel(y, int8_matmul_reference(xq, wq, s_x, s_w, b, torch.float32), torch.float16)


@pytest.mark.gpu
@pytest.mark.parametrize("programs_per_sm", [0, 1, 2])
def test_tma_gemm_on_gpu(programs_per_sm):
    # 17 x 18 tiles of 128 x 128: more than 2 programs on each of 132 SMs, so persistent programs loop
    for m, n, k in ((300, 200, 4160), (2048 + 17, 2304, 1152), (1, 72, 4160)):
        xq, wq, s_x, s_w, b = make_case(m, n, k)
        want, ref = exact(xq, wq), int8_matmul_reference(xq, wq, s_x, s_w, b, torch.float32)
        # (the int32 output's 128 x 256 tile crosses shared memory on its way out: BK 64 leaves room)
        for bm, bn, bk, warps in ((128, 128, 128, 4), (128, 256, 64, 8), (64, 128, 256, 4)):
            cfg = dict(kernel="tma", block_m=bm, block_n=bn, block_k=bk, num_warps=warps, num_stages=3,
                       programs_per_sm=programs_per_sm)
            acc = int8_matmul(xq, wq, s_x, s_w, out_dtype=torch.int32, config=cfg)
            assert torch.equal(acc.cpu(), want), cfg
            y = int8_matmul(xq, wq, s_x, s_w, b, out_dtype=torch.bfloat16, config=cfg)
            assert_close_rel(y, ref, torch.bfloat16)
