"""The one interface the engine, :func:`~jax_vattention.decode.generate.generate` and the commands
talk to: a :class:`CacheHost` keeps a virtual cache's slots and pages on the host.

Two classes implement it: :class:`~jax_vattention.cache.manager.CacheManager` (one device) and
:class:`~jax_vattention.cache.sharded_manager.ShardedCacheManager` (a mesh: one manager per device
under one plan). Callers never ask which one they hold: ``host.mesh`` is None on one device,
``host.shards`` lists the per-device managers (``[host]`` on one device), and
``host.pages_for(tokens)`` counts pages over every buffer of every device.

This module also keeps the registry of live hosts by id (the id a cache carries as
``KVCache.manager_id``), so that a function handed only a cache finds its host (:func:`host_for`).
"""

from __future__ import annotations

import time
import weakref
from typing import TYPE_CHECKING, Any, Callable, Protocol, runtime_checkable

import jax
import numpy as np

if TYPE_CHECKING:
    from jax_vattention.cache.config import CacheConfig
    from jax_vattention.cache.kv_cache import KVCache
    from jax_vattention.cache.prefix import SharedAlloc


@runtime_checkable
class CacheHost(Protocol):
    """Slots and physical pages of one virtual KV cache, on one device or over a mesh.

    Attributes
    ----------
    config : the whole cache's :class:`~jax_vattention.CacheConfig`
    shard_config : one device's share of it (``config`` itself on one device)
    page_bytes, capacity : one page's bytes; tokens per slot (``max_len`` rounded to whole pages)
    mesh, axis, spec : the ``jax.sharding.Mesh`` the cache is split over, its axis and the
        ``PartitionSpec`` of every cache buffer; None on one device
    shards : the per-device managers, in mesh order (``[self]`` on one device)
    manager_id : the id the in-graph mapping op finds the host by
    tokens_per_page : tokens a page holds where prefix sharing works, else 0
    """

    config: "CacheConfig"
    shard_config: "CacheConfig"
    page_bytes: int
    capacity: int
    mesh: jax.sharding.Mesh | None
    axis: str | None
    spec: jax.sharding.PartitionSpec | None

    @property
    def cache(self) -> "KVCache": ...
    @property
    def shards(self) -> list: ...
    @property
    def manager_id(self) -> int: ...
    @property
    def lost(self) -> bool: ...
    @property
    def tokens_per_page(self) -> int: ...

    def pages_for(self, tokens: int) -> int:
        """Pages one slot of ``tokens`` tokens holds over every buffer and device."""
    def check_cache(self, cache: "KVCache") -> None: ...
    def alloc(self, prompt_len: int, lookahead: int = 0) -> int: ...
    def alloc_prefix(self, keys, tokens: int, lookahead: int = 0) -> "SharedAlloc": ...
    def cached_pages(self, keys) -> int: ...
    def publish(self, slot: int, tokens) -> int: ...
    def publish_pages(self, slot: int, keys) -> int: ...
    def check_write(self, slot: int, start: int) -> None: ...
    def fork(self, slot: int, lookahead: int = 0) -> int: ...
    def free(self, slot: int) -> None: ...
    def rewind(self, slot: int, length: int) -> None: ...
    def grow(self, tokens: int) -> None: ...
    def grow_slots(self, counts) -> None: ...
    def reserve_growth(self, tokens: int) -> None: ...
    def prefetch(self, tokens: int, max_pages: int | None = None) -> int: ...
    def prefetch_while_busy(self, pending: jax.Array, tokens: int, deadline: float | None = None) -> int: ...
    def reclaim(self) -> int: ...
    def evict(self) -> int: ...
    def trim(self) -> int: ...
    def lengths(self) -> np.ndarray: ...
    def active(self) -> np.ndarray: ...
    def mapped_pages(self) -> np.ndarray: ...
    def stats(self) -> dict: ...
    def counters(self) -> dict: ...
    def recover_from_failed_step(self, taken: "KVCache") -> str: ...
    def reset(self) -> None: ...
    def close(self) -> None: ...


# The live hosts by id, for entry points that are handed a cache and need its host.
_LIVE: "weakref.WeakValueDictionary[int, Any]" = weakref.WeakValueDictionary()


def register_live(host: CacheHost) -> None:
    """Makes ``host`` findable by its ``manager_id`` (:func:`host_for`)."""
    _LIVE[host.manager_id] = host


def forget_live(manager_id: int) -> None:
    """``manager_id`` no longer names a live host."""
    _LIVE.pop(manager_id, None)


def host_for(cache: "KVCache") -> CacheHost | None:
    """The live host that made ``cache``; None for a dense cache.

    Raises ``ValueError`` when that host is closed or its cache was lost.
    """
    if cache.is_dense:
        return None
    host = _LIVE.get(cache.manager_id)
    if host is None:
        raise ValueError(f"the cache's manager {cache.manager_id} is closed or its cache was lost: "
                         "use the cache of a live manager")
    return host


def map_while_busy(map_one_page: Callable[[], int], pending: jax.Array, deadline: float | None) -> int:
    """Calls ``map_one_page()`` (it returns the pages it mapped, 0 when there is nothing left) until
    ``pending`` is ready, no page is left, or the last page's time says the next would end after
    ``deadline``; returns the pages mapped."""
    mapped, page_seconds = 0, 0.0
    while not pending.is_ready():
        begin = time.perf_counter()
        if deadline is not None and begin + page_seconds > deadline:
            break
        pages = map_one_page()
        if pages == 0:
            break
        page_seconds = time.perf_counter() - begin
        mapped += pages
    return mapped


def add_up(parts: list[dict], shared: tuple[str, ...]) -> dict:
    """One dict of several parts' stats (devices of a mesh, replicas of a server): each number
    summed over the parts, but the ``shared`` keys, flags and anything not a number, which are
    the first part's. ``parts``: at least one dict, each with the first one's keys."""
    total = {}
    for key, value in parts[0].items():
        if key in shared or isinstance(value, bool) or not isinstance(value, (int, float)):
            total[key] = value
        else:
            total[key] = sum(part.get(key, 0) for part in parts)
    return total


def check_own_cache(cache: "KVCache", manager_id: int, config, shape: tuple) -> None:
    """``ValueError`` unless ``cache`` is the cache of the manager (or group) ``manager_id``, whose
    :class:`~jax_vattention.cache.config.CacheConfig` is ``config`` and whose buffers have ``shape``:
    its id, layout, buffer count, shapes, dtype and FP8 scales."""
    from jax_vattention.cache.kv_cache import KVCache

    if not isinstance(cache, KVCache):
        raise ValueError(f"expected a KVCache, got {type(cache).__name__}")
    if cache.manager_id != manager_id:
        owner = "a dense cache" if cache.is_dense else f"the cache of manager {cache.manager_id}"
        raise ValueError(f"{owner} was given to manager {manager_id}: a manager accepts only its own "
                         "cache (the one its .cache returned, or a jitted step returned for it)")
    half = config.num_buffers // 2
    dtype = np.dtype(config.dtype)
    if (cache.interleaved != config.interleaved or len(cache.k) != half or len(cache.v) != half
            or any(b.shape != shape or b.dtype != dtype for b in (*cache.k, *cache.v))):
        raise ValueError(f"the cache's buffers do not match manager {manager_id}'s: expected {half} K and "
                         f"{half} V arrays of shape {shape} and dtype {dtype}")
    if (cache.k_scale, cache.v_scale) != (config.k_scale, config.v_scale):
        raise ValueError(f"the cache's scales (k_scale={cache.k_scale}, v_scale={cache.v_scale}) are not "
                         f"manager {manager_id}'s ({config.k_scale}, {config.v_scale}): its codes "
                         "would be read back wrong")
