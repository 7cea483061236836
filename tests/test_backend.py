"""Backend selection: where Triton runs, and where inline PTX may be used."""
import pytest
import torch

from tinyq import backend


@pytest.mark.parametrize("device, hip, target, interpret, expected", [
    ("cuda", None, "cuda", "0", True),  # NVIDIA
    ("cuda:1", None, "cuda", "0", True),
    ("cuda", "6.2.4", "hip", "0", False),  # ROCm: torch still says "cuda"
    ("cuda", "6.2.4", "cuda", "0", False),  # a HIP build of torch whatever Triton reports
    ("cuda", None, "hip", "0", False),  # Triton targets AMD
    ("cuda", None, "cuda", "1", False),  # the interpreter runs no PTX
    ("cpu", None, "cuda", "0", False),
    (torch.device("cpu"), None, "cuda", "1", False),
])
def test_ptx_only_on_nvidia(monkeypatch, device, hip, target, interpret, expected):
    monkeypatch.setattr(torch.version, "hip", hip)
    monkeypatch.setattr(backend, "triton_target_backend", lambda: target)
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    assert backend.ptx_supported(device) is expected


def test_force_backend_selects_triton_on_cpu_only_when_interpreting(monkeypatch):
    t = torch.zeros(1)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with backend.force_backend("triton"):
        assert backend.use_triton(t)
    with backend.force_backend("torch"):
        assert not backend.use_triton(t)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with backend.force_backend("triton"):
        assert not backend.use_triton(t)
    with pytest.raises(ValueError, match="backend 'cuda' is not one of"):
        with backend.force_backend("cuda"):
            pass


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_ptx_supported_on_this_gpu():
    """On the lent NVIDIA GPU PTX is allowed; on a ROCm GPU it is not."""
    assert backend.ptx_supported("cuda") is (torch.version.hip is None)
