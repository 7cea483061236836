"""Functional ops. Each dispatches to a Triton kernel on CUDA and to a torch reference on CPU."""
from tinyq.ops.linear import w4a16_linear, w4a16_linear_reference

__all__ = ["w4a16_linear", "w4a16_linear_reference"]
