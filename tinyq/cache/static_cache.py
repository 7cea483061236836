"""A static (pre-allocated) KV cache that CUDA graphs can capture."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

CACHE_DTYPES = (torch.float16, torch.bfloat16)


class StaticKVCache:
    """Keys and values of every layer, allocated once for ``max_seq_len`` tokens.

    Layout (two tensors, ``k`` and ``v``, same shape and dtype)::

        k, v: [num_layers, batch_size, num_kv_heads, max_seq_len, head_dim], contiguous

    One (layer, batch row, kv head) is a contiguous ``[max_seq_len, head_dim]`` slab, so an
    attention kernel streams a block of ``BLOCK_N`` consecutive positions with unit-stride,
    fully coalesced loads (``BLOCK_N * head_dim * 2`` bytes, e.g. 16 KiB for 64 x 128 fp16),
    and a decode program of one kv head reads one slab for all the query heads of its group.

    Positions ``[0, length)`` hold valid entries; anything past them is stale and never read.
    The fill level is kept twice: ``length`` (host int, for checks and shapes) and ``seq_pos``
    (device int32 tensor ``[1]``, read by the kernels, so a replayed CUDA graph sees the current
    position without any host value baked in). The attention kernels write new entries at
    ``seq_pos .. seq_pos + L``; they do not advance the counters: the caller calls
    :meth:`advance` once after a forward over all layers.

    dtype is fp16 or bf16 (fp32 is also accepted on CPU, where the torch path computes in fp32).
    """

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        max_seq_len: int,
        batch_size: int = 1,
        dtype: torch.dtype = torch.float16,
        device: Optional[torch.device | str] = None,
    ):
        for name, val in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
                          ("max_seq_len", max_seq_len), ("batch_size", batch_size)):
            if not isinstance(val, int) or val <= 0:
                raise ValueError(f"StaticKVCache: {name} must be a positive int, got {val!r}")
        device = torch.device(device if device is not None else "cpu")
        allowed = CACHE_DTYPES if device.type == "cuda" else CACHE_DTYPES + (torch.float32,)
        if dtype not in allowed:
            raise ValueError(f"StaticKVCache: dtype must be one of {allowed} on {device.type}, got {dtype}")
        shape = (num_layers, batch_size, num_kv_heads, max_seq_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.seq_pos = torch.zeros(1, dtype=torch.int32, device=device)
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.max_seq_len, self.batch_size = max_seq_len, batch_size
        self.length = 0

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    @property
    def device(self) -> torch.device:
        return self.k.device

    def layer(self, layer_idx: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Views ``(k, v)`` of one layer, each ``[batch_size, num_kv_heads, max_seq_len, head_dim]``."""
        if not 0 <= layer_idx < self.num_layers:
            raise ValueError(f"layer_idx {layer_idx} out of range for a cache of {self.num_layers} layers")
        return self.k[layer_idx], self.v[layer_idx]

    def check_room(self, n: int) -> None:
        """Raise ValueError unless ``n`` more tokens fit (nothing is changed either way)."""
        if n < 0:
            raise ValueError(f"KV cache: cannot add a negative number of tokens ({n})")
        if self.length + n > self.max_seq_len:
            raise ValueError(
                f"KV cache full: {self.length} tokens filled + {n} new > max_seq_len={self.max_seq_len}"
            )

    def advance(self, n: int) -> None:
        """Mark ``n`` more tokens as filled (after a forward over all layers wrote them).

        The device counter is bumped with an in-place add, so a CUDA graph that captured this call
        advances it on every replay (the host ``length`` is then the caller's to keep in step).
        """
        self.check_room(n)
        self.length += n
        self.seq_pos.add_(n)

    def advance_on_device(self, n: torch.Tensor) -> None:
        """Advance only the device counter by ``n`` (an integer tensor ``[1]`` on the cache's device):
        a CUDA graph over a padded chunk advances by the chunk's real length, which the graph reads
        from the device. The caller adds the same count to ``length``."""
        self.seq_pos.add_(n)

    def truncate(self, n: int) -> None:
        """Keep the first ``n`` tokens (roll back a half-finished turn); ``0 <= n <= length``."""
        if not 0 <= n <= self.length:
            raise ValueError(f"KV cache: cannot truncate to {n} tokens (filled: {self.length})")
        self.length = n
        self.seq_pos.fill_(n)

    def reset(self) -> None:
        """Forget every token (the buffers are kept; stale entries are never read)."""
        self.truncate(0)

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def __repr__(self) -> str:
        return (
            f"StaticKVCache(layers={self.num_layers}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
            f"max_seq_len={self.max_seq_len}, batch={self.batch_size}, dtype={self.dtype}, "
            f"device={self.device}, length={self.length})"
        )
