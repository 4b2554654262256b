"""GPU regression cases that could fault the CUDA context, each run in its own process.

``python tests/gpu_cases.py CASE`` prints ``CASE OK`` on success. ``tests/test_gpu_safety.py``
runs every case so that a fault kills only that process, not the test suite.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

import jax_vattention as jv
from jax_vattention.attention import blocked_attention, xla_attention
from jax_vattention.preflight import mapping_failures

MiB = 1 << 20


def gpu():
    return jax.devices("gpu")[0]


def engine_default_backend() -> None:
    """Issue 10 item 1: the engine's default backend on a virtual GPU cache is safe; 'xla' is refused."""
    from jax_vattention.engine import Engine, EngineConfig, Request
    from jax_vattention.models.configs import get_config
    from jax_vattention.models.llama import Llama

    config = get_config("tiny").replace(dtype="bfloat16")
    model = Llama(config, rngs=nnx.Rngs(0))
    for layout, expected in (("per_layer", "cudnn"), ("interleaved", "pallas")):
        cache_config = jv.CacheConfig(num_layers=config.num_layers, max_batch=4, max_len=4096,
                                      kv_heads=config.num_kv_heads, head_dim=config.head_dim,
                                      dtype=jnp.bfloat16, budget_bytes=256 * MiB, layout=layout)
        with jv.CacheManager(cache_config, gpu()) as manager:
            try:
                Engine(model, manager, EngineConfig(token_budget=16, chunk_tokens=4, backend="xla"))
                raise AssertionError("backend 'xla' was accepted for a virtual GPU cache")
            except ValueError as error:
                assert "whole cache capacity" in str(error)
            engine = Engine(model, manager, EngineConfig(token_budget=16, chunk_tokens=4))
            assert engine.backend == expected, engine.backend
            ids = [engine.submit(Request(prompt=[3, 4, 5, 6][:n], max_new_tokens=9)) for n in (1, 4)]
            outputs = engine.run()
            assert all(len(outputs[i]) == 9 for i in ids)


def blocked_on_a_partly_mapped_cache() -> None:
    """The blocked backend reads a partly mapped cache only below each length, and matches xla."""
    config = jv.CacheConfig(num_layers=1, max_batch=3, max_len=8192, kv_heads=8, head_dim=128,
                            dtype=jnp.bfloat16, budget_bytes=256 * MiB)
    with jv.CacheManager(config, gpu()) as manager:
        lengths = np.array([0, 5, 1500], np.int32)              # 0, 1 and 2 pages of 1024 tokens
        for slot, length in enumerate(lengths):
            assert manager.alloc(int(length)) == slot
        write = jv.cache_jit(lambda cache, new, count: jv.write_kv(cache, 0, new, new, jnp.zeros_like(count),
                                                                  count))
        rng = np.random.default_rng(0)
        new = jnp.asarray(rng.standard_normal((3, 1500, 8, 128)), jnp.bfloat16)
        manager.cache = write(manager.cache, new, jnp.asarray(lengths))
        q = jnp.asarray(rng.standard_normal((3, 1, 32, 128)), jnp.bfloat16)
        k, v, _ = manager.cache.layer(0)
        got = jax.jit(blocked_attention)(q, k, v, jnp.asarray(np.maximum(lengths - 1, 0)[:, None]),
                                         jnp.asarray(lengths))
        got = np.asarray(jax.block_until_ready(got), np.float32)
        dense = jnp.where((jnp.arange(1500) < jnp.asarray(lengths)[:, None])[:, :, None, None], new, 0)
        want = xla_attention(q, dense, dense, jnp.asarray(np.maximum(lengths - 1, 0)[:, None]), jnp.asarray(lengths))
        np.testing.assert_allclose(got, np.asarray(want, np.float32), atol=2e-2, rtol=2e-2)


def chunk_attention_on_a_partly_mapped_cache() -> None:
    """Issue 12 item 2: prefill chunks attend over a partly mapped cache in place (both layouts), reading
    nothing past the lengths, and match the float32 reference."""
    from jax_vattention.attention import chunk_attention

    for layout in ("per_layer", "interleaved"):
        config = jv.CacheConfig(num_layers=2, max_batch=3, max_len=8192, kv_heads=8, head_dim=128,
                                dtype=jnp.bfloat16, budget_bytes=512 * MiB, layout=layout)
        with jv.CacheManager(config, gpu()) as manager:
            lengths = np.array([40, 1030, 700], np.int32)     # ends of the chunks below, past page edges
            for length in lengths:
                manager.alloc(int(length))
            rng = np.random.default_rng(1)
            new = jnp.asarray(rng.standard_normal((3, 1100, 8, 128)), jnp.bfloat16)
            write = jv.cache_jit(lambda cache, new, count: jv.write_kv(cache, 1, new, new, jnp.zeros_like(count),
                                                                      count))
            manager.cache = write(manager.cache, new, jnp.asarray(lengths))
            # Rows: slot 0's first chunk, two consecutive chunks of slot 1, a chunk of slot 2, padding.
            slots = np.array([0, 1, 1, 2, 3], np.int32)
            start = np.array([24, 1000, 1016, 690, 0], np.int32)
            count = np.array([16, 16, 14, 10, 0], np.int32)
            positions = start[:, None] + np.arange(16, dtype=np.int32)[None]
            q = jnp.asarray(rng.standard_normal((5, 16, 32, 128)), jnp.bfloat16)
            k, v, index = manager.cache.layer(1)
            got = jax.jit(chunk_attention, static_argnames="layer")(
                q, k, v, slots=jnp.asarray(slots), q_positions=jnp.asarray(positions),
                kv_lengths=jnp.asarray(start + count), layer=index)
            got = np.asarray(jax.block_until_ready(got), np.float32)
            rows = np.minimum(slots, 2)
            dense = jnp.where((jnp.arange(1100) < jnp.asarray(lengths)[:, None])[:, :, None, None], new, 0)[rows]
            want = np.asarray(xla_attention(q, dense, dense, jnp.asarray(positions),
                                            jnp.asarray(np.where(slots < 3, start + count, 0))), np.float32)
            real = np.arange(16)[None] < count[:, None]
            np.testing.assert_allclose(got[real], want[real], atol=3e-2, rtol=3e-2)


def out_of_pages_in_a_step_rebuilds_the_cache() -> None:
    """Issue 10 items 10 and 14: a step that runs out of pages inside becomes OutOfPagesError, and the
    manager's cache is rebuilt over the same reservations, usable at once."""
    config = jv.CacheConfig(num_layers=1, max_batch=2, max_len=4096, kv_heads=8, head_dim=128,
                            dtype=jnp.bfloat16, budget_bytes=2 * 2 * MiB)     # one page in each of 2 buffers
    with jv.CacheManager(config, gpu()) as manager:
        slot = manager.alloc(1020)
        bases = manager._core.buffer_bases()
        step = jv.cache_jit(lambda cache: lax.fori_loop(0, 10, lambda i, c: jv.grow(c, 1), cache))
        cache = manager.cache
        try:
            with mapping_failures(manager, cache, "the test step"):
                manager.cache = jax.block_until_ready(step(cache))
            raise AssertionError("the step did not run out of pages")
        except jv.OutOfPagesError as error:
            assert "rebuilt" in str(error) or "intact" in str(error), error
        assert not manager.lost
        assert [a.unsafe_buffer_pointer() for a in (*manager.cache.k, *manager.cache.v)] == bases
        write = jv.cache_jit(lambda cache, new: jv.write_kv(cache, 0, new, new, jnp.zeros(2, jnp.int32),
                                                           jnp.array([1, 0], jnp.int32)))
        manager.cache = write(manager.cache, jnp.ones((2, 1, 8, 128), jnp.bfloat16))
        assert float(manager.cache.k[0][slot, 0, 0, 0]) == 1.0
        manager.free(slot)
        assert manager.reclaim() >= 0


CASES = {function.__name__: function for function in (
    engine_default_backend, blocked_on_a_partly_mapped_cache, chunk_attention_on_a_partly_mapped_cache,
    out_of_pages_in_a_step_rebuilds_the_cache)}


if __name__ == "__main__":
    CASES[sys.argv[1]]()
    print(f"{sys.argv[1]} OK")
