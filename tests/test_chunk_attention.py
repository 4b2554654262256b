"""The chunk kernel (prefill chunks over their slots' cached prefixes) against the float32 reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_vattention.attention import chunk_attention, xla_attention

MAX_BATCH, CAPACITY, LAYERS, KV_HEADS, Q_HEADS, HEAD_DIM = 4, 160, 2, 2, 4, 16


def reference(q, k_cache, v_cache, slots, positions, lengths, layer):
    """Gathers each row's slot (a copy) and runs the reference; padding rows see nothing."""
    rows = np.minimum(slots, MAX_BATCH - 1)
    lengths = np.where(slots < MAX_BATCH, lengths, 0)
    return xla_attention(q, k_cache[rows], v_cache[rows], jnp.asarray(positions), jnp.asarray(lengths), layer=layer)


# (slot, start, count) per row, chunk width 8: a first chunk, a chunk after a long prefix that ends
# past a 64-token block, two consecutive chunks of one slot, a 1-token chunk, a padding row.
ROWS = [(2, 0, 8), (0, 57, 5), (1, 100, 8), (1, 108, 3), (3, 33, 1), (MAX_BATCH, 0, 0)]


@pytest.mark.parametrize("interleaved", [False, True])
def test_chunk_attention_matches_the_reference_on_ragged_chunks_and_reads_nothing_past_the_lengths(interleaved):
    width = 8
    keys = jax.random.split(jax.random.key(0), 3)
    layers = (LAYERS,) if interleaved else ()
    shape = (MAX_BATCH, CAPACITY, *layers, KV_HEADS, HEAD_DIM)
    k_cache = np.array(jax.random.normal(keys[0], shape, jnp.float32))
    v_cache = np.array(jax.random.normal(keys[1], shape, jnp.float32))
    slots = np.array([r[0] for r in ROWS], np.int32)
    start = np.array([r[1] for r in ROWS], np.int32)
    count = np.array([r[2] for r in ROWS], np.int32)
    lengths = start + count
    positions = start[:, None] + np.arange(width, dtype=np.int32)[None]
    # What lies past each slot's longest chunk is poison: a kernel that reads it returns NaN.
    for slot in range(MAX_BATCH):
        end = max([s + c for r, s, c in ROWS if r == slot], default=0)
        k_cache[slot, end:] = np.nan
        v_cache[slot, end:] = np.nan
    q = jax.random.normal(keys[2], (len(ROWS), width, Q_HEADS, HEAD_DIM), jnp.float32)
    layer = 1 if interleaved else None
    out = chunk_attention(q, jnp.asarray(k_cache), jnp.asarray(v_cache), slots=jnp.asarray(slots),
                          q_positions=jnp.asarray(positions), kv_lengths=jnp.asarray(lengths), layer=layer)
    clean_k, clean_v = np.nan_to_num(k_cache), np.nan_to_num(v_cache)
    expected = reference(q, clean_k, clean_v, slots, positions, lengths, layer)
    real = np.arange(width)[None] < count[:, None]  # [R, C]: queries past a row's count are padding
    assert np.all(np.isfinite(np.asarray(out)))
    np.testing.assert_allclose(np.asarray(out)[real], np.asarray(expected)[real], rtol=2e-5, atol=2e-5)
    np.testing.assert_array_equal(np.asarray(out)[-1], 0.0)  # the padding row sees no key


def test_chunk_attention_in_bfloat16_stays_close_to_the_float32_reference():
    keys = jax.random.split(jax.random.key(1), 3)
    shape = (MAX_BATCH, CAPACITY, KV_HEADS, HEAD_DIM)
    k_cache = jax.random.normal(keys[0], shape, jnp.float32)
    v_cache = jax.random.normal(keys[1], shape, jnp.float32)
    slots, start, count = np.array([1, 3], np.int32), np.array([70, 0], np.int32), np.array([4, 4], np.int32)
    positions = start[:, None] + np.arange(4, dtype=np.int32)[None]
    q = jax.random.normal(keys[2], (2, 4, Q_HEADS, HEAD_DIM), jnp.float32)
    out = chunk_attention(q.astype(jnp.bfloat16), k_cache.astype(jnp.bfloat16), v_cache.astype(jnp.bfloat16),
                          slots=jnp.asarray(slots), q_positions=jnp.asarray(positions),
                          kv_lengths=jnp.asarray(start + count))
    expected = reference(q, k_cache, v_cache, slots, positions, start + count, None)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(expected), atol=5e-2)
