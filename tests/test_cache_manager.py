"""The cache manager on JAX's CPU backend: in-place jitted updates, the mapping op, residency."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_vattention as jv
from caches import small_config
from jax_vattention import _core

KiB = 1024
CPU = jax.devices("cpu")[0]


@pytest.fixture
def manager():
    with jv.CacheManager(small_config(), CPU) as manager:
        yield manager


def pointers(cache):
    return [array.unsafe_buffer_pointer() for array in (*cache.k, *cache.v)]


def test_capacity_is_rounded_to_whole_pages(manager):
    # 2 heads x 16 x 4 bytes = 128 bytes a token: 512 tokens a page.
    assert manager.capacity == 1024
    assert manager.cache.k[0].shape == (3, 1024, 2, 16)
    assert len(manager.cache.k) == len(manager.cache.v) == 2


@functools.partial(jv.cache_jit)
def decode_steps(cache, keys, start, active, steps):
    """Writes keys[:, i] at start + i in every layer for `steps` steps, growing first."""

    def body(i, cache):
        cache = jv.grow(cache, tokens=1)
        for layer in range(cache.num_layers):
            new = jax.lax.dynamic_slice_in_dim(keys, i, 1, axis=1) * (layer + 1)
            cache = jv.write_kv(cache, layer, new, -new, start + i, active.astype(jnp.int32))
        return cache

    return jax.lax.fori_loop(0, steps, body, cache)


def test_jitted_loop_writes_in_place_and_maps_each_step(manager):
    rng = np.random.default_rng(0)
    slots = [manager.alloc(500), manager.alloc(3)]
    cache = manager.cache
    before = pointers(cache)
    steps = 40
    keys = jnp.asarray(rng.normal(size=(3, steps, 2, 16)), jnp.float32)
    start = jnp.asarray(manager.lengths())
    active = jnp.asarray(manager.active())
    manager.reserve_growth(steps)
    cache = decode_steps(cache, keys, start, active, steps)
    assert pointers(cache) == before
    assert manager.lengths().tolist() == [540, 43, 0]
    assert manager.mapped_pages().tolist() == [2, 1, 0]      # 540 tokens cross into a second page
    assert manager.stats()["grow_calls"] == steps
    dense = np.zeros((3, 1024, 2, 16), np.float32)
    for slot in slots:
        dense[slot, int(start[slot]):int(start[slot]) + steps] = np.asarray(keys[slot])
    for layer in range(2):
        np.testing.assert_array_equal(np.asarray(cache.k[layer][1, :64]), dense[1, :64] * (layer + 1))
        np.testing.assert_array_equal(np.asarray(cache.v[layer][0, 490:560]), -dense[0, 490:560] * (layer + 1))


def test_compiles_once_and_keeps_pointers_across_calls(manager):
    manager.alloc(10)
    cache = manager.cache
    before = pointers(cache)
    traces = []

    @jv.cache_jit
    def step(cache, new, start):
        traces.append(1)
        cache = jv.grow(cache, 1)
        return jv.write_kv(cache, 0, new, new, start, jnp.array([1, 0, 0], jnp.int32))

    for i in range(5):
        cache = step(cache, jnp.full((3, 1, 2, 16), i, jnp.float32), jnp.array([10 + i, 0, 0], jnp.int32))
    assert len(traces) == 1
    assert pointers(cache) == before
    np.testing.assert_array_equal(np.asarray(cache.k[0][0, 10:15, 0, 0]), np.arange(5))
    assert manager.lengths()[0] == 15


def test_growth_past_the_budget_fails_cleanly():
    config = small_config(budget_bytes=4 * 64 * KiB)          # one page per buffer
    with jv.CacheManager(config, CPU) as manager:
        manager.alloc(500)
        with pytest.raises(jv.OutOfPagesError):
            manager.reserve_growth(20)
        cache = manager.cache
        with pytest.raises(Exception, match="RESOURCE_EXHAUSTED|budget"):
            jax.block_until_ready(jv.cache_jit(lambda cache: jv.grow(cache, 20))(cache))
        assert manager.lengths()[0] == 500


def test_bad_inputs(manager):
    with pytest.raises(ValueError, match="max_len"):
        manager.alloc(601)
    with pytest.raises(ValueError, match="non-negative"):
        manager.alloc(-1)
    with pytest.raises(ValueError, match="does not exist"):
        manager.free(3)
    slot = manager.alloc(1)
    manager.free(slot)
    with pytest.raises(ValueError, match="not allocated"):
        manager.free(slot)
    for _ in range(3):
        manager.alloc(1)
    with pytest.raises(jv.NoFreeSlotError):
        manager.alloc(1)
    cache = manager.cache
    with pytest.raises(ValueError, match="shape"):
        jv.write_kv(cache, 0, jnp.zeros((3, 1, 4, 16)), jnp.zeros((3, 1, 4, 16)), jnp.zeros(3, jnp.int32),
                    jnp.ones(3, jnp.int32))
    with pytest.raises(ValueError, match="dtype"):
        jv.write_kv(cache, 0, jnp.zeros((3, 1, 2, 16), jnp.bfloat16), jnp.zeros((3, 1, 2, 16), jnp.bfloat16),
                    jnp.zeros(3, jnp.int32), jnp.ones(3, jnp.int32))
    with pytest.raises(ValueError, match="layer"):
        jv.write_kv(cache, 5, jnp.zeros((3, 1, 2, 16)), jnp.zeros((3, 1, 2, 16)), jnp.zeros(3, jnp.int32),
                    jnp.ones(3, jnp.int32))
    with pytest.raises(ValueError, match="tokens"):
        jv.grow(cache, -1)


@pytest.mark.parametrize("field, value", [("num_layers", 0), ("max_len", -4), ("head_dim", 2.5),
                                          ("dtype", jnp.int8), ("layout", "paged"), ("budget_fraction", 0.0)])
def test_config_rejects_bad_fields(field, value):
    with pytest.raises(ValueError, match=field):
        small_config(**{field: value})


def test_page_size_must_match_the_driver():
    with pytest.raises(ValueError, match="granularity"):
        jv.CacheManager(small_config(page_bytes=3 * KiB), CPU)


def test_writes_drop_padding_and_out_of_range_tokens():
    buffer = jnp.zeros((2, 8, 1, 1), jnp.float32)
    new = jnp.arange(1, 9, dtype=jnp.float32).reshape(2, 4, 1, 1)
    out = jv.scatter_tokens(buffer, new, jnp.array([6, -1]), jnp.array([4, 3]))
    np.testing.assert_array_equal(np.asarray(out[..., 0, 0]),
                                  [[0, 0, 0, 0, 0, 0, 1, 2], [6, 7, 0, 0, 0, 0, 0, 0]])


def test_resident_memory_follows_the_mapped_pages():
    # 8 heads x 128 x 4 bytes = 4 KiB a token: a 64 KiB page holds 16 tokens.
    config = jv.CacheConfig(num_layers=1, max_batch=2, max_len=4096, kv_heads=8, head_dim=128,
                            dtype=jnp.float32, page_bytes=64 * KiB, budget_bytes=1 << 30)
    with jv.CacheManager(config, CPU) as manager:
        cache = manager.cache
        slot_bytes = manager.capacity * config.token_bytes

        def resident(slot):
            return _core.residency(cache.k[0].unsafe_buffer_pointer() + slot * slot_bytes, slot_bytes)[0] * \
                _core.os_page_bytes()

        edge = _core.os_page_bytes()  # an OS page a slot shares with its neighbour or the allocator
        assert resident(0) <= edge and resident(1) <= edge
        slot = manager.alloc(0)
        write = jv.cache_jit(lambda cache, new, start, count: jv.write_kv(cache, 0, new, new, start, count))
        tokens = 100
        new = jnp.ones((2, tokens, 8, 128), jnp.float32)
        manager.grow(tokens)
        count = jnp.array([tokens, 0], jnp.int32) if slot == 0 else jnp.array([0, tokens], jnp.int32)
        cache = manager.cache = jax.block_until_ready(write(cache, new, jnp.zeros(2, jnp.int32), count))
        mapped = manager.mapped_pages()[slot] * manager.page_bytes
        assert tokens * config.token_bytes <= resident(slot) <= mapped + 2 * edge
        assert resident(1 - slot) <= edge
        manager.free(slot)
        assert resident(slot) > 0               # deferred: kept for the next request
        manager.reclaim()
        assert resident(slot) <= 2 * edge       # the OS pages shared with the neighbours


class Pending:
    """Stands for device work in flight: busy for its first ``polls`` checks."""

    def __init__(self, polls):
        self.polls = polls

    def is_ready(self):
        self.polls -= 1
        return self.polls < 0


def test_prefetch_while_busy_maps_one_slot_page_per_poll_until_the_work_is_done(manager):
    # 512 tokens a page: three slots each one token short of their page's end.
    slots = [manager.alloc(511) for _ in range(3)]
    buffers = manager.config.num_buffers
    assert manager.prefetch_while_busy(Pending(2), tokens=8) == 2 * buffers     # ready at the third check
    assert sorted(manager.mapped_pages()[slots].tolist()) == [1, 2, 2]
    assert manager.prefetch_while_busy(Pending(10), tokens=8) == buffers        # nothing more is needed
    assert manager.prefetch_while_busy(Pending(10), tokens=8) == 0
    assert manager.lengths()[slots].tolist() == [511] * 3
    assert manager.prefetch_while_busy(Pending(10), tokens=600, deadline=0.0) == 0   # past its deadline


def test_prefetch_while_busy_leaves_ready_work_alone(manager):
    slot = manager.alloc(511)
    assert manager.prefetch_while_busy(jnp.zeros(4).block_until_ready(), tokens=8) == 0
    assert manager.mapped_pages()[slot] == 1


@pytest.mark.parametrize("field, value", [("page_bytes", 2**62), ("max_len", 2**62), ("max_batch", 2**40),
                                          ("budget_bytes", 2**64), ("max_len", 2**64 - 1)])
def test_config_refuses_sizes_that_overflow(field, value):
    with pytest.raises(ValueError, match=f"{field}|2\\*\\*48"):
        small_config(**{field: value})


@pytest.mark.parametrize("call", [lambda m: m.alloc(1, 2**64 - 1), lambda m: m.alloc(2**63),
                                  lambda m: m.grow(2**64 - 1), lambda m: m.reserve_growth(2**63),
                                  lambda m: m.prefetch(1, 2**64), lambda m: m.free(2**63)])
def test_counts_that_would_overflow_are_refused(manager, call):
    with pytest.raises(ValueError, match="too large"):
        call(manager)
    assert manager.stats()["active_slots"] == 0


def test_reclaim_never_discards_memory_the_cache_no_longer_owns():
    # 512 tokens a page: a 600-token prompt takes 2 pages of every buffer, the whole budget.
    config = small_config(budget_bytes=8 * 64 * KiB)
    with jv.CacheManager(config, CPU) as manager:
        slot = manager.alloc(600)
        old = manager.cache
        copy = jax.jit(lambda cache: jax.tree.map(lambda a: a + 0, cache))(old)   # not donated: a copy
        jax.block_until_ready(copy)
        for array in (*old.k, *old.v):
            array.delete()                  # the cache's memory goes back to XLA...
        shape = old.k[0].shape
        others = [jax.device_put(np.full(shape, 7.0, np.float32), CPU) for _ in range(4)]   # ...and is reused
        jax.block_until_ready(others)
        manager.free(slot)
        assert manager.reclaim() == 8       # nothing proves the buffers are the cache's: no discard
        assert manager.alloc(600) == slot
        for other in others:
            assert np.all(np.asarray(other) == 7.0)


def test_reclaimed_pages_are_discarded_by_the_next_mapping_op():
    config = small_config(budget_bytes=8 * 64 * KiB)
    with jv.CacheManager(config, CPU) as manager:
        slot_bytes = manager.capacity * config.token_bytes
        slot = manager.alloc(600)
        step = jv.cache_jit(lambda cache, new, count: jv.write_kv(jv.grow(cache, 0), 0, new, new,
                                                                  jnp.zeros(3, jnp.int32), count))
        new = jnp.ones((3, 600, 2, 16), jnp.float32)
        count = jnp.zeros(3, jnp.int32).at[slot].set(600)
        cache = jax.block_until_ready(step(manager.cache, new, count))    # manager.cache is stale now
        base = cache.k[0].unsafe_buffer_pointer() + slot * slot_bytes
        before = _core.residency(base, slot_bytes)[0]
        assert before * _core.os_page_bytes() >= 600 * config.token_bytes
        manager.free(slot)
        manager.reclaim()
        assert _core.residency(base, slot_bytes)[0] == before     # queued: nothing proves the buffers live
        manager.cache = jax.block_until_ready(step(cache, new, jnp.zeros(3, jnp.int32)))   # the op proves it
        assert _core.residency(base, slot_bytes)[0] <= 2           # the OS pages shared with the neighbours


def test_close_frees_what_it_can_reports_the_rest_and_can_be_retried():
    driver = _core.FakeDriver(64 * KiB)
    manager = jv.CacheManager(small_config(), CPU, driver=driver)
    manager.alloc(600)
    driver.fail_on("unmap", 2)
    driver.fail_on("release", 1)
    with pytest.raises(jv.DriverError, match="Call release\\(\\) again"):
        manager.close()
    assert len(driver.mappings()) == 1
    manager.close()
    assert driver.mappings() == {} and driver.handles() == []
    manager.close()


def test_a_poisoned_manager_names_the_first_failure_and_still_closes():
    assert issubclass(jv.CacheManagerPoisonedError, RuntimeError)
    driver = _core.FakeDriver(64 * KiB)
    manager = jv.CacheManager(small_config(), CPU, driver=driver)
    driver.fail_on("map", 2)
    driver.fail_on("unmap", 1, after_a_failure=True)
    with pytest.raises(jv.DriverError, match="fake map failed"):
        manager.alloc(600)
    with pytest.raises(jv.CacheManagerPoisonedError, match="fake map failed.*close it"):
        manager.alloc(1)
    assert manager.stats()["poisoned"]
    manager.close()
    assert driver.mappings() == {} and driver.handles() == []
