"""The Mosaic GPU chunk kernel against a dense float32 reference: interpreter and Hopper GPU.

Prefill chunks of several slots in one call: a first chunk at offset 0, chunks after a cached prefix,
two consecutive chunks of one slot, a one-token chunk and padding rows. What lies past the lengths holds
NaN, which spreads into the output if the kernel loads it. The key loop's read plan is tested in
``test_mosaic_decode_attention.py`` (it is shared), and so is what the interpreter runs (see there).
Run this file in a process of its own on a GPU: a compile failure must not take other files down.
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_vattention.attention.kernels.mosaic_chunk_attention import mosaic_chunk_attention
from mosaic_interpreter import interpreter, reset

ON_HOPPER = any(d.platform == "gpu" and str(getattr(d, "compute_capability", "")).startswith("9")
                for d in jax.devices())
TOLERANCE = {jnp.float16: 4e-3, jnp.bfloat16: 3e-2}


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
    rows, _, q_heads, head_dim = q.shape
    group = q_heads // k_cache.shape[2]
    out = np.zeros(q.shape, np.float32)
    for r in range(rows):
        if not 0 <= slots[r] < k_cache.shape[0]:
            continue
        keys = np.repeat(k_cache[slots[r]], group, axis=1)  # [S, N, H]
        values = np.repeat(v_cache[slots[r]], group, axis=1)  # [S, N, H]
        logits = np.einsum("tnh,snh->tns", q[r], keys) / np.sqrt(head_dim)  # [T, N, S]
        s = np.arange(keys.shape[0])
        visible = (s[None, :] <= positions[r][:, None]) & (s[None, :] < lengths[r])  # [T, S]
        logits = np.where(visible[:, None, :], logits, -np.inf)
        top = logits.max(axis=-1, keepdims=True)
        weights = np.exp(logits - np.where(np.isfinite(top), top, 0.0))  # [T, N, S]
        total = weights.sum(axis=-1, keepdims=True)
        out[r] = np.einsum("tns,snh->tnh", weights / np.where(total == 0, 1.0, total), values)
    return out


def make_inputs(seed, rows, *, group, dtype, max_batch, capacity, kv_heads, head_dim, width, layers=None):
    """Random q and caches, NaN past each slot's longest chunk; slots, positions and lengths of ``rows``
    ((slot, start, count) each)."""
    rng = np.random.default_rng(seed)
    shape = (max_batch, capacity, *((layers,) if layers else ()), kv_heads, head_dim)
    k_cache, v_cache = rng.standard_normal(shape), rng.standard_normal(shape)
    for slot in range(max_batch):
        end = max([start + count for r, start, count in rows if r == slot], default=0)
        k_cache[slot, end:] = np.nan
        v_cache[slot, end:] = np.nan
    slots = np.array([r[0] for r in rows], np.int32)
    start = np.array([r[1] for r in rows], np.int32)
    count = np.array([r[2] for r in rows], np.int32)
    positions = start[:, None] + np.arange(width, dtype=np.int32)[None]
    q = rng.standard_normal((len(rows), width, kv_heads * group, head_dim))
    q, k_cache, v_cache = (jnp.asarray(x, dtype) for x in (q, k_cache, v_cache))
    return q, k_cache, v_cache, slots, positions, start + count, count


def check(out, q, k_cache, v_cache, slots, positions, lengths, count, layer, max_batch):
    assert out.shape == q.shape and out.dtype == q.dtype
    out = np.asarray(out, np.float32)
    assert np.isfinite(out).all(), "a value at or past a length reached the output"
    expected = reference(q, k_cache, v_cache, slots, positions, lengths, layer)
    real = np.arange(q.shape[1])[None] < count[:, None]  # [R, T]: queries past a row's count are padding
    tolerance = TOLERANCE[q.dtype.type]
    np.testing.assert_allclose(out[real], expected[real], rtol=tolerance, atol=tolerance)
    np.testing.assert_array_equal(out[slots >= max_batch], 0.0)  # padding rows read nothing


def test_bad_inputs_are_refused():
    q, k, v, slots, positions, lengths, _ = make_inputs(0, [(1, 0, 4), (2, 3, 2)], group=2, dtype=jnp.bfloat16,
                                                        max_batch=3, capacity=64, kv_heads=2, head_dim=64, width=4)
    args = (jnp.asarray(slots), jnp.asarray(positions), jnp.asarray(lengths))
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        mosaic_chunk_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), *args)
    with pytest.raises(ValueError, match="slots must be int32"):
        mosaic_chunk_attention(q, k, v, jnp.asarray(slots, jnp.float32), *args[1:])
    with pytest.raises(ValueError, match="q_positions must be int32"):
        mosaic_chunk_attention(q, k, v, args[0], args[1][:, :3], args[2])
    with pytest.raises(ValueError, match="block_k"):
        mosaic_chunk_attention(q, k, v, *args, block_k=32)
    with pytest.raises(ValueError, match="max_len a multiple of 8"):
        mosaic_chunk_attention(q, k[:, :60], v[:, :60], *args)
    with pytest.raises(ValueError, match="needs `layer`"):
        mosaic_chunk_attention(q, k[:, :, None], v[:, :, None], *args)


def test_reads_the_cache_in_place():
    """The caches go straight into the kernel: no transpose, copy or slice of them comes first."""
    q, k, v, slots, positions, lengths, _ = make_inputs(0, [(1, 0, 4), (2, 3, 2)], group=4, dtype=jnp.float16,
                                                        max_batch=3, capacity=64, kv_heads=2, head_dim=64, width=4)
    jaxpr = jax.make_jaxpr(lambda k, v: mosaic_chunk_attention(
        q, k, v, jnp.asarray(slots), jnp.asarray(positions), jnp.asarray(lengths)))(k, v).jaxpr
    (call,) = jaxpr.eqns
    body = call.params["jaxpr"].jaxpr
    caches = set(body.invars[1:3])
    users = [eqn for eqn in body.eqns if caches & {x for x in eqn.invars if type(x).__name__ != "Literal"}]
    assert len(users) == 1 and caches <= set(users[0].invars)
    assert users[0].primitive.name in ("custom_vmap_call", "pallas_call")


@pytest.fixture
def fresh_interpreter():
    yield
    reset()


@pytest.mark.usefixtures("fresh_interpreter")
@pytest.mark.parametrize("group, layers, stages", [(1, None, 2), (8, 2, 1)])
def test_interpreted_kernel_matches_the_reference_and_reads_nothing_past_the_lengths(group, layers, stages):
    """(slot, start, count): a first chunk, one after a whole tile and a group, one ending mid-group, a
    one-token chunk, a padding row. Group 8 puts the 12 tokens in two query blocks of 8."""
    rows = [(1, 0, 12), (2, 72, 5), (3, 20, 3), (0, 6, 1), (4, 0, 0)]
    max_batch, width = 4, 12
    q, k, v, slots, positions, lengths, count = make_inputs(
        group, rows, group=group, dtype=jnp.bfloat16, max_batch=max_batch, capacity=136, kv_heads=1, head_dim=64,
        width=width, layers=layers)
    layer = 1 if layers else None
    out = mosaic_chunk_attention(q, k, v, jnp.asarray(slots), jnp.asarray(positions), jnp.asarray(lengths),
                                 layer=layer, block_k=64, stages=stages, interpret=interpreter())
    check(out, q, k, v, slots, positions, lengths, count, layer, max_batch)


GPU_ROWS = [(1, 0, 100), (2, 700, 77), (3, 1200, 128), (3, 1328, 50), (0, 5, 1), (0, 13, 3), (4, 0, 0)]


# (layers, group, head_dim, dtype): both layouts for every group, every head_dim and dtype at least
# twice, in 8 cases rather than the 48 of the whole product (each case compiles the kernel twice).
GPU_CASES = [(None, 1, 64, jnp.bfloat16), (3, 1, 128, jnp.float16), (None, 2, 256, jnp.float16),
             (3, 2, 64, jnp.bfloat16), (None, 4, 128, jnp.bfloat16), (3, 4, 256, jnp.bfloat16),
             (None, 8, 64, jnp.float16), (3, 8, 128, jnp.float16)]


@pytest.mark.gpu
@pytest.mark.skipif(not ON_HOPPER, reason="needs a Hopper GPU (wgmma)")
@pytest.mark.parametrize("layers, group, head_dim, dtype", GPU_CASES)
def test_gpu_compiled_kernel_matches_the_reference(layers, group, head_dim, dtype):
    max_batch, width = 4, 128
    q, k, v, slots, positions, lengths, count = make_inputs(
        group * head_dim, GPU_ROWS, group=group, dtype=dtype, max_batch=max_batch, capacity=1504, kv_heads=2,
        head_dim=head_dim, width=width, layers=layers)
    layer = 2 if layers else None
    for block_k in (None, 64):
        out = mosaic_chunk_attention(q, k, v, jnp.asarray(slots), jnp.asarray(positions), jnp.asarray(lengths),
                                     layer=layer, block_k=block_k)
        check(out, q, k, v, slots, positions, lengths, count, layer, max_batch)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_HOPPER, reason="needs a Hopper GPU (wgmma)")
def test_gpu_partly_mapped_cache_reads_only_mapped_pages():
    """The kernel over a reservation whose pages are mapped only up to each length (a child process)."""
    pytest.importorskip("cupy")
    pytest.importorskip("cuda.bindings.driver")
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    child = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert child.returncode == 0, child.stdout + child.stderr
    assert "PARTLY MAPPED OK" in child.stdout, child.stdout + child.stderr


def _partly_mapped_child():
    """Per-layer and interleaved float16 caches over 2 MiB pages; each row is a chunk ending at its
    slot's length (slot 0 on a page boundary; slot 2 has no page, and row 2 is padding)."""
    sys.path.insert(0, os.path.dirname(__file__))
    from partly_mapped import partly_mapped_cache

    kv_heads, head_dim, group, width = 8, 128, 4, 40
    rng = np.random.default_rng(0)
    for layers, lengths in ((None, [1024, 2501, 0, 1031]), (4, [256, 613, 0, 263])):
        max_len = 4096 if layers is None else 1024
        shape = (4, max_len, *((layers,) if layers else ()), kv_heads, head_dim)
        k, v = (partly_mapped_cache(shape, lengths, np.float16, seed) for seed in (1, 2))
        layer = 3 if layers else None
        lengths = np.asarray(lengths, np.int32)
        slots = np.array([0, 1, 4, 3], np.int32)  # row 2: padding
        positions = lengths[:, None] - width + np.arange(width, dtype=np.int32)[None]  # [R, T]
        count = np.where(slots < 4, width, 0)
        q = jnp.asarray(rng.standard_normal((4, width, group * kv_heads, head_dim)), jnp.float16)
        out = mosaic_chunk_attention(q, k.device, v.device, jnp.asarray(slots), jnp.asarray(positions),
                                     jnp.asarray(lengths), layer=layer).block_until_ready()
        check(out, q, jnp.asarray(k.host), jnp.asarray(v.host), slots, positions, lengths, count, layer, 4)
        print(f"layers={layers}: matches the reference")
    print("PARTLY MAPPED OK")


if __name__ == "__main__":
    _partly_mapped_child()
