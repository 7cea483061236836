"""Drop-in ``nn.Module`` layers."""
from tinyq.nn.w4a16_linear import W4A16Linear

__all__ = ["W4A16Linear"]
