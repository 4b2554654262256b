"""GPU regression cases that could fault the CUDA context, each run in its own process.

``python tests/gpu_cases.py CASE`` prints ``CASE OK`` on success. ``tests/test_gpu_safety.py``
runs every case so that a fault kills only that process, not the test suite.
"""

from __future__ import annotations

import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

import jax_vattention as jv
from jax_vattention.attention import blocked_attention, xla_attention
from jax_vattention.cache.guards import mapping_failures

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
    nothing past the lengths, and match the float32 reference. On a GPU ``chunk_attention`` runs the
    Pallas chunk kernel (no host-read loop bound in the step); the kernel is also called directly, with
    its default and with small tiles."""
    from jax_vattention.attention import chunk_attention
    from jax_vattention.attention.kernels.chunk_attention import chunk_attention as chunk_kernel

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
            args = (jnp.asarray(slots), jnp.asarray(positions), jnp.asarray(start + count))
            attend = jax.jit(chunk_attention, static_argnames="layer")
            lowered = attend.lower(q, k, v, slots=args[0], q_positions=args[1], kv_lengths=args[2],
                                   layer=index).as_text()
            assert "triton" in lowered and "stablehlo.while" not in lowered, "not the chunk kernel"
            got = attend(q, k, v, slots=args[0], q_positions=args[1], kv_lengths=args[2], layer=index)
            got = np.asarray(jax.block_until_ready(got), np.float32)
            rows = np.minimum(slots, 2)
            dense = jnp.where((jnp.arange(1100) < jnp.asarray(lengths)[:, None])[:, :, None, None], new, 0)[rows]
            dense = dense.astype(jnp.float32)
            want = np.asarray(xla_attention(q.astype(jnp.float32), dense, dense, args[1],
                                            jnp.asarray(np.where(slots < 3, start + count, 0))))
            real = np.arange(16)[None] < count[:, None]
            np.testing.assert_allclose(got[real], want[real], atol=3e-2, rtol=3e-2)
            np.testing.assert_array_equal(got[slots >= 3], 0.0)
            for tiles in ({}, {"block_q": 4, "block_k": 16}):
                direct = jax.jit(functools.partial(chunk_kernel, layer=index, interpret=False, **tiles))
                got = np.asarray(jax.block_until_ready(direct(q, k, v, *args)), np.float32)
                np.testing.assert_allclose(got[real], want[real], atol=3e-2, rtol=3e-2, err_msg=f"{tiles}")
                np.testing.assert_array_equal(got[slots >= 3], 0.0)


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


def hopper() -> bool:
    return str(getattr(gpu(), "compute_capability", "")).split(".")[0] == "9"


def mosaic_prefill_matches_reference() -> None:
    """Issue 12 item 7: JAX's Mosaic GPU flash attention behind backend='mosaic' prefills like the
    float32 reference on every real token (padded prompts, GQA, head_dim 64 and 128)."""
    if not hopper():
        print(f"not a Hopper GPU ({gpu().device_kind}): the case checks the refusal only")
        try:
            jv.attention.check_backend_on("mosaic", "per_layer", "gpu", compute_capability=gpu().compute_capability)
            raise AssertionError("backend 'mosaic' was accepted off Hopper")
        except ValueError as error:
            assert "Hopper" in str(error)
        return
    from jax_vattention.attention import attend_prompt

    rng = np.random.default_rng(7)
    for batch, tokens, q_heads, kv_heads, head_dim, lengths in ((2, 300, 32, 8, 128, (300, 77)),
                                                                 (3, 5, 4, 2, 64, (5, 1, 3))):
        q, k, v = (jnp.asarray(rng.standard_normal((batch, tokens, heads, head_dim)), jnp.bfloat16)
                   for heads in (q_heads, kv_heads, kv_heads))
        lengths = jnp.asarray(lengths, jnp.int32)
        got = jax.jit(attend_prompt, static_argnames="backend")(q, k, v, lengths, backend="mosaic")
        got = np.asarray(jax.block_until_ready(got), np.float32)
        want = np.asarray(xla_attention(*(x.astype(jnp.float32) for x in (q, k, v)),
                                        jnp.broadcast_to(jnp.arange(tokens), (batch, tokens)), lengths))
        real = np.arange(tokens)[None] < np.asarray(lengths)[:, None]
        np.testing.assert_allclose(got[real], want[real], atol=2e-2, rtol=2e-2)


def mosaic_generate_matches_cudnn() -> None:
    """Issue 12 item 7: generate with backend='mosaic' (Mosaic prefill) gives the tokens of the backend
    that differs from it only in the prefill kernel: cuDNN per-layer, Pallas interleaved (float16,
    head_dim 64, so that the query scale is exact and only the kernels differ)."""
    if not hopper():
        print(f"not a Hopper GPU ({gpu().device_kind}): skipped")
        return
    from jax_vattention.decode.generate import generate_in_manager
    from jax_vattention.models.configs import get_config
    from jax_vattention.models.llama import Llama

    config = get_config("tiny").replace(hidden_size=256, num_heads=4, num_kv_heads=2, head_dim=64, dtype="float16")
    model = Llama(config, rngs=nnx.Rngs(0))
    prompts = [[(7 * i + j) % 250 + 1 for j in range(n)] for i, n in enumerate((3, 70, 200))]
    for layout, other in (("per_layer", "cudnn"), ("interleaved", "pallas")):
        cache_config = jv.CacheConfig(num_layers=config.num_layers, max_batch=4, max_len=1024,
                                      kv_heads=config.num_kv_heads, head_dim=config.head_dim, dtype=jnp.float16,
                                      budget_bytes=256 * MiB, layout=layout)
        with jv.CacheManager(cache_config, gpu()) as manager:
            results = {backend: generate_in_manager(model, manager, prompts, max_new_tokens=8, backend=backend).tokens
                       for backend in ("mosaic", other)}
        assert results["mosaic"] == results[other], (layout, results)


def paged_kernels_match_reference() -> None:
    """Issue 12 item 6: the paged baselines (cuDNN paged, Pallas paged) against the float32 reference
    through the same block table, ragged lengths (one 0), bf16 32q/8kv D128, blocks of 16, 64, 128."""
    from jax_vattention.bench.paged_cache import (PagedKVCache, paged_cudnn_attention, paged_pallas_attention,
                                            paged_reference)

    rng = np.random.default_rng(8)
    batch, capacity = 4, 1000
    dense = jv.KVCache(k=(jnp.asarray(rng.standard_normal((batch, capacity, 8, 128)), jnp.bfloat16),),
                       v=(jnp.asarray(rng.standard_normal((batch, capacity, 8, 128)), jnp.bfloat16),))
    q = jnp.asarray(rng.standard_normal((batch, 32, 128)), jnp.bfloat16)
    lengths = jnp.array([1000, 0, 1, 517], jnp.int32)
    for block_size in (16, 64, 128):
        for heads_first, kernel in ((False, paged_cudnn_attention), (True, paged_pallas_attention)):
            paged = PagedKVCache.from_dense(dense, block_size=block_size, heads_first=heads_first)
            got = jax.jit(kernel)(q, paged.k[0], paged.v[0], paged.block_table, lengths)
            got = np.asarray(jax.block_until_ready(got), np.float32)
            want = np.asarray(paged_reference(q, paged.k[0], paged.v[0], paged.block_table, lengths,
                                              heads_first=heads_first))
            live = np.asarray(lengths) > 0  # cuDNN's row of length 0 is masked by PagedKVCache.attend
            np.testing.assert_allclose(got[live], want[live], atol=2e-2, rtol=2e-2,
                                       err_msg=f"{kernel.__name__} block {block_size}")


CASES = {function.__name__: function for function in (
    engine_default_backend, blocked_on_a_partly_mapped_cache, chunk_attention_on_a_partly_mapped_cache,
    out_of_pages_in_a_step_rebuilds_the_cache, mosaic_prefill_matches_reference, mosaic_generate_matches_cudnn,
    paged_kernels_match_reference)}


if __name__ == "__main__":
    CASES[sys.argv[1]]()
    print(f"{sys.argv[1]} OK")
