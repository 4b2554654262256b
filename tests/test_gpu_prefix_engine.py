"""Prefix sharing in the engine on a CUDA GPU: the same tokens with sharing on and off, both layouts.

The model is the tiny one with 8 KV heads of 128 (float32, matmuls at full precision, so that the
two runs do not differ by TF32 rounding): a 2 MiB page holds 512 tokens of one layer's K or V
(per-layer) or 256 tokens of both layers (interleaved). Each case runs in its own process.
"""

import pytest

from own_process import run_function

pytestmark = pytest.mark.gpu
MiB = 1 << 20


def run_case(name: str, *args) -> None:
    run_function("test_gpu_prefix_engine", name, *args)


def engine_tokens_with_sharing_on_and_off(layout: str, platform: str = "gpu") -> None:
    """``platform="cpu"`` runs the same checks on the fake driver's host pages (a check of this case)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    import jax_vattention as jv
    from jax_vattention.engine import Engine, EngineConfig, Request
    from jax_vattention.models.configs import get_config
    from jax_vattention.models.llama import Llama

    jax.config.update("jax_default_matmul_precision", "highest")
    from jax_vattention import _core

    config = get_config("tiny").replace(num_heads=8, num_kv_heads=8, head_dim=128)
    model = Llama(config, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    system = rng.integers(2, config.vocab_size, 600).tolist()
    requests = [Request(prompt=system + rng.integers(2, config.vocab_size, int(n)).tolist(), max_new_tokens=12)
                for n in rng.integers(3, 200, 6)]
    results = {}
    for sharing in (False, True):
        cache_config = jv.CacheConfig(num_layers=config.num_layers, max_batch=4, max_len=1024,
                                      kv_heads=config.num_kv_heads, head_dim=config.head_dim, dtype=jnp.float32,
                                      budget_bytes=256 * MiB, layout=layout)
        driver = _core.FakeDriver(2 * MiB, host_pages=True) if platform == "cpu" else None
        with jv.CacheManager(cache_config, jax.devices(platform)[0], driver=driver) as manager:
            engine = Engine(model, manager, EngineConfig(token_budget=128, chunk_tokens=32, prefix_sharing=sharing))
            ids = [engine.submit(request) for request in requests]
            outputs = engine.run()
            assert not engine.failed, engine.failed
            results[sharing] = [outputs[i] for i in ids]
            stats = engine.stats
            if sharing:
                per_page = manager.tokens_per_page
                assert per_page == (512 if layout == "per_layer" else 256), per_page
                shared = 600 // per_page * per_page
                assert stats.shared_admissions == 5 and stats.shared_tokens == 5 * shared, stats
                assert stats.prefill_tokens == stats.prompt_tokens - 5 * shared
                assert stats.peak_bytes_saved > 0
            else:
                assert not engine.prefixes.active and stats.prefill_tokens == stats.prompt_tokens
    assert results[True] == results[False], (results[True], results[False])


@pytest.mark.parametrize("layout", ["per_layer", "interleaved"])
def test_engine_tokens_with_sharing_on_and_off(layout):
    run_case("engine_tokens_with_sharing_on_and_off", layout)
