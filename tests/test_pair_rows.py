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
from tinyq.kernels.pair_rows import BLOCK, pair_rows
from tinyq.kernels.paired import empty_paired_rows, pair_rows_reference, paired_plane
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
    assert paired_gemv_plan(torch.float16, -1) == base
    assert paired_gemv_plan(torch.bfloat16, -1) == dict(w4a16_configs.launch_plan(1, torch.bfloat16, -1)[1], block_n=16)


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
    monkeypatch.setattr(matmul_mod, "pair_rows", lambda x: calls.append(x.shape) or pair_rows(x))
    real_gemv = matmul_mod.launch_w4a16_gemv
    monkeypatch.setattr(matmul_mod, "launch_w4a16_gemv", lambda *a, **kw: plans.append(kw) or real_gemv(*a, **kw))
    qw, s, z = (t.to(DEV) for t in quantize_weight(torch.randn(67, k) * 0.02, group, dtype))
    b = torch.randn(67, dtype=dtype, device=DEV)
    x = torch.randn(1, k, dtype=dtype, device=DEV)
    ref = w4a16_linear_reference(x, qw, s, z, b)
    expect = torch.full((1, 67), float("nan"), dtype=dtype, device=DEV)
    paired_plan = paired_gemv_plan(dtype, x.get_device())
    launch_w4a16_gemv(pair_rows_reference(x), qw, s, z, b, expect, **paired_plan)
    assert paired_plan["block_n"] == (16 if dtype == torch.bfloat16 else 8)

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
