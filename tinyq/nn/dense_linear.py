"""``DenseLinear``: ``nn.Linear`` whose decode-sized calls (<= 4 rows) on a GPU where it was
measured faster run tinyq's dense GEMV instead of cuBLAS (:mod:`tinyq.kernels.dense_gemv`).

It is an ``nn.Linear`` subclass with the same parameters and state-dict names, so checkpoints,
``isinstance`` checks and ``quantize_`` treat it as a plain linear layer.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from tinyq.backend import gpu_arch
from tinyq.kernels import dense_gemv as _dg


def _dense_gemv_impl(x, weight, bias, config_key: str):
    return _dg.dense_gemv(x, weight, bias, config=_dg.config_for(config_key, weight.shape[1]))


@torch.library.custom_op("tinyq::dense_gemv", mutates_args=())
def _dense_gemv_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], config_key: str) -> torch.Tensor:
    return _dense_gemv_impl(x, weight, bias, config_key)


@_dense_gemv_op.register_fake
def _(x, weight, bias, config_key):
    return x.new_empty(x.shape[0], weight.shape[0])


_ARCH: dict = {}


def _arch(x: torch.Tensor) -> str:
    """``backend.gpu_arch`` of x's device, looked up once per device (not a driver query per call)."""
    index = x.get_device()
    key = _ARCH.get(index)
    if key is None:
        key = _ARCH[index] = gpu_arch(x.device)
    return key


class DenseLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if x.is_cuda and x.dtype == w.dtype and x.dtype in (torch.float16, torch.bfloat16) and x.shape[-1] == w.shape[1]:
            rows = x.numel() // x.shape[-1]
            key = _arch(x)
            if rows <= _dg.MAX_M and key in _dg.USE_ON and w.is_contiguous():
                op = _dense_gemv_op if torch.compiler.is_compiling() else _dense_gemv_impl  # no dispatcher in eager
                y = op(x.reshape(rows, x.shape[-1]).contiguous(), w, self.bias, key)
                return y.reshape(*x.shape[:-1], w.shape[0])
        return F.linear(x, w, self.bias)
