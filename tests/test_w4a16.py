"""W4A16 kernels (GEMV, fused-dequant GEMM, the M dispatcher) against the float32 reference.

Runs the Triton kernels themselves: on the CPU through the interpreter (conftest sets
TRITON_INTERPRET=1), on CUDA for the `gpu`-marked tests.
"""
import pytest
import torch
import triton
import triton.language as tl

from tests.tolerances import assert_close_rel
from tinyq.backend import force_backend, interpreting
from tinyq.kernels.paired import pair_rows_reference, paired_plane, unpair_rows_reference
from tinyq.kernels.semaphore import counters
from tinyq.kernels.w4a16_configs import PLANS, launch_plan
from tinyq.kernels.w4a16_dequant import launch_w4a16_dequant, w4a16_dequant_reference
from tinyq.kernels.tiling import tma_eligible
from tinyq.kernels.w4a16_gemm import launch_w4a16_gemm
from tinyq.kernels.w4a16_gemv import _nibble_minus_zero, launch_w4a16_gemv
from tinyq.kernels.w4a16_matmul import w4a16_matmul
from tinyq.ops.linear import w4a16_linear, w4a16_linear_reference
from tinyq.quant.format import quantize_weight

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float16, torch.bfloat16]


def make_case(m, n, k, group_size, dtype, bias=True, device=DEV):
    w = torch.randn(n, k) * 0.02
    qweight, scales, zeros = quantize_weight(w, group_size, dtype)
    x = torch.randn(m, k, dtype=dtype)
    b = torch.randn(n, dtype=dtype) if bias else None
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return to(x), to(qweight), to(scales), to(zeros), to(b)


def poisoned(m, n, dtype, device=DEV):
    return torch.full((m, n), float("nan"), dtype=dtype, device=device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("m,n,k", [(1, 40, 256), (3, 67, 384), (4, 16, 576), (2, 9, 128), (2, 33, 512)])
@pytest.mark.parametrize("warp_blocks,paired", [(None, False), (2, False), (None, True), (2, True)])
def test_gemv(m, n, k, group_size, dtype, warp_blocks, paired):
    """One weight row per warp (None) and rows sharing a warp (2 blocks of 32 inputs a warp-row),
    with x in its natural layout or the paired one (poisoned padding: it must never be read)."""
    if k % group_size:
        pytest.skip("group does not divide K")
    x, qw, s, z, b = make_case(m, n, k, group_size, dtype)
    y = poisoned(m, n, dtype)
    launch_w4a16_gemv(poisoned_pairs(x) if paired else x, qw, s, z, b, y, block_n=16, block_k=256, num_warps=4,
                      num_stages=2, warp_blocks=warp_blocks)
    assert_close_rel(y, w4a16_linear_reference(x, qw, s, z, b))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize("m,n,k,group_size", [(2, 40, 256, 32), (3, 67, 576, 64), (5, 9, 384, 128), (7, 33, 512, 64)])
@pytest.mark.parametrize("paired", [False, True])
def test_gemv_several_rows_a_program(m, n, k, group_size, rows, paired, dtype):
    """Programs that unpack each weight word once for ``rows`` activation rows: every row of y equals
    its own reference, including a last group of fewer rows (M not a multiple of ``rows``: the
    missing rows are neither computed into y nor written past it) and rows of different sizes."""
    x, qw, s, z, b = make_case(m, n, k, group_size, dtype)
    x = (x.float() * torch.logspace(-1, 1, m, device=x.device)[:, None]).to(dtype)
    y = poisoned(m + 1, n, dtype)
    launch_w4a16_gemv(poisoned_pairs(x) if paired else x, qw, s, z, b, y[:m], block_n=16, block_k=256, num_warps=4,
                      num_stages=2, ptx_dequant=True, rows=rows)
    ref = w4a16_linear_reference(x, qw, s, z, b)
    for r in range(m):
        assert_close_rel(y[r:r + 1], ref[r:r + 1])
    assert y[m].isnan().all()


def test_gemv_rows_a_program_are_one_or_two():
    x, qw, s, z, b = make_case(3, 40, 256, 32, torch.float16)
    with pytest.raises(ValueError, match="rows=3"):
        launch_w4a16_gemv(x, qw, s, z, b, poisoned(3, 40, torch.float16), block_n=16, block_k=256, num_warps=4,
                          num_stages=2, rows=3)


def poisoned_pairs(x):
    """``x`` in the GEMV's paired layout with NaN in the plane padding (K=576: 144 of 160 entries used)."""
    paired = pair_rows_reference(x)
    planes = paired.data.view(x.shape[0], 4, -1)
    planes[:, :, x.shape[1] // 4:] = float("nan")
    return paired


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k", [(1, 32), (3, 576), (2, 4096)])
def test_paired_layout_round_trip(m, k, dtype):
    """The paired layout puts input 32b + 16h + 4j + w at j * plane + 8b + 2w + h, planes 64-byte aligned."""
    x = torch.randn(m, k).to(dtype)
    paired = pair_rows_reference(x)
    plane = paired_plane(k)
    assert plane % 32 == 0 and plane >= k // 4 and paired.data.shape == (m, 4 * plane)
    assert torch.equal(unpair_rows_reference(paired), x)
    n = torch.arange(k)
    r = n % 32
    where = ((r % 16) // 4) * plane + (n // 32) * 8 + (n % 4) * 2 + r // 16
    assert torch.equal(paired.data[:, where], x)


GEMM_CASES = [  # (group_size, block_k, unpack)
    (g, bk, u) for g, bk in [(32, 32), (64, 64), (128, 64), (128, 128)] for u in ("frag", "natural")
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("swap_ab", [False, True])
@pytest.mark.parametrize("group_size,block_k,unpack", GEMM_CASES)
@pytest.mark.parametrize("m,n,k", [(5, 40, 256), (17, 67, 384), (33, 16, 128)])
def test_gemm(m, n, k, group_size, block_k, unpack, swap_ab, dtype):
    if k % group_size:
        pytest.skip("group does not divide K")
    x, qw, s, z, b = make_case(m, n, k, group_size, dtype, bias=(m % 2 == 1))
    y = poisoned(m, n, dtype)
    launch_w4a16_gemm(x, qw, s, z, b, y, block_m=16, block_n=32, block_k=block_k, swap_ab=swap_ab,
                      unpack=unpack, num_warps=4)
    assert_close_rel(y, w4a16_linear_reference(x, qw, s, z, b))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("split_k", [2, 3, 4])
@pytest.mark.parametrize("swap_ab", [False, True])
@pytest.mark.parametrize("m,n,k,group_size,block_k,unpack", [
    (3, 67, 576, 64, 64, "natural"),  # 9 K steps over 3 or 4 splits: the last split is short
    (17, 40, 512, 128, 128, "frag"),
    (2, 33, 384, 32, 32, "natural"),
    (257, 40, 576, 64, 64, "frag"),
    (3, 72, 384, 128, 128, "frag"),
])
def test_gemm_split_k(m, n, k, group_size, block_k, unpack, swap_ab, split_k, dtype):
    """Split-K writes fp32 partials and a second kernel sums them, adds the bias and casts; with
    ``fused_reduce`` the tile's last program does it, bit for bit the same, and leaves the arrival
    counters at zero."""
    x, qw, s, z, b = make_case(m, n, k, group_size, dtype, bias=(split_k != 3))
    y = poisoned(m, n, dtype)
    launch_w4a16_gemm(x, qw, s, z, b, y, block_m=16, block_n=32, block_k=block_k, swap_ab=swap_ab,
                      unpack=unpack, split_k=split_k, num_warps=4)
    assert_close_rel(y, w4a16_linear_reference(x, qw, s, z, b))
    if dtype != torch.float16:  # the reduction does not depend on the dtype; the CPU suite's time does
        return
    y_fused = poisoned(m, n, dtype)
    launch_w4a16_gemm(x, qw, s, z, b, y_fused, block_m=16, block_n=32, block_k=block_k, swap_ab=swap_ab,
                      unpack=unpack, split_k=split_k, fused_reduce=True, num_warps=4)
    assert torch.equal(y_fused, y)
    assert not counters(y.device, 1).any()


@pytest.mark.parametrize("split_below_tiles,splits", [(0, True), (3, True), (2, False), (1, False)])
def test_gemm_split_below_tiles(split_below_tiles, splits, monkeypatch):
    """``split_below_tiles``: K is split only while the output has fewer tiles than that (here 2:
    N = 40 in tiles of 32); otherwise one program a tile reduces the whole K, with the same result."""
    import tinyq.kernels.w4a16_gemm as gemm

    reduces = []
    real = gemm._splitk_reduce_kernel
    monkeypatch.setattr(gemm, "_splitk_reduce_kernel", type("Spy", (), {
        "__getitem__": lambda self, grid: (lambda *a, **kw: (reduces.append(grid), real[grid](*a, **kw)))})())
    x, qw, s, z, b = make_case(5, 40, 512, 128, torch.float16, bias=True)
    y = poisoned(5, 40, torch.float16)
    launch_w4a16_gemm(x, qw, s, z, b, y, block_m=16, block_n=32, block_k=128, swap_ab=True, unpack="frag",
                      split_k=4, split_below_tiles=split_below_tiles, num_warps=4)
    assert_close_rel(y, w4a16_linear_reference(x, qw, s, z, b))
    assert bool(reduces) == splits


def test_shipped_plans_split_while_tiles_are_short():
    """The shipped split-K GEMM plans split only layers with fewer output tiles than the GPU has
    SMs (resolved per device); the interpreter's plans always split, so CPU tests cover the split."""
    split_plans = [cfg for _, kind, cfg in PLANS["sm90"] if kind == "gemm" and cfg["split_k"] > 1]
    assert split_plans and all(cfg["split_below_tiles"] == "sms" for cfg in split_plans)
    kind, cfg = launch_plan(16, torch.float16, -1)
    assert kind == "gemm" and cfg["split_k"] > 1 and cfg["split_below_tiles"] == 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k,group_size,block_k,swap_ab,split_k", [
    (3, 67, 640, 64, 64, True, 3),  # N and M past the tiles (zero-filled rows), splits of 4, 4 and 2 steps
    (17, 40, 512, 128, 128, True, 1),
    (257, 33, 384, 32, 32, False, 2),
])
def test_gemm_tensor_descriptors(m, n, k, group_size, block_k, swap_ab, split_k, dtype):
    """x and the packed words through tensor descriptors: the same result as the pointer loads."""
    x, qw, s, z, b = make_case(m, n, k, group_size, dtype)
    cfg = dict(block_m=16, block_n=32, block_k=block_k, swap_ab=swap_ab, unpack="natural", split_k=split_k,
               num_warps=4)
    assert tma_eligible(x, qw)  # so the descriptors, not the pointer fallback, produce y_tma
    y_ptr, y_tma = poisoned(m, n, dtype), poisoned(m, n, dtype)
    launch_w4a16_gemm(x, qw, s, z, b, y_ptr, **cfg)
    launch_w4a16_gemm(x, qw, s, z, b, y_tma, tma=True, **cfg)
    assert_close_rel(y_tma, w4a16_linear_reference(x, qw, s, z, b))
    assert torch.equal(y_tma, y_ptr)


@triton.jit
def _nibble_minus_zero_kernel(W, Z, OUT, J: tl.constexpr, N: tl.constexpr, PTX: tl.constexpr):
    offs = tl.arange(0, N)
    words = tl.load(W + offs).to(tl.uint32, bitcast=True)
    tl.store(OUT + offs, _nibble_minus_zero(words, J, tl.load(Z + offs), PTX))


@pytest.mark.parametrize("ptx", [False, pytest.param(True, marks=pytest.mark.gpu)])
@pytest.mark.parametrize("j", [0, 1, 2, 3])
def test_nibble_minus_zero_is_exact_for_every_code_and_zero(j, ptx):
    """The convert-free unpack of the bf16 GEMV, in Triton and as one PTX ``lop3`` (GPU): every
    (q, z) pair in 0..15, with every other bit of the word set (the mask must drop them), gives q - z
    exactly."""
    q = torch.arange(256) % 16
    z = (torch.arange(256) // 16).float()
    words = (0xFFFFFFFF & ~(0xF << (4 * j))) | (q << (4 * j))
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).to(DEV)
    out = torch.full((256,), float("nan"), device=DEV)
    _nibble_minus_zero_kernel[(1,)](words, z.to(DEV), out, J=j, N=256, PTX=ptx)
    assert torch.equal(out.cpu(), q.float() - z)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("n,k", [(67, 576), (16, 128), (33, 384)])
def test_dequant_is_exact(n, k, group_size, dtype):
    """(q - z) is exact in fp16/bf16 and the one multiply rounds once: equal to the fp32 reference
    rounded to the dtype, bit for bit (odd N, K not a multiple of the tile)."""
    if k % group_size:
        pytest.skip("group does not divide K")
    _, qw, s, z, _ = make_case(1, n, k, group_size, dtype, bias=False)
    out = torch.full((n, k), float("nan"), dtype=dtype, device=DEV)
    launch_w4a16_dequant(qw, s, z, out, block_n=16, block_k=256)
    ref = w4a16_dequant_reference(qw, s, z)
    if dtype == torch.bfloat16 and interpreting():
        # Triton's interpreter converts fp32 -> bf16 by truncation (the GPU rounds to nearest even)
        ref = (ref.view(torch.int32) & -65536).view(torch.float32)
    assert torch.equal(out, ref.to(dtype))


def test_dequant_scratch_is_one_buffer_and_outlives_captured_graphs(monkeypatch):
    """One buffer per (device, dtype), reused by smaller layers and replaced by a larger one; a buffer
    that a CUDA-graph capture wrote is kept alive when outgrown (a replay still writes it), others are freed."""
    from tinyq.kernels import w4a16_dequant as dq

    monkeypatch.setattr(dq, "_SCRATCH", {})
    monkeypatch.setattr(dq, "_KEPT", [])
    cpu = torch.device("cpu")
    a = dq.scratch(100, torch.float16, cpu)
    assert dq.scratch(60, torch.float16, cpu).data_ptr() == a.data_ptr()  # smaller: the same memory
    assert dq.scratch(60, torch.bfloat16, cpu).data_ptr() != a.data_ptr()  # another dtype: its own
    b = dq.scratch(200, torch.float16, cpu)  # outgrown, never captured: dropped
    assert b.numel() == 200 and b.data_ptr() != a.data_ptr() and dq._KEPT == []
    assert dq.scratch(150, torch.float16, cpu, capturing=True).data_ptr() == b.data_ptr()
    c = dq.scratch(300, torch.float16, cpu)  # outgrows the captured one: kept
    assert [k.data_ptr() for k in dq._KEPT] == [b.data_ptr()] and c.data_ptr() != b.data_ptr()
    assert len(dq._SCRATCH) == 2


def test_plans_cover_every_m_and_skip_ptx_off_nvidia(monkeypatch):
    """Every bucket resolves; buckets grow; the last is open-ended; no PTX where the backend has none."""
    for plans in PLANS.values():
        bounds = [m for m, _, _ in plans]
        assert bounds[-1] is None and bounds[:-1] == sorted(bounds[:-1])
    assert launch_plan(1, torch.float16, -1)[0] == "gemv"
    assert launch_plan(10**6, torch.float16, -1)[0] == "dequant"
    assert all(not cfg.get("ptx_dequant") for m in (1, 16, 64, 128) for cfg in [launch_plan(m, torch.float16, -1)[1]])
    from tinyq.kernels import w4a16_configs

    monkeypatch.setattr(w4a16_configs, "gpu_arch", lambda device: "sm90")  # resolve an H100/H200 plan here
    monkeypatch.setattr(w4a16_configs, "fp16_accumulate_default", lambda device: False)
    monkeypatch.setattr(w4a16_configs, "sm_count", lambda device: 132)
    gpu = torch.device("cuda", 0)
    for nvidia in (True, False):  # False: e.g. a ROCm GPU, whose tensors also report is_cuda
        monkeypatch.setattr(w4a16_configs, "ptx_supported", lambda device: nvidia)
        ptx = [w4a16_configs._resolve(m, torch.float16, gpu)[1].get("ptx_dequant") for m in (1, 4, 16, 64)]
        assert all(ptx) if nvidia else not any(ptx)
    # on a GPU the split-K plans split only layers with fewer output tiles than SMs
    assert all(w4a16_configs._resolve(m, torch.float16, gpu)[1]["split_below_tiles"] == 132 for m in (4, 16, 32, 64))


@pytest.mark.parametrize("unpack", ["frag", "natural"])
@pytest.mark.parametrize("swap_ab", [False, True])
def test_gemm_fp16_accumulate(swap_ab, unpack):
    x, qw, s, z, b = make_case(37, 48, 512, 128, torch.float16)
    y = poisoned(37, 48, torch.float16)
    launch_w4a16_gemm(x, qw, s, z, b, y, block_m=16, block_n=16, block_k=128, swap_ab=swap_ab, acc_fp16=True,
                      unpack=unpack)
    assert_close_rel(y, w4a16_linear_reference(x, qw, s, z, b))
    with pytest.raises(ValueError, match="fp16 accumulation needs fp16"):
        xb, qwb, sb, zb, _ = make_case(4, 16, 64, 64, torch.bfloat16)
        launch_w4a16_gemm(xb, qwb, sb, zb, None, poisoned(4, 16, torch.bfloat16),
                          block_m=16, block_n=16, block_k=64, acc_fp16=True)


@pytest.mark.parametrize("group_size", [64, 128])
@pytest.mark.parametrize("m", [1, 3, 4, 5, 16, 17, 64, 65, 128, 129, 257])
def test_dispatch_shipped_configs(m, group_size):
    """Every M bucket of the shipped config table, through the public launcher."""
    x, qw, s, z, b = make_case(m, 24, 256, group_size, torch.float16)
    assert_close_rel(w4a16_matmul(x, qw, s, z, b), w4a16_linear_reference(x, qw, s, z, b))


@pytest.mark.parametrize("dtype", DTYPES)
def test_functional_op_3d_input(dtype):
    x, qw, s, z, b = make_case(6, 32, 128, 32, dtype)
    x3 = x.reshape(2, 3, 128)
    with force_backend("triton"):
        y = w4a16_linear(x3, qw, s, z, b)
    assert y.shape == (2, 3, 32)
    assert_close_rel(y, w4a16_linear_reference(x3, qw, s, z, b))


def test_non_contiguous_input_is_handled_by_the_op():
    x, qw, s, z, b = make_case(8, 16, 128, 64, torch.float16)
    xt = torch.cat([x, x], dim=1)[:, ::2]  # strided view with the same shape as x
    with force_backend("triton"):
        y = w4a16_linear(xt, qw, s, z, b)
    assert_close_rel(y, w4a16_linear_reference(xt.contiguous(), qw, s, z, b))


def test_bad_inputs_are_clear_errors():
    x, qw, s, z, b = make_case(2, 16, 128, 64, torch.float16)
    with pytest.raises(ValueError, match="input has 64 features but the weight expects K=128"):
        w4a16_matmul(x[:, :64].contiguous(), qw, s, z)
    with pytest.raises(ValueError, match="activations must be one of"):
        w4a16_linear(x.to(torch.int32), qw, s, z)
    with pytest.raises(ValueError, match="imply group size 42.6667"):
        w4a16_matmul(x, qw, s[:, :1].repeat(1, 3).contiguous(), z[:, :1].repeat(1, 3).contiguous())
    with pytest.raises(ValueError, match="qweight must be a 2-D int32"):
        w4a16_matmul(x, qw.to(torch.int64), s, z)
    with pytest.raises(ValueError, match="bias must have shape"):
        w4a16_matmul(x, qw, s, z, torch.zeros(15, dtype=torch.float16))
    with pytest.raises(ValueError, match="contiguous along K"):
        w4a16_matmul(torch.randn(128, 2, dtype=torch.float16).t(), qw, s, z)
    with pytest.raises(ValueError, match="scales dtype"):
        w4a16_matmul(x.to(torch.bfloat16), qw, s, z)
    with pytest.raises(ValueError, match="different devices"):
        w4a16_matmul(x, qw.to("meta"), s, z)
    with pytest.raises(ValueError, match="expects a 2-D input"):
        w4a16_matmul(x.reshape(1, 2, 128), qw, s, z)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 3, 5, 16, 17, 100, 1000])
@pytest.mark.parametrize("n,k,group_size", [(4096, 4096, 128), (1000, 576, 64), (4096, 14336, 32)])
def test_gpu_shapes(m, n, k, group_size, dtype):
    x, qw, s, z, b = make_case(m, n, k, group_size, dtype, device="cuda")
    y = w4a16_matmul(x, qw, s, z, b)
    torch.cuda.synchronize()
    assert_close_rel(y, w4a16_linear_reference(x, qw, s, z, b))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k,group_size", [(4096, 4096, 128), (1000, 576, 64)])
def test_gpu_every_shipped_plan(monkeypatch, n, k, group_size, dtype):
    """Every M bucket of this GPU's shipped plans at its two ends and middle (the open one up to
    1000), through the dispatcher, with the paired path off so that M = 1 and 2 run their own plans."""
    from tinyq.kernels import w4a16_configs
    from tinyq.kernels import w4a16_matmul as matmul_mod

    dev = torch.cuda.current_device()
    ms, lo = [], 1
    for max_m, _, _ in PLANS[w4a16_configs.device_arch(torch.device("cuda", dev))]:
        hi = max_m if max_m is not None else 1000
        ms += sorted({lo, (lo + hi) // 2, hi})
        lo = hi + 1
    monkeypatch.setattr(matmul_mod, "paired_decode", lambda device_index: False)
    for m in ms:
        x, qw, s, z, b = make_case(m, n, k, group_size, dtype, device="cuda")
        y = w4a16_matmul(x, qw, s, z, b)
        torch.cuda.synchronize()
        assert_close_rel(y, w4a16_linear_reference(x, qw, s, z, b))


@pytest.mark.gpu
def test_gpu_dequant_graph_survives_a_larger_layer():
    """A graph captured on the dequantize + cuBLAS path writes the scratch buffer on every replay; a
    larger layer called after the capture grows the scratch, and the captured buffer must stay alive,
    not be handed to another tensor."""
    dtype = torch.float16
    plan = launch_plan(10**6, dtype, torch.cuda.current_device())
    assert plan[0] == "dequant"
    x, qw, s, z, _ = make_case(300, 256, 512, 64, dtype, bias=False, device="cuda")
    w4a16_matmul(x, qw, s, z, config=plan)  # warm-up
    static_x = x.clone()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static_y = w4a16_matmul(static_x, qw, s, z, config=plan)
    xl, qwl, sl, zl, _ = make_case(300, 2048, 1024, 64, dtype, bias=False, device="cuda")
    w4a16_matmul(xl, qwl, sl, zl, config=plan)  # outgrows the captured scratch
    torch.cuda.synchronize()
    others = [torch.zeros(256 * 512, dtype=dtype, device="cuda") for _ in range(8)]  # would take freed memory
    static_x.copy_(torch.randn_like(x))
    g.replay()
    torch.cuda.synchronize()
    assert_close_rel(static_y, w4a16_linear_reference(static_x, qw, s, z))
    assert all(int(t.count_nonzero()) == 0 for t in others)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 2])
def test_gpu_cuda_graph_and_compile(monkeypatch, m, dtype):
    """The op captures in a CUDA graph and compiles with inductor, giving the eager result. One or
    two rows in a capture are paired first where the plans say so (w4a16_configs.paired_decode;
    bf16 as scaled fp16 pairs): the replay must then equal an eager run that pairs too."""
    import tinyq
    from tinyq.kernels import w4a16_matmul as matmul_mod
    from torch import nn

    model = nn.Sequential(nn.Linear(512, 1024), nn.SiLU(), nn.Linear(1024, 256)).to(dtype).cuda()
    tinyq.quantize_(model, tinyq.W4A16Config(group_size=64))
    x = torch.randn(m, 512, dtype=dtype, device="cuda")
    eager = model(x)
    static_x = x.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        model(static_x)
    torch.cuda.current_stream().wait_stream(s)
    paired = []
    real_pair_rows = matmul_mod.pair_rows
    monkeypatch.setattr(matmul_mod, "pair_rows", lambda t, **kw: paired.append(t.shape) or real_pair_rows(t, **kw))
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static_y = model(static_x)
    # both linears pair inside the capture where the plans say so, and nowhere else
    assert len(paired) == (2 if matmul_mod.paired_decode(torch.cuda.current_device()) else 0)
    x2 = torch.randn_like(x)
    static_x.copy_(x2)
    g.replay()
    torch.cuda.synchronize()
    monkeypatch.setattr(matmul_mod, "capturing", lambda t: True)  # eager, the path the capture took
    assert torch.equal(static_y, model(x2))
    monkeypatch.undo()
    compiled = torch.compile(model, fullgraph=True)
    assert_close_rel(compiled(x), eager)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ptx_dequant", [True, False])
@pytest.mark.parametrize("m,n,k,group_size", [(1, 4096, 4096, 128), (3, 1000, 576, 64), (2, 333, 14336, 32)])
@pytest.mark.parametrize("warp_blocks", [None, 4])
@pytest.mark.parametrize("paired", [False, True])
def test_gpu_gemv_paths_and_outliers(m, n, k, group_size, ptx_dequant, warp_blocks, paired, dtype):
    """Both GEMV dequant paths of each dtype (fp16: the PTX dot or plain Triton; bf16: the one-lop3
    unpack or plain Triton), one row a warp and rows sharing a warp, x natural or paired, including
    activations with 3000-sized outliers (Llama's massive activations): the fp16 PTX path must
    neither overflow nor lose accuracy."""
    x, qw, s, z, b = make_case(m, n, k, group_size, dtype, device="cuda")
    x[:, 7] = 3000.0
    x[:, k // 2] = -2500.0
    y = poisoned(m, n, dtype, device="cuda")
    launch_w4a16_gemv(poisoned_pairs(x) if paired else x, qw, s, z, b, y, block_n=4, block_k=1024, num_warps=8,
                      num_stages=2, ptx_dequant=ptx_dequant, warp_blocks=warp_blocks)
    torch.cuda.synchronize()
    assert_close_rel(y, w4a16_linear_reference(x, qw, s, z, b))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("swap_ab,block_m,block_n,split_k,stages", [(True, 32, 64, 4, 4), (True, 128, 64, 1, 3),
                                                                    (False, 128, 128, 1, 3)])
@pytest.mark.parametrize("m,n,k,group_size", [(256, 4096, 4096, 128), (300, 1000, 1024, 64), (57, 333, 576, 32)])
def test_gpu_gemm_tensor_descriptors(m, n, k, group_size, swap_ab, block_m, block_n, split_k, stages, dtype):
    """The descriptor-fed GEMM with the PTX dequant equals the pointer-fed one, outliers included."""
    x, qw, s, z, b = make_case(m, n, k, group_size, dtype, device="cuda")
    x[:, 5] = 3000.0
    cfg = dict(block_m=block_m, block_n=block_n, block_k=min(128, group_size), swap_ab=swap_ab, unpack="natural",
               ptx_dequant=True, split_k=split_k, num_warps=4 if swap_ab else 8, num_stages=stages)
    assert tma_eligible(x, qw)
    y_ptr, y_tma = poisoned(m, n, dtype, device="cuda"), poisoned(m, n, dtype, device="cuda")
    launch_w4a16_gemm(x, qw, s, z, b, y_ptr, **cfg)
    launch_w4a16_gemm(x, qw, s, z, b, y_tma, tma=True, **cfg)
    torch.cuda.synchronize()
    assert_close_rel(y_tma, w4a16_linear_reference(x, qw, s, z, b))
    assert torch.equal(y_tma, y_ptr)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("unpack", ["frag", "natural"])
@pytest.mark.parametrize("swap_ab,block_m,split_k", [(True, 16, 4), (True, 64, 2), (True, 128, 1), (False, 128, 1)])
@pytest.mark.parametrize("m,n,k,group_size", [(16, 4096, 4096, 128), (300, 1000, 1024, 64), (1, 4096, 14336, 128),
                                              (57, 333, 576, 32)])
def test_gpu_gemm_ptx_dequant(m, n, k, group_size, swap_ab, block_m, split_k, unpack, dtype):
    """Both unpack orders with their fp16/bf16 PTX dequant, outlier activations included."""
    x, qw, s, z, b = make_case(m, n, k, group_size, dtype, device="cuda")
    x[:, 5] = 3000.0
    y = poisoned(m, n, dtype, device="cuda")
    launch_w4a16_gemm(x, qw, s, z, b, y, block_m=block_m, block_n=64, block_k=min(128, group_size), swap_ab=swap_ab,
                      unpack=unpack, ptx_dequant=True, split_k=split_k, num_warps=4, num_stages=3)
    torch.cuda.synchronize()
    assert_close_rel(y, w4a16_linear_reference(x, qw, s, z, b))
    if split_k > 1:  # the last program per tile reduces: the same sum, and the counters back at zero
        y_fused = poisoned(m, n, dtype, device="cuda")
        launch_w4a16_gemm(x, qw, s, z, b, y_fused, block_m=block_m, block_n=64, block_k=min(128, group_size),
                          swap_ab=swap_ab, unpack=unpack, ptx_dequant=True, split_k=split_k, fused_reduce=True,
                          num_warps=4, num_stages=3)
        torch.cuda.synchronize()
        assert torch.equal(y_fused, y) and not counters(y.device, 1).any()


def test_bias_must_be_contiguous_and_float():
    """The kernels read the bias at unit stride and convert it as loaded: a strided view gave wrong
    outputs silently, an int32 bias was taken at small M and an internal torch error at large M.
    Both are named errors of the weight check that modules (and the fused ops' callers) run once."""
    from tinyq.nn import W4A16Linear
    from tinyq.ops.linear import check_w4a16_weight

    x, qw, s, z, _ = make_case(3, 16, 128, 64, torch.float16)
    strided = torch.randn(16, 2, dtype=torch.float16, device=DEV)[:, 0]
    with pytest.raises(ValueError, match="bias must be contiguous"):
        check_w4a16_weight(qw, s, z, strided)
    mod = W4A16Linear.from_quantized(qw, s, z, strided)
    for backend in ("torch", "triton"):
        with force_backend(backend):
            with pytest.raises(ValueError, match="bias must be contiguous"):
                w4a16_linear(x, qw, s, z, strided)
            with pytest.raises(ValueError, match="bias must be contiguous"):
                mod(x)
            with pytest.raises(ValueError, match="bias must be a float tensor, got torch.int32"):
                w4a16_linear(x, qw, s, z, torch.ones(16, dtype=torch.int32, device=DEV))
            with pytest.raises(ValueError, match="0-d"):
                w4a16_linear(torch.tensor(1.0, dtype=torch.float16), qw, s, z)


@pytest.mark.parametrize("bias_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [3, 300])
def test_bias_of_another_float_dtype(m, bias_dtype):
    """A float bias of another dtype works at every M: the GEMV/GEMM kernels convert it as they load
    it, and the large-M path (dequantize + addmm, which takes x's dtype only) converts it first."""
    x, qw, s, z, _ = make_case(m, 16, 128, 64, torch.float16)
    b = torch.randn(16, device=DEV).to(bias_dtype)
    with force_backend("triton"):
        y = w4a16_linear(x, qw, s, z, b)
    assert y.dtype == torch.float16
    assert_close_rel(y, w4a16_linear_reference(x, qw, s, z, b))


def test_module_weights_validated_once_and_again_when_replaced(monkeypatch):
    """``W4A16Linear`` checks its weight tensors once (host cost), again when one is replaced, and
    reads a bias assigned after construction to a bias-less layer (a plain attribute, no buffer)."""
    from tinyq.nn import W4A16Linear
    from tinyq.nn import w4a16_linear as mod_file

    lin = W4A16Linear.from_linear(torch.nn.Linear(128, 24, bias=False).half(), group_size=64)
    x = torch.randn(3, 128, dtype=torch.float16)
    calls = []
    real_check = mod_file.check_w4a16_weight
    monkeypatch.setattr(mod_file, "check_w4a16_weight", lambda *a: calls.append(a) or real_check(*a))
    with force_backend("triton"):
        y = lin(x)
        lin(x)
        assert len(calls) == 1
        assert_close_rel(y, w4a16_linear_reference(x, lin.qweight, lin.scales, lin.zeros))
        lin.bias = torch.randn(24, dtype=torch.float16)
        assert "bias" not in lin._buffers
        y = lin(x)
        assert len(calls) == 2
        assert_close_rel(y, w4a16_linear_reference(x, lin.qweight, lin.scales, lin.zeros, lin.bias))
        lin.scales = lin.scales[:12].clone()
        with pytest.raises(ValueError, match=r"scales must be \[N=24, K/G\]"):
            lin(x)
