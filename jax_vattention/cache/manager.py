"""The host side of a virtual cache: slots, pages and the cache arrays.

A :class:`CacheManager` owns the virtual buffers of one :class:`KVCache` on one
device and decides which physical pages back them. The host keeps every slot's
length: it knows a request's length when it is admitted (:meth:`alloc`), and
the in-graph op :func:`jax_vattention.grow` adds the step's tokens to every
active slot each time a compiled step runs, mapping pages just before the
step writes into them. The device never has to tell the host anything.

On a GPU the buffers are ranges reserved with the CUDA driver's virtual-memory
API, handed to JAX through DLPack without a copy; pages are 2 MiB physical
allocations mapped into them. On the CPU backend they are XLA-owned buffers
that the operating system commits page by page when they are first written;
freed pages go back with ``madvise``. The API is the same on both.

The safety promise: nothing done through this API reaches an unmapped page,
and any error leaves the state as it was (``OutOfPagesError``,
``NoFreeSlotError``, ``ValueError``, ``DriverError``). If undoing a failed
driver call fails too, the manager is poisoned: every later call but
:meth:`stats` and :meth:`close` raises ``CacheManagerPoisonedError`` naming
the first failure, and :meth:`close` still frees what it can.
"""

from __future__ import annotations

import atexit
import weakref
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

import jax_vattention._core as _core
from jax_vattention.cache import _ffi
from jax_vattention.cache.kv_cache import KVCache
from jax_vattention.cache.config import CacheConfig
from jax_vattention.cache.config import count as _count
from jax_vattention.cache.forks import Forks
from jax_vattention.cache.host import check_own_cache, forget_live, map_while_busy, register_live
from jax_vattention.cache.prefix import PrefixSharing

_DLPACK_DEVICE_CUDA = 2

_DLPACK_DTYPES = {  # dtype -> (DLPack type code, bits)
    jnp.dtype(jnp.float32): (2, 32),
    jnp.dtype(jnp.float16): (2, 16),
    jnp.dtype(jnp.bfloat16): (4, 16),
    jnp.dtype(jnp.float8_e4m3fn): (10, 8),  # kDLFloat8_e4m3fn (DLPack 1.1); JAX imports it without a copy
}


class CacheManager(PrefixSharing, Forks):
    """Slots and physical pages of one virtual KV cache on one device: a
    :class:`~jax_vattention.cache.host.CacheHost`.

    Parameters
    ----------
    config : CacheConfig
    device : jax.Device or None
        A CUDA GPU or a CPU device; default ``jax.devices()[0]``.
    driver : optional
        A ``jax_vattention._core`` driver to use instead of the device's own
        (tests pass a ``FakeDriver``; only on a CPU device).

    Attributes
    ----------
    cache : KVCache
        The cache, arrays ``config.buffer_shape(capacity)``. Pass
        it to jitted functions that donate it, and keep what they return.
    capacity : int
        Tokens per slot: ``config.max_len`` rounded up to whole pages.

    Example::

        manager = CacheManager(CacheConfig(num_layers=2, max_batch=4, max_len=256,
                                           kv_heads=2, head_dim=16))
        slot = manager.alloc(prompt_len=10)    # maps the pages for 10 tokens
        cache = manager.cache
        ...                                    # jitted steps: grow(cache, 1), write_kv(...)
        manager.free(slot)                     # pages stay for the next request there
    """

    def __init__(self, config: CacheConfig, device: jax.Device | None = None, *, driver=None):
        if not isinstance(config, CacheConfig):
            raise TypeError(f"config must be a CacheConfig, got {type(config).__name__}")
        device = device if device is not None else jax.devices()[0]
        if device.platform not in ("gpu", "cpu") or (device.platform == "gpu" and "cuda" not in
                                                       device.client.platform_version.lower()):
            raise ValueError(f"{device} is not supported: use a CUDA GPU or a CPU device")
        on_gpu = device.platform == "gpu"
        if driver is not None and on_gpu:
            raise ValueError("a custom driver can only serve a CPU device")
        if driver is None:
            driver = default_driver(device)
        page_bytes = config.page_bytes or driver.granularity
        if page_bytes % driver.granularity:
            raise ValueError(f"page_bytes={page_bytes} is not a multiple of the {driver.name} driver's "
                             f"granularity {driver.granularity}")
        budget = config.budget_bytes
        if budget is None:
            budget = int(config.budget_fraction * driver.memory_info()[0])
        self.config = config
        self.shard_config = config   # one device holds the whole cache
        self.mesh = self.axis = self.spec = None
        self.device = device
        self.driver = driver
        self.page_bytes = page_bytes
        self.capacity = config.capacity(page_bytes)
        self._shape = config.buffer_shape(self.capacity)
        config.check_buffer_bytes(self.capacity)
        # Only the CPU backend discards unmapped pages (see _discard_unmapped).
        self._discards = not on_gpu
        self._budget = budget
        self._id = 0
        self._lost: str | None = None
        self._closed = False
        self._steps_owner = self   # whose cache the steps in flight produce (wait_for_steps)
        self._open()
        # Released by close() or at exit, never by garbage collection: the
        # cache's arrays may outlive this object, and must not outlive its memory.
        atexit.register(self.close)

    def _open(self) -> None:
        """Creates the page manager, the buffers and the cache, and registers them."""
        config = self.config
        self._core = _core.PageManager(config.num_buffers, config.max_batch, self.capacity,
                                       config.token_bytes, self.page_bytes, self.driver, self._budget)
        if self.device.platform != "gpu":
            self._core.set_host_wait(_waiter(weakref.ref(self)))
        try:
            if config.window is not None:
                self._core.set_window(config.window, list(config.windowed_buffers))
            if self.device.platform == "gpu":
                self._core.reserve_buffers()
                buffers = self._gpu_views()
            else:
                buffers = self._cpu_buffers()
            self._id = _core.register_manager(self._core)
        except BaseException:
            self._core.release()
            raise
        register_live(self)
        self._lost = None
        self._cache = self._wrap(buffers)

    def _wrap(self, buffers: list[jax.Array]) -> KVCache:
        half = self.config.num_buffers // 2
        return KVCache(k=tuple(buffers[:half]), v=tuple(buffers[half:]), manager_id=self._id,
                       interleaved=self.config.interleaved, k_scale=self.config.k_scale, v_scale=self.config.v_scale)

    @property
    def cache(self) -> KVCache:
        """The cache; raises ``RuntimeError`` once it was lost (see :meth:`reset`)."""
        self._check_usable()
        return self._cache

    @cache.setter
    def cache(self, cache: KVCache) -> None:
        """Stores the cache a jitted step returned. Only this manager's cache is accepted: a cache
        of another manager would have this manager's mapping op grow its slots while the step
        writes into the other's."""
        self._check_usable()
        self.check_cache(cache)
        self._cache = cache

    @property
    def lost(self) -> bool:
        """True after a failed step took the cache with it (CPU backend); see :meth:`reset`."""
        return self._lost is not None

    def check_cache(self, cache: KVCache) -> None:
        """Raises ``ValueError`` unless ``cache`` is a cache this manager made (its id, layout,
        buffer count, shapes and dtype)."""
        check_own_cache(cache, self._id, self.config, self._shape)

    def _check_usable(self) -> None:
        if self._closed:
            raise RuntimeError(f"manager {self._id} is closed: its cache must not be used")
        if self._lost is not None:
            raise RuntimeError(f"the cache of manager {self._id} was lost: {self._lost}. Every request in it "
                               "is gone; call reset() for a fresh, empty cache, or close()")

    def rebuild_views(self) -> None:
        """GPU: the cache's arrays made anew over the same reservations (after XLA deleted the
        donated arrays of a failed step); the contents stay."""
        self._cache = self._wrap(self._gpu_views())

    def _gpu_views(self) -> list[jax.Array]:
        """Zero-copy arrays over the reserved ranges (reserved already)."""
        code, bits = _DLPACK_DTYPES[jnp.dtype(self.config.dtype)]
        buffers = []
        for base in self._core.buffer_bases():
            view = _core.device_view(self._core, base, self._shape, code, bits, _DLPACK_DEVICE_CUDA,
                                     self.device.local_hardware_id)
            array = jax.dlpack.from_dlpack(view)
            if array.unsafe_buffer_pointer() != base:
                raise RuntimeError("JAX copied a reserved buffer on import instead of viewing it")
            buffers.append(array)
        return buffers

    def _cpu_buffers(self) -> list[jax.Array]:
        sharding = jax.sharding.make_single_device_sharding(self.device)
        make = jax.jit(lambda: jax.ffi.ffi_call(
            _ffi.UNINITIALIZED_TARGET, jax.ShapeDtypeStruct(self._shape, self.config.dtype),
            has_side_effect=True)(), out_shardings=sharding)
        buffers = [make() for _ in range(self.config.num_buffers)]
        bases = [buffer.unsafe_buffer_pointer() for buffer in buffers]
        buffer_bytes = int(np.prod(self._shape)) * jnp.dtype(self.config.dtype).itemsize
        for base in bases:
            # XLA may hand out recycled memory, which may hold anything (NaN included): zeros, and none
            # of it resident (but the OS pages the buffer shares at its edges).
            _core.clear_pages(base, buffer_bytes)
        self._core.adopt_buffers(bases)
        return buffers

    @property
    def manager_id(self) -> int:
        """The id the in-graph op finds this manager by."""
        return self._id

    @property
    def shards(self) -> list["CacheManager"]:
        """The per-device managers: this one."""
        return [self]

    @property
    def page_manager(self) -> "_core.PageManager":
        """The C++ page manager behind this one (a group of devices registers them together)."""
        return self._core

    def pages_for(self, tokens: int) -> int:
        """Pages one slot of ``tokens`` tokens holds over every buffer (tokens past the capacity
        count as the capacity)."""
        return self._core.slot_pages(_count("tokens", tokens))

    def alloc(self, prompt_len: int, lookahead: int = 0) -> int:
        """Places a request of ``prompt_len`` tokens in a free slot and maps its pages.

        ``lookahead`` tokens more are mapped at once (eager allocation), so the
        first decode steps find their pages ready. A free slot whose deferred
        pages cover the request is preferred.
        Raises ``ValueError`` for a prompt longer than ``max_len``,
        ``NoFreeSlotError`` when every slot is taken and ``OutOfPagesError``
        when the budget cannot cover the prompt; nothing changes then.
        """
        self._check_usable()
        prompt_len = _count("prompt_len", prompt_len)
        if prompt_len > self.config.max_len:
            raise ValueError(f"a prompt of {prompt_len} tokens is longer than max_len={self.config.max_len}")
        slot = self._core.alloc(prompt_len, _count("lookahead", lookahead))
        self._discard_unmapped()
        return slot

    def free(self, slot: int) -> None:
        """Ends the request in ``slot``; its pages stay mapped until they are needed elsewhere."""
        self._check_usable()
        self._core.free(_count("slot", slot))

    def rewind(self, slot: int, length: int) -> None:
        """Lowers ``slot``'s length to ``length`` tokens: what lies past it is dropped (a step's
        rejected speculative tokens); its pages stay mapped for the next growth, which writes over it.

        No driver call, so nothing can fail half-way. ``ValueError`` (nothing changed) for a free
        slot, a length above the slot's, one inside its shared prefix pages (the next write would
        overwrite them), or one whose next query's window reaches pages unmapped behind a sliding
        window.
        """
        self._check_usable()
        self._core.rewind(_count("slot", slot), _count("length", length))

    def reserve_growth(self, tokens: int) -> None:
        """Creates now the pages that growing every active slot by ``tokens`` needs.

        Call it before a decode loop of ``tokens`` steps: the loop then only
        maps pages it already has, and cannot run out of memory half-way.
        The pages are earmarked for the active slots: no :meth:`alloc`,
        :meth:`prefetch` or later reservation takes them, so a growth within
        every active slot's reservation fails only if the driver fails.
        Raises ``OutOfPagesError`` with nothing changed if the budget is short.
        """
        self._check_usable()
        self._core.reserve_growth(_count("tokens", tokens))
        self._discard_unmapped()

    def prefetch(self, tokens: int, max_pages: int | None = None) -> int:
        """Maps now, without growing, pages that growing every active slot by ``tokens`` will need.

        Called while the device computes, it takes the mapping off the
        critical path. It maps one slot's next page (in every buffer) at a
        time, the slot closest to the end of its pages first, until
        ``max_pages`` or more are mapped (default: all it needs). Best effort:
        it stops when the budget has no free page left, and never waits for
        the device to reclaim free slots' pages. Returns the pages mapped.
        """
        self._check_usable()
        tokens = _count("tokens", tokens)
        if max_pages is None:
            return self._core.prefetch(tokens)
        return self._core.prefetch(tokens, _count("max_pages", max_pages))

    def prefetch_while_busy(self, pending: jax.Array, tokens: int, deadline: float | None = None) -> int:
        """Maps ahead like :meth:`prefetch`, one slot's page at a time, until ``pending`` is ready.

        ``pending`` is an output of the device work in flight, so the mapping
        stays behind that work instead of delaying what follows it. With a
        ``deadline`` (a ``time.perf_counter()`` value: when that work should
        end), no page is begun that the previous page's mapping time says
        would end after it. Returns the pages mapped.
        """
        self._check_usable()
        tokens = _count("tokens", tokens)
        return map_while_busy(lambda: self._core.prefetch(tokens, 1), pending, deadline)

    def grow(self, tokens: int) -> None:
        """Host-side growth, outside a compiled program: what :func:`jax_vattention.grow` does in one."""
        self._check_usable()
        tokens = _count("tokens", tokens)
        self._core.grow(tokens)
        self._discard_unmapped()

    def grow_slots(self, counts) -> None:
        """Host-side growth of each slot by its own count, all or nothing.

        ``counts`` : one non-negative token count per slot (``[max_batch]``), zero for free
        slots. A step that writes a prefill chunk into one slot and one token into others maps
        its plan with this right before dispatch. ``OutOfPagesError`` (nothing changed) if the
        budget cannot cover it, ``ValueError`` for a bad count or a count on a free slot.
        """
        self._check_usable()
        counts = [_count("a slot's count", c) for c in np.asarray(counts).reshape(-1).tolist()]
        if len(counts) != self.config.max_batch:
            raise ValueError(f"grow_slots takes one count per slot ({self.config.max_batch}), got {len(counts)}")
        self._core.grow_slots(counts)
        self._discard_unmapped()

    def reclaim(self) -> int:
        """Unmaps the pages of free slots, after the device finished with them; returns the page count."""
        self._check_usable()
        pages = self._core.reclaim()
        self._discard_unmapped()
        return pages

    def _discard_unmapped(self) -> None:
        """Returns the pages unmapped so far to the OS (CPU backend), where that is provably safe.

        The CPU backend's buffers are XLA's: once a non-donating function has
        copied the cache and the old arrays are dropped, their memory may hold
        someone else's data, which ``madvise(MADV_DONTNEED)`` would zero. So
        unmapping only queues a page, and the queue is discarded where the
        buffers are proven to be the cache's: in the mapping op, which checks
        that its operands are the buffers, and here, when ``self.cache``'s
        arrays are alive and are the buffers (keep ``manager.cache`` up to date
        with what your jitted steps return). Otherwise the pages stay resident,
        holding nothing, until the mapping op next runs.
        """
        if self._discards and not self._closed and self._lost is None:
            self._core.discard_unmapped([*self._cache.k, *self._cache.v])

    def wait_for_steps(self) -> None:
        """Waits until the steps in flight have ended: those that produced :attr:`cache` (or, for a
        device of a :class:`ShardedCacheManager`, the group's cache).

        The page manager calls it on the CPU backend before it unmaps a page or copies one for a
        fork (on a GPU it waits for the device itself): XLA runs the CPU backend's steps
        asynchronously, and a step in flight may still read a page that a host-side call (a
        growth that reclaims a preempted request's pages, a window's dead pages, an admission)
        is about to unmap. Inside a compiled program (the mapping op) the earlier steps have ended.
        """
        owner = self._steps_owner
        if not owner._closed and owner._lost is None and hasattr(owner, "_cache"):
            jax.block_until_ready(owner._cache)

    def trim(self) -> int:
        """Releases pooled (created, unmapped) pages back to the device; returns the page count.

        Pages earmarked by :meth:`reserve_growth` stay. If the driver fails to
        release a page, the others are still released, the page stays pooled,
        and ``DriverError`` is raised: calling it again retries.
        """
        self._check_usable()
        return self._core.trim()

    def lengths(self) -> np.ndarray:
        """int32 [max_batch]: the host's mirror of every slot's length (0 for free slots)."""
        return np.asarray(self._core.lengths(), dtype=np.int32)

    def active(self) -> np.ndarray:
        """bool [max_batch]: which slots hold a request."""
        return np.asarray(self._core.active(), dtype=bool)

    def mapped_pages(self) -> np.ndarray:
        """int64 [max_batch]: pages mapped per slot in each buffer."""
        return np.asarray(self._core.mapped_pages(), dtype=np.int64)

    def stats(self) -> dict:
        """Exact counts: pages created, pooled, mapped and deferred; tokens and bytes used; waste.

        ``mapped_bytes``, ``used_bytes`` and ``waste_bytes`` add up over all
        buffers; ``static_bytes`` is what a static cache of ``max_batch`` x
        ``max_len`` tokens would hold. Prefix sharing: ``cached_pages`` (and
        ``cached_bytes``) the prefix cache holds, mapped or not; ``forked_pages``
        full pages that forks share (:meth:`fork`; they have no key);
        ``shared_pages`` physical pages mapped in more than one slot;
        ``bytes_saved`` every mapping of a page beyond its first;
        ``pages_evicted_total``. Pages count once per buffer, as
        ``mapped_pages`` does (which counts every mapping). Sliding windows:
        ``window_unmapped_pages`` unmapped behind the windows now (within the
        slots' ranges), ``window_pages_unmapped_total`` ever.
        """
        stats = self._core.stats()
        stats["mapped_bytes"] = stats["mapped_pages"] * self.page_bytes
        stats["cached_bytes"] = stats["cached_pages"] * self.page_bytes
        stats["static_bytes"] = self.config.static_bytes()
        return stats

    def counters(self) -> dict:
        """The part of :meth:`stats` that costs nothing to read, for a caller that reads it every
        step (:meth:`stats` walks every slot's pages and the prefix cache's): ``page_bytes``,
        ``budget_pages``, ``created_pages``, ``pooled_pages``, ``mapped_pages`` and
        ``mapped_bytes``, the running totals (``pages_mapped_total``, ``pages_unmapped_total``,
        ``grow_calls``, ``pages_evicted_total``, ``window_pages_unmapped_total``),
        ``map_seconds``, ``unmap_seconds`` and ``poisoned``; each equal to :meth:`stats`'."""
        counters = self._core.counters()
        counters["mapped_bytes"] = counters["mapped_pages"] * self.page_bytes
        return counters

    def close(self) -> None:
        """Unmaps and releases all memory. The cache's arrays must not be used afterwards.

        Runs by itself at exit; until then (or close) the manager stays alive,
        even with no reference left to it, since its cache may still be in use.
        It frees everything it can, also on a poisoned manager; if the driver
        fails to free something it raises ``DriverError``, and calling it again
        retries what is left.
        """
        if not self._closed:
            self._closed = True
            atexit.unregister(self.close)
        self._shut()

    def _shut(self) -> None:
        """Unregisters the page manager and releases it.

        Releasing never touches a CPU buffer's memory (unmapping there only forgets the page, and
        pages queued for a discard are dropped), so a cache XLA already freed is safe to release.
        """
        forget_live(self._id)
        _core.unregister_manager(self._id)
        self._core.set_host_wait(None)
        self._core.release()

    def reset(self) -> None:
        """Starts over with an empty cache (new id, every slot free), e.g. after the cache was lost.

        Every request in the old cache is gone; its arrays must not be used again.
        """
        if self._closed:
            raise RuntimeError(f"manager {self._id} is closed: create a new one")
        self._shut()
        self._open()

    def recover_from_failed_step(self, taken: KVCache) -> str:
        """After a compiled step that took the cache ``taken`` failed: keeps :attr:`cache` usable,
        or marks it lost.

        XLA deletes the donated arrays of a failed execution. On a GPU the reserved ranges and
        their pages are the manager's, so the arrays are rebuilt over them (the contents written
        before the failure stay). On the CPU backend XLA owned the buffers and has freed them:
        the cache is lost, and the manager never touches that memory again. Returns what happened,
        for the error message.
        """
        self.check_cache(taken)
        if not any(buffer.is_deleted() for buffer in (*taken.k, *taken.v)):
            self._cache = taken
            return "the cache is intact"
        if self.device.platform == "gpu":
            self.rebuild_views()
            return ("the cache arrays were rebuilt over the same reservations; the slots' host lengths "
                    "include the steps that ran before the failure")
        self._lost = "a compiled step failed after taking the cache, and XLA freed its CPU buffers"
        forget_live(self._id)
        _core.unregister_manager(self._id)
        return f"the cache is lost ({self._lost}): call manager.reset()"

    def __enter__(self) -> "CacheManager":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        stats = self._core.stats()
        return (f"CacheManager({self.device}, {self.config.num_layers} layers, {self.config.max_batch} slots x "
                f"{self.capacity} tokens, {stats['mapped_pages']} of {stats['budget_pages']} pages mapped)")


def default_driver(device: jax.Device):
    """The driver a :class:`CacheManager` on ``device`` uses: CUDA's on a GPU, the host's on a CPU.

    Its ``granularity`` is the default page size.
    """
    return _core.cuda_driver(device.local_hardware_id) if device.platform == "gpu" else _core.host_driver()


def _waiter(manager: weakref.ref) -> Callable[[], None]:
    """The page manager's host wait: :meth:`CacheManager.wait_for_steps` while the manager lives
    (a weak reference: the page manager must not keep its owner alive)."""
    def wait() -> None:
        owner = manager()
        if owner is not None:
            owner.wait_for_steps()
    return wait
