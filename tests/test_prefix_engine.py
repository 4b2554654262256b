"""Prefix sharing in the engine, on the CPU: the same tokens with sharing on and off, exact counts.

The fake driver's ``host_pages`` makes a page mapped at a second address show the bytes of its
first mapping (and keeps an unmapped page's bytes for its next one), as one physical page does on
a GPU: a shared prefix then really holds the K and V another request computed, and the tokens
prove it. Pages are 4 KiB: 32 tokens of the tiny model per layer's K or V (per-layer layout), 16
tokens of every layer (interleaved).
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_vattention as jv
from jax_vattention import _core
from jax_vattention.engine import Engine, EngineConfig, Request
from jax_vattention.decode.generate import generate_in_manager
from jax_vattention.cache.prefix import page_keys

CPU = jax.devices("cpu")[0]
PAGE = 4096


def make_manager(model, *, layout="per_layer", max_batch=4, max_len=160, budget_pages=10_000, host_pages=True):
    config = model.config
    cache_config = jv.CacheConfig(num_layers=config.num_layers, max_batch=max_batch, max_len=max_len,
                                  kv_heads=config.num_kv_heads, head_dim=config.head_dim, dtype=jnp.float32,
                                  page_bytes=PAGE, budget_bytes=budget_pages * PAGE, layout=layout)
    driver = _core.FakeDriver(PAGE, host_pages=host_pages)
    return jv.CacheManager(cache_config, CPU, driver=driver), driver


def run(model, requests, *, sharing, layout="per_layer", budget_pages=10_000, token_budget=48, chunk_tokens=16,
        host_pages=True):
    """Runs ``requests`` (submitted at once) on a fresh engine; returns (tokens, engine, manager, driver)."""
    manager, driver = make_manager(model, layout=layout, budget_pages=budget_pages, host_pages=host_pages)
    engine = Engine(model, manager, EngineConfig(token_budget=token_budget, chunk_tokens=chunk_tokens,
                                                 prefix_sharing=sharing))
    ids = [engine.submit(request) for request in requests]
    outputs = engine.run()
    assert not engine.failed
    return [outputs[i] for i in ids], engine, manager, driver


def workload(seed, count, prefix_len, user=(2, 30), new=(4, 16)):
    rng = np.random.default_rng(seed)
    system = rng.integers(2, 256, prefix_len).tolist()
    return [Request(prompt=system + rng.integers(2, 256, int(rng.integers(*user))).tolist(),
                    max_new_tokens=int(rng.integers(*new))) for _ in range(count)]


def check_accounting(manager, driver):
    """Every handle the driver holds is mapped, pooled or cached, exactly once; each cache entry's
    mappings are the slots that map it; the statistics count the same pages."""
    view = manager._core.view()
    cached = {h for entry in view["cache"] for h in entry["handles"]}
    mapped = [h for pages in view["slots"] for page in pages for h in page]
    private = [h for h in mapped if h not in cached]
    assert len(private) == len(set(private)), "a private page is mapped twice"
    assert sorted(set(private) | cached | set(view["pooled"])) == sorted(driver.handles())
    assert len(private) + len(cached) + len(view["pooled"]) == len(driver.handles())
    assert len(driver.mappings()) == len(mapped)
    for entry in view["cache"]:
        assert entry["mappings"] == sum(page == entry["handles"] for pages in view["slots"] for page in pages)
    stats = manager.stats()
    assert stats["cached_pages"] == len(cached) and stats["mapped_pages"] == len(mapped)
    assert stats["pooled_pages"] == len(view["pooled"]) and stats["created_pages"] == len(driver.handles())
    assert stats["bytes_saved"] == (len(mapped) - len(set(mapped))) * PAGE
    return view


def check_nothing_leaks(manager, driver):
    """After every request: nothing active; reclaim, evict and trim give every page back."""
    assert not manager.active().any()
    check_accounting(manager, driver)
    manager.reclaim()
    view = check_accounting(manager, driver)
    assert all(entry["mappings"] == 0 for entry in view["cache"]) and driver.mappings() == {}
    manager.evict()
    manager.trim()
    stats = manager.stats()
    assert stats["cached_pages"] == stats["created_pages"] == stats["mapped_pages"] == 0
    assert driver.handles() == [] and driver.mappings() == {}


@pytest.mark.parametrize("layout", ["per_layer", pytest.param("interleaved", marks=pytest.mark.slow)])
def test_tokens_are_the_same_with_sharing_on_and_off_under_preemption(model, layout):
    # A 70-token system prompt (2 pages per layer, 4 interleaved pages) and a tight budget.
    # Outputs longer than the eager pages: decodes grow into pages they must map, and preempt.
    requests = workload(0, 8, 70, new=(24, 40))
    requests[3] = Request(prompt=requests[1].prompt, max_new_tokens=30)         # a whole prompt again
    budget = 24 if layout == "per_layer" else 20
    off, engine_off, manager_off, _ = run(model, requests, sharing=False, layout=layout, budget_pages=budget)
    on, engine, manager, driver = run(model, requests, sharing=True, layout=layout, budget_pages=budget)
    assert on == off
    stats = engine.stats
    assert engine.prefixes.active and not engine_off.prefixes.active
    assert stats.preemptions > 0 and stats.shared_admissions >= 6
    assert engine_off.stats.prefill_tokens == engine_off.stats.prompt_tokens
    assert stats.prompt_tokens - stats.prefill_tokens == stats.shared_tokens > 6 * 64
    assert stats.shared_pages == stats.shared_tokens // manager.tokens_per_page * manager.config.num_buffers
    assert stats.peak_bytes_saved > 0
    check_nothing_leaks(manager, driver)
    manager.close()
    manager_off.close()


def test_without_host_pages_the_fake_driver_shares_nothing_in_cpu_buffers(model):
    """Its pages there would not carry their bytes to a second address: sharing is off, as on the
    CPU backend's own driver, and the engine computes every prompt."""
    manager, _ = make_manager(model, host_pages=False)
    assert manager.tokens_per_page == 0
    assert Engine(model, manager, EngineConfig(prefix_sharing=True)).prefixes.active is False
    manager.close()


def test_a_burst_with_one_system_prompt_computes_it_once(model):
    # 64 tokens: 2 full pages. The first request computes them in its first two steps (48 tokens a
    # step); the next one waits one step for page 1 instead of computing it too, then every one shares.
    requests = workload(2, 6, 64, user=(4, 12), new=(3, 6))
    _, engine, manager, driver = run(model, requests, sharing=True)
    stats = engine.stats
    user_tokens = sum(len(r.prompt) - 64 for r in requests)
    assert stats.prefill_tokens == 64 + user_tokens and stats.prompt_tokens == 6 * 64 + user_tokens
    assert stats.shared_admissions == 5 and stats.shared_tokens == 5 * 64 and stats.prefix_waits >= 1
    assert stats.preemptions == 0
    keys = page_keys(requests[0].prompt[:64], manager.tokens_per_page)
    entries = {entry["key"]: entry for entry in manager._core.view()["cache"]}
    assert [entries[key]["page"] for key in keys] == [0, 1]                  # one copy of the prefix
    check_nothing_leaks(manager, driver)
    manager.close()


def test_cached_pages_are_evicted_before_a_request_waits_or_is_preempted(model):
    manager, driver = make_manager(model, budget_pages=32)                  # 8 pages of 32 tokens x 4 buffers
    engine = Engine(model, manager, EngineConfig(token_budget=48, chunk_tokens=16))
    rng = np.random.default_rng(3)
    engine.submit(Request(prompt=rng.integers(2, 256, 96).tolist(), max_new_tokens=8))
    engine.run()
    assert manager.stats()["cached_pages"] == 3 * 4                         # 103 tokens written: 3 full pages
    # Two new prompts need 6 pages with their first decodes; the free slot's private page and the
    # cache's 3 pages make room, and nobody waits.
    for _ in range(2):
        engine.submit(Request(prompt=rng.integers(2, 256, 70).tolist(), max_new_tokens=8))
    engine.run()
    assert engine.stats.preemptions == 0 and not engine.stats.memory_bound_batches
    assert manager.stats()["pages_evicted_total"] > 0
    check_nothing_leaks(manager, driver)
    manager.close()


@pytest.mark.slow
def test_a_driver_failure_while_mapping_a_shared_prefix_changes_nothing_and_the_engine_goes_on(model):
    requests = workload(6, 2, 70, new=(6, 7))
    manager, driver = make_manager(model)
    engine = Engine(model, manager, EngineConfig(token_budget=48, chunk_tokens=16))
    first = engine.submit(requests[0])
    alone = engine.run()[first]
    manager.reclaim()                          # the prefix stays cached, mapped nowhere: admission maps it
    second = engine.submit(requests[1])
    for tries, operation in enumerate(("map", "set_access"), 1):   # the cached pages' mapping, then their access
        driver.fail_on(operation, 1)
        before = manager._core.view()
        engine._waiting[0].retry_at = 0.0      # no back-off: the admission is tried in this step
        assert engine.step() == []             # the admission waits, to be tried again
        assert driver.failures_thrown == tries and engine._waiting[0].admission_failures == tries
        view = check_accounting(manager, driver)
        assert (view["slots"], view["cache"]) == (before["slots"], before["cache"]) and engine.waiting == 1
    outputs = engine.run()
    assert engine.stats.shared_admissions == 1 and not engine.failed
    check_nothing_leaks(manager, driver)
    manager.close()
    reference, *_, plain, _ = run(model, requests, sharing=False)
    assert [alone, outputs[second]] == reference
    plain.close()


def test_a_shared_page_reads_the_same_in_every_slot_that_maps_it(model):
    """The fake driver's host pages: values written in one slot appear at the shared positions of
    another, and come back after the page was unmapped everywhere."""
    manager, driver = make_manager(model, max_batch=3)
    prompt = list(range(2, 80))
    keys = page_keys(prompt[:-1], manager.tokens_per_page)                  # 2 full pages before the last token
    first = manager.alloc_prefix(keys, len(prompt))
    assert first.shared_tokens == 0
    manager.grow_slots([len(prompt) if s == first.slot else 0 for s in range(3)])
    layers, heads, dim = manager.config.num_layers, manager.config.kv_heads, manager.config.head_dim
    values = jnp.asarray(np.random.default_rng(4).normal(size=(1, len(prompt), heads, dim)), jnp.float32)

    def write_all(cache, k, start, count, slots):
        for layer in range(layers):
            cache = jv.write_kv(cache, layer, k, k, start, count, slots)
        return cache

    write = jv.cache_jit(write_all)
    manager.cache = write(manager.cache, values, jnp.zeros(1, jnp.int32), jnp.full(1, len(prompt), jnp.int32),
                          jnp.full(1, first.slot, jnp.int32))
    assert manager.publish_pages(first.slot, keys) == 2
    second = manager.alloc_prefix(keys, len(prompt))
    assert second.shared_tokens == 64 and manager.lengths()[second.slot] == 64
    with pytest.raises(ValueError, match="start at token 64"):
        manager.check_write(second.slot, 63)
    read = jax.jit(lambda buffer: buffer[:, :64])
    k = np.asarray(read(manager.cache.k[1]))
    np.testing.assert_array_equal(k[second.slot], np.asarray(values[0, :64]))
    manager.free(first.slot)
    manager.free(second.slot)
    manager.reclaim()                                                       # unmapped everywhere, still cached
    third = manager.alloc_prefix(keys, len(prompt))
    assert third.shared_tokens == 64
    k = np.asarray(read(manager.cache.k[1]))
    np.testing.assert_array_equal(k[third.slot], np.asarray(values[0, :64]))
    manager.free(third.slot)
    check_nothing_leaks(manager, driver)
    manager.close()


def test_alloc_prefix_refuses_keys_past_the_last_token(model):
    manager, _ = make_manager(model)
    with pytest.raises(ValueError, match="2 page keys"):
        manager.alloc_prefix([1, 2], 64)                                   # 64 tokens: 1 page before the last
    with pytest.raises(ValueError, match="64-bit"):
        manager.alloc_prefix([-1], 64)
    assert not manager.active().any()
    manager.close()


def test_serve_bench_with_a_shared_prefix_computes_a_fraction_of_the_prompts(model, tmp_path, capsys, monkeypatch):
    import functools

    from jax_vattention.bench import serve
    from jax_vattention.app.cli import main
    # The bench's manager on the fake driver with host pages: the CPU backend's own cannot share.
    monkeypatch.setattr(serve, "CacheManager", functools.partial(
        jv.CacheManager, driver=_core.FakeDriver(PAGE, host_pages=True)))
    assert main(["serve-bench", "--requests", "8", "--rate", "1000", "--max-batch", "4", "--max-len", "160",
                 "--shared-prefix", "96", "--prompt-len", "4", "16", "--output-len", "2", "6", "--page-kib", "4",
                 "--token-budget", "64", "--chunk-tokens", "32", "--budget-mib", "4", "--out", str(tmp_path)]) == 0
    report = capsys.readouterr().out
    line = next(line for line in report.splitlines() if line.startswith("prefill tokens computed"))
    computed, prompt = (int(word) for word in line.split()[3:6:2])
    assert computed < prompt / 3 and "prefix sharing (16 tokens a page)" in line
    tokens = json.loads((tmp_path / "tokens.json").read_text())
    assert len(tokens) == 8 and all(tokens)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["per_layer", "interleaved"])
def test_generate_shares_the_prefixes_earlier_calls_published(model, layout):
    rng = np.random.default_rng(5)
    system = rng.integers(2, 256, 70).tolist()
    first = [system + [5, 6, 7], rng.integers(2, 256, 20).tolist()]
    second = [system + rng.integers(2, 256, 9).tolist(), system + [5, 6, 7]]
    manager, driver = make_manager(model, layout=layout)
    tokens = [generate_in_manager(model, manager, first, max_new_tokens=8, prefix_sharing=True).tokens]
    # The first call published its prompts' full pages: the system prompt's 64 tokens are cached.
    assert manager.cached_pages(page_keys(second[0][:-1], manager.tokens_per_page)) == 64 // manager.tokens_per_page
    tokens.append(generate_in_manager(model, manager, second, max_new_tokens=8, prefix_sharing=True).tokens)
    check_nothing_leaks(manager, driver)
    manager.close()
    plain, _ = make_manager(model, layout=layout)
    assert tokens == [generate_in_manager(model, plain, prompts, max_new_tokens=8).tokens
                      for prompts in (first, second)]
    plain.close()
