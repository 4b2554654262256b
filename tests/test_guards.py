"""Entry points refuse what would fault before dispatch, and keep a manager consistent when a step fails."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import jax_vattention as jv
from jax_vattention.decode.generate import generate, generate_in_manager
from jax_vattention.cache.host import host_for
from jax_vattention.models import Llama, get_config

CONFIG = get_config("tiny")
CPU = jax.devices("cpu")[0]


@pytest.fixture(scope="module")
def model():
    return Llama(CONFIG, rngs=nnx.Rngs(3))


PAGE = 4096        # a fake driver's page: 32 tokens of one buffer (128 bytes a token in float32)
BUFFERS = 2 * CONFIG.num_layers


def make_manager(max_batch=2, max_len=128, budget_pages=1000):
    return jv.CacheManager(jv.CacheConfig(num_layers=CONFIG.num_layers, max_batch=max_batch, max_len=max_len,
                                          kv_heads=CONFIG.num_kv_heads, head_dim=CONFIG.head_dim,
                                          dtype=jnp.float32, page_bytes=PAGE, budget_bytes=budget_pages * PAGE),
                           CPU, driver=jv._core.FakeDriver(PAGE))


def test_a_manager_accepts_only_its_own_cache():
    with make_manager() as a, make_manager() as b:
        with pytest.raises(ValueError, match=f"cache of manager {a.manager_id} was given to manager"):
            b.cache = a.cache
        dense = jv.KVCache.dense(num_layers=CONFIG.num_layers, max_batch=2, capacity=b.capacity,
                                 kv_heads=CONFIG.num_kv_heads, head_dim=CONFIG.head_dim, dtype=jnp.float32)
        with pytest.raises(ValueError, match="a dense cache"):
            b.cache = dense
        with pytest.raises(ValueError, match="do not match"):
            b.cache = b.cache.replace(k=b.cache.k[:1])
        assert host_for(a.cache) is a and host_for(b.cache) is b
        b.cache = b.cache


def test_generate_checks_the_slots_of_a_managers_cache(model):
    with make_manager() as manager:
        with pytest.raises(ValueError, match="slot 1 is not allocated"):
            generate(model, manager.cache, [[5, 6, 7]], slots=[1], max_new_tokens=3)
        slot = manager.alloc(2)
        with pytest.raises(ValueError, match=f"slot {slot} holds 2 tokens .* writes 3"):
            generate(model, manager.cache, [[5, 6, 7]], slots=[slot], max_new_tokens=3)
        assert manager.lengths()[slot] == 2
        result, manager.cache = generate(model, manager.cache, [[5, 6]], slots=[slot], max_new_tokens=3)
        assert len(result.tokens[0]) == 3


def test_generate_reserves_the_loops_growth_before_dispatch(model):
    with make_manager(budget_pages=BUFFERS) as manager:     # one page (32 tokens) per buffer
        slot = manager.alloc(28)
        before = manager.stats()
        with pytest.raises(jv.OutOfPagesError):
            generate(model, manager.cache, [[5] * 28], slots=[slot], max_new_tokens=10)
        assert manager.lengths()[slot] == 28 and manager.stats()["mapped_pages"] == before["mapped_pages"]
        result, manager.cache = generate(model, manager.cache, [[5] * 28], slots=[slot], max_new_tokens=4)
        assert len(result.tokens[0]) == 4


def test_a_step_that_runs_out_of_pages_inside_loses_the_cpu_cache_clearly(model, monkeypatch):
    with make_manager(budget_pages=BUFFERS) as manager:     # one page (32 tokens) per buffer
        monkeypatch.setattr(manager, "reserve_growth", lambda tokens: None)   # as if pages were taken
        old_id = manager.manager_id
        with pytest.raises(jv.OutOfPagesError, match="inside the compiled step.*lost.*reset"):
            generate_in_manager(model, manager, [[5] * 28], max_new_tokens=10)
        assert manager.lost
        for use in (lambda: manager.cache, lambda: manager.alloc(1), lambda: manager.reclaim()):
            with pytest.raises(RuntimeError, match="was lost.*reset"):
                use()
        monkeypatch.undo()
        manager.reset()
        assert not manager.lost and manager.manager_id != old_id and not manager.active().any()
        result = generate_in_manager(model, manager, [[5, 6, 7]], max_new_tokens=4)
        assert len(result.tokens[0]) == 4
