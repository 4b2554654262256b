"""A model with sliding windows served through a virtual cache that unmaps the pages behind them.

The fake driver fills an address with NaN when its page is unmapped (``poison_unmapped``), so a
kernel that reads a page behind a window poisons the logits: the tokens through the virtual cache
must still equal those through a dense cache, from ``generate`` and from the engine (chunked
prefill, decode rows and chunk rows in one step, preemption under a tight budget), while the
window layers' pages go back to the pool.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jax_vattention as jv
from jax_vattention import _core
from jax_vattention.decode.generate import generate, generate_in_manager
from jax_vattention.engine import Engine, EngineConfig, Request
from jax_vattention.models.configs import get_config
from jax_vattention.models.llama import Llama

from conftest import SLIDING_WINDOW as WINDOW  # the windowed models' window

CPU = jax.devices("cpu")[0]
PAGE = 4096                  # 32 tokens of one layer (2 KV heads x 16 x float32)
MAX_LEN = 224


@pytest.fixture(scope="module")
def model(windowed_model):
    """Mistral-like or Gemma-like: the conftest's windowed tiny models."""
    return windowed_model


def manager_for(model, *, max_batch=3, budget_pages=10_000, layout="per_layer"):
    config = model.config
    cache_config = jv.CacheConfig(num_layers=config.num_layers, max_batch=max_batch, max_len=MAX_LEN,
                                  kv_heads=config.num_kv_heads, head_dim=config.head_dim, dtype=jnp.float32,
                                  page_bytes=PAGE, budget_bytes=budget_pages * PAGE, layout=layout,
                                  window=config.sliding_window, window_layers=config.window_layers)
    driver = _core.FakeDriver(PAGE, host_pages=True, poison_unmapped=True)
    return jv.CacheManager(cache_config, CPU, driver=driver)


def dense_tokens(model, prompts, new_tokens):
    config = model.config
    cache = jv.KVCache.dense(num_layers=config.num_layers, max_batch=len(prompts), capacity=MAX_LEN,
                             kv_heads=config.num_kv_heads, head_dim=config.head_dim, dtype=jnp.float32)
    return generate(model, cache, prompts, max_new_tokens=new_tokens)[0].tokens


PROMPTS = [list(range(3, 9)), list(range(10, 80)), [7] * 40]


@pytest.mark.parametrize("layout", ["per_layer", "interleaved"])
def test_generate_through_unmapped_windows_gives_the_dense_tokens(model, layout):
    want = dense_tokens(model, PROMPTS, 100)
    with manager_for(model, layout=layout) as manager:
        got = generate_in_manager(model, manager, PROMPTS, max_new_tokens=100).tokens
        stats = manager.stats()
    assert got == want
    every_layer = model.config.sliding_layers is None
    if layout == "per_layer" or every_layer:
        assert stats["window_pages_unmapped_total"] > 0
    else:  # interleaved with a full layer: a page holds every layer's tokens, none can go
        assert stats["window_pages_unmapped_total"] == 0


def test_the_pallas_kernels_read_only_the_windows_too(model):
    """The Pallas decode and chunk kernels (interpreted) over the poisoned cache."""
    prompts = PROMPTS[1:]
    want = dense_tokens(model, prompts, 40)
    with manager_for(model) as manager:
        assert generate_in_manager(model, manager, prompts, max_new_tokens=40, backend="pallas").tokens == want


def test_the_engine_serves_windows_with_the_dense_tokens_and_gives_pages_back(model):
    rng = np.random.default_rng(5)
    requests = [Request(prompt=rng.integers(0, 256, size=int(n)).tolist(), max_new_tokens=int(m))
                for n, m in zip(rng.integers(5, 120, 6), rng.integers(20, 90, 6))]
    want = [dense_tokens(model, [r.prompt], r.max_new_tokens)[0] for r in requests]
    preemptions = 0
    for budget in (24, 28):   # the largest request's pages, and a few more: tight enough to preempt
        with manager_for(model, budget_pages=budget) as manager:
            engine = Engine(model, manager, EngineConfig(token_budget=32, chunk_tokens=16))
            ids = [engine.submit(request) for request in requests]
            outputs = engine.run()
            assert not engine.failed
            assert [outputs[i] for i in ids] == want
            assert manager.stats()["window_pages_unmapped_total"] > 0
            preemptions += engine.stats.preemptions
    assert preemptions > 0


def test_a_cache_that_unmaps_more_than_the_model_allows_is_refused(model):
    config = model.config
    cache_config = jv.CacheConfig(num_layers=config.num_layers, max_batch=2, max_len=MAX_LEN,
                                  kv_heads=config.num_kv_heads, head_dim=config.head_dim, dtype=jnp.float32,
                                  window=WINDOW - 1, budget_bytes=1 << 24)
    with jv.CacheManager(cache_config, CPU) as manager:
        with pytest.raises(ValueError, match="unmaps layer 0's pages behind a window of 15 tokens"):
            generate_in_manager(model, manager, PROMPTS[:1], max_new_tokens=4)
        with pytest.raises(ValueError, match="attends within"):
            Engine(model, manager, EngineConfig())


def test_the_generate_command_gives_a_windowed_checkpoint_a_windowed_cache(tmp_path, capsys):
    import argparse

    from jax_vattention.app.commands import generate as command
    from random_checkpoints import write_random_checkpoint
    write_random_checkpoint(str(tmp_path), dict(
        model_type="mistral", vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=WINDOW, torch_dtype="float32"))
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    args = parser.parse_args(["--model", str(tmp_path), "--batch", "2", "--prompt-len", "700", "--max-new-tokens",
                              "20", "--max-len", "1024", "--rounds", "1", "--backend", "blocked"])
    assert command.run(args) == 0
    out = capsys.readouterr().out
    assert f"sliding window of {WINDOW} tokens:" in out and "unmapped behind it" in out


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cudnn", "pallas"])
def test_gpu_generate_unmaps_behind_the_windows_and_gives_the_dense_tokens(backend):
    """On the CUDA driver, 2 MiB pages of 1,024 tokens (8 KV heads x 128 x bfloat16): a window of 256
    in layer 0; prompts of up to 1,500 tokens and 700 new ones cross several pages behind the window,
    which are unmapped while the loop runs (a read there would kill the CUDA context)."""
    config = get_config("tiny").replace(hidden_size=256, intermediate_size=512, num_heads=8, num_kv_heads=8,
                                        head_dim=128, dtype="bfloat16", rope_scaling=None, sliding_window=256,
                                        sliding_layers=(0,))
    model = Llama(config, rngs=nnx.Rngs(7))
    rng = np.random.default_rng(8)
    prompts = [rng.integers(0, 256, size=n).tolist() for n in (1500, 900, 40)]
    cache_config = jv.CacheConfig(num_layers=config.num_layers, max_batch=4, max_len=4096,
                                  kv_heads=config.num_kv_heads, head_dim=config.head_dim, dtype=jnp.bfloat16,
                                  **config.cache_windows())
    with jv.CacheManager(cache_config) as manager:
        got = generate_in_manager(model, manager, prompts, max_new_tokens=700, stop_tokens=[], backend=backend)
        unmapped = manager.stats()["window_pages_unmapped_total"]
        capacity = manager.capacity
    assert unmapped >= 2 * 2   # layer 0's K and V, two pages at least (the longest prompt's)
    dense = jv.KVCache.dense(num_layers=config.num_layers, max_batch=4, capacity=capacity,
                             kv_heads=config.num_kv_heads, head_dim=config.head_dim, dtype=jnp.bfloat16)
    want, _ = generate(model, dense, prompts, max_new_tokens=700, stop_tokens=[], backend=backend)
    assert got.tokens == want.tokens
