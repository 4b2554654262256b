"""Everything that knows pages: the cache's configuration, the :class:`KVCache` pytree, the managers
that map physical pages into its virtual ranges (one device, or a mesh), prefix sharing, the
in-graph mapping op, writes, donation and the checks that guard a compiled step."""

from jax_vattention.cache.config import CacheConfig
from jax_vattention.cache.donation import cache_jit, check_cache_donation
from jax_vattention.cache.mapping_op import grow
from jax_vattention.cache.kv_cache import KVCache
from jax_vattention.cache.manager import CacheManager
from jax_vattention.cache.sharded_manager import ShardedCacheManager
from jax_vattention.cache.writes import scatter_tokens, write_kv

__all__ = ["CacheConfig", "CacheManager", "KVCache", "ShardedCacheManager", "cache_jit", "check_cache_donation",
           "grow", "scatter_tokens", "write_kv"]
