"""KV caches for incremental decoding."""
from tinyq.cache.static_cache import StaticKVCache

__all__ = ["StaticKVCache"]
