"""The paged baseline on the CPU: writes and attention through the block table against the dense cache,
Pallas' paged kernel (interpreted; JAX before 0.12 ships it) against the reference, and the model's
decode through a paged cache against the virtual one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jax_vattention as jv
from jax_vattention import _core
from jax_vattention.attention import xla_attention
from jax_vattention.bench.decode_chunk import decode_chunk_fn
from jax_vattention.bench.paged_cache import (PagedKVCache, paged_pallas_attention, paged_reference,
                                              pallas_paged_shipped)
from jax_vattention.decode.step_batch import StepBatch

CPU = jax.devices("cpu")[0]
needs_pallas_paged = pytest.mark.skipif(not pallas_paged_shipped(),
                                        reason=f"jax {jax.__version__} ships no Pallas paged kernel (tokamax has it)")


def random_dense(rng, batch=3, capacity=40, kv_heads=2, head_dim=16, layers=1):
    def array():
        return jnp.asarray(rng.standard_normal((batch, capacity, kv_heads, head_dim)), jnp.float32)
    return jv.KVCache(k=tuple(array() for _ in range(layers)), v=tuple(array() for _ in range(layers)))


@pytest.mark.parametrize("heads_first", [False, True])
@pytest.mark.parametrize("block_size", [8, 16])
def test_the_reference_through_the_block_table_equals_the_dense_cache_on_ragged_lengths(heads_first, block_size):
    rng = np.random.default_rng(block_size)
    dense = random_dense(rng)
    paged = PagedKVCache.from_dense(dense, block_size=block_size, heads_first=heads_first)
    assert paged.capacity == (48 if block_size == 16 else 40)
    assert sorted(np.asarray(paged.block_table).ravel().tolist()) == list(range(paged.num_blocks))
    lengths = jnp.array([0, 7, 40], jnp.int32)
    q = jnp.asarray(rng.standard_normal((3, 1, 4, 16)), jnp.float32)
    positions = jnp.maximum(lengths - 1, 0)[:, None]
    want = xla_attention(q, dense.k[0], dense.v[0], positions, lengths)  # [B, 1, N, H]
    got = paged.attend(0, q, q_positions=positions, kv_lengths=lengths, slots=jnp.arange(3), backend="xla")
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)
    reference = paged_reference(q[:, 0], paged.k[0], paged.v[0], paged.block_table, lengths, heads_first=heads_first)
    np.testing.assert_allclose(np.asarray(reference), np.asarray(want[:, 0]), atol=1e-6)
    assert not np.asarray(reference[0]).any()                       # length 0: zeros
    # Rows in other slots, and a padding row (slot 3 >= max_batch) that gets zeros.
    slots = jnp.array([2, 3, 1], jnp.int32)
    got = paged.attend(0, q, q_positions=positions, kv_lengths=jnp.array([5, 9, 7]), slots=slots, backend="xla")
    want = xla_attention(q, dense.k[0][jnp.array([2, 0, 1])], dense.v[0][jnp.array([2, 0, 1])], positions,
                         jnp.array([5, 0, 7]))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)


@pytest.mark.parametrize("heads_first", [False, True])
def test_writes_through_the_block_table_equal_the_dense_writes_and_drop_padding(heads_first):
    rng = np.random.default_rng(1)
    dense = random_dense(rng)
    paged = PagedKVCache.from_dense(dense, block_size=8, heads_first=heads_first)
    new = jnp.asarray(rng.standard_normal((3, 4, 2, 16)), jnp.float32)
    # A row across a block edge, one that runs past the capacity, and padding (count 0, slot >= max_batch).
    start, count, slots = jnp.array([6, 38, 0]), jnp.array([4, 4, 0]), jnp.array([2, 0, 5])
    written = paged.write(0, new, -new, start, count, slots)
    expected = jv.write_kv(dense, 0, new, -new, start, count, slots)
    k, v = written.gather(0, jnp.arange(3))
    np.testing.assert_array_equal(np.asarray(k), np.asarray(expected.k[0]))
    np.testing.assert_array_equal(np.asarray(v), np.asarray(expected.v[0]))


@needs_pallas_paged
def test_pallas_paged_interpreted_equals_the_reference():
    rng = np.random.default_rng(2)
    dense = random_dense(rng, batch=4, capacity=64)
    paged = PagedKVCache.from_dense(dense, block_size=16, heads_first=True)
    q = jnp.asarray(rng.standard_normal((4, 4, 16)), jnp.float32)
    lengths = jnp.array([0, 1, 33, 64], jnp.int32)
    got = paged_pallas_attention(q, paged.k[0], paged.v[0], paged.block_table, lengths)
    want = paged_reference(q, paged.k[0], paged.v[0], paged.block_table, lengths, heads_first=True)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)


def test_a_jax_without_pallas_paged_kernel_gets_a_clear_refusal():
    """JAX 0.12 moved Pallas' paged kernel out (to tokamax): the baseline says so by name, before tracing."""
    heads_first = PagedKVCache.allocate(num_layers=1, max_batch=2, capacity=32, kv_heads=2, head_dim=16,
                                        block_size=8, dtype=jnp.float32, heads_first=True)
    arguments = dict(q_positions=jnp.zeros((2, 1), jnp.int32), kv_lengths=jnp.ones(2, jnp.int32),
                     slots=jnp.arange(2))
    if pallas_paged_shipped():
        assert heads_first.attend(0, jnp.zeros((2, 1, 4, 16)), backend="pallas", **arguments).shape == (2, 1, 4, 16)
    else:
        with pytest.raises(ValueError, match=f"not in jax {jax.__version__}.*tokamax"):
            heads_first.attend(0, jnp.zeros((2, 1, 4, 16)), backend="pallas", **arguments)


def test_backends_a_paged_cache_refuses_say_what_to_use():
    blocks_first = PagedKVCache.allocate(num_layers=1, max_batch=2, capacity=32, kv_heads=2, head_dim=16,
                                         block_size=8, dtype=jnp.float32)
    heads_first = PagedKVCache.allocate(num_layers=1, max_batch=2, capacity=32, kv_heads=2, head_dim=16,
                                        block_size=8, dtype=jnp.float32, heads_first=True)
    q = jnp.zeros((2, 1, 4, 16), jnp.float32)
    arguments = dict(q_positions=jnp.zeros((2, 1), jnp.int32), kv_lengths=jnp.ones(2, jnp.int32),
                     slots=jnp.arange(2))
    for cache, backend, message in ((blocks_first, "blocked", "runs the backends xla, cudnn, pallas"),
                                    *([(blocks_first, "pallas", "heads_first=True")] if pallas_paged_shipped() else []),
                                    (heads_first, "cudnn", "heads_first=False"),
                                    (blocks_first, "cudnn", "bfloat16 or float16")):
        with pytest.raises(ValueError, match=message):
            cache.attend(0, q, backend=backend, **arguments)
    with pytest.raises(ValueError, match="prefill chunks on a paged cache run with backend 'xla'"):
        heads_first.attend(0, jnp.zeros((2, 3, 4, 16)), q_positions=jnp.zeros((2, 3), jnp.int32),
                           kv_lengths=jnp.ones(2, jnp.int32), slots=jnp.arange(2), backend="pallas")


def test_a_mixed_step_through_a_paged_cache_gives_the_dense_caches_logits(model):
    """Decode rows and prefill chunks in one step (the reference backend) through the block table."""
    config = model.config
    rng = np.random.default_rng(3)
    dense = random_dense(rng, batch=3, capacity=48, kv_heads=config.num_kv_heads, head_dim=config.head_dim,
                         layers=config.num_layers)
    paged = PagedKVCache.from_dense(dense, block_size=16)
    step = StepBatch(decode_tokens=jnp.array([5, 9], jnp.int32), decode_slots=jnp.array([0, 3], jnp.int32),
                     decode_positions=jnp.array([20, 0], jnp.int32), decode_count=jnp.array([1, 0], jnp.int32),
                     chunk_tokens=jnp.array([[1, 2, 3, 4], [7, 8, 0, 0]], jnp.int32),
                     chunk_slots=jnp.array([1, 2], jnp.int32), chunk_start=jnp.array([12, 0], jnp.int32),
                     chunk_count=jnp.array([4, 2], jnp.int32))
    run = jax.jit(lambda cache: model.run_step(step, cache, backend="xla"))
    want, dense = run(dense)
    got, paged = run(paged)
    np.testing.assert_allclose(np.asarray(got[np.array([0, 2, 3])]), np.asarray(want[np.array([0, 2, 3])]),
                               atol=1e-5, rtol=1e-5)
    k, _ = paged.gather(1, jnp.arange(3))
    # The keys come from two programs (dense and paged writes), which XLA may fuse differently.
    np.testing.assert_allclose(np.asarray(k), np.asarray(dense.k[1]), rtol=1e-6, atol=1e-6)


def fill(cache, values, context):
    """``values[layer]`` (k, v ``[batch, context, K, H]``) written at positions 0..context-1 of every slot."""
    batch = values[0][0].shape[0]
    start, count, slots = jnp.zeros(batch, jnp.int32), jnp.full(batch, context, jnp.int32), jnp.arange(batch)
    for layer, (k, v) in enumerate(values):
        if isinstance(cache, PagedKVCache):
            cache = cache.write(layer, k, v, start, count, slots)
        else:
            cache = jv.write_kv(cache, layer, k, v, start, count, slots)
    return cache


def decode(model, cache, backend, batch, context, steps):
    graphdef, state = nnx.split(model)
    ints = jnp.zeros((batch,), jnp.int32)
    arguments = (jnp.arange(batch, dtype=jnp.int32) + 3, jnp.full((batch,), context, jnp.int32),
                 jnp.ones((batch,), bool), ints, jnp.full((batch,), 1 << 30, jnp.int32),
                 jnp.full((batch, 1), -1, jnp.int32), jnp.zeros((batch,), jnp.float32), ints,
                 jnp.ones((batch,), jnp.float32), jax.random.key(0))
    outputs = decode_chunk_fn(graphdef, backend, steps)(state, cache, *arguments)
    return outputs[0], np.asarray(outputs[5])


@pytest.mark.parametrize("heads_first, backend", [(False, "xla"), pytest.param(True, "pallas", marks=needs_pallas_paged)])
def test_the_models_decode_through_a_paged_cache_gives_the_virtual_caches_tokens(model, heads_first, backend):
    config = model.config
    batch, context, steps, capacity = 3, 21, 6, 64
    rng = np.random.default_rng(4)
    shape = (batch, context, config.num_kv_heads, config.head_dim)
    values = [tuple(jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in "kv")
              for _ in range(config.num_layers)]
    page = 4096
    cache_config = jv.CacheConfig(num_layers=config.num_layers, max_batch=batch, max_len=capacity,
                                  kv_heads=config.num_kv_heads, head_dim=config.head_dim, dtype=jnp.float32,
                                  page_bytes=page, budget_bytes=1000 * page)
    with jv.CacheManager(cache_config, CPU, driver=_core.FakeDriver(page)) as manager:
        for _ in range(batch):
            manager.alloc(context)
        manager.cache = jv.cache_jit(lambda cache: fill(cache, values, context))(manager.cache)
        manager.reserve_growth(steps)
        manager.cache, virtual = decode(model, manager.cache, "blocked", batch, context, steps)
    paged = PagedKVCache.allocate(num_layers=config.num_layers, max_batch=batch, capacity=capacity,
                                  kv_heads=config.num_kv_heads, head_dim=config.head_dim, block_size=16,
                                  dtype=jnp.float32, heads_first=heads_first)
    paged = jax.jit(lambda cache: fill(cache, values, context))(paged)
    _, tokens = decode(model, paged, backend, batch, context, steps)
    np.testing.assert_array_equal(tokens, virtual)
    assert (virtual >= 0).all()


@pytest.mark.slow
def test_bench_decode_runs_the_paged_rows_through_the_reference_off_a_gpu(tmp_path, capsys):
    from jax_vattention.app.cli import main
    assert main(["bench", "decode", "--batch", "2", "--context", "16", "--steps", "2", "--repeats", "1",
                 "--modes", "virtual_per_layer", "paged_cudnn", "paged_pallas", "--block-size", "8",
                 "--out", str(tmp_path)]) == 0
    report = capsys.readouterr().out
    rows = [line.split(",") for line in (tmp_path / "decode.csv").read_text().splitlines()]
    header = rows[0]
    rows = [dict(zip(header, row)) for row in rows[1:]]
    assert [(r["mode"], r["backend"], r["block_size"]) for r in rows] == [
        ("virtual_per_layer", "blocked", ""), ("paged_cudnn", "xla", "8"), ("paged_pallas", "xla", "8")]
    assert all(float(r["step_ms"]) > 0 and float(r["vs_best_paged"]) > 0 for r in rows)
    assert max(float(r["vs_best_paged"]) for r in rows if r["mode"].startswith("paged")) == 1.0
    assert "virtual / best paged" in report and "batch    2 context     16: virtual_per_layer" in report


@needs_pallas_paged
def test_the_kernels_take_rows_in_any_slots_and_padding_rows():
    rng = np.random.default_rng(5)
    dense = random_dense(rng, batch=3, capacity=32)
    paged = PagedKVCache.from_dense(dense, block_size=16, heads_first=True)
    q = jnp.asarray(rng.standard_normal((2, 1, 4, 16)), jnp.float32)
    arguments = dict(q_positions=jnp.array([[8], [0]]), kv_lengths=jnp.array([9, 4]), slots=jnp.array([2, 7]))
    got = paged.attend(0, q, backend="pallas", **arguments)
    want = paged.attend(0, q, backend="xla", **arguments)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
    assert not np.asarray(got[1]).any()
