"""vAttention for JAX: a virtually contiguous KV cache with pages mapped on demand.

Example::

    import jax, jax.numpy as jnp
    import jax_vattention as jv

    manager = jv.CacheManager(jv.CacheConfig(num_layers=2, max_batch=4, max_len=512,
                                             kv_heads=2, head_dim=64))
    slot = manager.alloc(prompt_len=7)
    cache = manager.cache          # per-layer k/v arrays [4, capacity, 2, 64]

    @jv.cache_jit
    def step(cache, k, v, start):
        cache = jv.grow(cache, tokens=1)              # maps pages just in time
        return jv.write_kv(cache, 0, k, v, start, jnp.ones_like(start))
"""

# JAX first: loading the C++ core before JAX (and ml_dtypes) crashed JAX's
# import on the GPU machine (Python 3.12, jax 0.11.2).
import jax  # noqa: F401

from jax_vattention._core import CacheManagerPoisonedError, DriverError, NoFreeSlotError, OutOfPagesError
from jax_vattention.cache import (CacheConfig, CacheManager, KVCache, ShardedCacheManager, cache_jit,
                                  check_cache_donation, grow, scatter_tokens, write_kv)

__all__ = [
    "CacheConfig",
    "CacheManager",
    "CacheManagerPoisonedError",
    "DriverError",
    "KVCache",
    "NoFreeSlotError",
    "OutOfPagesError",
    "ShardedCacheManager",
    "cache_jit",
    "check_cache_donation",
    "grow",
    "scatter_tokens",
    "write_kv",
]
__version__ = "0.1.0"
