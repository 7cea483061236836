"""The pairing kernel (rows rewritten in the W4A16 GEMV's paired layout) and the plain M = 1 W4A16
call that pairs its input inside a CUDA-graph capture.

On the CPU the kernels run through the interpreter (conftest sets TRITON_INTERPRET=1), and the
capture is simulated (``w4a16_matmul.capturing``); the `gpu` test captures a real graph.
"""
import pytest
import torch

from tests.tolerances import assert_close_rel
from tinyq.kernels import w4a16_configs, w4a16_matmul as matmul_mod
from tinyq.kernels.pair_rows import BLOCK, pair_rows
from tinyq.kernels.paired import empty_paired_rows, pair_rows_reference, paired_plane
from tinyq.kernels.w4a16_configs import pair_plain_gemv, paired_gemv_plan
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


def test_pair_rows_rejects_k_off_the_block_size():
    with pytest.raises(ValueError, match="multiple of 32 entries per row, this one has 40"):
        pair_rows(torch.randn(1, 40, dtype=torch.float16, device=DEV))


def test_plain_pairing_follows_the_paired_decode_table():
    """Pairing a lone row in graphs is on where the fused decode ops pair (sm90), off elsewhere."""
    assert pair_plain_gemv(-1) is w4a16_configs.PAIRED_DECODE["default"] is False
    assert w4a16_configs.PAIRED_DECODE["sm90"] is True


def test_paired_plan_takes_16_rows_for_bf16_only():
    base = w4a16_configs.launch_plan(1, torch.float16, -1)[1]
    assert paired_gemv_plan(torch.float16, -1) == base
    assert paired_gemv_plan(torch.bfloat16, -1) == dict(w4a16_configs.launch_plan(1, torch.bfloat16, -1)[1], block_n=16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k,group", [(576, 64), (256, 128), (96, 32)])
def test_plain_call_pairs_its_input_only_in_a_capture(monkeypatch, dtype, k, group):
    """With pairing on for this device: one row inside a capture goes through the pairing kernel and
    the paired GEMV plan, and gives exactly what that GEMV gives on a pre-paired input; outside a
    capture, or with 3 rows, nothing is paired."""
    monkeypatch.setattr(matmul_mod, "pair_plain_gemv", lambda device_index: True)  # as on sm90
    calls = []
    monkeypatch.setattr(matmul_mod, "pair_rows", lambda x: calls.append(x.shape) or pair_rows(x))
    qw, s, z = (t.to(DEV) for t in quantize_weight(torch.randn(67, k) * 0.02, group, dtype))
    b = torch.randn(67, dtype=dtype, device=DEV)
    x = torch.randn(1, k, dtype=dtype, device=DEV)
    ref = w4a16_linear_reference(x, qw, s, z, b)

    monkeypatch.setattr(matmul_mod, "capturing", lambda: False)
    assert_close_rel(w4a16_matmul(x, qw, s, z, b), ref)
    assert calls == []

    monkeypatch.setattr(matmul_mod, "capturing", lambda: True)
    y = w4a16_matmul(x, qw, s, z, b)
    assert calls == [(1, k)]
    expect = torch.full((1, 67), float("nan"), dtype=dtype, device=DEV)
    launch_w4a16_gemv(pair_rows_reference(x), qw, s, z, b, expect, **paired_gemv_plan(dtype, x.get_device()))
    assert torch.equal(y, expect)
    assert_close_rel(y, ref)

    x3 = torch.randn(3, k, dtype=dtype, device=DEV)
    assert_close_rel(w4a16_matmul(x3, qw, s, z, b), w4a16_linear_reference(x3, qw, s, z, b))
    assert calls == [(1, k)]
