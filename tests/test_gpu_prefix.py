"""Prefix sharing on a CUDA GPU: one physical page mapped in several slots, read by unpaged kernels.

Each case runs in its own process: a page wrongly left unmapped would fault and kill the CUDA
context for every test after it.
"""

import pytest

from own_process import run_function

pytestmark = pytest.mark.gpu
MiB = 1 << 20


def run_case(name: str, *args) -> None:
    run_function("test_gpu_prefix", name, *args)


def _setup(layout: str):
    """Slot A holds a 2500-token prompt and published its full pages; B shares them and writes only
    the rest, C holds a private copy. The same K and V everywhere. Returns (manager, cache, slots, k, v)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jax_vattention as jv

    config = jv.CacheConfig(num_layers=2, max_batch=3, max_len=4096, kv_heads=8, head_dim=128,
                            dtype=jnp.bfloat16, budget_bytes=1024 * MiB, layout=layout)
    manager = jv.CacheManager(config, jax.devices("gpu")[0])
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, 32_000, 2500)
    k = jnp.asarray(rng.normal(size=(1, 2500, 8, 128)), jnp.bfloat16)
    v = jnp.asarray(rng.normal(size=(1, 2500, 8, 128)), jnp.bfloat16)

    def write_all(cache, k, v, start, count, slots):
        for layer in range(config.num_layers):
            cache = jv.write_kv(cache, layer, k, v, start, count, slots)
        return cache

    write = jv.cache_jit(write_all)
    a = manager.alloc_shared(2500, prefix=prompt)
    cache = write(manager.cache, k, v, jnp.zeros(1, jnp.int32), jnp.full(1, 2500, jnp.int32),
                  jnp.full(1, a.slot, jnp.int32))
    manager.cache = cache
    assert manager.publish(a.slot, prompt) == 2500 // manager.tokens_per_page
    b = manager.alloc_shared(2500, prefix=prompt)
    shared = b.shared_tokens
    assert shared == 2500 // manager.tokens_per_page * manager.tokens_per_page
    manager.check_write(b.slot, shared)
    cache = write(manager.cache, k[:, shared:], v[:, shared:], jnp.full(1, shared, jnp.int32),
                  jnp.full(1, 2500 - shared, jnp.int32), jnp.full(1, b.slot, jnp.int32))
    c = manager.alloc(2500)
    cache = write(cache, k, v, jnp.zeros(1, jnp.int32), jnp.full(1, 2500, jnp.int32), jnp.full(1, c, jnp.int32))
    manager.cache = cache
    return manager, cache, (a.slot, b.slot, c), k, v


def aliased_pages_read_like_a_private_copy(layout: str) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jax_vattention.attention import cudnn_attention, pallas_attention

    manager, cache, (a, b, c), k, v = _setup(layout)
    view = manager._core.view()
    shared_pages = manager.stats()["shared_pages"] // (2 if layout == "interleaved" else 4)
    assert shared_pages >= 2 and view["slots"][a][:shared_pages] == view["slots"][b][:shared_pages]
    k_buffer, v_buffer, layer = cache.layer(1)
    # The tokens themselves: B's shared positions hold A's values, C's private ones the same.
    tokens = jax.jit(lambda buffer: buffer[:, :2500])(k_buffer)
    tokens = np.asarray(tokens[:, :, layer] if layer is not None else tokens, np.float32)
    np.testing.assert_array_equal(tokens[b], tokens[a])
    np.testing.assert_array_equal(tokens[c], tokens[a])
    np.testing.assert_array_equal(tokens[a], np.asarray(k[0], np.float32))
    q = jnp.asarray(np.random.default_rng(1).normal(size=(1, 1, 32, 128)), jnp.bfloat16)
    q = jnp.broadcast_to(q, (3, 1, 32, 128))
    lengths = jnp.full(3, 2500, jnp.int32)
    kernels = [pallas_attention] + ([cudnn_attention] if layout == "per_layer" else [])
    for kernel in kernels:
        out = jax.jit(lambda q, kb, vb, n, kernel=kernel: kernel(q, kb, vb, None, n, layer))(q, k_buffer, v_buffer,
                                                                                           lengths)
        out = np.asarray(out.astype(jnp.float32))
        np.testing.assert_allclose(out[b], out[c], atol=1e-6, err_msg=kernel.__name__)
        np.testing.assert_allclose(out[a], out[c], atol=1e-6, err_msg=kernel.__name__)
    manager.close()


def free_memory_moves_by_the_unshared_pages_only() -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jax_vattention as jv
    from test_gpu_cache import free_device_bytes

    config = jv.CacheConfig(num_layers=2, max_batch=3, max_len=4096, kv_heads=8, head_dim=128,
                            dtype=jnp.bfloat16, budget_bytes=1024 * MiB)
    with jv.CacheManager(config, jax.devices("gpu")[0]) as manager:
        prompt = np.arange(2500)
        a = manager.alloc_shared(2500, prefix=prompt)               # 3 pages in each of 4 buffers
        assert manager.publish(a.slot, prompt) == 2
        before = free_device_bytes()
        b = manager.alloc_shared(2500, prefix=prompt)
        assert b.shared_tokens == 2048
        assert before - free_device_bytes() == 1 * 4 * 2 * MiB       # only B's last page is new
        stats = manager.stats()
        assert stats["bytes_saved"] == 2 * 4 * 2 * MiB and stats["shared_pages"] == 2 * 4
        manager.free(a.slot)
        manager.free(b.slot)
        manager.reclaim()
        before = free_device_bytes()
        assert manager.evict() == 2 * 4
        manager.trim()
        assert free_device_bytes() - before == (2 + 2) * 4 * 2 * MiB  # the cached pages and the pooled ones


@pytest.mark.parametrize("layout", ["per_layer", "interleaved"])
def test_aliased_pages_read_like_a_private_copy(layout):
    run_case("aliased_pages_read_like_a_private_copy", layout)


def test_free_memory_moves_by_the_unshared_pages_only():
    run_case("free_memory_moves_by_the_unshared_pages_only")
