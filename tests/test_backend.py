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


@pytest.mark.parametrize("hip, capability, arch, flash_table", [
    (None, (9, 0), "sm90", "sm90"),  # H100 / H200: the tuned attention tiles
    (None, (8, 0), "sm80", "default"),
    (None, (12, 0), "sm120", "default"),
    ("6.2.4", (9, 4), "hip", "default"),  # MI300 reports 9.4: not an H100
])
def test_gpu_arch_keys_the_config_tables(monkeypatch, hip, capability, arch, flash_table):
    from tinyq.kernels import attention_configs as ac

    monkeypatch.setattr(torch.version, "hip", hip)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    cuda = torch.device("cuda")
    assert backend.gpu_arch(cuda) == arch and backend.gpu_arch("cpu") == "cpu"
    assert ac.flash_config(128, cuda) == ac.FLASH[flash_table][128]
    assert ac.decode_config(128, cuda) == ac.DECODE.get(flash_table, ac.DECODE["default"])[128]
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert ac.flash_config(128, torch.device("cpu")) == ac.FLASH["interpret"][128]


def test_flash_config_exact_head_dim_wins(monkeypatch):
    """An exact head_dim entry (SigLIP's 72 on sm90) wins over its padded width; 80, with no entry
    of its own, takes the padded 128's."""
    from tinyq.kernels import attention_configs as ac

    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    cuda = torch.device("cuda")
    assert ac.flash_config(128, cuda, 72) == ac.FLASH["sm90"][72] != ac.FLASH["sm90"][128]
    assert ac.flash_config(128, cuda, 80) == ac.FLASH["sm90"][128]
    assert ac.flash_config(128, cuda) == ac.FLASH["sm90"][128]


def test_uninitialized_memory_is_poisoned_in_tests():
    """conftest's poison reaches what the launchers allocate (torch.empty / empty_like by attribute)."""
    import tinyq.kernels.silu_mul as silu_mul_kernel

    assert silu_mul_kernel.torch.empty(3).isnan().all()
    assert torch.empty_like(torch.zeros(2, dtype=torch.int8)).eq(-128).all()


def _eager_op_calls():
    """(module, custom-op attribute, call) for every op whose eager call must reach the launcher
    without the custom-op dispatcher (its autograd wrapper cost more host time than the launch)."""
    from tinyq.ops import attention, layer_norm, norm

    x = torch.randn(3, 64)
    w, b = torch.rand(64) + 0.5, torch.randn(64)
    q = torch.randn(1, 5, 2, 16, dtype=torch.float16)
    return [
        (layer_norm, "_layer_norm_op", lambda: layer_norm.layer_norm(x, w, b, 1e-5)),
        (layer_norm, "_add_layer_norm_op", lambda: layer_norm.add_layer_norm(x, x, w, b, 1e-5)),
        (norm, "_rms_norm_op", lambda: norm.rms_norm(x, w, 1e-5)),
        (norm, "_add_rms_norm_op", lambda: norm.add_rms_norm(x, x, w, 1e-5)),
        (norm, "_silu_mul_op", lambda: norm.silu_mul(x)),
        (attention, "_flash_attention_op", lambda: attention.flash_attention(q, q, q, causal=False)),
    ]


@pytest.mark.parametrize("index", range(6))
def test_eager_calls_skip_the_custom_op_dispatcher(monkeypatch, index):
    module, name, call = _eager_op_calls()[index]

    def dispatched(*args, **kwargs):
        raise AssertionError(f"{module.__name__}.{name} went through the custom-op dispatcher in eager mode")

    monkeypatch.setattr(module, name, dispatched)
    with backend.force_backend("triton"):
        out = call()
    first = out[0] if isinstance(out, tuple) else out
    assert torch.isfinite(first).all()
