"""Caches the CPU tests share: a small manager on the host backend, and a model's cache over the fake driver."""

import jax
import jax.numpy as jnp

import jax_vattention as jv
from jax_vattention import _core

KiB = 1024
CPU = jax.devices("cpu")[0]
PAGE = 4096


def small_config(**overrides) -> jv.CacheConfig:
    """2 layers, 3 slots of 600 tokens, 2 KV heads of 16, float32, 64 KiB pages, a 256-page budget."""
    settings = dict(num_layers=2, max_batch=3, max_len=600, kv_heads=2, head_dim=16, dtype=jnp.float32,
                    page_bytes=64 * KiB, budget_bytes=256 * 64 * KiB)
    settings.update(overrides)
    return jv.CacheConfig(**settings)


def model_manager(model, *, layout="per_layer", max_batch=4, max_len=160, budget_pages=10_000):
    """``(manager, driver)``: a float32 cache of ``model``'s shape on the CPU over a fake driver of
    4 KiB pages."""
    config = model.config
    cache_config = jv.CacheConfig(num_layers=config.num_layers, max_batch=max_batch, max_len=max_len,
                                  kv_heads=config.num_kv_heads, head_dim=config.head_dim, dtype=jnp.float32,
                                  page_bytes=PAGE, budget_bytes=budget_pages * PAGE, layout=layout)
    driver = _core.FakeDriver(PAGE)
    return jv.CacheManager(cache_config, CPU, driver=driver), driver
