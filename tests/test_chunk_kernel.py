"""The Pallas chunk attention kernel, in the interpreter, against a dense float32 reference.

Prefill chunks of several slots in one call: a first chunk at offset 0, chunks after a cached prefix
that crosses K/V tiles, two consecutive chunks of one slot, a one-token chunk and padding rows. What
lies past the lengths holds NaN, and every test runs the kernel with loads that turn their whole tile
NaN when any lane they load is NaN: a load at or past a length then shows in the output, even a key
load whose logits the mask would have dropped.
"""

from __future__ import annotations

import importlib

import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import triton as plgpu

from jax_vattention.attention.kernels.chunk_attention import chunk_attention

kernel_module = importlib.import_module("jax_vattention.attention.kernels.chunk_attention")

MAX_BATCH, CAPACITY, LAYERS, KV_HEADS, HEAD_DIM, WIDTH, BLOCK_K = 5, 160, 2, 2, 16, 10, 32

# (slot, start, count) per row. Slot 0 holds no token at all: the padding rows' addresses are clamped
# to it, and it is NaN from token 0.
ROWS = [(2, 0, 10), (1, 57, 6), (3, 100, 10), (3, 110, 3), (4, 33, 1), (MAX_BATCH, 0, 0), (MAX_BATCH + 2, 40, 5)]


class PoisoningLoads:
    """``plgpu`` whose ``load`` spreads a NaN it loaded over its whole tile."""

    def __getattr__(self, name):
        return getattr(plgpu, name)

    @staticmethod
    def load(ref, **kwargs):
        tile = plgpu.load(ref, **kwargs)
        return tile + 0 * tile.sum()


@pytest.fixture(autouse=True)
def poisoning_loads(monkeypatch):
    monkeypatch.setattr(kernel_module, "plgpu", PoisoningLoads())
    chunk_attention.clear_cache()  # trace the kernel again with these loads
    yield
    chunk_attention.clear_cache()


def reference(q, k_cache, v_cache, slots, positions, lengths, layer=None):
    """Float32 attention of each row over its slot's cache, dense and plain.

    q [R, T, N, H], caches [M, S, K, H] (or [M, S, layers, K, H] with ``layer``), slots, lengths [R],
    positions [R, T] -> float32 [R, T, N, H]; zeros for padding rows (slot >= M) and queries that see
    no key. NaN in the cache is read as 0 (it lies past the lengths, where no weight falls).
    """
    q, k_cache, v_cache = (np.asarray(x, np.float32) for x in (q, k_cache, v_cache))
    if layer is not None:
        k_cache, v_cache = k_cache[:, :, layer], v_cache[:, :, layer]
    k_cache, v_cache = np.nan_to_num(k_cache), np.nan_to_num(v_cache)
    rows, q_len, q_heads, head_dim = q.shape
    kv_heads = k_cache.shape[2]
    group = q_heads // kv_heads
    out = np.zeros((rows, q_len, q_heads, head_dim), np.float32)
    for r in range(rows):
        if slots[r] >= k_cache.shape[0]:
            continue
        keys = np.repeat(k_cache[slots[r]], group, axis=1)  # [S, N, H]
        values = np.repeat(v_cache[slots[r]], group, axis=1)  # [S, N, H]
        logits = np.einsum("tnh,snh->tns", q[r], keys) / np.sqrt(head_dim)  # [T, N, S]
        s = np.arange(keys.shape[0])
        visible = (s[None, :] <= positions[r][:, None]) & (s[None, :] < lengths[r])  # [T, S]
        logits = np.where(visible[:, None, :], logits, -np.inf)
        top = logits.max(axis=-1, keepdims=True)
        weights = np.exp(logits - np.where(np.isfinite(top), top, 0.0))  # [T, N, S]; 0 where not visible
        total = weights.sum(axis=-1, keepdims=True)
        weights = weights / np.where(total == 0, 1.0, total)
        out[r] = np.einsum("tns,snh->tnh", weights, values)
    return out


def make_inputs(seed, rows, *, group, dtype, interleaved, max_batch=MAX_BATCH, capacity=CAPACITY, layers=LAYERS,
                kv_heads=KV_HEADS, head_dim=HEAD_DIM, width=WIDTH):
    """Random q and caches, NaN past each slot's longest chunk; slots, positions and lengths of ``rows``."""
    rng = np.random.default_rng(seed)
    shape = (max_batch, capacity, *((layers,) if interleaved else ()), kv_heads, head_dim)
    k_cache = rng.standard_normal(shape).astype(np.float32)
    v_cache = rng.standard_normal(shape).astype(np.float32)
    for slot in range(max_batch):
        end = max([s + c for r, s, c in rows if r == slot], default=0)
        k_cache[slot, end:] = np.nan
        v_cache[slot, end:] = np.nan
    slots = np.array([r[0] for r in rows], np.int32)
    start = np.array([r[1] for r in rows], np.int32)
    count = np.array([r[2] for r in rows], np.int32)
    positions = start[:, None] + np.arange(width, dtype=np.int32)[None]
    q = rng.standard_normal((len(rows), width, kv_heads * group, head_dim)).astype(np.float32)
    q, k_cache, v_cache = (jnp.asarray(x, dtype) for x in (q, k_cache, v_cache))
    return q, k_cache, v_cache, slots, positions, start + count, count


def run(q, k_cache, v_cache, slots, positions, lengths, **kwargs):
    return chunk_attention(q, k_cache, v_cache, jnp.asarray(slots), jnp.asarray(positions),
                           jnp.asarray(lengths), block_k=BLOCK_K, interpret=True, **kwargs)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("interleaved", [False, True])
def test_ragged_chunks_match_the_reference_and_read_nothing_past_the_lengths(interleaved, group, dtype):
    q, k_cache, v_cache, slots, positions, lengths, count = make_inputs(
        group, ROWS, group=group, dtype=dtype, interleaved=interleaved)
    layer = 1 if interleaved else None
    # WIDTH = 10 tokens: one block of 16 with 6 padding tokens, or blocks of 4, 4 and 2 (16 rows each).
    block_q = 16 if group == 1 else 4
    out = run(q, k_cache, v_cache, slots, positions, lengths, layer=layer, block_q=block_q)
    assert out.shape == q.shape and out.dtype == q.dtype
    out = np.asarray(out, np.float32)
    assert np.all(np.isfinite(out))
    expected = reference(q, k_cache, v_cache, slots, positions, lengths, layer)
    real = np.arange(WIDTH)[None] < count[:, None]  # [R, T]: queries past a row's count are padding
    tolerance = 2e-5 if dtype == jnp.float32 else 3e-2
    np.testing.assert_allclose(out[real], expected[real], rtol=tolerance, atol=tolerance)
    np.testing.assert_array_equal(out[slots >= MAX_BATCH], 0.0)  # padding rows read nothing


def test_each_row_reads_only_below_its_own_length():
    """One row per slot, NaN from each row's own length on (inside its last tile too), and the
    default block sizes."""
    rows = [(1, 0, 7), (2, 30, 10), (3, 64, 1), (4, 95, 10), (MAX_BATCH + 1, 3, 4)]
    q, k_cache, v_cache, slots, positions, lengths, count = make_inputs(
        7, rows, group=2, dtype=jnp.float32, interleaved=False)
    out = np.asarray(chunk_attention(q, k_cache, v_cache, jnp.asarray(slots), jnp.asarray(positions),
                                     jnp.asarray(lengths), interpret=True))
    assert np.all(np.isfinite(out))
    expected = reference(q, k_cache, v_cache, slots, positions, lengths)
    real = np.arange(WIDTH)[None] < count[:, None]
    np.testing.assert_allclose(out[real], expected[real], rtol=2e-5, atol=2e-5)
    np.testing.assert_array_equal(out[-1], 0.0)


def test_queries_that_see_no_key_get_zeros():
    """Positions below 0 see nothing; a query at position 0 sees key 0 alone."""
    q, k_cache, v_cache, slots, positions, lengths, _ = make_inputs(
        3, [(1, 0, 4)], group=1, dtype=jnp.float32, interleaved=False)
    positions = positions - 2  # [-2, -1, 0, 1, ...]
    out = np.asarray(run(q, k_cache, v_cache, slots, positions, lengths))
    np.testing.assert_array_equal(out[0, :2], 0.0)
    np.testing.assert_allclose(out[0, 2], np.broadcast_to(np.asarray(v_cache)[1, 0], out[0, 2].shape),
                               rtol=1e-6, atol=1e-6)


def test_bad_inputs_are_refused():
    q, k_cache, v_cache, slots, positions, lengths, _ = make_inputs(
        0, ROWS[:2], group=2, dtype=jnp.float32, interleaved=True)
    args = (jnp.asarray(slots), jnp.asarray(positions), jnp.asarray(lengths))
    with pytest.raises(ValueError, match="needs `layer`"):
        chunk_attention(q, k_cache, v_cache, *args, interpret=True)
    with pytest.raises(ValueError, match="slots must be int32"):
        chunk_attention(q, k_cache, v_cache, jnp.asarray(slots, jnp.float32), *args[1:], layer=0, interpret=True)
    with pytest.raises(ValueError, match="q_positions must be int32"):
        chunk_attention(q, k_cache, v_cache, args[0], args[1][:, :3], args[2], layer=0, interpret=True)
    with pytest.raises(ValueError, match="block_q"):
        chunk_attention(q, k_cache, v_cache, *args, layer=0, block_q=4, interpret=True)
    with pytest.raises(ValueError, match="dtypes differ"):
        chunk_attention(q.astype(jnp.bfloat16), k_cache, v_cache, *args, layer=0, interpret=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("interleaved", [False, True])
def test_gpu_compiled_kernel_matches_the_reference(interleaved, group, head_dim, dtype):
    """Triton-compiled, default tiles and small ones, longer chunks and prefixes: the same NaN-spreading
    loads catch a read past a length."""
    rows = [(1, 0, 100), (2, 700, 77), (3, 1200, 128), (3, 1328, 50), (0, 5, 1), (4, 0, 0)]
    max_batch, width = 4, 128
    q, k_cache, v_cache, slots, positions, lengths, count = make_inputs(
        group * head_dim, rows, group=group, dtype=dtype, interleaved=interleaved, max_batch=max_batch,
        capacity=1500, layers=3, kv_heads=2, head_dim=head_dim, width=width)
    layer = 2 if interleaved else None
    expected = reference(q, k_cache, v_cache, slots, positions, lengths, layer)
    real = np.arange(width)[None] < count[:, None]
    tolerance = {jnp.float32: 1e-4, jnp.float16: 4e-3, jnp.bfloat16: 3e-2}[dtype]
    for tiles in ({}, {"block_q": max(1, 16 // group), "block_k": 16}):
        out = chunk_attention(q, k_cache, v_cache, jnp.asarray(slots), jnp.asarray(positions),
                              jnp.asarray(lengths), layer=layer, interpret=False, **tiles)
        out = np.asarray(out, np.float32)
        assert np.all(np.isfinite(out)), tiles
        np.testing.assert_allclose(out[real], expected[real], rtol=tolerance, atol=tolerance, err_msg=f"{tiles}")
        np.testing.assert_array_equal(out[slots >= max_batch], 0.0)
