"""Weight quantization: tinyq's int4 format (``format``) and, later, AWQ search."""
from tinyq.quant.format import (
    GROUP_SIZES,
    dequantize_weight,
    fake_quantize,
    from_awq_gemm,
    pack_int4,
    quantize_groupwise,
    quantize_weight,
    to_awq_gemm,
    unpack_int4,
)

__all__ = [
    "GROUP_SIZES",
    "dequantize_weight",
    "fake_quantize",
    "from_awq_gemm",
    "pack_int4",
    "quantize_groupwise",
    "quantize_weight",
    "to_awq_gemm",
    "unpack_int4",
]
