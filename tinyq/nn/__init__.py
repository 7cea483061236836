"""Drop-in ``nn.Module`` layers and their safetensors I/O."""
from tinyq.nn.dense_linear import DenseLinear
from tinyq.nn.io import load_safetensors, save_safetensors
from tinyq.nn.w4a16_linear import W4A16Linear
from tinyq.nn.w8a8_linear import W8A8Linear

__all__ = ["DenseLinear", "W4A16Linear", "W8A8Linear", "load_safetensors", "save_safetensors"]
