"""Speculative decoding on a CUDA GPU: prompt lookup's greedy tokens are plain decoding's, the
verification rows attended by the device's chunk kernel over the virtual cache, both layouts.

The model is the tiny one with 8 KV heads of 128 (float32, matmuls at full precision, so that a
verified token and a decoded one do not differ by TF32 rounding). Each case runs in its own process.
"""

import pytest

from own_process import run_function

pytestmark = pytest.mark.gpu
MiB = 1 << 20


def run_case(name: str, *args) -> None:
    run_function("test_gpu_speculation", name, *args)


def speculative_tokens_are_plain(layout: str) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    import jax_vattention as jv
    from jax_vattention.engine import Engine, EngineConfig, Request
    from jax_vattention.models.configs import get_config
    from jax_vattention.models.llama import Llama

    jax.config.update("jax_default_matmul_precision", "highest")
    config = get_config("tiny").replace(num_heads=8, num_kv_heads=8, head_dim=128)
    model = Llama(config, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    requests = []
    for _ in range(6):
        phrase = rng.integers(2, config.vocab_size, int(rng.integers(4, 12))).tolist()
        requests.append(Request(prompt=rng.integers(2, config.vocab_size, 24).tolist() + phrase * 3,
                                max_new_tokens=48))
    results = {}
    for speculate in (None, "ngram"):
        cache_config = jv.CacheConfig(num_layers=config.num_layers, max_batch=4, max_len=1024,
                                      kv_heads=config.num_kv_heads, head_dim=config.head_dim, dtype=jnp.float32,
                                      budget_bytes=256 * MiB, layout=layout)
        with jv.CacheManager(cache_config, jax.devices("gpu")[0]) as manager:
            engine = Engine(model, manager, EngineConfig(token_budget=128, chunk_tokens=32, speculate=speculate))
            ids = [engine.submit(request) for request in requests]
            outputs = engine.run()
            assert not engine.failed, engine.failed
            results[speculate] = [outputs[i] for i in ids]
            if speculate:
                assert engine.stats.verifications > 0, engine.stats
            assert manager.stats()["active_slots"] == 0
    assert results[None] == results["ngram"]


@pytest.mark.parametrize("layout", ["per_layer", "interleaved"])
def test_speculative_tokens_are_plain_on_the_gpu(layout):
    run_case("speculative_tokens_are_plain", layout)
