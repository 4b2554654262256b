"""Forks from Python on the CPU: ``CacheManager.fork`` over the cache's real memory, both layouts.

The fake driver's ``host_pages`` makes a page mapped at a second address show the bytes of its
first mapping (as one physical page does on a GPU: tests/test_gpu_forks.py checks the same there),
and its copy is a copy of host memory. So a forked slot really holds its parent's K and V, which
the arrays show, and the tokens prove: a greedy continuation from a fork is the parent's.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_vattention as jv
from jax_vattention import _core
from jax_vattention.decode.generate import generate, generate_in_manager
from jax_vattention.models.configs import get_config

CPU = jax.devices("cpu")[0]
PAGE = 4096
MODEL = get_config("tiny")     # 2 layers, 2 KV heads x 16, float32: 128 bytes a token per layer
PER_PAGE = {"per_layer": 32, "interleaved": 16}


def cache_config(layout, *, max_batch=4, budget_pages=10_000, page_bytes=PAGE):
    return jv.CacheConfig(num_layers=MODEL.num_layers, max_batch=max_batch, max_len=160,
                          kv_heads=MODEL.num_kv_heads, head_dim=MODEL.head_dim, dtype=jnp.float32,
                          page_bytes=page_bytes, budget_bytes=budget_pages * page_bytes, layout=layout)


@jv.cache_jit
def write_all_layers(cache, k, v, start, count, slots):
    """Writes ``k``/``v`` [layers, batch, tokens, kv_heads, head_dim] into every layer."""
    for layer in range(cache.num_layers):
        cache = jv.write_kv(cache, layer, k[layer], v[layer], start, count, slots)
    return cache


def tokens_of(manager, slot, count):
    """K and V of the first ``count`` tokens of ``slot``: [layers, count, kv_heads, head_dim] each."""
    cache = jax.block_until_ready(manager.cache)
    out = []
    for buffers in (cache.k, cache.v):
        if cache.interleaved:
            out.append(np.moveaxis(np.asarray(buffers[0][slot, :count]), 1, 0))
        else:
            out.append(np.stack([np.asarray(buffer[slot, :count]) for buffer in buffers]))
    return out


def random_tokens(rng, count, batch=1):
    shape = (MODEL.num_layers, batch, count, MODEL.num_kv_heads, MODEL.head_dim)
    return jnp.asarray(rng.normal(size=shape), jnp.float32), jnp.asarray(rng.normal(size=shape), jnp.float32)


@pytest.mark.parametrize("layout", ["per_layer", "interleaved"])
def test_a_fork_holds_its_parents_tokens_and_each_writes_its_own(fake_host, layout):
    rng = np.random.default_rng(0)
    per_page = PER_PAGE[layout]
    manager, _ = fake_host(cache_config(layout), PAGE, host_pages=True)
    parent = manager.alloc(70)
    k, v = random_tokens(rng, 70)
    manager.cache = write_all_layers(manager.cache, k, v, jnp.zeros(1, jnp.int32), jnp.full(1, 70, jnp.int32),
                                     jnp.full(1, parent, jnp.int32))
    child = manager.fork(parent, lookahead=8)
    assert manager.lengths()[child] == 70
    full = 70 // per_page
    view = manager.page_manager.view()
    assert view["slots"][child][:full] == view["slots"][parent][:full]
    assert not set(view["slots"][child][full]) & set(view["slots"][parent][full])   # the copy
    stats = manager.stats()
    assert stats["forked_pages"] == stats["shared_pages"] == full * manager.config.num_buffers
    parent_tokens = tokens_of(manager, parent, 70)
    for mine, theirs in zip(tokens_of(manager, child, 70), parent_tokens):
        np.testing.assert_array_equal(mine, theirs)
    for slot in (parent, child):
        assert manager.writable_from(slot) == full * per_page
        with pytest.raises(ValueError, match="shared prefix"):
            manager.check_write(slot, full * per_page - 1)
    # Each writes its own next tokens: the other slot's stay as they were.
    k2, v2 = random_tokens(rng, 5, batch=2)
    manager.cache = write_all_layers(manager.cache, k2, v2, jnp.full(2, 70, jnp.int32), jnp.full(2, 5, jnp.int32),
                                     jnp.asarray([parent, child], jnp.int32))
    for slot, row in ((parent, 0), (child, 1)):
        got_k, got_v = tokens_of(manager, slot, 75)
        np.testing.assert_array_equal(got_k[:, :70], parent_tokens[0])
        np.testing.assert_array_equal(got_k[:, 70:], np.asarray(k2[:, row]))
        np.testing.assert_array_equal(got_v[:, 70:], np.asarray(v2[:, row]))


def test_a_fork_refused_changes_nothing(fake_host):
    manager, _ = fake_host(cache_config("per_layer", max_batch=2, budget_pages=13), PAGE, host_pages=True)
    parent = manager.alloc(70)                         # 3 pages in each of 4 buffers: 12 of 13
    before = manager.page_manager.view()
    with pytest.raises(ValueError, match="slot 1 holds no request to fork"):
        manager.fork(1)
    with pytest.raises(ValueError, match="slot 5 does not exist"):
        manager.fork(5)
    with pytest.raises(jv.OutOfPagesError, match="forking slot 0"):
        manager.fork(parent)                           # its copy: 1 page in each buffer
    assert manager.page_manager.view() == before
    manager.free(parent)
    parent = manager.alloc(40)                         # 2 pages in each buffer
    manager.fork(parent)
    before = manager.page_manager.view()
    with pytest.raises(jv.NoFreeSlotError, match="free one before forking slot 0"):
        manager.fork(parent)
    assert manager.page_manager.view() == before


def test_the_cpu_backends_own_driver_cannot_fork():
    with jv.CacheManager(cache_config("per_layer", page_bytes=64 * 1024), CPU, driver=_core.host_driver()) as manager:
        slot = manager.alloc(10)
        with pytest.raises(ValueError, match="host driver cannot"):
            manager.fork(slot)
        assert manager.active().tolist() == [True, False, False, False]


@pytest.mark.parametrize("layout", ["per_layer", pytest.param("interleaved", marks=pytest.mark.slow)])
def test_greedy_tokens_from_forks_are_the_parents(model, fake_host, layout):
    prompt = np.random.default_rng(1).integers(2, 256, 45).tolist()   # 13 tokens in its last page
    manager, _ = fake_host(cache_config(layout), PAGE, host_pages=True)
    # The run that shares nothing, then the prompt prefilled once (the same compiled program).
    want = generate_in_manager(model, manager, [prompt], max_new_tokens=12).tokens[0]
    parent = manager.alloc(len(prompt))
    first, manager.cache = generate(model, manager.cache, [prompt], slots=[parent], max_len=160, max_new_tokens=[1])
    assert first.tokens[0] == want[:1]
    children = [manager.fork(parent), manager.fork(parent)]
    slots = [parent, *children]
    # Each slot recomputes only the prompt's last token (its logits give the first new token): the
    # rest of the prompt's K and V are the parent's shared pages and the copy of its last page.
    result, manager.cache = generate(model, manager.cache, [prompt] * 3, slots=slots, starts=[len(prompt) - 1] * 3,
                                     max_new_tokens=12)
    assert result.tokens == [want] * 3
    assert manager.stats()["shared_pages"] == len(prompt) // PER_PAGE[layout] * manager.config.num_buffers
    for slot in slots:
        manager.free(slot)
    manager.reclaim()
    stats = manager.stats()
    assert stats["forked_pages"] == stats["mapped_pages"] == 0
    assert stats["pooled_pages"] == stats["created_pages"]
