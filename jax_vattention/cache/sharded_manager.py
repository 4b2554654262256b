"""One virtual cache over a mesh of devices (tensor parallelism): a page manager per device, one plan.

Each device holds ``kv_heads / N`` of the KV heads in its own reservations (its own
:class:`~jax_vattention.CacheManager`); the per-device arrays are joined with
``jax.make_array_from_single_device_arrays`` into one array per buffer, sharded on the heads axis::

    global buffer [max_batch, capacity, (layers,) kv_heads, head_dim], NamedSharding(mesh, P(.., "tp", ..))
      ├── device 0: heads [0, K/N)      its own reserved range, its own pages
      ├── device 1: heads [K/N, 2K/N)   same slots, same lengths, same page decisions
      └── ...

Why one plan: every device maps the same slots to the same lengths, so a device's pages are
always exactly its share of the model's. Every operation runs on all the managers in order; the
first one decides (back-pressure such as ``OutOfPagesError`` comes from it, nothing changed
anywhere, since all have the same geometry and budget). If a later one fails, its state no longer
matches the others': the group is poisoned (``CacheManagerPoisonedError`` on every later call but
:meth:`stats` and :meth:`close`), unless the devices still agree, when the error passes unchanged.

In a compiled program the mapping op runs per device inside ``shard_map``; all devices run it
with the same ``manager`` id, a group id under which each device's handler finds its own page
manager by the address of its first operand (a copied shard matches none: the donation error).
"""

from __future__ import annotations

import atexit
import dataclasses

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

import jax_vattention._core as _core
from jax_vattention._core import CacheManagerPoisonedError
from jax_vattention.cache.kv_cache import KVCache
from jax_vattention.cache.config import CacheConfig
from jax_vattention.cache.host import add_up, check_own_cache, forget_live, map_while_busy, register_live
from jax_vattention.cache.manager import CacheManager, default_driver


# Stats every device has the same value of, under one plan: not summed.
_SHARED_STATS = ("page_bytes", "active_slots", "used_tokens", "grow_calls")


def mesh_axis(mesh: jax.sharding.Mesh, axis: str | None) -> str:
    """The name of ``mesh``'s tensor-parallel axis; ``ValueError`` for a mesh that is not 1-D over
    distinct devices of one platform, or an axis it does not have."""
    if not isinstance(mesh, jax.sharding.Mesh):
        raise ValueError(f"expected a jax.sharding.Mesh, got {type(mesh).__name__}")
    if len(mesh.axis_names) != 1:
        raise ValueError(f"tensor parallelism needs a one-dimensional mesh; got axes {mesh.axis_names}")
    name = mesh.axis_names[0] if axis is None else axis
    if name != mesh.axis_names[0]:
        raise ValueError(f"the mesh has no axis {axis!r}; its axis is {mesh.axis_names[0]!r}")
    devices = list(mesh.devices.flat)
    if len({d.id for d in devices}) != len(devices) or len({d.platform for d in devices}) != 1:
        raise ValueError(f"the mesh must hold distinct devices of one platform; got {devices}")
    return name


def head_spec(config: CacheConfig, axis: str) -> PartitionSpec:
    """The PartitionSpec of a cache buffer: sharded on the KV-heads axis (second to last)."""
    rank = len(config.buffer_shape(1))
    return PartitionSpec(*([None] * (rank - 2)), axis, None)


class ShardedCacheManager:
    """Slots and pages of one virtual KV cache split by KV heads over the devices of ``mesh``: a
    :class:`~jax_vattention.cache.host.CacheHost`.

    Parameters
    ----------
    config : CacheConfig
        The whole cache (all ``kv_heads``); ``kv_heads`` must divide by the mesh size.
        ``budget_bytes`` is per device; without it, every device gets ``budget_fraction`` of the
        smallest free memory among them (so that all follow one plan).
    mesh : jax.sharding.Mesh
        One-dimensional, over the devices to use.
    axis : str or None
        The mesh axis (default: its only one).
    driver_factory : callable or None
        ``device -> driver``; tests pass fake drivers (CPU devices only).

    Attributes
    ----------
    cache : KVCache
        Arrays ``config.buffer_shape(capacity)``, each sharded on the heads axis.
    managers : list[CacheManager]
        One per device of this process, in mesh order, each with ``kv_heads / N`` heads.
    devices : list[jax.Device]
        This process's devices of the mesh (all of them in a single process).

    Example::

        mesh = jax.make_mesh((2,), ("tp",))
        manager = ShardedCacheManager(CacheConfig(num_layers=2, max_batch=4, max_len=256,
                                                  kv_heads=2, head_dim=16), mesh)
        slot = manager.alloc(prompt_len=10)     # the same slot and pages on both devices
        manager.stats()["per_device"][1]["mapped_pages"]
    """

    def __init__(self, config: CacheConfig, mesh: jax.sharding.Mesh, axis: str | None = None, *,
                 driver_factory=None):
        if not isinstance(config, CacheConfig):
            raise TypeError(f"config must be a CacheConfig, got {type(config).__name__}")
        self.axis = mesh_axis(mesh, axis)
        self.mesh = mesh
        count = mesh.size
        if config.kv_heads % count:
            raise ValueError(f"kv_heads={config.kv_heads} does not divide by the {count} devices of the mesh: "
                             f"each device must hold the same number of KV heads")
        # This process's devices of the mesh (all of them, unless jax.distributed spans processes).
        self.devices = [device for device in mesh.devices.flat if device.process_index == jax.process_index()]
        if not self.devices:
            raise ValueError(f"the mesh has none of process {jax.process_index()}'s devices: every process "
                             "of a multi-process mesh holds the pages of its own devices")
        drivers = [(driver_factory or default_driver)(device) for device in self.devices]
        budget = config.budget_bytes
        if budget is None:
            budget = _agreed_minimum(min(driver.memory_info()[0] for driver in drivers), mesh)
            budget = int(config.budget_fraction * budget)
        self.config = config
        self.shard_config = dataclasses.replace(config, kv_heads=config.kv_heads // count, budget_bytes=budget)
        self._drivers = drivers if driver_factory is not None else [None] * len(self.devices)
        self.spec = head_spec(config, self.axis)
        self._sharding = NamedSharding(mesh, self.spec)
        self._id = 0
        self._lost: str | None = None
        self._poisoned: str | None = None
        self._closed = False
        self.managers: list[CacheManager] = []
        self._open()
        atexit.register(self.close)

    def _open(self) -> None:
        """Creates the managers, registers their group and joins their buffers."""
        try:
            for device, driver in zip(self.devices, self._drivers):
                self.managers.append(CacheManager(self.shard_config, device, driver=driver))
                self.managers[-1]._steps_owner = self   # the steps write the group's cache
            self._id = _core.register_group([m.page_manager for m in self.managers])
        except BaseException:
            self._close_managers()
            raise
        register_live(self)
        self._lost = self._poisoned = None
        self.page_bytes = self.managers[0].page_bytes
        self.capacity = self.managers[0].capacity
        self._shape = self.config.buffer_shape(self.capacity)
        self._cache = self._join()

    def _join(self) -> KVCache:
        """The global cache over the managers' current per-device arrays."""
        shards = [(*m.cache.k, *m.cache.v) for m in self.managers]
        buffers = [jax.make_array_from_single_device_arrays(self._shape, self._sharding, list(per_buffer))
                   for per_buffer in zip(*shards)]
        half = len(buffers) // 2
        return KVCache(k=tuple(buffers[:half]), v=tuple(buffers[half:]), manager_id=self._id,
                       interleaved=self.config.interleaved, k_scale=self.config.k_scale, v_scale=self.config.v_scale)

    @property
    def manager_id(self) -> int:
        """The group id the in-graph op finds every device's page manager by."""
        return self._id

    @property
    def shards(self) -> list[CacheManager]:
        """The per-device managers, in mesh order."""
        return self.managers

    def pages_for(self, tokens: int) -> int:
        """Pages one slot of ``tokens`` tokens holds over every buffer of this process's devices (as
        :meth:`stats` counts them)."""
        return sum(manager.pages_for(tokens) for manager in self.managers)

    @property
    def multiprocess(self) -> bool:
        """True when the mesh spans processes (``jax.distributed``): this process holds only its own
        devices' managers, and every process must run the same plan."""
        return len(self.devices) < self.mesh.size

    @property
    def cache(self) -> KVCache:
        self._check_usable()
        return self._cache

    @cache.setter
    def cache(self, cache: KVCache) -> None:
        """Stores the cache a jitted step returned, and hands each device manager its shards."""
        self._check_usable()
        self.check_cache(cache)
        self._cache = cache
        for index, manager in enumerate(self.managers):
            buffers = [_shard_on(array, self.devices[index]) for array in (*cache.k, *cache.v)]
            half = len(buffers) // 2
            manager.cache = KVCache(k=tuple(buffers[:half]), v=tuple(buffers[half:]), manager_id=manager.manager_id,
                                    interleaved=cache.interleaved, k_scale=cache.k_scale, v_scale=cache.v_scale)

    @property
    def lost(self) -> bool:
        return self._lost is not None

    def check_cache(self, cache: KVCache) -> None:
        """Raises ``ValueError`` unless ``cache`` is this group's: id, layout, shapes, dtype, sharding."""
        check_own_cache(cache, self._id, self.config, self._shape)
        buffers = (*cache.k, *cache.v)
        if any(not b.sharding.is_equivalent_to(self._sharding, b.ndim) for b in buffers):
            raise ValueError(f"the cache's buffers are not sharded on the KV-heads axis over the mesh "
                             f"({self.spec}): keep the sharding the manager's cache has")

    def _check_usable(self) -> None:
        if self._closed:
            raise RuntimeError(f"manager {self._id} is closed: its cache must not be used")
        if self._poisoned is not None:
            raise CacheManagerPoisonedError(f"tensor-parallel manager {self._id} is poisoned: {self._poisoned}")
        if self._lost is not None:
            raise RuntimeError(f"the cache of manager {self._id} was lost: {self._lost}. Call reset() or close()")

    def _on_all(self, what: str, call):
        """Runs ``call(manager)`` on every device's manager in order; returns device 0's result."""
        self._check_usable()
        results = []
        for index, manager in enumerate(self.managers):
            try:
                results.append(call(manager))
            except Exception as error:
                if index > 0:
                    self._check_agreement(f"{what} failed on {self.devices[index]} ({error})")
                raise
        if any(result != results[0] for result in results):
            self._poisoned = f"{what} gave different results on the devices: {results}"
            raise RuntimeError(self._poisoned)
        return results[0]

    def _check_agreement(self, reason: str) -> None:
        """Poisons the group when the devices' slots, lengths or mapped pages no longer agree."""
        views = [(m.active().tolist(), m.lengths().tolist(), m.mapped_pages().tolist()) for m in self.managers]
        if any(view != views[0] for view in views):
            self._poisoned = f"{reason}; the devices' managers no longer agree"

    def alloc(self, prompt_len: int, lookahead: int = 0) -> int:
        """Places a request in the same free slot on every device; see :meth:`CacheManager.alloc`."""
        return self._on_all("alloc", lambda m: m.alloc(prompt_len, lookahead))

    def free(self, slot: int) -> None:
        self._on_all("free", lambda m: m.free(slot))

    def rewind(self, slot: int, length: int) -> None:
        """Lowers ``slot``'s length on every device; see :meth:`CacheManager.rewind`."""
        self._on_all("rewind", lambda m: m.rewind(slot, length))

    def reserve_growth(self, tokens: int) -> None:
        self._on_all("reserve_growth", lambda m: m.reserve_growth(tokens))

    def prefetch(self, tokens: int, max_pages: int | None = None) -> int:
        """Maps ahead on every device (``max_pages`` per device); returns device 0's page count."""
        return self._on_all("prefetch", lambda m: m.prefetch(tokens, max_pages))

    def prefetch_while_busy(self, pending: jax.Array, tokens: int, deadline: float | None = None) -> int:
        """:meth:`CacheManager.prefetch_while_busy` on every device: one slot's next page at a time
        (on each device), until ``pending`` is ready or the ``deadline`` would pass; returns device 0's
        page count."""
        self._check_usable()
        return map_while_busy(lambda: self.prefetch(tokens, 1), pending, deadline)

    def grow(self, tokens: int) -> None:
        self._on_all("grow", lambda m: m.grow(tokens))

    def grow_slots(self, counts) -> None:
        """Grows each slot by its own count on every device; see :meth:`CacheManager.grow_slots`."""
        self._on_all("grow_slots", lambda m: m.grow_slots(counts))

    @property
    def tokens_per_page(self) -> int:
        """Tokens one page of a device holds (0 where prefix sharing is off); the same on every device."""
        return self.managers[0].tokens_per_page

    def alloc_shared(self, prompt_len: int, lookahead: int = 0, *, prefix):
        """:meth:`CacheManager.alloc_shared` on every device: the same slot and shared prefix everywhere."""
        return self._on_all("alloc_shared", lambda m: m.alloc_shared(prompt_len, lookahead, prefix=prefix))

    def publish(self, slot: int, tokens) -> int:
        return self._on_all("publish", lambda m: m.publish(slot, tokens))

    def cached_pages(self, keys) -> int:
        """:meth:`CacheManager.cached_pages`: the same on every device, or the group is poisoned."""
        return self._on_all("cached_pages", lambda m: m.cached_pages(keys))

    def alloc_prefix(self, keys, tokens: int, lookahead: int = 0):
        """:meth:`CacheManager.alloc_prefix` on every device: the same slot and shared pages everywhere."""
        return self._on_all("alloc_prefix", lambda m: m.alloc_prefix(keys, tokens, lookahead))

    def publish_pages(self, slot: int, keys) -> int:
        """:meth:`CacheManager.publish_pages` on every device."""
        return self._on_all("publish_pages", lambda m: m.publish_pages(slot, keys))

    def writable_from(self, slot: int) -> int:
        return self._on_all("writable_from", lambda m: m.writable_from(slot))

    def check_write(self, slot: int, start: int) -> None:
        self._on_all("check_write", lambda m: m.check_write(slot, start))

    def fork(self, slot: int, lookahead: int = 0) -> int:
        """:meth:`CacheManager.fork` on every device: the same new slot, shared pages and copy everywhere."""
        return self._on_all("fork", lambda m: m.fork(slot, lookahead))

    def evict(self) -> int:
        return self._on_all("evict", lambda m: m.evict())

    def reclaim(self) -> int:
        return self._on_all("reclaim", lambda m: m.reclaim())

    def trim(self) -> int:
        return self._on_all("trim", lambda m: m.trim())

    def lengths(self) -> np.ndarray:
        """int32 [max_batch]: every slot's length (the same on every device)."""
        return self.managers[0].lengths()

    def active(self) -> np.ndarray:
        return self.managers[0].active()

    def mapped_pages(self) -> np.ndarray:
        """int64 [max_batch]: pages mapped per slot in each buffer of each device."""
        return self.managers[0].mapped_pages()

    def stats(self) -> dict:
        """Totals over this process's devices, and ``per_device``: each manager's stats.

        Pages, bytes, page counters and seconds add up over the devices; what every device shares
        (``page_bytes``, ``active_slots``, ``used_tokens``, ``grow_calls``) is device 0's;
        ``poisoned`` is the group's reason or the first device's.
        """
        total = self._total([m.stats() for m in self.managers])
        total["static_bytes"] = self.config.static_bytes()
        return total

    def counters(self) -> dict:
        """:meth:`CacheManager.counters` over this process's devices, added up as :meth:`stats`."""
        return self._total([m.counters() for m in self.managers])

    def _total(self, per_device: list[dict]) -> dict:
        """One dict of the devices' ``per_device`` stats or counters (see :meth:`stats`)."""
        if not per_device:
            raise RuntimeError(f"manager {self._id} is closed: it has no stats")
        total = add_up(per_device, _SHARED_STATS)
        total["poisoned"] = self._poisoned or next((s["poisoned"] for s in per_device if s["poisoned"]),
                                                   per_device[0]["poisoned"])
        total["per_device"] = per_device
        return total

    def close(self) -> None:
        """Unmaps and releases every device's memory; the cache must not be used afterwards."""
        if not self._closed:
            self._closed = True
            atexit.unregister(self.close)
        self._shut()

    def _shut(self) -> None:
        forget_live(self._id)
        _core.unregister_manager(self._id)
        self._close_managers()

    def _close_managers(self) -> None:
        managers, self.managers = self.managers, []
        failures = []
        for manager in managers:
            try:
                manager.close()
            except Exception as error:
                failures.append(error)
        if failures:
            raise failures[0]

    def reset(self) -> None:
        """Starts over with an empty cache on every device (new id)."""
        if self._closed:
            raise RuntimeError(f"manager {self._id} is closed: create a new one")
        self._shut()
        self._open()

    def recover_from_failed_step(self, taken: KVCache) -> str:
        """After a compiled step that took ``taken`` failed: keeps :attr:`cache` usable (GPU: rebuilt
        over the same reservations) or marks it lost (CPU); poisons the group if the devices'
        managers no longer agree. Returns what happened."""
        self.check_cache(taken)
        if not any(buffer.is_deleted() for buffer in (*taken.k, *taken.v)):
            self._cache, state = taken, "the cache is intact"
        elif self.devices[0].platform == "gpu":
            for manager in self.managers:
                manager.rebuild_views()
            self._cache = self._join()
            state = "the cache arrays were rebuilt over the same reservations"
        else:
            self._lost = "a compiled step failed after taking the cache, and XLA freed its CPU buffers"
            forget_live(self._id)
            _core.unregister_manager(self._id)
            state = f"the cache is lost ({self._lost}): call reset()"
        self._check_agreement("a compiled step failed")
        if self._poisoned is not None:
            state += f"; the group is poisoned ({self._poisoned})"
        return state

    def __enter__(self) -> "ShardedCacheManager":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"ShardedCacheManager({len(self.devices)} devices over axis {self.axis!r}, "
                f"{self.config.max_batch} slots x {self.capacity} tokens)")


def _shard_on(array: jax.Array, device: jax.Device) -> jax.Array:
    """The single-device array of ``array``'s shard on ``device`` (the same buffer, no copy)."""
    for shard in array.addressable_shards:
        if shard.device == device:
            return shard.data
    raise ValueError(f"the cache array has no shard on {device}")


def _agreed_minimum(value: int, mesh: jax.sharding.Mesh) -> int:
    """The smallest ``value`` over the processes that hold devices of ``mesh`` (``value`` itself in a
    single process): every process of a multi-process mesh must budget the same pages."""
    if all(device.process_index == jax.process_index() for device in mesh.devices.flat):
        return value
    from jax.experimental import multihost_utils
    kib = np.array([min(value >> 10, np.iinfo(np.int32).max)], np.int32)   # JAX gathers 32-bit integers
    return int(np.min(multihost_utils.process_allgather(kib))) << 10
