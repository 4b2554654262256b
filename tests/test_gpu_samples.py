"""``n`` samples of one prompt in the engine on a CUDA GPU: forked slots whose full pages are the
prefill's physical pages give the tokens of independent requests with the seeds ``seed + i``.

The model is the tiny one with 8 KV heads of 128 (float32, matmuls at full precision): a 2 MiB
page holds 512 tokens of one layer's K or V (per-layer) or 256 tokens of both layers (interleaved).
Each case runs in its own process.
"""

import pytest

from own_process import run_function

pytestmark = pytest.mark.gpu
MiB = 1 << 20


def run_case(name: str, *args) -> None:
    run_function("test_gpu_samples", name, *args)


def samples_are_seeded_requests(layout: str, platform: str = "gpu") -> None:
    """``platform="cpu"`` runs the same checks on the fake driver's host pages (a check of this case)."""
    import dataclasses

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    import jax_vattention as jv
    from jax_vattention import _core
    from jax_vattention.engine import Engine, EngineConfig, Request
    from jax_vattention.models.configs import get_config
    from jax_vattention.models.llama import Llama

    jax.config.update("jax_default_matmul_precision", "highest")
    config = get_config("tiny").replace(num_heads=8, num_kv_heads=8, head_dim=128)
    model = Llama(config, rngs=nnx.Rngs(0))
    prompt = np.random.default_rng(0).integers(2, config.vocab_size, 700).tolist()   # a page and a part
    request = Request(prompt=prompt, max_new_tokens=16, temperature=1.0, seed=42, repetition_penalty=1.2,
                      logprobs=1)
    cache_config = jv.CacheConfig(num_layers=config.num_layers, max_batch=8, max_len=1024,
                                  kv_heads=config.num_kv_heads, head_dim=config.head_dim, dtype=jnp.float32,
                                  budget_bytes=256 * MiB, layout=layout)
    driver = _core.FakeDriver(2 * MiB, host_pages=True) if platform == "cpu" else None
    with jv.CacheManager(cache_config, jax.devices(platform)[0], driver=driver) as manager:
        engine = Engine(model, manager, EngineConfig(token_budget=128, chunk_tokens=32))
        ids = engine.submit_samples(request, 4)
        forked = 0
        outputs = {i: [] for i in ids}
        while not engine.idle:
            for event in engine.step():
                outputs[event.request_id].append(event.token)
            forked = max(forked, manager.stats()["forked_pages"])
        assert not engine.failed, engine.failed
        per_page = 512 if layout == "per_layer" else 256
        assert forked == (len(prompt) - 1) // per_page * manager.config.num_buffers
        assert engine.stats.prefill_tokens == len(prompt) - 1
        alone = [engine.submit(dataclasses.replace(request, seed=42 + i)) for i in range(4)]
        reference = engine.run()
        assert [outputs[i] for i in ids] == [reference[i] for i in alone]
        assert len({tuple(outputs[i]) for i in ids}) == 4


@pytest.mark.parametrize("layout", ["per_layer", "interleaved"])
def test_samples_on_a_gpu_are_independent_requests_with_their_seeds(layout):
    run_case("samples_are_seeded_requests", layout)
