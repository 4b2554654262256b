"""The engine's features two and three at a time, on CPU, against the plain engine.

Each scenario runs the engine with a combination of speculative decoding (prompt lookup, a draft
model), forked samples (``n > 1``), prefix sharing, sliding windows, the FP8 cache, preemption,
cancellation, pipelining, both layouts, log-probabilities and stop tokens, and checks it against an
independent reference: the same requests through the engine with every one of those features off
(no speculation, no sharing, no forks, a roomy budget, not pipelined), or ``generate`` on a dense
cache, token for token. After every drained scenario no slot is active and, once the prefix cache
and the free slots give their pages back, nothing is mapped and the driver holds no page.

Pages are 4 KiB: 32 tokens of the tiny model per buffer (per-layer float32), 16 of every layer
(interleaved), twice as many in FP8.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_vattention as jv
from jax_vattention import _core
from jax_vattention.engine import Engine, EngineConfig, Request

CPU = jax.devices("cpu")[0]
PAGE = 4096
FP8 = jnp.float8_e4m3fn


def make_manager(model, *, layout="per_layer", dtype=jnp.float32, budget_pages=10_000, max_batch=4, max_len=160,
                 window=None, window_layers=None, poison=False):
    config = model.config
    cache_config = jv.CacheConfig(num_layers=config.num_layers, max_batch=max_batch, max_len=max_len,
                                  kv_heads=config.num_kv_heads, head_dim=config.head_dim, dtype=dtype,
                                  page_bytes=PAGE, budget_bytes=budget_pages * PAGE, layout=layout,
                                  window=window, window_layers=window_layers)
    driver = _core.FakeDriver(PAGE, host_pages=True, poison_unmapped=poison)
    return jv.CacheManager(cache_config, CPU, driver=driver), driver


def check_drained(engine, manager, driver):
    """The engine is idle, no slot is active, and every page goes back to the driver."""
    assert engine.idle
    counters = manager.counters()
    assert manager.stats()["active_slots"] == 0 and not manager.active().any(), counters
    manager.reclaim()
    manager.evict()
    manager.trim()
    stats = manager.stats()
    assert stats["cached_pages"] == stats["created_pages"] == stats["mapped_pages"] == 0, stats
    assert driver.handles() == [] and driver.mappings() == {}


def copying_requests(seed, count, *, system=24, new=(32, 48)):
    """Prompts that repeat a phrase after one shared system prefix: the random model's output loops,
    which prompt lookup finds (proposals are accepted and rejected)."""
    rng = np.random.default_rng(seed)
    prefix = rng.integers(2, 256, system).tolist()
    requests = []
    for _ in range(count):
        phrase = rng.integers(2, 256, int(rng.integers(4, 12))).tolist()
        requests.append(Request(prompt=prefix + phrase * 3, max_new_tokens=int(rng.integers(*new))))
    return requests


def run(engine, requests):
    ids = [engine.submit(request) for request in requests]
    outputs = engine.run()
    assert not engine.failed, engine.failed
    return [outputs[i] for i in ids]


_PLAIN = {}   # cache options -> (engine, manager): one reference engine per kind of cache, compiled once


@pytest.fixture(scope="module", autouse=True)
def _plain_engines_closed():
    yield
    for _, manager in _PLAIN.values():
        manager.close()
    _PLAIN.clear()


def plain_engine(model, **cache):
    """The reference: an engine with no speculation, sharing or pipelining, on a roomy cache of the
    given kind (so no preemption)."""
    key = (id(model), tuple(sorted((name, str(value)) for name, value in cache.items())))
    if key not in _PLAIN:
        manager, _ = make_manager(model, **{**cache, "budget_pages": 10_000})
        _PLAIN[key] = Engine(model, manager, EngineConfig(token_budget=24, chunk_tokens=8, pipeline=False,
                                                          prefix_sharing=False)), manager
    return _PLAIN[key][0]


def plain_engine_tokens(model, requests, **cache):
    return run(plain_engine(model, **cache), requests)


# -- speculation x ... -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def speculating(model):
    """One engine that speculates by prompt lookup (6 slots, a roomy budget), for the tests that need
    no budget of their own: its programs compile once. Each test starts its stats afresh."""
    manager, driver = make_manager(model, max_batch=6)
    with manager:
        yield Engine(model, manager, EngineConfig(token_budget=24, chunk_tokens=8, speculate="ngram")), manager, driver


def fresh(speculating):
    engine, manager, driver = speculating
    engine.reset_stats()
    return engine, manager, driver

@pytest.mark.parametrize("layout", ["per_layer", "interleaved"])
def test_speculation_on_an_fp8_cache_gives_the_plain_fp8_engines_tokens(model, layout):
    requests = copying_requests(seed=1, count=3)
    want = plain_engine_tokens(model, requests, layout=layout, dtype=FP8)
    manager, driver = make_manager(model, layout=layout, dtype=FP8, budget_pages=16)
    with manager:
        engine = Engine(model, manager, EngineConfig(token_budget=24, chunk_tokens=8, speculate="ngram"))
        assert run(engine, requests) == want
        assert 0 < engine.stats.accepted_tokens < engine.stats.proposed_tokens
        check_drained(engine, manager, driver)


def test_speculating_samples_fork_and_stream_what_independent_requests_stream(model, speculating):
    """Greedy samples stream the plain greedy answer; seeded sampling ones (temperature 0.8) what the
    same samples submitted as requests of their own stream, speculating too."""
    from jax_vattention.engine.groups import sample_requests

    requests = copying_requests(seed=0, count=2, new=(24, 32))
    want = plain_engine_tokens(model, requests)
    sampled = dataclasses.replace(requests[1], temperature=0.8, top_k=20, seed=7)
    engine, manager, driver = fresh(speculating)
    groups = [engine.submit_samples(request, 3) for request in (requests[0], sampled)]
    outputs = engine.run()
    assert not engine.failed
    assert [outputs[i] for i in groups[0]] == [want[0]] * 3
    assert engine.stats.accepted_tokens > 0 and engine.stats.unforked_samples == 0
    assert [outputs[i] for i in groups[1]] == run(engine, sample_requests(sampled, 3))
    check_drained(engine, manager, driver)


def test_speculating_samples_under_a_tight_budget_are_preempted_and_come_back_the_same(model):
    requests = copying_requests(seed=3, count=2)
    want = plain_engine_tokens(model, requests)
    manager, driver = make_manager(model, max_batch=6, budget_pages=20)
    with manager:
        engine = Engine(model, manager, EngineConfig(token_budget=24, chunk_tokens=8, speculate="ngram",
                                                     prefetch_tokens=4))
        groups = [engine.submit_samples(request, 3) for request in requests]
        outputs = engine.run()
        assert not engine.failed
        assert [[outputs[i] for i in ids] for ids in groups] == [[tokens] * 3 for tokens in want]
        assert engine.stats.preemptions > 0 and engine.stats.accepted_tokens > 0
        check_drained(engine, manager, driver)


def test_interleaved_speculation_shares_prefixes_published_after_rejections(model):
    """Interleaved pages of 16 tokens: the system prompt's pages and pages the accepted runs complete
    are published (the rejected proposals' rows were written past the length and are never keys of a
    page), later requests share them, and every request streams the plain engine's tokens."""
    requests = copying_requests(seed=13, count=4, system=40, new=(24, 32))
    want = plain_engine_tokens(model, requests, layout="interleaved")
    manager, driver = make_manager(model, layout="interleaved", budget_pages=24)
    with manager:
        engine = Engine(model, manager, EngineConfig(token_budget=24, chunk_tokens=8, speculate="ngram",
                                                     prefetch_tokens=4))
        first = run(engine, requests[:1])
        assert first == want[:1]
        assert run(engine, requests[1:] + requests[:1]) == want[1:] + want[:1]   # the first again: all shared
        stats = engine.stats
        assert stats.shared_admissions >= 4 and stats.accepted_tokens > 0 and stats.preemptions > 0
        check_drained(engine, manager, driver)


def test_speculating_samples_on_the_cpu_backends_own_memory_run_unforked(model):
    """The CPU backend's own pages cannot back two addresses: nothing is shared or forked, samples are
    requests of their own (counted), and speculation's rewinds work the same."""
    config = model.config
    cache_config = jv.CacheConfig(num_layers=config.num_layers, max_batch=4, max_len=160,
                                  kv_heads=config.num_kv_heads, head_dim=config.head_dim, dtype=jnp.float32,
                                  budget_bytes=1 << 22)
    requests = copying_requests(seed=14, count=2, new=(20, 28))
    want = plain_engine_tokens(model, requests)
    with jv.CacheManager(cache_config, CPU) as manager:
        assert manager.tokens_per_page == 0
        engine = Engine(model, manager, EngineConfig(token_budget=24, chunk_tokens=8, speculate="ngram"))
        groups = [engine.submit_samples(request, 2) for request in requests]
        outputs = engine.run()
        assert not engine.failed
        assert [[outputs[i] for i in ids] for ids in groups] == [[tokens] * 2 for tokens in want]
        assert engine.stats.unforked_samples == 4 and engine.stats.accepted_tokens > 0
        assert manager.stats()["active_slots"] == 0


def test_speculation_with_every_memory_policy_off_under_a_tight_budget(model):
    """No overlap, no deferred reclamation, no eager allocation, no prefix sharing, 4 tokens mapped
    ahead: proposals' pages are mapped and given back like any growth, requests are preempted, and
    the tokens are the plain engine's."""
    requests = copying_requests(seed=12, count=4, new=(20, 28))
    want = plain_engine_tokens(model, requests)
    manager, driver = make_manager(model, budget_pages=18)
    with manager:
        engine = Engine(model, manager, EngineConfig(token_budget=24, chunk_tokens=8, speculate="ngram",
                                                     overlap=False, deferred_reclamation=False,
                                                     eager_allocation=False, prefix_sharing=False,
                                                     prefetch_tokens=4))
        assert run(engine, requests) == want
        assert engine.stats.preemptions > 0 and engine.stats.accepted_tokens > 0
        check_drained(engine, manager, driver)


def test_cancelling_speculating_groups_with_preempted_samples_leaks_nothing(model):
    requests = [dataclasses.replace(r, max_new_tokens=60) for r in copying_requests(seed=3, count=2)]
    manager, driver = make_manager(model, max_batch=6, budget_pages=20)
    with manager:
        engine = Engine(model, manager, EngineConfig(token_budget=24, chunk_tokens=8, speculate="ngram",
                                                     prefetch_tokens=4))
        groups = [engine.submit_samples(request, 3) for request in requests]
        while engine.stats.preemptions == 0:
            engine.step()
        assert engine.waiting > 0
        assert all(engine.cancel(request_id) for ids in groups for request_id in ids)
        assert list(engine.stream()) == []
        check_drained(engine, manager, driver)


def test_cancelling_a_speculating_group_leaks_nothing(speculating):
    request = dataclasses.replace(copying_requests(seed=4, count=1)[0], max_new_tokens=60)
    engine, manager, driver = fresh(speculating)
    ids = engine.submit_samples(request, 3)
    while engine.stats.verifications < 3:
        engine.step()
    assert engine.cancel(ids[1])
    streamed = {i: [] for i in ids}
    while engine.stats.verifications < 6:
        for event in engine.step():
            streamed[event.request_id].append(event.token)
    assert engine.cancel(ids[0]) and engine.cancel(ids[2])
    for event in engine.stream():
        assert False, f"a cancelled sample streamed {event}"
    check_drained(engine, manager, driver)


@pytest.mark.parametrize("field", ["stop_tokens", "stop_token_ids"])
def test_a_stop_token_inside_an_accepted_run_ends_the_request_there(model, speculating, field):
    requests = copying_requests(seed=0, count=3)
    plain = plain_engine_tokens(model, requests)
    # Stop on a token of each output's loop, after the loop began (the proposals cover it).
    stops = [tokens[12] for tokens in plain]
    stopped = [dataclasses.replace(r, **{field: (stop,)}) for r, stop in zip(requests, stops)]
    # min_tokens past the first occurrence: the request must go on through it.
    stopped[1] = dataclasses.replace(stopped[1], min_tokens=plain[1].index(stops[1]) + 2)
    want = plain_engine_tokens(model, stopped)
    for tokens, stop in zip(want, stops):
        assert tokens[-1] == stop
    engine, manager, driver = fresh(speculating)
    assert run(engine, stopped) == want
    assert engine.stats.accepted_tokens > 0
    check_drained(engine, manager, driver)


def test_logprobs_beside_speculation_are_the_plain_engines(model, speculating):
    requests = copying_requests(seed=6, count=3)
    requests[1] = dataclasses.replace(requests[1], logprobs=2, prompt_logprobs=1)
    requests[2] = dataclasses.replace(requests[2], prompt_logprobs=2)

    def events(engine):
        ids = [engine.submit(request) for request in requests]
        by_id = {i: [] for i in ids}
        for event in engine.stream():
            by_id[event.request_id].append(event)
        assert not engine.failed
        return [by_id[i] for i in ids]

    want = events(plain_engine(model))
    engine, manager, driver = fresh(speculating)
    got = events(engine)
    assert [[e.token for e in r] for r in got] == [[e.token for e in r] for r in want]
    for mine, theirs in zip(got, want):
        for a, b in zip(mine, theirs):
            assert (a.logprobs is None) == (b.logprobs is None)
            if a.logprobs is not None:
                assert abs(a.logprobs.logprob - b.logprobs.logprob) < 1e-4
                assert [t for t, _ in a.logprobs.top] == [t for t, _ in b.logprobs.top]
        assert (mine[0].prompt_logprobs is None) == (theirs[0].prompt_logprobs is None)
        if mine[0].prompt_logprobs is not None:
            np.testing.assert_allclose([e.logprob for e in mine[0].prompt_logprobs[1:]],
                                       [e.logprob for e in theirs[0].prompt_logprobs[1:]], atol=1e-4)
    assert engine.stats.accepted_tokens > 0
    check_drained(engine, manager, driver)


def test_speculation_to_the_end_of_the_slot_stays_within_max_len(model, speculating):
    rng = np.random.default_rng(7)
    phrase = rng.integers(2, 256, 6).tolist()
    prompt = phrase * 24                      # 144 tokens: a slot of 160 leaves 17 new tokens
    request = Request(prompt=prompt, max_new_tokens=160 - len(prompt) + 1)
    want = plain_engine_tokens(model, [request])
    engine, manager, driver = fresh(speculating)
    assert run(engine, [request]) == want
    assert engine.stats.verifications > 0
    check_drained(engine, manager, driver)


def test_a_draft_model_speculates_for_forked_samples_and_preempted_requests(model):
    from jax_vattention.engine.draft import DraftProposer

    requests = copying_requests(seed=8, count=2, new=(16, 24))
    want = plain_engine_tokens(model, requests)
    manager, driver = make_manager(model, max_batch=6, budget_pages=20)
    draft_manager, draft_driver = make_manager(model, max_batch=6)
    with manager, draft_manager:
        engine = Engine(model, manager, EngineConfig(token_budget=24, chunk_tokens=8, speculate="draft",
                                                     num_speculative_tokens=3, prefetch_tokens=4),
                        draft=DraftProposer(model, draft_manager))
        groups = [engine.submit_samples(request, 3) for request in requests]
        outputs = engine.run()
        assert not engine.failed
        assert [[outputs[i] for i in ids] for ids in groups] == [[tokens] * 3 for tokens in want]
        assert engine.stats.preemptions > 0 and engine.stats.acceptance_rate > 0.9
        check_drained(engine, manager, driver)
        check_drained(engine, draft_manager, draft_driver)


# -- sliding windows x ... -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def windowed(windowed_model):
    """Mistral-like or Gemma-like: the conftest's windowed tiny models."""
    return windowed_model


def windowed_manager(model, **options):
    config = model.config
    return make_manager(model, window=config.sliding_window, window_layers=config.window_layers, poison=True,
                        **options)


def dense_tokens(model, requests):
    """``generate`` on a dense cache (no window unmapped, nothing shared)."""
    from jax_vattention.decode.generate import generate

    config = model.config
    cache = jv.KVCache.dense(num_layers=config.num_layers, max_batch=len(requests), capacity=256,
                             kv_heads=config.num_kv_heads, head_dim=config.head_dim, dtype=jnp.float32)
    return generate(model, cache, [r.prompt for r in requests],
                    max_new_tokens=[r.max_new_tokens for r in requests])[0].tokens


def test_speculation_over_a_sliding_window_is_refused_naming_both_and_a_windowless_cache_speculates(windowed):
    """A cache that unmaps behind the window cannot undo a rejection (the pages the lowered length's
    window needs may be gone): refused, naming what to do. A windowed model over a cache that keeps
    every page speculates to the dense tokens."""
    from jax_vattention.engine.draft import DraftProposer

    manager, _ = windowed_manager(windowed)
    with manager:
        with pytest.raises(ValueError, match="(?s)speculative decoding.*sliding window.*window=None"):
            Engine(windowed, manager, EngineConfig(speculate="ngram"))
        plain_manager, _ = make_manager(windowed)
        with plain_manager:
            with pytest.raises(ValueError, match="(?s)draft's cache has a sliding window.*window=None"):
                Engine(windowed, plain_manager, EngineConfig(speculate="draft"),
                       draft=DraftProposer(windowed, manager))
    requests = copying_requests(seed=15, count=2, new=(24, 32))
    want = dense_tokens(windowed, requests)
    manager, driver = make_manager(windowed, budget_pages=24)
    with manager:
        engine = Engine(windowed, manager, EngineConfig(token_budget=24, chunk_tokens=8, speculate="ngram"))
        assert run(engine, requests) == want
        assert engine.stats.verifications > 0
        check_drained(engine, manager, driver)


@pytest.mark.parametrize("layout", ["per_layer", "interleaved"])
def test_windowed_requests_share_a_long_system_prompt_and_give_samples_of_any_prompt(windowed, layout):
    """A system prompt longer than the window, shared between requests; samples of a prompt within the
    window fork, and those of a longer one (whose prefill unmaps the pages behind the window, which a
    fork would share) run as requests of their own: the dense cache's tokens, every page given back."""
    rng = np.random.default_rng(9)
    system = rng.integers(2, 256, 70).tolist()
    requests = [Request(prompt=system + rng.integers(2, 256, 3).tolist(), max_new_tokens=24),
                Request(prompt=rng.integers(2, 256, 12).tolist(), max_new_tokens=24),
                Request(prompt=system + rng.integers(2, 256, 20).tolist(), max_new_tokens=24)]
    want = dense_tokens(windowed, requests)
    manager, driver = windowed_manager(windowed, layout=layout, max_batch=6, budget_pages=40)
    with manager:
        engine = Engine(windowed, manager, EngineConfig(token_budget=24, chunk_tokens=8))
        first = engine.submit(requests[0])
        streamed = []
        for _ in range(12):          # its prompt's pages are published before the others come
            streamed += [event.token for event in engine.step()]
        later = [engine.submit_samples(r, 2) for r in requests[1:]]
        outputs = engine.run()
        assert not engine.failed
        assert [streamed + outputs[first], *[[outputs[i] for i in ids] for ids in later]] == [
            want[0], [want[1]] * 2, [want[2]] * 2]
        # One admission for the first request, one for the forked group, one per unforked sample (and
        # one per readmission). Pages behind a window are not shared (prefix_pages.cc): where the
        # window unmaps the system prompt's first page, nothing of it is.
        stats = engine.stats
        assert stats.admissions == 4 + stats.preemptions and stats.unforked_samples == 2
        check_drained(engine, manager, driver)


def test_an_fp8_windowed_cache_in_the_engine_gives_generates_tokens(windowed):
    from jax_vattention.decode.generate import generate_in_manager

    rng = np.random.default_rng(10)
    requests = [Request(prompt=rng.integers(2, 256, int(n)).tolist(), max_new_tokens=int(m))
                for n, m in zip((5, 60, 90), (40, 30, 20))]
    manager, _ = windowed_manager(windowed, layout="interleaved", dtype=FP8)
    with manager:
        want = generate_in_manager(windowed, manager, [r.prompt for r in requests],
                                   max_new_tokens=[r.max_new_tokens for r in requests]).tokens
    manager, driver = windowed_manager(windowed, layout="interleaved", dtype=FP8, budget_pages=12)
    with manager:
        engine = Engine(windowed, manager, EngineConfig(token_budget=24, chunk_tokens=8, prefetch_tokens=4))
        assert run(engine, requests) == want
        check_drained(engine, manager, driver)


def test_fp8_samples_fork_in_the_engine_and_match_independent_requests(model):
    requests = copying_requests(seed=11, count=2, new=(16, 24))
    requests = [dataclasses.replace(r, temperature=0.8, seed=5) for r in requests]
    manager, driver = make_manager(model, dtype=FP8, layout="interleaved", max_batch=6)
    with manager:
        engine = Engine(model, manager, EngineConfig(token_budget=24, chunk_tokens=8))
        groups = [engine.submit_samples(r, 3) for r in requests]
        outputs = engine.run()
        forked = [[outputs[i] for i in ids] for ids in groups]
        from jax_vattention.engine.groups import sample_requests

        alone = [run(engine, sample_requests(r, 3)) for r in requests]
        assert forked == alone
        assert manager.stats()["forked_pages"] == 0
        check_drained(engine, manager, driver)
