"""One-launch argmax (greedy sampling) vs torch's argmax, and the sampler using it."""
import pytest
import torch

from tinyq.backend import force_backend
from tinyq.kernels.argmax import BLOCK, argmax, argmax_reference
from tinyq.kernels.semaphore import counters

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("n", [1, 7, BLOCK, BLOCK + 1, 3 * BLOCK - 5, 49152])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_argmax_matches_torch(n, dtype):
    x = torch.randn(n, device=DEV).to(dtype)
    out = torch.full((1,), -7, dtype=torch.int64, device=DEV)  # poisoned
    with force_backend("triton"):
        got = argmax(x, out=out)
    assert got is out and int(got) == int(argmax_reference(x))
    assert int(counters(x.device, 1)[0]) == 0  # the last program left its counter at zero


@pytest.mark.parametrize("where", [(3, 3 * BLOCK - 9), (BLOCK + 4, 2 * BLOCK + 4), (0, 5)])
def test_ties_go_to_the_first_index(where):
    x = torch.zeros(3 * BLOCK, dtype=torch.float16, device=DEV)
    for i in where:
        x[i] = 9.0
    with force_backend("triton"):
        assert int(argmax(x)) == min(where) == int(torch.argmax(x.float()))


def test_all_negative_infinity_but_one():
    x = torch.full((2 * BLOCK + 3,), float("-inf"), device=DEV)
    x[2 * BLOCK + 1] = -1e30
    with force_backend("triton"):
        assert int(argmax(x)) == 2 * BLOCK + 1


@pytest.mark.parametrize("nans", [(5,), (BLOCK + 7, 2 * BLOCK + 1), (2 * BLOCK + 1, BLOCK + 7, 9)])
def test_nan_wins_like_torch(nans):
    """A NaN logit gives torch's answer (the first NaN), a valid index, never garbage."""
    x = torch.randn(3 * BLOCK, device=DEV).half()
    x[BLOCK] = float("inf")
    for i in nans:
        x[i] = float("nan")
    with force_backend("triton"):
        assert int(argmax(x)) == min(nans) == int(torch.argmax(x.float()))


@pytest.mark.parametrize("nans", [(), (5,), (BLOCK + 7, 2 * BLOCK + 1)])
def test_nan_marker(nans):
    """With nan_marker a NaN gives -1 (what the sampler turns into an error), on both paths."""
    x = torch.randn(3 * BLOCK, device=DEV).half()
    for i in nans:
        x[i] = float("nan")
    want = -1 if nans else int(torch.argmax(x.float()))
    assert int(argmax_reference(x, nan_marker=True)) == want
    with force_backend("triton"):
        assert int(argmax(x, nan_marker=True)) == want


def test_bad_input():
    with force_backend("triton"):
        with pytest.raises(ValueError, match="1-D"):
            argmax(torch.randn(2, 3, device=DEV))
        with pytest.raises(ValueError, match="fp16/bf16/fp32"):
            argmax(torch.ones(4, dtype=torch.int32, device=DEV))


def test_greedy_sampler_on_the_kernel_matches_torch():
    from tinyq.generate import make_config
    from tinyq.sampling import Sampler, sampler_key

    logits = torch.randn(3000, device=DEV).half()
    for cfg in (make_config(temperature=0.0), make_config(temperature=0.0, repetition_penalty=1.3)):
        key = sampler_key(cfg, logits.numel())
        want = int(Sampler(key, logits.device).load(cfg, [int(torch.argmax(logits))])(logits))
        with force_backend("triton"):
            got = int(Sampler(key, logits.device).load(cfg, [int(torch.argmax(logits))])(logits))
        assert got == want
