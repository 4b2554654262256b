"""The virtual cache on a CUDA GPU: reserved ranges, real page mapping, cuDNN over a partly mapped cache."""

import functools
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_vattention as jv
from jax_vattention import _core

pytestmark = pytest.mark.gpu
MiB = 1 << 20


def gpu():
    return jax.devices("gpu")[0]


def free_device_bytes() -> int:
    cuda = pytest.importorskip("cuda.bindings.driver", reason="needs cuda-python: pip install '.[gpu]'")
    cuda.cuInit(0)
    _, device = cuda.cuDeviceGet(gpu().local_hardware_id)
    _, context = cuda.cuDevicePrimaryCtxRetain(device)
    cuda.cuCtxPushCurrent(context)
    try:
        error, free, _ = cuda.cuMemGetInfo()
        assert error == cuda.CUresult.CUDA_SUCCESS
        return free
    finally:
        cuda.cuCtxPopCurrent()
        cuda.cuDevicePrimaryCtxRelease(device)


def config(**overrides):
    # 8 heads x 128 x bf16 = 2 KiB a token: a 2 MiB page holds 1024 tokens.
    settings = dict(num_layers=2, max_batch=2, max_len=4096, kv_heads=8, head_dim=128,
                    dtype=jnp.bfloat16, budget_bytes=512 * MiB)
    settings.update(overrides)
    return jv.CacheConfig(**settings)


def test_buffers_are_zero_copy_views_of_the_reservations():
    with jv.CacheManager(config(), gpu()) as manager:
        bases = manager._core.buffer_bases()
        cache = manager.cache
        assert [a.unsafe_buffer_pointer() for a in (*cache.k, *cache.v)] == bases
        assert manager.page_bytes == 2 * MiB and manager.capacity == 4096
        assert cache.k[0].devices() == {gpu()}


def test_free_device_memory_moves_by_exactly_the_mapped_pages():
    with jv.CacheManager(config(), gpu()) as manager:
        before = free_device_bytes()
        slot = manager.alloc(1500)                        # 2 pages in each of 4 buffers
        assert before - free_device_bytes() == 8 * 2 * MiB
        manager.grow(1000)                                # 2500 tokens: 3 pages each
        assert before - free_device_bytes() == 12 * 2 * MiB
        manager.free(slot)
        assert before - free_device_bytes() == 12 * 2 * MiB   # deferred reclamation keeps them
        manager.reclaim()
        manager.trim()
        assert free_device_bytes() == before


@functools.partial(jv.cache_jit, static_argnames="steps")
def write_steps(cache, start, steps):
    """Step i writes the value start + i + 1 (as bf16 of a small int) at position start + i of slot 0."""

    def body(i, cache):
        cache = jv.grow(cache, tokens=1)
        value = (i % 251 + 1).astype(jnp.bfloat16)
        new = jnp.full((2, 1, 8, 128), value, jnp.bfloat16)
        count = jnp.array([1, 0], jnp.int32)
        for layer in range(cache.num_layers):
            cache = jv.write_kv(cache, layer, new, -new, start + i, count)
        return cache

    return jax.lax.fori_loop(0, steps, body, cache)


def test_a_long_jitted_loop_crosses_pages_in_place():
    with jv.CacheManager(config(), gpu()) as manager:
        slot = manager.alloc(500)
        assert slot == 0
        cache = manager.cache
        before = [a.unsafe_buffer_pointer() for a in (*cache.k, *cache.v)]
        steps = 2500                                      # 500 -> 3000 tokens: pages 1 -> 3
        manager.reserve_growth(steps)
        cache = write_steps(cache, jnp.array([500, 0], jnp.int32), steps=steps)
        jax.block_until_ready(cache)
        assert [a.unsafe_buffer_pointer() for a in (*cache.k, *cache.v)] == before
        assert manager.lengths().tolist() == [3000, 0]
        assert manager.mapped_pages().tolist() == [3, 0]
        expected = (np.arange(steps) % 251 + 1).astype(np.float32)
        for layer in range(2):
            got = np.asarray(cache.k[layer][0, 500:3000, 3, 7].astype(jnp.float32))
            np.testing.assert_array_equal(got, expected)
            got = np.asarray(cache.v[layer][0, 500:3000, 5, 0].astype(jnp.float32))
            np.testing.assert_array_equal(got, -expected)


def reference_attention(q, k, v, lengths):
    """float32 [B, 1, N, H] attention over the first lengths[b] keys, with GQA."""
    q, k, v = (np.asarray(x, np.float32) for x in (q, k, v))
    groups = q.shape[2] // k.shape[2]
    out = np.zeros(q.shape, np.float32)
    for b, length in enumerate(lengths):
        keys = np.repeat(k[b, :length], groups, axis=1)            # [S, N, H]
        values = np.repeat(v[b, :length], groups, axis=1)
        scores = np.einsum("tnh,snh->nts", q[b], keys) / np.sqrt(q.shape[-1])
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        out[b] = np.einsum("nts,snh->tnh", weights, values)
    return out


def test_cudnn_attention_over_a_partly_mapped_cache_matches_a_dense_reference():
    rng = np.random.default_rng(1)
    lengths = np.array([1700, 300], np.int32)
    with jv.CacheManager(config(), gpu()) as manager:
        for length in lengths:
            manager.alloc(int(length))
        k = rng.normal(size=(2, 1700, 8, 128)).astype(np.float32)
        v = rng.normal(size=(2, 1700, 8, 128)).astype(np.float32)
        write = jv.cache_jit(lambda cache, k, v, count: jv.write_kv(
            cache, 0, k, v, jnp.zeros(2, jnp.int32), count))
        cache = write(manager.cache, jnp.asarray(k, jnp.bfloat16), jnp.asarray(v, jnp.bfloat16),
                      jnp.asarray(lengths))
        q = jnp.asarray(rng.normal(size=(2, 1, 32, 128)), jnp.bfloat16)

        @jax.jit
        def attend(q, k_cache, v_cache, lengths):
            return jax.nn.dot_product_attention(q, k_cache, v_cache, implementation="cudnn",
                                                query_seq_lengths=jnp.ones_like(lengths),
                                                key_value_seq_lengths=lengths)

        out = attend(q, cache.k[0], cache.v[0], jnp.asarray(lengths))
        bf16 = lambda x: np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32))
        expected = reference_attention(bf16(q), bf16(k), bf16(v), lengths)
        np.testing.assert_allclose(np.asarray(out.astype(jnp.float32)), expected, atol=2e-2, rtol=2e-2)


def test_reclaim_waits_for_queued_work_that_reads_the_pages():
    # In its own process: if reclaim unmapped too early the read would fault
    # and kill the CUDA context.
    script = textwrap.dedent("""
        import jax, jax.numpy as jnp, numpy as np
        import jax_vattention as jv
        config = jv.CacheConfig(num_layers=1, max_batch=2, max_len=65536, kv_heads=8, head_dim=128,
                                dtype=jnp.bfloat16, budget_bytes=1 << 30)
        manager = jv.CacheManager(config, jax.devices("gpu")[0])
        slot = manager.alloc(65536)
        fill = jv.cache_jit(lambda cache: jv.KVCache(
            k=(cache.k[0].at[0].set(1),), v=(cache.v[0].at[0].set(1),), manager_id=cache.manager_id))
        cache = fill(manager.cache)

        @jax.jit
        def slow_sum(k):
            # acc inside the sum keeps XLA from hoisting the read out of the loop.
            body = lambda i, acc: acc + jnp.sum(k[0].astype(jnp.float32) + acc * 1e-30) * 1e-9
            return jax.lax.fori_loop(0, 400, body, jnp.float32(0))

        total = slow_sum(cache.k[0])          # queued: reads all 128 MiB of slot 0, 400 times
        manager.free(slot)
        pages = manager.reclaim()             # must wait for slow_sum before unmapping
        print("reclaimed", pages, "total", float(total))
    """)
    result = subprocess.run([sys.executable, "-P", "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "reclaimed 128" in result.stdout
    expected = 400 * 65536 * 8 * 128 * 1e-9
    assert abs(float(result.stdout.split()[-1]) - expected) / expected < 1e-2


def test_page_manager_on_the_cuda_driver_ends_with_nothing_mapped():
    rng = np.random.default_rng(2)
    driver = _core.cuda_driver(gpu().local_hardware_id)
    before = free_device_bytes()
    manager = _core.PageManager(4, 4, 4096, 2048, 2 * MiB, driver, 40 * 2 * MiB)
    manager.reserve_buffers()
    live = set()
    for _ in range(1000):
        action = rng.random()
        try:
            if action < 0.4:
                live.add(manager.alloc(int(rng.integers(0, 4097))))
            elif action < 0.7 and live:
                slot = int(rng.choice(sorted(live)))
                live.remove(slot)
                manager.free(slot)
            else:
                manager.grow(int(rng.integers(1, 600)))
        except (jv.OutOfPagesError, jv.NoFreeSlotError):
            pass
        stats = manager.stats()
        assert before - free_device_bytes() == stats["created_pages"] * 2 * MiB
    for slot in live:
        manager.free(slot)
    manager.reclaim()
    assert manager.stats()["mapped_pages"] == 0
    manager.release()
    assert free_device_bytes() == before
