"""Output buffers wrong in one way each, for the launchers' ``out=`` checks."""
import torch

WRONG_OUTS = ("dtype", "bigger", "smaller", "device", "strided")


def wrong_out(kind: str, shape, dtype, backing: torch.Tensor) -> torch.Tensor:
    """An ``out=`` for an op whose output is ``shape`` in ``dtype``, wrong by ``kind``. The smaller one
    is a view of the front of ``backing`` (zeros), so a write past its end would show in ``backing``."""
    dev = backing.device
    other = torch.float32 if dtype != torch.float32 else torch.float16
    if kind == "dtype":
        return torch.zeros(shape, dtype=other, device=dev)
    if kind == "bigger":
        return torch.zeros((shape[0] + 1, *shape[1:]), dtype=dtype, device=dev)
    if kind == "smaller":
        return backing[: shape[-1]].view(1, 1, 1, shape[-1])
    if kind == "device":
        return torch.zeros(shape, dtype=dtype, device="meta")
    if kind == "strided":
        return torch.zeros((*shape[:-1], 2 * shape[-1]), dtype=dtype, device=dev)[..., ::2]
    raise ValueError(f"unknown kind {kind!r}")
