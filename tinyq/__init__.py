"""tinyq: Triton kernels and a runtime for 4-bit LLMs and VLMs, with nothing to compile."""
from tinyq.nn import W4A16Linear, W8A8Linear
from tinyq.quant.smoothquant import smooth_
from tinyq.quantize import W4A16Config, W8A8Config, quantize_

__version__ = "0.1.0"
__all__ = ["W4A16Config", "W4A16Linear", "W8A8Config", "W8A8Linear", "quantize_", "smooth_", "__version__"]
