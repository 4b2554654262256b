"""Attention backends against a naive per-row, per-head reference written here."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_vattention as jv
from jax_vattention.attention import (BACKENDS, BLOCK_TOKENS, attend, blocked_attention, dot_product_attention,
                                      resolve_backend, xla_attention)


def naive_attention(q, k_cache, v_cache, q_positions, kv_lengths):
    """float64 loops: query (b, t, n) sees keys s < kv_lengths[b] with s <= q_positions[b, t]."""
    q, k_cache, v_cache = (np.asarray(a, np.float64) for a in (q, k_cache, v_cache))
    batch, q_len, q_heads, head_dim = q.shape
    groups = q_heads // k_cache.shape[2]
    out = np.zeros(q.shape)
    for b in range(batch):
        for t in range(q_len):
            visible = min(int(kv_lengths[b]), int(q_positions[b, t]) + 1)
            if visible <= 0:
                continue
            for n in range(q_heads):
                keys = k_cache[b, :visible, n // groups]  # [S, H]
                scores = keys @ q[b, t, n] / np.sqrt(head_dim)  # [S]
                weights = np.exp(scores - scores.max())
                out[b, t, n] = weights @ v_cache[b, :visible, n // groups] / weights.sum()
    return out


def random_case(seed, batch=3, q_len=1, capacity=40, q_heads=4, kv_heads=2, head_dim=16):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, q_len, q_heads, head_dim)).astype(np.float32)
    k = rng.standard_normal((batch, capacity, kv_heads, head_dim)).astype(np.float32)
    v = rng.standard_normal((batch, capacity, kv_heads, head_dim)).astype(np.float32)
    return rng, q, k, v


@pytest.mark.parametrize("q_heads,kv_heads", [(4, 4), (4, 2), (8, 1)])
@pytest.mark.parametrize("seed", [0, 1])
def test_xla_decode_and_chunk_match_naive(seed, q_heads, kv_heads):
    rng, q, k, v = random_case(seed, q_len=5, q_heads=q_heads, kv_heads=kv_heads)
    starts = rng.integers(0, 30, size=3).astype(np.int32)
    positions = starts[:, None] + np.arange(5, dtype=np.int32)[None]  # a chunk at any offset
    lengths = (starts + rng.integers(0, 6, size=3)).astype(np.int32)
    got = xla_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(positions),
                        jnp.asarray(lengths))
    np.testing.assert_allclose(np.asarray(got), naive_attention(q, k, v, positions, lengths),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("q_len", [1, 7])
def test_dot_product_attention_mapping_matches_naive(q_len):
    """The cudnn backend's arguments, run through JAX's XLA implementation of the same call."""
    rng, q, k, v = random_case(2, q_len=q_len)
    if q_len == 1:  # decode: the query sits at the last valid position
        lengths = rng.integers(1, 40, size=3).astype(np.int32)
        positions = (lengths - 1)[:, None]
    else:  # prefill from position 0, rows padded past their length
        lengths = np.array([7, 3, 5], np.int32)
        positions = np.broadcast_to(np.arange(q_len, dtype=np.int32), (3, q_len))
    got = dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                jnp.asarray(positions), jnp.asarray(lengths), implementation=None)
    want = naive_attention(q, k, v, positions, lengths)
    for b in range(3):  # only real query tokens matter
        real = min(q_len, int(lengths[b]))
        np.testing.assert_allclose(np.asarray(got)[b, :real], want[b, :real], atol=1e-5, rtol=1e-5)


def test_slots_map_rows_to_cache_rows_and_padding_gets_zeros():
    rng, _, k, v = random_case(3, batch=4)
    q = rng.standard_normal((3, 1, 4, 16)).astype(np.float32)
    slots = np.array([2, 0, 4], np.int32)  # the third row is padding: slot 4 >= max_batch
    lengths = np.array([9, 33, 5], np.int32)
    positions = (lengths - 1)[:, None]
    got = np.asarray(attend(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                            q_positions=jnp.asarray(positions), kv_lengths=jnp.asarray(lengths),
                            slots=jnp.asarray(slots)))
    for row, slot in enumerate(slots[:2]):
        want = naive_attention(q[row:row + 1], k[slot:slot + 1], v[slot:slot + 1],
                               positions[row:row + 1], lengths[row:row + 1])
        np.testing.assert_allclose(got[row:row + 1], want, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(got[2], 0.0)


def test_pallas_backend_matches_xla_on_cpu():
    pytest.importorskip("jax_vattention.attention.kernels.decode_attention")
    rng, q, k, v = random_case(4, batch=3, capacity=64)
    lengths = np.array([1, 64, 17], np.int32)
    args = dict(q_positions=jnp.asarray((lengths - 1)[:, None]), kv_lengths=jnp.asarray(lengths))
    got = attend(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), backend="pallas", **args)
    np.testing.assert_allclose(np.asarray(got), naive_attention(q, k, v, (lengths - 1)[:, None], lengths),
                               atol=1e-4, rtol=1e-4)


def _cache_consumers(backend, q_len):
    """Primitives of attend's jaxpr that take a cache array as a direct input."""
    q = jnp.zeros((2, q_len, 4, 16), jnp.bfloat16)
    cache = jnp.zeros((2, 32, 2, 16), jnp.bfloat16)
    positions = jnp.zeros((2, q_len), jnp.int32)
    lengths = jnp.ones((2,), jnp.int32)
    jaxpr = jax.make_jaxpr(lambda k, v: attend(q, k, v, q_positions=positions, kv_lengths=lengths,
                                               backend=backend))(cache, cache).jaxpr
    consumers = set()

    def sub_jaxprs(params):
        for value in params.values():
            for item in value if isinstance(value, (tuple, list)) else (value,):
                if hasattr(item, "consts") and hasattr(item, "jaxpr"):
                    yield item.jaxpr
                elif hasattr(item, "eqns"):
                    yield item

    def visit(eqns, cache_vars):
        for eqn in eqns:
            fed = [type(var).__name__ != "Literal" and var in cache_vars for var in eqn.invars]
            if not any(fed):
                continue
            subs = list(sub_jaxprs(eqn.params))
            if not subs:
                consumers.add(eqn.primitive.name)
            for sub in subs:  # a container (pjit, custom_jvp): follow the cache inside
                visit(sub.eqns, {inner for inner, f in zip(sub.invars, fed) if f})

    visit(jaxpr.eqns, set(jaxpr.invars))
    return consumers


@pytest.mark.parametrize("q_len", [1, 8])
def test_xla_backend_reads_the_cache_only_through_dots(q_len):
    assert _cache_consumers("xla", q_len) <= {"dot_general"}


def test_unknown_backend_is_a_value_error():
    q = jnp.zeros((1, 1, 4, 16))
    cache = jnp.zeros((1, 8, 2, 16))
    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        attend(q, cache, cache, q_positions=jnp.zeros((1, 1), jnp.int32),
               kv_lengths=jnp.ones((1,), jnp.int32), backend="flash")
    assert set(BACKENDS) == {"xla", "blocked", "cudnn", "pallas", "pallas_triton", "pallas_mgpu", "mosaic"}


@pytest.mark.gpu
@pytest.mark.parametrize("backend, q_len", [("cudnn", 1), ("cudnn", 8), ("pallas", 1), ("pallas", 8), ("mosaic", 1),
                                            ("pallas_triton", 1)])
def test_gpu_backends_read_the_cache_in_place(backend, q_len):
    consumers = _cache_consumers(backend, q_len)
    assert not consumers & {"transpose", "slice", "dynamic_slice", "gather", "copy", "convert_element_type"}


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cudnn", "pallas", "pallas_triton", "pallas_mgpu"])
def test_gpu_backends_match_naive(backend):
    if backend == "pallas_mgpu" and not str(getattr(jax.devices()[0], "compute_capability", "")).startswith("9"):
        pytest.skip("our Mosaic GPU kernels need a Hopper GPU")
    rng, q, k, v = random_case(5, batch=4, capacity=256, q_heads=8, kv_heads=2, head_dim=64)
    lengths = np.array([1, 256, 100, 37], np.int32)
    got = attend(jnp.asarray(q, jnp.bfloat16), jnp.asarray(k, jnp.bfloat16), jnp.asarray(v, jnp.bfloat16),
                 q_positions=jnp.asarray((lengths - 1)[:, None]), kv_lengths=jnp.asarray(lengths),
                 backend=backend)
    want = naive_attention(np.asarray(jnp.asarray(q, jnp.bfloat16), np.float32),
                           np.asarray(jnp.asarray(k, jnp.bfloat16), np.float32),
                           np.asarray(jnp.asarray(v, jnp.bfloat16), np.float32), (lengths - 1)[:, None], lengths)
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("q_len", [1, 6])
@pytest.mark.parametrize("seed", [0, 1])
def test_blocked_matches_naive_across_blocks_and_empty_rows(seed, q_len):
    capacity = 3 * BLOCK_TOKENS
    rng, q, k, v = random_case(seed, batch=4, q_len=q_len, capacity=capacity, q_heads=8, kv_heads=2)
    lengths = np.array([0, 1, BLOCK_TOKENS + 5, capacity], np.int32)
    lengths[1:] = np.maximum(lengths[1:] - rng.integers(0, 3, size=3), q_len)
    positions = np.maximum(lengths[:, None] - q_len + np.arange(q_len, dtype=np.int32)[None], 0)
    got = blocked_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(positions),
                            jnp.asarray(lengths))
    np.testing.assert_allclose(np.asarray(got), naive_attention(q, k, v, positions, lengths),
                               atol=1e-5, rtol=1e-5)


def test_blocked_reads_one_layer_of_an_interleaved_cache():
    rng, q, k, v = random_case(3, batch=3, capacity=100)
    layers_k = np.stack([k, -k, 2 * k], axis=2)  # [B, S, layers, K, H]
    layers_v = np.stack([v, v, -v], axis=2)
    lengths = np.array([5, 100, 70], np.int32)
    positions = (lengths - 1)[:, None]
    got = blocked_attention(jnp.asarray(q), jnp.asarray(layers_k), jnp.asarray(layers_v),
                            jnp.asarray(positions), jnp.asarray(lengths), layer=2)
    want = naive_attention(q, 2 * k, -v, positions, lengths)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)


def test_blocked_never_reads_at_or_past_a_length():
    """Poisoned positions past each length (NaN) would spread into every output they touched."""
    rng, q, k, v = random_case(4, batch=3, capacity=2 * BLOCK_TOKENS)
    lengths = np.array([0, 3, BLOCK_TOKENS + 1], np.int32)
    for b, length in enumerate(lengths):
        k[b, length:] = np.nan
        v[b, length:] = np.nan
    got = np.asarray(blocked_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                       jnp.asarray((np.maximum(lengths, 1) - 1)[:, None]), jnp.asarray(lengths)))
    assert np.isfinite(got).all()
    np.testing.assert_array_equal(got[0], 0)


def test_one_rule_picks_and_refuses_backends():
    dense = jv.KVCache.dense(num_layers=1, max_batch=1, capacity=8, kv_heads=1, head_dim=4)
    assert resolve_backend(None, dense) == "blocked"          # CPU default
    assert resolve_backend("xla", dense) == "xla"             # a dense reference may read it all
    virtual_cpu = dense.replace(manager_id=7)
    assert resolve_backend("xla", virtual_cpu) == "xla"       # the OS commits what is read: allowed, not default
    with pytest.raises(ValueError, match="unknown attention backend"):
        resolve_backend("flash", dense)
    assert jv.attention.default_backend("per_layer", "gpu") == "cudnn"
    assert jv.attention.default_backend("interleaved", "gpu") == "pallas"


def test_pallas_names_pick_an_implementation(monkeypatch):
    """``pallas`` runs Triton until PALLAS_ON_HOPPER says Mosaic GPU, then Mosaic GPU on Hopper only and
    only for shapes its kernels take; the pinned names run theirs."""
    from jax_vattention.attention import kernel_implementation as backends
    bf16 = jnp.bfloat16
    assert backends.pallas_implementation("pallas", bf16, 128, 4, compute_capability="9.0") == "triton"
    assert backends.pallas_implementation("pallas_triton", bf16, 128, 4) == "triton"
    assert backends.pallas_implementation("pallas_mgpu", bf16, 128, 4) == "mosaic_gpu"
    monkeypatch.setattr(backends, "PALLAS_ON_HOPPER", "mosaic_gpu")
    assert backends.pallas_implementation("pallas", bf16, 128, 4, compute_capability="9.0") == "mosaic_gpu"
    assert backends.pallas_implementation(None, bf16, 256, 8, compute_capability="9.0") == "mosaic_gpu"
    assert backends.pallas_implementation("pallas", bf16, 128, 4, compute_capability="8.0") == "triton"
    assert backends.pallas_implementation("pallas", jnp.float32, 128, 4, compute_capability="9.0") == "triton"
    assert backends.pallas_implementation("pallas", bf16, 32, 4, compute_capability="9.0") == "triton"
    assert backends.pallas_implementation("pallas", bf16, 128, 4, 1500, compute_capability="9.0") == "triton"
    assert backends.pallas_implementation("pallas_triton", bf16, 128, 4, compute_capability="9.0") == "triton"


def test_one_rule_refuses_pallas_mgpu_where_its_kernels_cannot_run():
    with pytest.raises(ValueError, match="needs an NVIDIA Hopper GPU"):
        jv.attention.check_backend_on("pallas_mgpu", "interleaved", "cpu")
    with pytest.raises(ValueError, match="compute capability 9.x"):
        jv.attention.check_backend_on("pallas_mgpu", "per_layer", "gpu", compute_capability="8.0")
    jv.attention.check_backend_on("pallas_mgpu", "interleaved", "gpu", compute_capability="9.0")
    jv.attention.check_backend_on("pallas_triton", "interleaved", "cpu")
    from jax_vattention.attention.backends import check_pallas_mgpu_shapes
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        check_pallas_mgpu_shapes(jnp.float32, 128)
    with pytest.raises(ValueError, match="multiple of 64"):
        check_pallas_mgpu_shapes(jnp.bfloat16, 96)
    with pytest.raises(ValueError, match="multiple of 8 tokens"):
        check_pallas_mgpu_shapes(jnp.bfloat16, 128, 1500)
    check_pallas_mgpu_shapes(jnp.float16, 256, 4096)


def test_pallas_mgpu_off_a_gpu_is_a_value_error():
    if jax.default_backend() == "gpu":
        pytest.skip("runs where JAX has no GPU")
    q = jnp.zeros((1, 1, 4, 64), jnp.bfloat16)
    cache = jnp.zeros((1, 8, 2, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match="need a Hopper GPU"):
        attend(q, cache, cache, q_positions=jnp.zeros((1, 1), jnp.int32), kv_lengths=jnp.ones((1,), jnp.int32),
               backend="pallas_mgpu")


def test_pinned_triton_backend_matches_xla_on_cpu():
    pytest.importorskip("jax_vattention.attention.kernels.decode_attention")
    rng, q, k, v = random_case(6, batch=2, capacity=48)
    lengths = np.array([48, 9], np.int32)
    args = dict(q_positions=jnp.asarray((lengths - 1)[:, None]), kv_lengths=jnp.asarray(lengths))
    got = attend(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), backend="pallas_triton", **args)
    np.testing.assert_allclose(np.asarray(got), naive_attention(q, k, v, (lengths - 1)[:, None], lengths),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
def test_gpu_rule_refuses_xla_for_a_virtual_cache():
    gpu = jax.devices("gpu")[0]
    dense = jv.KVCache.dense(num_layers=1, max_batch=1, capacity=8, kv_heads=1, head_dim=4, device=gpu)
    with pytest.raises(ValueError, match="whole cache capacity"):
        resolve_backend("xla", dense.replace(manager_id=7))
    assert resolve_backend(None, dense.replace(manager_id=7)) == "cudnn"
    assert resolve_backend("xla", dense) == "xla"
