"""Forks on a CUDA GPU: the parent's full pages mapped in the child's range, its last page copied.

Each case runs in its own process: a page wrongly left unmapped would fault and kill the CUDA
context for every test after it.
"""

import pytest

from own_process import run_function

pytestmark = pytest.mark.gpu
MiB = 1 << 20


def run_case(name: str, *args) -> None:
    run_function("test_gpu_forks", name, *args)


def _manager(layout: str):
    import jax
    import jax.numpy as jnp

    import jax_vattention as jv

    config = jv.CacheConfig(num_layers=2, max_batch=3, max_len=4096, kv_heads=8, head_dim=128,
                            dtype=jnp.bfloat16, budget_bytes=1024 * MiB, layout=layout)
    return jv.CacheManager(config, jax.devices("gpu")[0])


def _writer():
    import jax_vattention as jv

    def write_all(cache, k, v, start, count, slots):
        for layer in range(cache.num_layers):
            cache = jv.write_kv(cache, layer, k, v, start, count, slots)
        return cache

    return jv.cache_jit(write_all)


def _tokens(cache, slot: int, count: int):
    """Layer 1's K of the first ``count`` tokens of ``slot`` (only that slot's mapped pages are read)."""
    import jax
    import numpy as np

    k_buffer, _, layer = cache.layer(1)
    tokens = np.asarray(jax.jit(lambda buffer: buffer[slot, :count])(k_buffer), np.float32)
    return tokens[:, layer] if layer is not None else tokens


def a_fork_shares_the_full_pages_and_copies_the_last(layout: str) -> None:
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(0)
    manager = _manager(layout)
    write = _writer()
    per_page = manager.tokens_per_page                         # 1024 per layer, 512 interleaved
    parent = manager.alloc(2500)
    k = jnp.asarray(rng.normal(size=(1, 2500, 8, 128)), jnp.bfloat16)
    manager.cache = write(manager.cache, k, k, jnp.zeros(1, jnp.int32), jnp.full(1, 2500, jnp.int32),
                          jnp.full(1, parent, jnp.int32))
    child = manager.fork(parent, lookahead=16)
    full = 2500 // per_page
    view = manager.page_manager.view()
    assert view["slots"][child][:full] == view["slots"][parent][:full]
    assert not set(view["slots"][child][full]) & set(view["slots"][parent][full])
    assert manager.stats()["shared_pages"] == full * manager.config.num_buffers
    np.testing.assert_array_equal(_tokens(manager.cache, child, 2500), np.asarray(k[0], np.float32))
    np.testing.assert_array_equal(_tokens(manager.cache, parent, 2500), np.asarray(k[0], np.float32))
    for slot in (parent, child):
        assert manager.writable_from(slot) == full * per_page
    # Each slot writes its own next tokens; the other's stay.
    new = jnp.asarray(rng.normal(size=(2, 8, 8, 128)), jnp.bfloat16)
    manager.cache = write(manager.cache, new, new, jnp.full(2, 2500, jnp.int32), jnp.full(2, 8, jnp.int32),
                          jnp.asarray([parent, child], jnp.int32))
    for slot, row in ((parent, 0), (child, 1)):
        tokens = _tokens(manager.cache, slot, 2508)
        np.testing.assert_array_equal(tokens[:2500], np.asarray(k[0], np.float32))
        np.testing.assert_array_equal(tokens[2500:], np.asarray(new[row], np.float32))
    manager.close()


def free_memory_moves_by_the_copied_pages_only() -> None:
    from test_gpu_cache import free_device_bytes

    with _manager("per_layer") as manager:                       # 1024 tokens a page, 4 buffers
        start = free_device_bytes()
        parent = manager.alloc(2500)                             # 3 pages in each buffer
        assert start - free_device_bytes() == 3 * 4 * 2 * MiB
        before = free_device_bytes()
        child = manager.fork(parent)
        assert before - free_device_bytes() == 1 * 4 * 2 * MiB   # only the copy of the last page
        stats = manager.stats()
        assert stats["bytes_saved"] == 2 * 4 * 2 * MiB and stats["forked_pages"] == 2 * 4
        manager.free(parent)
        manager.reclaim()                                        # the shared pages stay: the child maps them
        before = free_device_bytes()
        assert manager.trim() == 1 * 4
        assert free_device_bytes() - before == 1 * 4 * 2 * MiB
        manager.free(child)
        manager.reclaim()
        assert manager.trim() == 3 * 4
        assert free_device_bytes() == start


@pytest.mark.parametrize("layout", ["per_layer", "interleaved"])
def test_a_fork_shares_the_full_pages_and_copies_the_last(layout):
    run_case("a_fork_shares_the_full_pages_and_copies_the_last", layout)


def test_free_memory_moves_by_the_copied_pages_only():
    run_case("free_memory_moves_by_the_copied_pages_only")
