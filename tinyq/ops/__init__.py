"""Functional ops. Each dispatches to a Triton kernel on CUDA and to a torch reference on CPU."""
from tinyq.ops.attention import attention_with_cache, flash_attention
from tinyq.ops.linear import w4a16_linear, w4a16_linear_reference
from tinyq.ops.norm import add_rms_norm, rms_norm, silu_mul

__all__ = [
    "add_rms_norm", "attention_with_cache", "flash_attention", "rms_norm", "silu_mul", "w4a16_linear",
    "w4a16_linear_reference",
]
