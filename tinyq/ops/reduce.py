"""Functional reductions used by device-side sampling."""
from __future__ import annotations

import torch

from tinyq.backend import use_triton
from tinyq.kernels.argmax import argmax as _argmax_triton
from tinyq.kernels.argmax import argmax_reference


def argmax(x: torch.Tensor, nan_marker: bool = False) -> torch.Tensor:
    """int64 ``[1]``: the index of the largest entry of the 1-D ``x`` (the first one on ties; a NaN
    is the largest, or gives -1 with ``nan_marker``). One Triton launch on a GPU (safe inside a CUDA
    graph); torch on a CPU."""
    if use_triton(x) and x.dim() == 1:
        return _argmax_triton(x if x.stride(0) == 1 else x.contiguous(), nan_marker=nan_marker)
    return argmax_reference(x, nan_marker)
