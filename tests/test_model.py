"""The Llama model against a cache-free float64 numpy forward pass written here."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_vattention.cache.kv_cache import KVCache
from jax_vattention.models import CONFIGS, Llama, RopeScaling, get_config
from jax_vattention.models.rope import inverse_frequencies


def separate_projections(block) -> dict[str, np.ndarray]:
    """One layer's fused weights as the separate matmuls they stand for, sliced here from
    ``w_qkv [D, K, G + 2, H]`` and ``w_gate_up [D, 2, F]``: ``wq [D, N, H]`` (query head
    ``k * G + g`` is ``w_qkv[:, k, g]``), ``wk``, ``wv [D, K, H]``, ``w_gate``, ``w_up [D, F]``."""
    w_qkv = np.asarray(block.attention.w_qkv[...])
    d, kv_heads, columns, head_dim = w_qkv.shape
    groups = columns - 2
    w_gate_up = np.asarray(block.mlp.w_gate_up[...])
    return {"wq": w_qkv[:, :, :groups].reshape(d, kv_heads * groups, head_dim), "wk": w_qkv[:, :, groups],
            "wv": w_qkv[:, :, groups + 1], "w_gate": w_gate_up[:, 0], "w_up": w_gate_up[:, 1]}


def reference_logits(model: Llama, tokens, dtype=np.float64) -> np.ndarray:
    """Logits [T, V] of one sequence in ``dtype``, full causal attention, no cache, with the
    query, key, value, gate and up projections as separate matmuls (:func:`separate_projections`)."""
    config = model.config
    p = lambda param: np.asarray(param[...], dtype)
    tokens = np.asarray(tokens)
    length = len(tokens)

    def norm(x, weight):
        return weight * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + config.rms_norm_eps)

    angles = np.arange(length)[:, None] * inverse_frequencies(config).astype(np.float64)[None]  # [T, H/2]
    cos, sin = np.cos(angles).astype(dtype)[:, None], np.sin(angles).astype(dtype)[:, None]  # [T, 1, H/2]

    def rope(x):  # [T, N, H], dimension i pairs with i + H/2
        first, second = np.split(x, 2, axis=-1)
        return np.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)

    groups = config.num_heads // config.num_kv_heads
    causal = np.tril(np.ones((length, length), bool))
    x = p(model.embed)[tokens]  # [T, D]
    for block in model.layers:
        w = {name: value.astype(dtype) for name, value in separate_projections(block).items()}
        h = norm(x, p(block.attention_norm.weight))
        q = rope(np.einsum('TD,DNH->TNH', h, w["wq"]))
        k = np.repeat(rope(np.einsum('TD,DKH->TKH', h, w["wk"])), groups, axis=1)
        v = np.repeat(np.einsum('TD,DKH->TKH', h, w["wv"]), groups, axis=1)
        scores = np.einsum('TNH,SNH->NTS', q, k) / np.sqrt(config.head_dim)
        scores = np.where(causal, scores, -np.inf)
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        x = x + np.einsum('NTS,SNH,NHD->TD', weights, v, p(block.attention.wo))
        h = norm(x, p(block.mlp_norm.weight))
        gate = h @ w["w_gate"]
        x = x + (gate / (1 + np.exp(-gate)) * (h @ w["w_up"])) @ p(block.mlp.w_down)
    x = norm(x, p(model.norm.weight))
    head = p(model.embed).T if model.lm_head is None else p(model.lm_head)
    return x @ head


def tiny_cache(config, max_batch=4, capacity=64):
    return KVCache.dense(num_layers=config.num_layers, max_batch=max_batch, capacity=capacity,
                         kv_heads=config.num_kv_heads, head_dim=config.head_dim, dtype=jnp.float32)


@pytest.mark.parametrize("tie", [False, True])
def test_padded_prefill_then_decode_matches_reference(tie):
    config = get_config("tiny").replace(tie_embeddings=tie)
    model = Llama(config, rngs=nnx.Rngs(1))
    rng = np.random.default_rng(7)
    lengths = np.array([5, 12, 1], np.int32)
    width = 16
    tokens = rng.integers(0, config.vocab_size, size=(3, width + 1)).astype(np.int32)
    cache = tiny_cache(config)
    positions = np.broadcast_to(np.arange(width, dtype=np.int32), (3, width))
    logits, cache = model(jnp.asarray(tokens[:, :width]), jnp.asarray(positions), cache,
                          start=jnp.zeros(3, jnp.int32), count=jnp.asarray(lengths))
    for b, length in enumerate(lengths):
        want = reference_logits(model, tokens[b, :length + 1])
        np.testing.assert_allclose(np.asarray(logits)[b, :length], want[:length], atol=2e-4, rtol=2e-4)
    for layer in range(config.num_layers):  # padding never reached the cache
        for b, length in enumerate(lengths):
            assert not np.any(np.asarray(cache.k[layer])[b, length:])
            assert not np.any(np.asarray(cache.v[layer])[b, length:])
    # one decode step: row b feeds the token at position lengths[b]
    step = tokens[np.arange(3), lengths][:, None]
    logits, cache = model(jnp.asarray(step), jnp.asarray(lengths[:, None]), cache,
                          start=jnp.asarray(lengths), count=jnp.ones(3, jnp.int32),
                          logit_index=jnp.zeros(3, jnp.int32))
    for b, length in enumerate(lengths):
        want = reference_logits(model, tokens[b, :length + 1])[length]
        np.testing.assert_allclose(np.asarray(logits)[b], want, atol=2e-4, rtol=2e-4)


def test_rows_follow_their_slots():
    config = get_config("tiny")
    model = Llama(config, rngs=nnx.Rngs(2))
    tokens = np.random.default_rng(3).integers(0, config.vocab_size, size=(2, 6)).astype(np.int32)
    cache = tiny_cache(config, max_batch=4)
    logits, cache = model(jnp.asarray(tokens), jnp.asarray(np.broadcast_to(np.arange(6), (2, 6))), cache,
                          start=jnp.zeros(2, jnp.int32), count=jnp.array([6, 4], jnp.int32),
                          slots=jnp.array([3, 1], jnp.int32))
    np.testing.assert_allclose(np.asarray(logits)[0], reference_logits(model, tokens[0]), atol=2e-4, rtol=2e-4)
    np.testing.assert_allclose(np.asarray(logits)[1, :4], reference_logits(model, tokens[1, :4]),
                               atol=2e-4, rtol=2e-4)
    written = [bool(np.any(np.asarray(cache.k[0])[slot])) for slot in range(4)]
    assert written == [False, True, False, True]
    assert not np.any(np.asarray(cache.k[0])[1, 4:])


def test_fused_projections_equal_separate_matmuls():
    """One w_qkv and one w_gate_up matmul give the logits of separate q/k/v and gate/up matmuls of
    the same weights (three query heads per KV head, float32 on both sides)."""
    config = get_config("tiny").replace(num_heads=6, num_kv_heads=2)
    model = Llama(config, rngs=nnx.Rngs(3))
    assert model.layers[0].attention.w_qkv.shape == (config.hidden_size, 2, 3 + 2, config.head_dim)
    assert model.layers[0].mlp.w_gate_up.shape == (config.hidden_size, 2, config.intermediate_size)
    tokens = np.random.default_rng(5).integers(0, config.vocab_size, size=(1, 9)).astype(np.int32)
    logits, _ = model(jnp.asarray(tokens), jnp.arange(9, dtype=jnp.int32)[None], tiny_cache(config, max_batch=1),
                      start=jnp.zeros(1, jnp.int32), count=jnp.full(1, 9, jnp.int32))
    want = reference_logits(model, tokens[0], dtype=np.float32)
    np.testing.assert_allclose(np.asarray(logits)[0], want, atol=2e-5, rtol=2e-5)


def test_llama3_rope_scaling_keeps_high_and_divides_low_frequencies():
    base = get_config("tiny").replace(rope_scaling=None, head_dim=64, rope_theta=500000.0)
    scaled = base.replace(rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                                   original_max_position_embeddings=8192))
    plain, stretched = inverse_frequencies(base), inverse_frequencies(scaled)
    wavelength = 2 * np.pi / plain
    high, low = wavelength < 8192 / 4, wavelength > 8192
    np.testing.assert_array_equal(stretched[high], plain[high])
    np.testing.assert_allclose(stretched[low], plain[low] / 8, rtol=1e-6)
    middle = ~high & ~low
    assert middle.any() and np.all((stretched[middle] < plain[middle]) & (stretched[middle] > plain[middle] / 8))


@pytest.mark.parametrize("name,billions,kv_kib", [("yi-6b", 6.06, 64), ("llama-3-8b", 8.03, 128),
                                                   ("yi-34b", 34.39, 240)])
def test_named_configs_have_the_real_shapes(name, billions, kv_kib):
    config = get_config(name)
    assert config.kv_bytes_per_token == kv_kib * 1024
    abstract = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0)))
    params = sum(x.size for x in jax.tree_util.tree_leaves(nnx.state(abstract, nnx.Param)))
    assert abs(params / 1e9 - billions) < 0.01


def test_bad_configs_are_value_errors():
    tiny = CONFIGS["tiny"]
    with pytest.raises(ValueError, match="num_heads"):
        tiny.replace(num_heads=3)
    with pytest.raises(ValueError, match="dtype"):
        tiny.replace(dtype="int8")
    with pytest.raises(ValueError, match="rope scaling kind 'ntk'"):
        RopeScaling(kind="ntk")
    with pytest.raises(ValueError, match="longrope short_factor and long_factor need head_dim / 2 = 8"):
        tiny.replace(rope_scaling=RopeScaling(kind="longrope", factor=None, short_factor=(1.0,) * 4,
                                              long_factor=(2.0,) * 4))
    with pytest.raises(ValueError, match="activation 'relu'"):
        tiny.replace(activation="relu")
    with pytest.raises(ValueError, match="sliding_layers needs a sliding_window"):
        tiny.replace(sliding_layers=(0,))
    with pytest.raises(ValueError, match="sliding_layers"):
        tiny.replace(sliding_window=8, sliding_layers=(5,))
    with pytest.raises(ValueError, match="unknown config 'gpt2'"):
        get_config("gpt2")
