"""The pairing kernel (rows rewritten in the W4A16 GEMV's paired layout) and the plain M = 1 W4A16
call that pairs its input inside a CUDA-graph capture.

On the CPU the kernels run through the interpreter (conftest sets TRITON_INTERPRET=1), and the
capture is simulated (``w4a16_matmul.capturing``); ``test_gpu_cuda_graph_and_compile`` in
``test_w4a16.py`` captures a real graph.
"""
import pytest
import torch

from tests.tolerances import assert_close_rel
from tinyq.kernels import w4a16_configs, w4a16_matmul as matmul_mod
from tinyq.kernels.pair_rows import BLOCK, pair_rows, pair_rows_scaled_reference
from tinyq.kernels.paired import PairedRows, empty_paired_rows, pair_rows_reference, paired_plane, \
    unpair_rows_reference, x_operand
from tinyq.kernels.w4a16_configs import launch_plan, paired_decode, paired_gemv_plan
from tinyq.kernels.w4a16_gemv import launch_w4a16_gemv
from tinyq.kernels.w4a16_matmul import w4a16_linear_reference, w4a16_matmul
from tinyq.quant.format import quantize_weight

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,k", [(1, 32), (3, 576), (2, BLOCK), (1, BLOCK + 96), (2, 3 * BLOCK + 32)])
def test_pair_rows_matches_the_reference_layout(m, k, dtype):
    """Every entry lands where the layout puts it, across program boundaries (K past one BLOCK,
    K not a multiple of it); the plane padding is never written (poisoned, still NaN after)."""
    x = torch.randn(m, k, dtype=dtype, device=DEV)
    out = empty_paired_rows(m, k, dtype, DEV)
    out.data.fill_(float("nan"))
    pair_rows(x, out)
    planes = out.data.view(m, 4, paired_plane(k))
    ref = pair_rows_reference(x).data.view(m, 4, paired_plane(k))
    assert torch.equal(planes[:, :, :k // 4], ref[:, :, :k // 4])
    assert planes[:, :, k // 4:].isnan().all()


def test_pair_rows_of_a_row_view_with_a_wider_stride():
    """A row of a wider tensor (row stride != K) is read at its stride."""
    wide = torch.randn(3, 640, dtype=torch.float16, device=DEV)
    x = wide[:, :576]
    got = pair_rows(x).data.view(3, 4, -1)[:, :, :144]
    assert torch.equal(got, pair_rows_reference(x.contiguous()).data.view(3, 4, -1)[:, :, :144])


def test_pair_rows_rejects_what_it_cannot_pair():
    """K not a multiple of 32, a strided row, an ``out`` of another K, dtype or too few rows: named
    errors, never a silent cast or a write past the buffer."""
    with pytest.raises(ValueError, match="multiple of 32 entries per row, this one has 40"):
        pair_rows(torch.randn(1, 40, dtype=torch.float16, device=DEV))
    with pytest.raises(ValueError, match=r"unit stride along K \(strides \(1, 2\)\)"):
        pair_rows(torch.randn(64, 2, dtype=torch.float16, device=DEV).t())
    x = torch.randn(2, 64, dtype=torch.float16, device=DEV)
    for out, what in ((empty_paired_rows(2, 32, torch.float16, DEV), "32 inputs"),
                      (empty_paired_rows(2, 64, torch.bfloat16, DEV), "torch.bfloat16"),
                      (empty_paired_rows(1, 64, torch.float16, DEV), "1 rows")):
        with pytest.raises(ValueError, match=f"pair_rows: out .*{what}"):
            pair_rows(x, out)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,k", [(1, 32), (3, 576), (1, BLOCK + 96), (2, 3 * BLOCK + 32)])
def test_scaled_pairs_hold_each_row_over_a_power_of_two(m, k, dtype):
    """``scaled``: fp16 pairs whose largest entry lies in [2^14, 2^15), a float32 power of two per row
    that gives the input back exactly, as the reference writes them; the padding is never written."""
    x = torch.randn(m, k, dtype=dtype, device=DEV) * torch.logspace(-3, 3, m, device=DEV)[:, None].to(dtype)
    out = empty_paired_rows(m, k, torch.float16, DEV)
    out = out._replace(scale=torch.full((m,), float("nan"), device=DEV))
    out.data.fill_(float("nan"))
    pair_rows(x, out, scaled=True)
    planes = out.data.view(m, 4, paired_plane(k))
    ref = pair_rows_scaled_reference(x)
    assert torch.equal(planes[:, :, :k // 4], ref.data.view(m, 4, -1)[:, :, :k // 4])
    assert planes[:, :, k // 4:].isnan().all()
    assert torch.equal(out.scale, ref.scale)
    assert torch.equal(out.scale.log2(), out.scale.log2().round())
    back = unpair_rows_reference(PairedRows(out.data.float(), k)) * out.scale[:, None]
    assert torch.equal(back, x.float())
    peak = unpair_rows_reference(out).float().abs().amax(dim=1)
    assert ((peak >= 2 ** 14) & (peak < 2 ** 15)).all()


def test_scaled_pairs_of_extreme_rows():
    """A row of zeros, one far above fp16's range and one far below it are held exactly; in a row
    with an inf the inf stays inf and the finite entries (2^-114 of it) flush to 0; a row whose
    maximum is a float32 subnormal gets the capped scale 2^-126 (whether the subnormal itself
    survives depends on the arithmetic's denormal mode); no NaN appears and the scales stay normal."""
    k = 64
    x = torch.randn(5, k, dtype=torch.float32, device=DEV)
    x[0] = 0
    x[1] *= 1e30
    x[2] *= 1e-30
    x[3, 5] = float("inf")
    x[4] = 0
    x[4, 3] = 1e-40  # a float32 subnormal: the scale is capped at 2^126
    x = x.to(torch.bfloat16)
    got = pair_rows(x, scaled=True)
    ref = pair_rows_scaled_reference(x)
    assert torch.equal(got.scale, ref.scale) and (got.scale > 0).all() and torch.isfinite(got.scale).all()
    back = unpair_rows_reference(got).float() * got.scale[:, None]
    assert torch.equal(back[[0, 1, 2]], x[[0, 1, 2]].float())
    assert back[3, 5] == float("inf") and not back.isnan().any()
    assert (back[3, :5] == 0).all() and (back[3, 6:] == 0).all()
    assert got.scale[4] == 2.0 ** -126


def test_a_nan_row_gives_nan_outputs_and_spares_the_others():
    """A NaN in one row: the row maximum skips it (kernel and reference alike), the NaN reaches that
    row's outputs through the GEMV, and the other row is unaffected."""
    qw, s, z = (t.to(DEV) for t in quantize_weight(torch.randn(16, 64) * 0.02, 32, torch.bfloat16))
    x = torch.randn(2, 64, device=DEV).to(torch.bfloat16)
    x[1, 9] = float("nan")
    got = pair_rows(x, scaled=True)
    ref = pair_rows_scaled_reference(x)
    assert torch.equal(got.scale, ref.scale) and torch.isfinite(got.scale).all()
    assert torch.equal(unpair_rows_reference(got).isnan(), x.isnan())
    assert torch.equal(unpair_rows_reference(got)[0], unpair_rows_reference(ref)[0])
    y = launch_w4a16_gemv(got, qw, s, z, None, torch.empty(2, 16, dtype=torch.bfloat16, device=DEV), block_n=8,
                          block_k=64, num_warps=4, num_stages=2, ptx_dequant=True)
    assert y[1].isnan().all()
    assert_close_rel(y[:1], w4a16_linear_reference(x[:1], qw, s, z))


def test_scaled_pairs_at_the_top_of_the_range_do_not_overflow():
    """The worst case of the fp16 dot on scaled pairs: every x at the top of a binade (all mantissa
    bits set: scaled to 2^15 - 2^7 from bf16, 2^15 - 2^4 from fp16) with one sign, every weight
    (q - z) = 15 with that sign, so each fp16 pair sum of the GEMV reaches 2 * 15/16 * 32752 = 61410
    (fp16 overflows at 65520). The result is finite and matches the float32 reference, on the PTX
    dot on a GPU."""
    n, k = 24, 512
    qw = torch.full((n, k // 8), -1, dtype=torch.int32, device=DEV)  # every nibble 15
    s = torch.full((n, k // 128), 2.0 ** -20, dtype=torch.bfloat16, device=DEV)
    z = torch.zeros(n, k // 128, dtype=torch.bfloat16, device=DEV)
    for x_dtype, top, scaled_top in ((torch.bfloat16, torch.finfo(torch.bfloat16).max, 32640.0),
                                     (torch.bfloat16, 32640.0, 32640.0), (torch.float16, 2 - 2 ** -10, 32752.0)):
        x = torch.full((2, k), top, device=DEV).to(x_dtype)
        x[1] = -x[1]
        got = pair_rows(x, scaled=True)
        assert unpair_rows_reference(got).float().abs().max() == scaled_top
        y = torch.full((2, n), float("nan"), dtype=x_dtype, device=DEV)
        launch_w4a16_gemv(got, qw, s.to(x_dtype), z.to(x_dtype), None, y, block_n=8, block_k=256, num_warps=4,
                          num_stages=2, ptx_dequant=True)
        assert_close_rel(y, w4a16_linear_reference(x, qw, s.to(x_dtype), z.to(x_dtype)))


def test_scaled_rows_are_refused_where_the_scale_is_not_applied():
    """The fused GEMVs read paired rows without a scale; handed scaled ones they refuse rather than
    return results off by a power of two."""
    x = torch.randn(1, 64, dtype=torch.bfloat16, device=DEV)
    with pytest.raises(ValueError, match="without a per-row scale"):
        x_operand(pair_rows(x, scaled=True))
    assert x_operand(pair_rows(x, scaled=True), scaled_ok=True)[1] == paired_plane(64) // 2
    with pytest.raises(ValueError, match="scaled=True needs an out with a contiguous float32 scale"):
        pair_rows(x, empty_paired_rows(1, 64, torch.float16, DEV), scaled=True)
    strided = empty_paired_rows(2, 64, torch.float16, DEV)._replace(scale=torch.empty(4, device=DEV)[::2])
    with pytest.raises(ValueError, match="contiguous float32 scale of at least 2 rows"):
        pair_rows(torch.cat([x, x]), strided, scaled=True)
    with pytest.raises(ValueError, match="to be written as scaled float16"):
        pair_rows(x, empty_paired_rows(1, 64, torch.bfloat16, DEV), scaled=True)
    with pytest.raises(ValueError, match="must be fp16 or bf16, got torch.float32"):
        pair_rows(x.float(), scaled=True)
    with pytest.raises(ValueError, match="at most 32768 inputs in one program, x has 32800"):
        pair_rows(torch.zeros(1, 32800, dtype=torch.bfloat16, device=DEV), scaled=True)


@pytest.mark.parametrize("x_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize("m,n,k,group", [(1, 67, 576, 64), (2, 40, 256, 32), (3, 9, 1024, 128), (5, 33, 384, 64)])
def test_gemv_on_scaled_pairs(m, n, k, group, rows, x_dtype):
    """The GEMV on scaled fp16 pairs applies each row's scale, with one or several rows a program
    (a last group of fewer rows reads its clamped row's scale, stores nothing past M): rows of very
    different size (one with a 1e5 outlier, past fp16's range) match the float32 reference to the
    output dtype's rounding, for the plain Triton path and (on a GPU) the fp16 PTX dot."""
    qw, s, z = (t.to(DEV) for t in quantize_weight(torch.randn(n, k) * 0.02, group, x_dtype))
    b = torch.randn(n, dtype=x_dtype, device=DEV)
    x = torch.randn(m, k, device=DEV) * torch.logspace(-2, 2, m, device=DEV)[:, None]
    if x_dtype == torch.bfloat16:
        x[-1, 3] = 1e5
    x = x.to(x_dtype)
    ref = w4a16_linear_reference(x, qw, s, z, b)
    for ptx in (False, True) if DEV == "cuda" else (False,):  # the interpreter runs no PTX
        y = torch.full((m + 1, n), float("nan"), dtype=x_dtype, device=DEV)
        launch_w4a16_gemv(pair_rows(x, scaled=True), qw, s, z, b, y[:m], block_n=8, block_k=256, num_warps=4,
                          num_stages=2, ptx_dequant=ptx, rows=rows)
        for r in range(m):  # each row against its own size: a row's error must not scale with another's
            assert_close_rel(y[r:r + 1], ref[r:r + 1])
        assert y[m].isnan().all()


def test_plain_pairing_follows_the_paired_decode_table(monkeypatch):
    """Pairing a lone row in graphs is on where the fused decode ops pair (an sm90 device), off
    elsewhere, and follows the table when it is patched."""
    monkeypatch.setattr(w4a16_configs, "_ARCHS", {})
    monkeypatch.setattr(w4a16_configs, "gpu_arch", lambda device: "sm90" if device.index == 0 else "sm80")
    assert paired_decode(0) and not paired_decode(1) and not paired_decode(-1)
    monkeypatch.setitem(w4a16_configs.PAIRED_DECODE, "sm90", False)
    assert not paired_decode(0)


def test_paired_plan_takes_16_rows_for_bf16_only():
    base = w4a16_configs.launch_plan(1, torch.float16, -1)[1]
    assert paired_gemv_plan(1, torch.float16, -1) == base
    assert paired_gemv_plan(1, torch.bfloat16, -1) == dict(w4a16_configs.launch_plan(1, torch.bfloat16, -1)[1],
                                                           block_n=16)
    assert paired_gemv_plan(2, torch.float16, -1) == dict(base, rows=2)  # two rows a program
    assert w4a16_configs.launch_plan(2, torch.float16, -1)[0] == "gemm"  # unpaired, M = 2 keeps the GEMM
    with pytest.raises(ValueError, match=r"takes \[1, 2\] rows, not 3"):
        paired_gemv_plan(3, torch.float16, -1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k,group", [(576, 64), (256, 128), (96, 32)])
def test_plain_call_pairs_its_input_in_a_capture_and_once_eagerly(monkeypatch, dtype, k, group):
    """With pairing on for this device, one row goes through the pairing kernel and the paired GEMV
    plan inside a capture, and at the first eager call of its shape (the warm-up that compiles the
    paired kernels before any capture), giving exactly what that GEMV gives on a pre-paired input.
    Later eager calls, and 3 rows, are not paired."""
    monkeypatch.setattr(matmul_mod, "paired_decode", lambda device_index: True)  # as on sm90
    monkeypatch.setattr(matmul_mod, "_PAIRED_WARM", set())
    calls, plans = [], []
    monkeypatch.setattr(matmul_mod, "pair_rows", lambda x, **kw: calls.append(x.shape) or pair_rows(x, **kw))
    real_gemv = matmul_mod.launch_w4a16_gemv
    monkeypatch.setattr(matmul_mod, "launch_w4a16_gemv", lambda *a, **kw: plans.append(kw) or real_gemv(*a, **kw))
    qw, s, z = (t.to(DEV) for t in quantize_weight(torch.randn(67, k) * 0.02, group, dtype))
    b = torch.randn(67, dtype=dtype, device=DEV)
    x = torch.randn(1, k, dtype=dtype, device=DEV)
    ref = w4a16_linear_reference(x, qw, s, z, b)
    expect = torch.full((1, 67), float("nan"), dtype=dtype, device=DEV)
    # bf16 rows go as scaled fp16 pairs through the fp16 plan (w4a16_configs.PAIRED_BF16_AS_FP16)
    paired_plan = paired_gemv_plan(1, torch.float16, x.get_device())
    pairs = pair_rows_scaled_reference(x) if dtype == torch.bfloat16 else pair_rows_reference(x)
    launch_w4a16_gemv(pairs, qw, s, z, b, expect, **paired_plan)
    assert paired_plan["block_n"] == 8

    monkeypatch.setattr(matmul_mod, "capturing", lambda x: False)
    assert torch.equal(w4a16_matmul(x, qw, s, z, b), expect)  # the first eager call: paired
    assert calls == [(1, k)] and plans[-1] == paired_plan
    assert_close_rel(w4a16_matmul(x, qw, s, z, b), ref)  # later ones: natural
    assert calls == [(1, k)] and plans[-1] == launch_plan(1, dtype, x.get_device())[1]

    monkeypatch.setattr(matmul_mod, "capturing", lambda x: True)
    y = w4a16_matmul(x, qw, s, z, b)
    assert calls == [(1, k)] * 2 and plans[-1] == paired_plan
    assert torch.equal(y, expect)
    assert_close_rel(y, ref)

    x3 = torch.randn(3, k, dtype=dtype, device=DEV)
    assert_close_rel(w4a16_matmul(x3, qw, s, z, b), w4a16_linear_reference(x3, qw, s, z, b))
    assert calls == [(1, k)] * 2

    # two rows: in a capture, the GEMV of two rows a program on paired x
    x2 = torch.randn(2, k, dtype=dtype, device=DEV)
    ref2 = w4a16_linear_reference(x2, qw, s, z, b)
    y2 = w4a16_matmul(x2, qw, s, z, b)
    assert calls == [(1, k)] * 2 + [(2, k)] and plans[-1] == paired_gemv_plan(2, torch.float16, x.get_device())
    assert plans[-1]["rows"] == 2
    assert_close_rel(y2, ref2)
    # eagerly: the first call of the shape paired (the warm-up), later ones the M = 2 GEMM
    monkeypatch.setattr(matmul_mod, "capturing", lambda x: False)
    monkeypatch.setattr(matmul_mod, "_PAIRED_WARM", set())
    n_plans = len(plans)
    assert torch.equal(w4a16_matmul(x2, qw, s, z, b), y2)
    assert calls[-1] == (2, k) and len(plans) == n_plans + 1
    assert_close_rel(w4a16_matmul(x2, qw, s, z, b), ref2)
    assert len(calls) == 4 and len(plans) == n_plans + 1


def test_bf16_pairs_stay_bf16_when_the_table_says_so(monkeypatch):
    """With ``PAIRED_BF16_AS_FP16`` off, a captured bf16 row is paired as bf16 and takes the
    16-row bf16 plan."""
    monkeypatch.setattr(matmul_mod, "paired_decode", lambda device_index: True)
    monkeypatch.setattr(matmul_mod, "capturing", lambda x: True)
    monkeypatch.setattr(w4a16_configs, "PAIRED_BF16_AS_FP16", False)
    plans = []
    real_gemv = matmul_mod.launch_w4a16_gemv
    monkeypatch.setattr(matmul_mod, "launch_w4a16_gemv",
                        lambda x, *a, **kw: plans.append((x.data.dtype, x.scale, kw)) or real_gemv(x, *a, **kw))
    qw, s, z = (t.to(DEV) for t in quantize_weight(torch.randn(33, 256) * 0.02, 64, torch.bfloat16))
    x = torch.randn(1, 256, dtype=torch.bfloat16, device=DEV)
    assert_close_rel(w4a16_matmul(x, qw, s, z), w4a16_linear_reference(x, qw, s, z))
    assert plans == [(torch.bfloat16, None, paired_gemv_plan(1, torch.bfloat16, x.get_device()))]
    assert plans[0][2]["block_n"] == 16
