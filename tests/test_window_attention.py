"""Sliding windows, logit scales and soft-caps in every attention kernel, against a float64 reference.

A sliding window of ``W`` positions lets a query at position ``p`` see keys ``p - W < s <= p``. A
kernel must read nothing behind the window: the pages there may be unmapped. So every cache here
holds NaN behind each row's window and at or past its length, and the Pallas kernels run (in the
interpreter) with loads that spread a NaN they load over their whole tile, as the chunk kernel's
own tests do: a read behind the window then shows in the output, even one the mask would drop.
"""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import triton as plgpu

from jax_vattention.attention import attend, attend_prompt, blocked_attention, xla_attention
from jax_vattention.attention.adapters import cudnn_attention, dot_product_attention
from jax_vattention.attention.kernels.chunk_attention import chunk_attention as chunk_kernel
from jax_vattention.attention.kernels.decode_attention import decode_attention

decode_module = importlib.import_module("jax_vattention.attention.kernels.decode_attention")
chunk_module = importlib.import_module("jax_vattention.attention.kernels.chunk_attention")

MAX_BATCH, CAPACITY, LAYERS, KV_HEADS, HEAD_DIM = 4, 96, 2, 2, 16
WINDOW = 20


class PoisoningLoads:
    """``plgpu`` whose ``load`` spreads a NaN it loaded over its whole tile."""

    def __getattr__(self, name):
        return getattr(plgpu, name)

    @staticmethod
    def load(ref, **kwargs):
        tile = plgpu.load(ref, **kwargs)
        return tile + 0 * tile.sum()


@pytest.fixture
def poisoning_loads(monkeypatch):
    for module, kernel in ((decode_module, decode_attention), (chunk_module, chunk_kernel)):
        monkeypatch.setattr(module, "plgpu", PoisoningLoads())
        kernel.clear_cache()
    yield
    decode_attention.clear_cache()
    chunk_kernel.clear_cache()


def reference(q, k_cache, v_cache, q_positions, lengths, slots=None, layer=None, *, scale=None, window=None,
              softcap=None):
    """float64 [B, T, N, H]; zeros where a query sees no key (NaN in the cache never weighs)."""
    q, k_cache, v_cache = (np.asarray(x, np.float64) for x in (q, k_cache, v_cache))
    if layer is not None:
        k_cache, v_cache = k_cache[:, :, layer], v_cache[:, :, layer]
    batch, q_len, q_heads, head_dim = q.shape
    group = q_heads // k_cache.shape[2]
    slots = np.arange(batch) if slots is None else np.asarray(slots)
    scale = head_dim ** -0.5 if scale is None else scale
    out = np.zeros(q.shape)
    for b in range(batch):
        if slots[b] >= k_cache.shape[0]:
            continue
        keys = np.repeat(np.nan_to_num(k_cache[slots[b]]), group, axis=1)  # [S, N, H]
        values = np.repeat(np.nan_to_num(v_cache[slots[b]]), group, axis=1)
        logits = np.einsum("tnh,snh->tns", q[b], keys) * scale
        if softcap is not None:
            logits = softcap * np.tanh(logits / softcap)
        s = np.arange(keys.shape[0])
        p = np.asarray(q_positions[b])[:, None]
        visible = (s[None] <= p) & (s[None] < lengths[b])
        if window is not None:
            visible &= s[None] > p - window
        logits = np.where(visible[:, None], logits, -np.inf)
        top = logits.max(-1, keepdims=True)
        weights = np.exp(logits - np.where(np.isfinite(top), top, 0.0))
        total = weights.sum(-1, keepdims=True)
        out[b] = np.einsum("tns,snh->tnh", weights / np.where(total == 0, 1, total), values)
    return out


def poisoned_caches(seed, q_positions, lengths, slots, *, interleaved, window, dtype=np.float32):
    """Random caches, NaN at and past each slot's length and behind its rows' windows."""
    rng = np.random.default_rng(seed)
    shape = (MAX_BATCH, CAPACITY, *((LAYERS,) if interleaved else ()), KV_HEADS, HEAD_DIM)
    k = rng.standard_normal(shape).astype(np.float32)
    v = rng.standard_normal(shape).astype(np.float32)
    for slot in range(MAX_BATCH):
        rows = [b for b in range(len(slots)) if slots[b] == slot and lengths[b] > 0]
        if not rows:
            k[slot], v[slot] = np.nan, np.nan
            continue
        end = max(lengths[b] for b in rows)
        start = min(max(int(np.min(q_positions[b])) - window + 1, 0) for b in rows) if window else 0
        for cache in (k, v):
            cache[slot, end:] = np.nan
            cache[slot, :start] = np.nan
    return jnp.asarray(k, dtype), jnp.asarray(v, dtype)


def random_q(seed, rows, q_len, group=2, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((rows, q_len, KV_HEADS * group, HEAD_DIM)), dtype)


# Decode rows: (slot, length); the query at length - 1.
DECODE = [(0, 96), (1, 21), (2, 20), (3, 1)]
# Chunk rows: (slot, start, count) of width 8.
CHUNKS = [(0, 70, 8), (1, 13, 5), (2, 0, 8), (3, 40, 1), (MAX_BATCH, 0, 0)]
WIDTH = 8


def decode_case(seed, interleaved):
    slots = np.array([s for s, _ in DECODE])
    lengths = np.array([n for _, n in DECODE], np.int32)
    positions = (lengths - 1)[:, None]
    k, v = poisoned_caches(seed, positions, lengths, slots, interleaved=interleaved, window=WINDOW)
    return random_q(seed, len(DECODE), 1), k, v, positions, lengths


def chunk_case(seed, interleaved):
    slots = np.array([s for s, _, _ in CHUNKS], np.int32)
    start = np.array([a for _, a, _ in CHUNKS], np.int32)
    count = np.array([c for _, _, c in CHUNKS], np.int32)
    positions = start[:, None] + np.arange(WIDTH, dtype=np.int32)[None]
    lengths = start + count
    k, v = poisoned_caches(seed, positions, lengths, slots, interleaved=interleaved, window=WINDOW)
    return random_q(seed, len(CHUNKS), WIDTH), k, v, slots, positions, lengths, count


def assert_close(out, expected, real=None, tolerance=2e-5):
    out = np.asarray(out, np.float64)
    real = np.ones(out.shape[:2], bool) if real is None else real
    assert np.all(np.isfinite(out[real]))
    np.testing.assert_allclose(out[real], expected[real], rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("softcap", [None, 0.7])
@pytest.mark.parametrize("interleaved", [False, True])
def test_decode_kernel_reads_only_the_window(poisoning_loads, interleaved, softcap):
    q, k, v, positions, lengths = decode_case(1, interleaved)
    layer = 1 if interleaved else None
    for tiles in (dict(block_k=16, num_splits=3), {}):
        out = decode_attention(q[:, 0], k, v, jnp.asarray(lengths), layer=layer, window=WINDOW, softcap=softcap,
                               scale=0.4, interpret=True, **tiles)
        expected = reference(q, k, v, positions, lengths, layer=layer, scale=0.4, window=WINDOW, softcap=softcap)
        assert_close(out[:, None], expected)


@pytest.mark.parametrize("softcap", [None, 0.7])
@pytest.mark.parametrize("interleaved", [False, True])
def test_chunk_kernel_reads_only_the_window(poisoning_loads, interleaved, softcap):
    q, k, v, slots, positions, lengths, count = chunk_case(2, interleaved)
    layer = 0 if interleaved else None
    real = np.arange(WIDTH)[None] < count[:, None]
    for tiles in (dict(block_q=8, block_k=16), {}):
        out = chunk_kernel(q, k, v, jnp.asarray(slots), jnp.asarray(positions), jnp.asarray(lengths), layer=layer,
                           window=WINDOW, softcap=softcap, scale=0.4, interpret=True, **tiles)
        expected = reference(q, k, v, positions, lengths, slots, layer, scale=0.4, window=WINDOW, softcap=softcap)
        assert_close(out, expected, real)
        np.testing.assert_array_equal(np.asarray(out)[slots >= MAX_BATCH], 0.0)


@pytest.mark.parametrize("interleaved", [False, True])
def test_blocked_kernel_reads_only_the_window(interleaved):
    """Decode rows and chunk rows (the blocked kernel is the CPU's chunk kernel too), empty rows among them."""
    layer = 1 if interleaved else None
    q, k, v, positions, lengths = decode_case(3, interleaved)
    out = blocked_attention(q, k, v, jnp.asarray(positions), jnp.asarray(lengths), layer, window=WINDOW,
                            softcap=0.7, scale=0.4)
    assert_close(out, reference(q, k, v, positions, lengths, layer=layer, scale=0.4, window=WINDOW, softcap=0.7))
    q, k, v, slots, positions, lengths, count = chunk_case(4, interleaved)
    out = blocked_attention(q, k, v, jnp.asarray(positions), jnp.asarray(lengths), layer, slots=jnp.asarray(slots),
                            window=WINDOW)
    expected = reference(q, k, v, positions, lengths, slots, layer, window=WINDOW)
    assert_close(out, expected, np.arange(WIDTH)[None] < count[:, None])


def test_xla_reference_masks_the_window_scale_and_cap():
    """The reference reads every position (dense caches only), so its caches hold no NaN here."""
    q, k, v, positions, lengths = decode_case(5, False)
    k, v = jnp.nan_to_num(k), jnp.nan_to_num(v)
    out = xla_attention(q, k, v, jnp.asarray(positions), jnp.asarray(lengths), window=WINDOW, softcap=0.7, scale=0.4)
    assert_close(out, reference(q, k, v, positions, lengths, scale=0.4, window=WINDOW, softcap=0.7))
    full = xla_attention(q, k, v, jnp.asarray(positions), jnp.asarray(lengths))
    assert np.abs(np.asarray(full) - np.asarray(out))[0].max() > 1e-2  # the window is in effect


@pytest.mark.parametrize("backend", ["blocked", "pallas"])
def test_attend_passes_the_window_to_every_kernel_of_a_step(poisoning_loads, backend):
    q, k, v, positions, lengths = decode_case(6, False)
    slots = jnp.array([3, 2, 1, 0], jnp.int32)  # rows in other slots than their index
    out = attend(q, k[::-1], v[::-1], q_positions=jnp.asarray(positions), kv_lengths=jnp.asarray(lengths),
                 backend=backend, slots=slots, window=WINDOW, softcap=0.7)
    assert_close(out, reference(q, k, v, positions, lengths, window=WINDOW, softcap=0.7))


def test_cudnn_runs_the_pallas_kernels_where_it_has_no_window_or_cap(poisoning_loads):
    """cuDNN's window is top-left aligned (prefill from 0) and it has no soft-cap: a decode window or a
    cap runs the Pallas kernels (here interpreted: the adapter itself runs off a GPU)."""
    q, k, v, positions, lengths = decode_case(7, False)
    out = cudnn_attention(q, k, v, jnp.asarray(positions), jnp.asarray(lengths), window=WINDOW)
    assert_close(out, reference(q, k, v, positions, lengths, window=WINDOW))
    with pytest.raises(ValueError, match="no soft-capping and no decode window"):
        dot_product_attention(q, k, v, jnp.asarray(positions), jnp.asarray(lengths), implementation=None,
                              window=WINDOW)


def test_prefill_from_zero_takes_the_window_as_a_local_window():
    """jax.nn.dot_product_attention's local window (what cuDNN runs) for prompts from position 0."""
    rng = np.random.default_rng(8)
    q = jnp.asarray(rng.standard_normal((2, 48, 4, HEAD_DIM)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((2, 48, 2, HEAD_DIM)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((2, 48, 2, HEAD_DIM)), jnp.float32)
    lengths = np.array([48, 30], np.int32)
    positions = np.broadcast_to(np.arange(48), (2, 48))
    expected = reference(q, k, v, positions, lengths, scale=0.3, window=WINDOW)
    real = positions < lengths[:, None]
    out = dot_product_attention(q, k, v, jnp.asarray(positions), jnp.asarray(lengths), implementation=None,
                                scale=0.3, window=WINDOW)
    assert_close(out, expected, real)
    out = attend_prompt(q, k, v, jnp.asarray(lengths), backend="blocked", scale=0.3, window=WINDOW)
    assert_close(out, expected, real)


def test_a_window_below_one_is_a_value_error():
    q, k, v, positions, lengths = decode_case(9, False)
    with pytest.raises(ValueError, match="window must be"):
        attend(q, k, v, q_positions=jnp.asarray(positions), kv_lengths=jnp.asarray(lengths), backend="blocked",
               window=0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_gpu_kernels_read_only_the_window(dtype):
    """Triton-compiled decode and chunk kernels and cuDNN's prefill with a window, against the reference
    (NaN behind the windows: the kernels' masked loads must not reach it)."""
    tolerance = 3e-2 if dtype == jnp.bfloat16 else 4e-3
    q, k, v, positions, lengths = decode_case(10, False)
    q, k, v = q.astype(dtype), k.astype(dtype), v.astype(dtype)
    out = decode_attention(q[:, 0], k, v, jnp.asarray(lengths), window=WINDOW, softcap=0.7, interpret=False)
    assert_close(out[:, None], reference(q, k, v, positions, lengths, window=WINDOW, softcap=0.7), tolerance=tolerance)
    q, k, v, slots, positions, lengths, count = chunk_case(11, False)
    q, k, v = q.astype(dtype), k.astype(dtype), v.astype(dtype)
    out = chunk_kernel(q, k, v, jnp.asarray(slots), jnp.asarray(positions), jnp.asarray(lengths), window=WINDOW,
                       interpret=False)
    assert_close(out, reference(q, k, v, positions, lengths, slots, window=WINDOW),
                 np.arange(WIDTH)[None] < count[:, None], tolerance=tolerance)
    rng = np.random.default_rng(12)
    prompt = [jnp.asarray(rng.standard_normal(shape), dtype) for shape in ((2, 64, 4, 64), (2, 64, 2, 64), (2, 64, 2, 64))]
    lengths = np.array([64, 41], np.int32)
    positions = np.broadcast_to(np.arange(64), (2, 64))
    out = jax.jit(lambda q, k, v, n: cudnn_attention(q, k, v, jnp.asarray(positions), n, window=WINDOW))(
        *prompt, jnp.asarray(lengths))
    assert_close(out, reference(*prompt, positions, lengths, window=WINDOW), positions < lengths[:, None],
                 tolerance=tolerance)
