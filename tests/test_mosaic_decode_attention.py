"""The Mosaic GPU decode kernel: its read plan, its checks, the interpreter and a Hopper GPU.

What runs where:

* everywhere: the read plan (:func:`token_reads`) against the bound for every small length and split,
  the input checks, and that the cache goes into the kernel with no copy, slice or transpose first;
* the kernel itself in Pallas' Mosaic GPU interpreter on the CPU (``mosaic_interpreter``: on jax 0.10
  with the three rules its interpreter lacks), on caches that hold NaN past every length: a value
  loaded there spreads into the output (through ``0 * NaN`` in P @ V even where the mask drops it; K and
  V are copied by the same calls, so what holds for V holds for K);
* a Hopper GPU (``gpu`` marker): compiled, both layouts, groups 1..8, head_dim 64..256, bfloat16 and
  float16, and over a reservation mapped only up to each length (in a child process: a fault there
  would kill the CUDA context). Run this file in a process of its own: a compile failure of a Mosaic
  GPU kernel must not take other test files down with it.
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jax_vattention.attention.kernels.mosaic_decode_attention import mosaic_decode_attention
from mosaic_interpreter import interpreter, reset
from jax_vattention.attention.kernels.mosaic_keys import GROUP, KeyPlan, split_range, token_reads
from jax_vattention.attention.kernels.reference import decode_attention_reference

ON_HOPPER = any(d.platform == "gpu" and str(getattr(d, "compute_capability", "")).startswith("9")
                for d in jax.devices())
hopper = [pytest.mark.gpu, pytest.mark.skipif(not ON_HOPPER, reason="needs a Hopper GPU (wgmma)")]
TOLERANCE = {jnp.float16: 4e-3, jnp.bfloat16: 2e-2}


@pytest.mark.parametrize("block_k", [64, 128])
def test_reads_cover_each_range_exactly_once_and_stop_at_its_end(block_k):
    for lo in range(0, 3 * block_k + 1, GROUP):
        for hi in range(lo, lo + 2 * block_k + GROUP + 1):
            reads = token_reads(lo, hi, block_k)
            covered = [token for start, stop in reads for token in range(start, stop)]
            assert covered == list(range(lo, hi)), (lo, hi)
            for start, stop in reads:
                # A TMA copy into an (8, 64)-tiled tile starts on a tile row; one-token reads are the tail.
                assert stop - start == 1 or (start % GROUP == 0 and stop - start in (GROUP, block_k)), (lo, hi)


@settings(max_examples=200, deadline=None)
@given(length=st.integers(0, 5000), num_splits=st.integers(1, 40), block_k=st.sampled_from([64, 128]))
def test_decode_splits_partition_a_row_below_its_length(length, num_splits, block_k):
    ranges = [split_range(length, split, num_splits, block_k) for split in range(num_splits)]
    covered = [token for lo, hi in ranges for start, stop in token_reads(lo, hi, block_k)
               for token in range(start, stop)]
    assert sorted(covered) == list(range(length))
    assert all(lo % block_k == 0 and (lo == hi or lo < hi <= length) for lo, hi in ranges)


def test_plan_arithmetic_is_the_same_traced():
    """The kernel evaluates the plan on int32 scalars; the tests on ints: they must agree."""
    for lo, hi in [(0, 0), (0, 5), (64, 200), (128, 129), (0, 1000)]:
        plan, traced = KeyPlan(lo, hi, 64), KeyPlan(jnp.int32(lo), jnp.int32(hi), 64)
        assert int(traced.tiled_end) == plan.tiled_end and int(traced.num_tiles) == plan.num_tiles
        for tile in range(plan.num_tiles):
            assert int(traced.tile_groups(jnp.int32(tile))) == plan.tile_groups(tile)
        assert tuple(map(int, split_range(jnp.int32(hi), jnp.int32(1), 3, 64))) == split_range(hi, 1, 3, 64)


def random_inputs(seed, *, batch, group, kv_heads, head_dim, max_len, dtype, layers=None, lengths=None):
    """q [batch, kv_heads * group, head_dim] and caches [batch, max_len, (layers,) kv_heads, head_dim];
    with ``lengths``, the caches hold NaN from each slot's length on."""
    rng = np.random.default_rng(seed)
    shape = (batch, max_len, *((layers,) if layers else ()), kv_heads, head_dim)
    q = rng.standard_normal((batch, kv_heads * group, head_dim))
    k, v = rng.standard_normal(shape), rng.standard_normal(shape)
    for slot, length in enumerate(lengths if lengths is not None else ()):
        k[slot, length:] = np.nan
        v[slot, length:] = np.nan
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def assert_matches_reference(out, q, k_cache, v_cache, lengths, **kwargs):
    """The float32 reference over the caches with NaN read as 0 (it lies past the lengths)."""
    expected = decode_attention_reference(q, jnp.nan_to_num(k_cache), jnp.nan_to_num(v_cache), lengths, **kwargs)
    assert out.shape == q.shape and out.dtype == q.dtype
    out = np.asarray(out, np.float32)
    assert np.isfinite(out).all(), "a value at or past a length reached the output"
    tolerance = TOLERANCE[q.dtype.type]
    np.testing.assert_allclose(out, np.asarray(expected), atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda q, k, v, n: (q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), n), "bfloat16 or"),
        (lambda q, k, v, n: (q[..., :32], k[..., :32], v[..., :32], n), "multiple of 64"),
        (lambda q, k, v, n: (q, k, v, n.astype(jnp.int16)), "lengths must be int32"),
        (lambda q, k, v, n: (q[:, :3], k, v, n), "multiple of kv_heads"),
        (lambda q, k, v, n: (q, k[:1], v[:1], n), "exceeds the cache's max_batch"),
    ],
)
def test_bad_input_raises_value_error(make_args, message):
    q, k, v = random_inputs(0, batch=2, group=2, kv_heads=2, head_dim=64, max_len=64, dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match=message):
        mosaic_decode_attention(*make_args(q, k, v, jnp.array([3, 4], jnp.int32)))
    with pytest.raises(ValueError, match="block_k"):
        mosaic_decode_attention(q, k, v, jnp.array([3, 4], jnp.int32), block_k=96)


def test_a_cache_beyond_a_tma_descriptor_is_refused():
    q = jax.ShapeDtypeStruct((2, 8, 64), jnp.bfloat16)
    cache = jax.ShapeDtypeStruct((256, 131072, 32, 8, 64), jnp.bfloat16)  # 2**33 rows of head_dim
    with pytest.raises(ValueError, match="TMA"):
        jax.eval_shape(lambda q, k, v: mosaic_decode_attention(q, k, v, jnp.array([1, 2], jnp.int32), layer=0),
                       q, cache, cache)


@pytest.mark.parametrize("layers", [None, 3])
def test_reads_the_cache_in_place(layers):
    """The caches go straight into the kernel: no transpose, copy or slice of them comes first."""
    q, k, v = random_inputs(0, batch=2, group=4, kv_heads=2, head_dim=64, max_len=64, dtype=jnp.bfloat16,
                            layers=layers)
    jaxpr = jax.make_jaxpr(lambda k, v: mosaic_decode_attention(
        q, k, v, jnp.array([64, 5], jnp.int32), layer=1 if layers else None))(k, v).jaxpr
    (call,) = jaxpr.eqns
    body = call.params["jaxpr"].jaxpr
    users = [eqn for eqn in body.eqns if set(body.invars[1:3]) & {x for x in eqn.invars if type(x).__name__ != "Literal"}]
    assert len(users) == 1 and set(body.invars[1:3]) <= set(users[0].invars)
    assert users[0].primitive.name in ("custom_vmap_call", "pallas_call")


@pytest.fixture
def fresh_interpreter():
    yield
    reset()


@pytest.mark.usefixtures("fresh_interpreter")
@pytest.mark.parametrize("group, layers, dtype, num_splits, stages",
                         [(1, None, jnp.bfloat16, 2, 2), (4, 2, jnp.float16, 1, 1)])
def test_interpreted_kernel_matches_the_reference_and_reads_nothing_past_the_lengths(group, layers, dtype, num_splits,
                                                                                     stages):
    """Lengths: a whole tile and a group past it, a short row with a tail, one token, none; two splits,
    or one with a single stage (each tile's copies issued as the one before is consumed)."""
    lengths = jnp.array([72, 13, 1, 0], jnp.int32)
    q, k, v = random_inputs(group, batch=4, group=group, kv_heads=1, head_dim=64, max_len=136, dtype=dtype,
                            layers=layers, lengths=lengths)
    layer = 1 if layers else None
    out = mosaic_decode_attention(q, k, v, lengths, layer=layer, block_k=64, num_splits=num_splits, stages=stages,
                                  interpret=interpreter())
    assert_matches_reference(out, q, k, v, lengths, layer=layer)
    np.testing.assert_array_equal(np.asarray(out[3], np.float32), 0.0)


# (layers, group, head_dim, dtype): both layouts for every group, every head_dim and dtype at least
# twice, in 8 cases rather than the 48 of the whole product (each case compiles the kernel 3 times).
GPU_CASES = [(None, 1, 64, jnp.bfloat16), (2, 1, 128, jnp.float16), (None, 2, 256, jnp.float16),
             (2, 2, 64, jnp.bfloat16), (None, 4, 128, jnp.bfloat16), (2, 4, 256, jnp.bfloat16),
             (None, 8, 64, jnp.float16), (2, 8, 128, jnp.float16)]


@pytest.mark.gpu
@pytest.mark.skipif(not ON_HOPPER, reason="needs a Hopper GPU (wgmma)")
@pytest.mark.parametrize("layers, group, head_dim, dtype", GPU_CASES)
def test_gpu_matches_reference(layers, group, head_dim, dtype):
    """Lengths: the whole cache, a tile plus a group plus a tail, tails alone, one token, none."""
    max_len = 1024
    lengths = jnp.array([max_len, 130, 7, 0, 1, 64, 777, 8 * 37 + 5], jnp.int32)
    q, k, v = random_inputs(group + head_dim, batch=8, group=group, kv_heads=2, head_dim=head_dim, max_len=max_len,
                            dtype=dtype, layers=layers, lengths=lengths)
    layer = 1 if layers else None
    for splits, block_k in ((None, None), (1, 128 if head_dim <= 128 else 64), (3, 64)):
        out = mosaic_decode_attention(q, k, v, lengths, layer=layer, num_splits=splits, block_k=block_k)
        assert_matches_reference(out, q, k, v, lengths, layer=layer)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_HOPPER, reason="needs a Hopper GPU (wgmma)")
def test_gpu_partly_mapped_cache_reads_only_mapped_pages():
    """The kernel over a reservation whose pages are mapped only up to each length."""
    pytest.importorskip("cupy")
    pytest.importorskip("cuda.bindings.driver")
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    child = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert child.returncode == 0, child.stdout + child.stderr
    assert "PARTLY MAPPED OK" in child.stdout, child.stdout + child.stderr


def _partly_mapped_child():
    """Per-layer and interleaved float16 caches, 2 MiB pages: slot 0 ends on a page boundary, slot 2
    has no page, the others end inside a page, mid-group and after a tile."""
    sys.path.insert(0, os.path.dirname(__file__))
    from partly_mapped import partly_mapped_cache

    kv_heads, head_dim, group = 8, 128, 4
    for layers, lengths in ((None, [1024, 2501, 0, 1031]), (4, [256, 613, 0, 263])):
        max_len = 4096 if layers is None else 1024
        shape = (4, max_len, *((layers,) if layers else ()), kv_heads, head_dim)
        k, v = (partly_mapped_cache(shape, lengths, np.float16, seed) for seed in (1, 2))
        layer = 3 if layers else None
        rng = np.random.default_rng(0)
        lengths = jnp.asarray(lengths, jnp.int32)
        q = jnp.asarray(rng.standard_normal((4, group * kv_heads, head_dim)), jnp.float16)  # [B, N, H]
        out = mosaic_decode_attention(q, k.device, v.device, lengths, layer=layer).block_until_ready()
        assert_matches_reference(out, q, jnp.asarray(k.host), jnp.asarray(v.host), lengths, layer=layer)
        print(f"layers={layers}: matches the reference")
    print("PARTLY MAPPED OK")


if __name__ == "__main__":
    _partly_mapped_child()
