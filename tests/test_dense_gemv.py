"""Dense fp16/bf16 GEMV against the float32 reference."""
import pytest
import torch

from tests.tolerances import assert_close_rel
from tinyq.kernels.dense_gemv import dense_gemv, dense_gemv_reference

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,n,k", [(1, 40, 256), (3, 67, 200), (4, 9, 1000)])
def test_dense_gemv(m, n, k, dtype):
    x = torch.randn(m, k, dtype=dtype, device=DEV)
    w = (torch.randn(n, k, device=DEV) * 0.05).to(dtype)
    b = torch.randn(n, dtype=dtype, device=DEV)
    y = dense_gemv(x, w, b, config=dict(block_n=16, block_k=128, num_warps=4, num_stages=2))
    assert_close_rel(y, dense_gemv_reference(x, w, b))


def test_dense_gemv_bad_input():
    x = torch.randn(2, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match="M <= 4"):
        dense_gemv(torch.randn(5, 64, dtype=torch.float16), torch.randn(8, 64, dtype=torch.float16))
    with pytest.raises(ValueError, match="one dtype"):
        dense_gemv(x, torch.randn(8, 64, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="expected x"):
        dense_gemv(x, torch.randn(8, 32, dtype=torch.float16))


@pytest.mark.gpu
@pytest.mark.parametrize("n,k", [(6144, 4096), (4096, 14336), (1000, 576)])
def test_dense_gemv_gpu(n, k):
    x = torch.randn(1, k, dtype=torch.float16, device="cuda")
    w = (torch.randn(n, k, device="cuda") * 0.02).half()
    assert_close_rel(dense_gemv(x, w), dense_gemv_reference(x, w))


@pytest.mark.gpu
def test_dense_linear_decode_path_in_graph(monkeypatch):
    """DenseLinear takes the GEMV at one row (enabled here for this GPU whatever was measured),
    matches F.linear, captures in a graph, and leaves 9 rows to cuBLAS."""
    from tinyq.kernels import dense_gemv as dg
    from tinyq.nn import DenseLinear

    major, minor = torch.cuda.get_device_capability()
    monkeypatch.setitem(dg.USE_ON, f"sm{major}{minor}", [(None, dg.DEFAULT_CONFIG)])
    launches = []
    kernel = dg.dense_gemv
    monkeypatch.setattr(dg, "dense_gemv", lambda *a, **kw: launches.append(a[0].shape) or kernel(*a, **kw))
    lin = DenseLinear(4096, 1000, bias=True, device="cuda", dtype=torch.float16)
    x = torch.randn(1, 1, 4096, dtype=torch.float16, device="cuda")
    ref = torch.nn.functional.linear(x.float(), lin.weight.float(), lin.bias.float())
    assert_close_rel(lin(x), ref)
    assert launches == [(1, 4096)]
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        lin(x)
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        y = lin(x)
    g.replay()
    torch.cuda.synchronize()
    assert_close_rel(y, ref)
    assert len(launches) == 3  # eager warm-up on the side stream and the capture ran the GEMV
    assert_close_rel(lin(x.repeat(1, 9, 1))[:, :1], ref)  # 9 rows: the cuBLAS path
    assert len(launches) == 3


def test_config_for_picks_by_k():
    """Configs are chosen by K: the first bucket whose bound holds, the open-ended one last."""
    from tinyq.kernels import dense_gemv as dg

    for arch, buckets in dg.USE_ON.items():
        assert buckets[-1][0] is None
        assert dg.config_for(arch, 10**6) is buckets[-1][1]
        assert dg.config_for(arch, 1) is buckets[0][1]
    assert dg.config_for("sm90", 576)["block_n"] == 32 and dg.config_for("sm90", 4096) == dg.DEFAULT_CONFIG
