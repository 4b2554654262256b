"""FP8 KV cache cases on a CUDA GPU, each run in its own process (a read of an unmapped page kills the
CUDA context): ``python tests/gpu_fp8_cases.py CASE`` prints ``CASE OK``; ``tests/test_gpu_fp8.py``
runs them.

The references are numpy's: e4m3 codes from ``ml_dtypes`` and a float64 softmax over their values.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

import jax_vattention as jv

MiB = 1 << 20
FP8 = jnp.float8_e4m3fn
K_SCALE, V_SCALE = 0.5, 0.25


def gpu():
    return jax.devices("gpu")[0]


def codes_of(x, scale):
    return np.clip(np.asarray(x, np.float32) * np.float32(1.0 / scale), -448, 448).astype(ml_dtypes.float8_e4m3fn)


def reference_attention(q, k, v, q_positions, kv_lengths):
    """float64 attention of q [B, T, N, H] over k, v [B, S, K, H] (causal, up to each length)."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    groups = q.shape[2] // k.shape[2]
    out = np.zeros(q.shape)
    for b in range(q.shape[0]):
        for t in range(q.shape[1]):
            visible = min(int(kv_lengths[b]), int(q_positions[b, t]) + 1)
            if visible <= 0:
                continue
            keys, values = k[b, :visible], v[b, :visible]                       # [S, K, H]
            logits = np.einsum('KGH,SKH->KGS', q[b, t].reshape(k.shape[2], groups, -1), keys) / np.sqrt(q.shape[-1])
            probs = np.exp(logits - logits.max(-1, keepdims=True))
            out[b, t] = (np.einsum('KGS,SKH->KGH', probs, values) / probs.sum(-1)[..., None]).reshape(q.shape[2:])
    return out


def filled_fp8_cache(layout: str, lengths, rng):
    """A manager of an FP8 cache (2 layers, 8 KV heads x 128) whose slots hold ``lengths`` tokens of
    layer 1, NaN codes from each length to the end of its last mapped page; returns the manager and
    the values written (float32 [slots, max(lengths), 8, 128] for K and V, bfloat16-exact)."""
    config = jv.CacheConfig(num_layers=2, max_batch=len(lengths), max_len=8192, kv_heads=8, head_dim=128, dtype=FP8,
                            budget_bytes=512 * MiB, layout=layout, k_scale=K_SCALE, v_scale=V_SCALE)
    manager = jv.CacheManager(config, gpu())
    per_page = manager.page_bytes // config.token_bytes
    for length in lengths:
        manager.alloc(int(length))
    mapped = -(-np.asarray(lengths) // per_page) * per_page                  # each slot's mapped tokens
    write = jv.cache_jit(lambda cache, k, v, count: jv.write_kv(cache, 1, k, v, jnp.zeros_like(count), count))
    nan = jnp.full((len(lengths), int(mapped.max()), 8, 128), jnp.nan, jnp.bfloat16)
    manager.cache = write(manager.cache, nan, nan, jnp.asarray(mapped, jnp.int32))
    longest = int(max(lengths))
    k = jnp.asarray(rng.standard_normal((len(lengths), longest, 8, 128)), jnp.bfloat16)
    v = jnp.asarray(rng.standard_normal((len(lengths), longest, 8, 128)), jnp.bfloat16)
    manager.cache = write(manager.cache, k, v, jnp.asarray(lengths, jnp.int32))
    return manager, np.asarray(k, np.float32), np.asarray(v, np.float32)


def triton_kernels_read_an_fp8_virtual_cache() -> None:
    """Our Triton decode and chunk kernels over a partly mapped FP8 cache (both layouts, GQA 4): the
    float64 attention over the codes' values, to bfloat16 accuracy; reading nothing past a length
    (NaN codes there) and no unmapped page; the lowered programs run Triton."""
    from jax_vattention.attention import attend, chunk_attention

    rng = np.random.default_rng(0)
    for layout in ("per_layer", "interleaved"):
        lengths = np.array([40, 2100, 1030, 0])                       # past page edges; an empty slot
        manager, k, v = filled_fp8_cache(layout, lengths, rng)
        with manager:
            k_values = codes_of(k, K_SCALE).astype(np.float64) * K_SCALE
            v_values = codes_of(v, V_SCALE).astype(np.float64) * V_SCALE
            k_cache, v_cache, index = manager.cache.layer(1)
            scales = dict(k_scale=K_SCALE, v_scale=V_SCALE)
            # Decode: one query per slot at its last position.
            q = rng.standard_normal((4, 1, 32, 128)).astype(np.float32)
            positions = np.maximum(lengths - 1, 0)[:, None]
            decode = jax.jit(lambda q, k, v, p, n: attend(q, k, v, q_positions=p, kv_lengths=n, backend="pallas_triton",
                                                          layer=index, **scales))
            operands = (jnp.asarray(q, jnp.bfloat16), k_cache, v_cache, jnp.asarray(positions, jnp.int32),
                        jnp.asarray(lengths, jnp.int32))
            assert "triton" in decode.lower(*operands).as_text(), "not the Triton decode kernel"
            got = np.asarray(jax.block_until_ready(decode(*operands)), np.float64)
            want = reference_attention(q, k_values, v_values, positions, lengths)
            np.testing.assert_allclose(got, want, atol=3e-2, rtol=3e-2, err_msg=f"decode, {layout}")
            exact = reference_attention(q, k, v, positions, lengths)
            assert np.abs(got - exact).max() <= 2.0 ** -4 * np.abs(v).max(), f"decode vs the original K/V, {layout}"
            # Prefill chunks: slot 0's last 16 tokens, two chunks of slot 1, one of slot 2, padding.
            slots = np.array([0, 1, 1, 2, 4], np.int32)
            start = np.array([24, 2068, 2084, 1020, 0], np.int32)
            count = np.array([16, 16, 16, 10, 0], np.int32)
            positions = start[:, None] + np.arange(16, dtype=np.int32)[None]
            q = rng.standard_normal((5, 16, 32, 128)).astype(np.float32)
            chunks = jax.jit(lambda q, k, v, s, p, n: chunk_attention(q, k, v, slots=s, q_positions=p, kv_lengths=n,
                                                                      layer=index, backend="pallas_triton", **scales))
            operands = (jnp.asarray(q, jnp.bfloat16), k_cache, v_cache, jnp.asarray(slots), jnp.asarray(positions),
                        jnp.asarray(start + count))
            lowered = chunks.lower(*operands).as_text()
            assert "triton" in lowered and "stablehlo.while" not in lowered, "not the Triton chunk kernel"
            got = np.asarray(jax.block_until_ready(chunks(*operands)), np.float64)
            rows = np.minimum(slots, 3)
            want = reference_attention(q, k_values[rows], v_values[rows], positions,
                                       np.where(slots < 4, start + count, 0))
            real = np.arange(16)[None] < count[:, None]
            np.testing.assert_allclose(got[real], want[real], atol=3e-2, rtol=3e-2, err_msg=f"chunks, {layout}")
            np.testing.assert_array_equal(got[slots >= 4], 0.0)


def generate_on_an_fp8_gpu_cache() -> None:
    """generate and the engine on an FP8 cache of the real GPU manager (the default backend, pallas):
    a page holds twice the tokens of a bfloat16 one, and the greedy tokens mostly agree with the
    bfloat16 cache's (the CPU test's bound: 3/4 over 16 tokens, every first token)."""
    from jax_vattention.decode.generate import generate_in_manager
    from jax_vattention.engine import Engine, EngineConfig, Request
    from jax_vattention.models.configs import get_config
    from jax_vattention.models.llama import Llama

    config = get_config("tiny").replace(dtype="bfloat16")
    model = Llama(config, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(3)
    prompts = [rng.integers(2, config.vocab_size, n).tolist() for n in (5, 17, 30, 9)]
    for layout in ("per_layer", "interleaved"):
        tokens, per_page = {}, {}
        for dtype in (jnp.bfloat16, FP8):
            cache_config = jv.CacheConfig(num_layers=config.num_layers, max_batch=4, max_len=4096,
                                          kv_heads=config.num_kv_heads, head_dim=config.head_dim, dtype=dtype,
                                          budget_bytes=256 * MiB, layout=layout)
            with jv.CacheManager(cache_config, gpu()) as manager:
                per_page[dtype] = manager.page_bytes // cache_config.token_bytes
                tokens[dtype] = generate_in_manager(model, manager, prompts, max_new_tokens=16, stop_tokens=[]).tokens
                if dtype == FP8:
                    engine = Engine(model, manager, EngineConfig(token_budget=32, chunk_tokens=8))
                    assert engine.backend == "pallas", engine.backend
                    ids = [engine.submit(Request(prompt=p, max_new_tokens=16)) for p in prompts]
                    outputs = engine.run()
                    assert not engine.failed
                    served = [(a, b) for i, want in zip(ids, tokens[FP8]) for a, b in zip(outputs[i], want)]
                    assert len(served) == 64 and np.mean([a == b for a, b in served]) >= 0.75, served
        assert per_page[FP8] == 2 * per_page[jnp.bfloat16]
        pairs = [(a, b) for got, want in zip(tokens[FP8], tokens[jnp.bfloat16]) for a, b in zip(got, want)]
        agreement = np.mean([a == b for a, b in pairs])
        print(f"{layout}: FP8 greedy tokens agree with bfloat16's on {agreement:.1%} of {len(pairs)}")
        assert agreement >= 0.75
        assert [t[0] for t in tokens[FP8]] == [t[0] for t in tokens[jnp.bfloat16]]


CASES = {function.__name__: function for function in (
    triton_kernels_read_an_fp8_virtual_cache, generate_on_an_fp8_gpu_cache)}


if __name__ == "__main__":
    CASES[sys.argv[1]]()
    print(f"{sys.argv[1]} OK")
