"""CPU residency follows the mapped pages, for every cache dtype and the default attention backend.

The CPU cache is XLA-owned memory that the OS commits page by page when it is first touched:
a write or a read of the whole capacity would commit every page while the manager reports a few
mapped. ``mincore`` (``_core.residency``) tells which pages are resident.
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_vattention as jv
from jax_vattention import _core
from jax_vattention.attention import attend
from jax_vattention.engine import Engine, EngineConfig, Request
from jax_vattention.decode.generate import generate_in_manager

CPU = jax.devices("cpu")[0]
KiB = 1024


def resident_bytes(manager, cache) -> list[int]:
    """Resident bytes of each buffer of ``cache``."""
    buffer_bytes = manager.config.max_batch * manager.capacity * manager.config.token_bytes
    return [_core.residency(buffer.unsafe_buffer_pointer(), buffer_bytes)[0] * _core.os_page_bytes()
            for buffer in (*cache.k, *cache.v)]


def assert_resident_within_mapped(manager, cache):
    mapped = int(manager.mapped_pages().sum()) * manager.page_bytes     # in each buffer
    edges = 2 * manager.config.max_batch * _core.os_page_bytes()      # OS pages shared with neighbours
    for resident in resident_bytes(manager, cache):
        assert resident <= mapped + edges, (resident, mapped)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_a_decode_step_with_the_default_backend_touches_only_mapped_pages(dtype):
    # 8 heads x 128: 2-4 KiB a token; a slot spans 128-256 MiB of address space per buffer.
    config = jv.CacheConfig(num_layers=1, max_batch=2, max_len=1 << 16, kv_heads=8, head_dim=128, dtype=dtype,
                            page_bytes=64 * KiB, budget_bytes=1 << 30)
    with jv.CacheManager(config, CPU) as manager:
        slot = manager.alloc(40)
        lengths = jnp.zeros(2, jnp.int32).at[slot].set(40)
        active = jnp.zeros(2, jnp.int32).at[slot].set(1)

        @jv.cache_jit
        def step(cache, q, new, lengths):
            cache = jv.grow(cache, 1)
            cache = jv.write_kv(cache, 0, new, new, start=lengths, count=active)
            k, v, _ = cache.layer(0)
            out = attend(q, k, v, q_positions=lengths[:, None], kv_lengths=(lengths + 1) * active)
            return cache, out

        cache = manager.cache
        q = jnp.ones((2, 1, 8, 128), dtype)
        new = jnp.ones((2, 1, 8, 128), dtype)
        for _ in range(3):
            cache, out = step(cache, q, new, lengths)
            lengths = lengths + active
        manager.cache = jax.block_until_ready(cache)
        assert np.isfinite(np.asarray(out, np.float32)).all()
        assert_resident_within_mapped(manager, manager.cache)


def bfloat16_manager(model):
    config = model.config
    return jv.CacheManager(jv.CacheConfig(num_layers=config.num_layers, max_batch=2, max_len=1 << 18,
                                          kv_heads=config.num_kv_heads, head_dim=config.head_dim,
                                          dtype=jnp.bfloat16, page_bytes=64 * KiB, budget_bytes=1 << 28), CPU)


def test_generate_and_the_engine_on_a_bfloat16_cache_touch_only_mapped_pages():
    """Run in a fresh process: in a long one (the whole suite), memory that earlier tests touched and
    freed can come back as this cache's buffers, already resident."""
    package_parent = os.path.dirname(os.path.dirname(os.path.realpath(jv.__file__)))
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join(filter(None, [package_parent, os.path.dirname(__file__),
                                                       os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", "import test_residency as t; t.check_generate_and_engine()"],
                          capture_output=True, text=True, timeout=600, env=env, cwd=os.path.dirname(__file__))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]


def check_generate_and_engine():
    """Generate and the engine on a bfloat16 cache leave only mapped pages resident."""
    from flax import nnx

    from jax_vattention.models import Llama, get_config

    model = Llama(get_config("tiny"), rngs=nnx.Rngs(0))
    with bfloat16_manager(model) as manager:
        result = generate_in_manager(model, manager, [[5, 6, 7], [9] * 20], max_new_tokens=6)
        assert [len(tokens) for tokens in result.tokens] == [6, 6]
        assert_resident_within_mapped(manager, manager.cache)
        engine = Engine(model, manager, EngineConfig(token_budget=16, chunk_tokens=4))
        engine.submit(Request(prompt=[3, 4, 5], max_new_tokens=9))
        assert len(next(iter(engine.run().values()))) == 9
        assert_resident_within_mapped(manager, manager.cache)


@pytest.mark.parametrize("offset, count", [(0, 3 * 1024), (100, 5000), (4000, 20)])
def test_clear_pages_zeros_an_unaligned_range_and_nothing_around_it(offset, count):
    """A fresh CPU cache buffer is XLA's memory, maybe recycled and holding anything (NaN a reference
    attention would multiply by a zero weight into NaN): the manager clears it, edges included."""
    memory = np.full(16 * 1024, np.nan, np.float32)
    base = memory.ctypes.data + offset * 4
    _core.clear_pages(base, count * 4)
    np.testing.assert_array_equal(memory[offset:offset + count], 0)
    assert np.isnan(memory[:offset]).all() and np.isnan(memory[offset + count:]).all()


def test_a_fresh_cache_reads_as_zeros_over_recycled_memory():
    config = jv.CacheConfig(num_layers=1, max_batch=2, max_len=64, kv_heads=1, head_dim=24, dtype=jnp.float32)
    for _ in range(3):   # buffers of the cache's size, filled with NaN and freed: XLA may hand them out again
        poison = [jnp.full(config.buffer_shape(config.capacity(64 * KiB)), jnp.nan) for _ in range(2)]
        jax.block_until_ready(poison)
        del poison
        with jv.CacheManager(config, CPU) as manager:
            assert not np.isnan(np.asarray(manager.cache.k[0])).any()
            assert not np.isnan(np.asarray(manager.cache.v[0])).any()
