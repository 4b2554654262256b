"""``n`` samples of one prompt in the engine, on the CPU: prefilled once, forked, each sample its own.

The fake driver's ``host_pages`` makes a page mapped at a second address show the bytes of its
first mapping, as one physical page does on a GPU: a forked sample really reads the K and V its
group's prefill wrote, and its tokens prove it. The reference of a group of ``n`` samples is ``n``
independent requests with the seeds ``seed + i`` (vLLM's rule): the same tokens, log-probabilities
and prompt log-probabilities, from one prefill of the prompt instead of ``n``.

Pages are 4 KiB: 32 tokens of the tiny model per layer's K or V (per-layer layout, 4 buffers), 16
tokens of every layer (interleaved, 1 buffer).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_vattention as jv
from jax_vattention import _core
from jax_vattention.engine import Engine, EngineConfig, Request
from jax_vattention.engine.groups import best_samples, sample_requests

CPU = jax.devices("cpu")[0]
PAGE = 4096
PER_PAGE = {"per_layer": 32, "interleaved": 16}
PROMPT = np.random.default_rng(4).integers(2, 256, 45).tolist()   # a partly filled last page either way
SAMPLED = Request(prompt=PROMPT, max_new_tokens=10, temperature=1.0, seed=100, repetition_penalty=1.3,
                  frequency_penalty=0.4, top_k=50, logprobs=2, prompt_logprobs=1)


def make_engine(model, *, layout="per_layer", max_batch=4, budget_pages=10_000, driver=None, page=PAGE, **config):
    model_config = model.config
    cache_config = jv.CacheConfig(num_layers=model_config.num_layers, max_batch=max_batch, max_len=160,
                                  kv_heads=model_config.num_kv_heads, head_dim=model_config.head_dim,
                                  dtype=jnp.float32, page_bytes=page, budget_bytes=budget_pages * page,
                                  layout=layout)
    driver = driver or _core.FakeDriver(PAGE, host_pages=True)
    manager = jv.CacheManager(cache_config, CPU, driver=driver)
    engine = Engine(model, manager, EngineConfig(**{"token_budget": 16, "chunk_tokens": 8, **config}))
    return engine, manager, driver


@pytest.fixture(scope="module")
def roomy(model):
    """One engine for the tests that need no tight budget (its programs compile once): 4 slots."""
    engine, manager, driver = make_engine(model)
    with manager:
        yield engine, manager, driver


@pytest.fixture(scope="module")
def tight(model):
    """An engine of 8 slots and 24 pages (6 per buffer), 4 tokens mapped ahead."""
    engine, manager, driver = make_engine(model, budget_pages=24, max_batch=8, prefetch_tokens=4)
    with manager:
        yield engine, manager, driver


def events_of(engine, ids):
    """Runs ``engine`` until idle; the events of each of ``ids``."""
    events = {i: [] for i in ids}
    for event in engine.stream():
        if event.request_id in events:
            events[event.request_id].append(event)
    return [events[i] for i in ids]


def independent(engine, request, samples):
    """The reference: ``samples`` requests of their own, with ``seed + i``."""
    return events_of(engine, [engine.submit(one) for one in sample_requests(request, samples)])


def check_nothing_leaks(manager, driver):
    """Nothing active; every handle the driver holds is mapped or pooled exactly once, then every
    page goes back: reclaim, evict and trim leave the driver no handle and no mapping."""
    assert not manager.active().any()
    view = manager._core.view()
    mapped = [h for pages in view["slots"] for page in pages for h in page]
    shared = {h for entry in view["cache"] for h in entry["handles"]}
    assert sorted(set(mapped) | shared | set(view["pooled"])) == sorted(driver.handles())
    manager.reclaim()
    manager.evict()
    manager.trim()
    stats = manager.stats()
    assert stats["created_pages"] == stats["mapped_pages"] == stats["forked_pages"] == 0
    assert driver.handles() == [] and driver.mappings() == {}


def token_lists(events):
    return [[e.token for e in sample] for sample in events]


@pytest.mark.parametrize("layout", ["per_layer", pytest.param("interleaved", marks=pytest.mark.slow)])
def test_samples_are_independent_requests_with_their_seeds_from_one_prefill_and_shared_pages(model, roomy, layout):
    engine, manager, driver = roomy if layout == "per_layer" else make_engine(model, layout=layout)
    engine.reset_stats()
    ids = engine.submit_samples(SAMPLED, 3)
    per_page = PER_PAGE[layout]
    full_pages = (len(PROMPT) - 1) // per_page              # the prompt's full pages (its last token aside)
    buffers = manager.config.num_buffers
    events = {i: [] for i in ids}
    forked = False
    while not engine.idle:
        for event in engine.step():
            events[event.request_id].append(event)
        if not forked and engine.running == 3:
            forked = True
            slots = sorted(s.slot for s in engine.scheduler.running.values())
            view = manager._core.view()
            for page in range(full_pages):                  # one physical page at three addresses
                assert len({tuple(view["slots"][slot][page]) for slot in slots}) == 1
            lasts = {h for slot in slots for h in view["slots"][slot][full_pages]}
            assert len(lasts) == 3 * buffers                # the partly filled page: a copy each
            assert manager.stats()["forked_pages"] == full_pages * buffers
            assert manager.stats()["bytes_saved"] == 2 * full_pages * buffers * PAGE
    assert forked and not engine.failed
    group = [events[i] for i in ids]
    assert engine.stats.prefill_tokens == len(PROMPT) - 1   # the prompt but its last token, once
    assert engine.stats.admissions == 1
    before = engine.stats.prefill_tokens
    alone = independent(engine, SAMPLED, 3)
    assert engine.stats.prefill_tokens - before == 3 * len(PROMPT)
    assert token_lists(group) == token_lists(alone)
    assert len({tuple(tokens) for tokens in token_lists(group)}) == 3     # three different samples
    for mine, theirs in zip(group, alone):
        for a, b in zip(mine, theirs):
            assert a.logprobs.token == b.logprobs.token and [t for t, _ in a.logprobs.top] == [t for t, _ in
                                                                                               b.logprobs.top]
            assert abs(a.logprobs.logprob - b.logprobs.logprob) < 1e-4
            assert abs(a.cumulative_logprob - b.cumulative_logprob) < 1e-3
        scored, want = mine[0].prompt_logprobs, theirs[0].prompt_logprobs
        assert len(scored) == len(PROMPT) and scored[0] is None and all(entry is not None for entry in scored[1:])
        assert [e.token for e in scored[1:]] == [e.token for e in want[1:]] == PROMPT[1:]
        np.testing.assert_allclose([e.logprob for e in scored[1:]], [e.logprob for e in want[1:]], atol=1e-4)
    check_nothing_leaks(manager, driver)


def test_greedy_samples_are_the_greedy_answer_forked_or_not(model, roomy):
    request = Request(prompt=PROMPT[:33], max_new_tokens=8)        # 32 tokens: no partly filled page to copy
    engine, manager, driver = roomy
    engine.reset_stats()
    want = events_of(engine, [engine.submit(request)])[0]
    ids = engine.submit_samples(request, 4)
    assert token_lists(events_of(engine, ids)) == [[e.token for e in want]] * 4
    # The group found the prompt's full page in the prefix cache and left its last token to the
    # samples: it prefilled nothing.
    assert engine.stats.prefill_tokens == len(request.prompt) and engine.stats.shared_tokens == 32
    check_nothing_leaks(manager, driver)
    # The CPU backend's own memory cannot map a page twice: the samples are requests of their own.
    own = _core.host_driver()
    engine, manager, _ = make_engine(model, driver=own, page=own.granularity, budget_pages=64)
    with manager:
        assert not engine.groups.forks
        ids = engine.submit_samples(request, 3)
        assert token_lists(events_of(engine, ids)) == [[e.token for e in want]] * 3
        assert engine.stats.prefill_tokens == 3 * len(request.prompt)


def test_a_group_waits_until_every_sample_fits_and_one_that_never_can_is_refused(roomy, tight):
    # A 40-token prompt and 20 new tokens (4 mapped ahead): 2 pages for the prompt in each of 4
    # buffers, and one for each other sample (a copy of 7 tokens and 4 more): 8 + 2 x 4 = 16 pages
    # to start 3 samples; 7 need 32.
    request = dataclasses.replace(SAMPLED, prompt=PROMPT[:40], max_new_tokens=20, logprobs=None,
                                  prompt_logprobs=None)
    engine, manager, driver = tight
    with pytest.raises(ValueError, match="7 samples of the request need 32 pages to start .* but the whole "
                                         "budget is 24 pages"):
        engine.submit_samples(request, 7)
    with pytest.raises(ValueError, match="9 samples of one prompt need 9 slots but the cache has 8"):
        engine.submit_samples(dataclasses.replace(request, prompt=PROMPT[:2], max_new_tokens=1), 9)
    for bad in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match="samples must be a positive integer"):
            engine.submit_samples(request, bad)
    assert engine.idle
    other = dataclasses.replace(request, seed=7, prompt=PROMPT[5:45])
    first, second = engine.submit_samples(request, 3), engine.submit_samples(other, 3)
    running = []
    events = {i: [] for i in first + second}
    while not engine.idle:
        for event in engine.step():
            events[event.request_id].append(event)
        running.append((engine.running, engine.waiting, engine.groups.held_slots))
    # The second group's prefill waits while the first group runs: its prefill and held slots do
    # not fit in the pages left (5 slots are free).
    assert not engine.failed and (3, 1, 0) in running and max(r for r, _, _ in running) == 3
    got = [token_lists([events[i] for i in ids]) for ids in (first, second)]
    assert got == [token_lists(independent(roomy[0], r, 3)) for r in (request, other)]
    check_nothing_leaks(manager, driver)


def test_forked_samples_preempted_by_a_tight_budget_come_back_with_the_same_tokens(roomy, tight):
    # Samples that outgrow their first pages: 4 samples of 33 + 34 tokens hold 4 + 4 x 2 pages in
    # each of 4 buffers at their longest, more than 24.
    request = dataclasses.replace(SAMPLED, prompt=PROMPT[:33], max_new_tokens=34, logprobs=None,
                                  prompt_logprobs=None, seed=3)
    engine, manager, driver = tight
    engine.reset_stats()
    ids = engine.submit_samples(request, 4)
    got = token_lists(events_of(engine, ids))
    assert not engine.failed and engine.stats.preemptions > 0
    assert got == token_lists(independent(roomy[0], request, 4))
    check_nothing_leaks(manager, driver)


def test_cancelling_samples_before_and_after_the_fork_leaks_nothing(roomy):
    engine, manager, driver = roomy
    request = dataclasses.replace(SAMPLED, logprobs=None, prompt_logprobs=None)
    ids = engine.submit_samples(request, 3)
    assert not engine.cancel(ids[0] - 1)                    # the group's prefill is not the caller's
    assert engine.cancel(ids[1]) and not engine.cancel(ids[1])
    events = {i: [] for i in ids}
    for event in engine.stream():
        events[event.request_id].append(event)
    assert events[ids[1]] == [] and not engine.failed
    alone = independent(engine, request, 3)
    assert [[e.token for e in events[i]] for i in (ids[0], ids[2])] == token_lists([alone[0], alone[2]])
    # Every sample cancelled while the prompt prefills: the prefill goes too.
    ids = engine.submit_samples(request, 3)
    engine.step()
    assert engine.running == 1
    assert all(engine.cancel(i) for i in ids)
    assert engine.running == 0 and engine.waiting == 0
    assert [e for e in engine.stream() if e.request_id in ids] == []
    # One sample cancelled after the fork: the others go on with the pages they share.
    ids = engine.submit_samples(request, 3)
    while engine.running < 3:
        engine.step()
    assert engine.cancel(ids[0])
    rest = events_of(engine, ids[1:])
    assert token_lists(rest) == token_lists(alone[1:])
    check_nothing_leaks(manager, driver)


def test_a_fork_the_driver_fails_fails_the_samples_alone_and_leaks_nothing(roomy):
    engine, manager, driver = roomy
    request = dataclasses.replace(SAMPLED, logprobs=None, prompt_logprobs=None)
    ids = engine.submit_samples(request, 3)
    bystander = engine.submit(Request(prompt=PROMPT[:9], max_new_tokens=12))
    while manager.stats()["forked_pages"] == 0 and not engine.failed:
        before = driver.calls("copy")
        engine.step()
        if engine.groups.held_slots and driver.calls("copy") == before:
            driver.fail_on("copy", 1)                   # the fork's copy of the prompt's last page
            break
    events = {i: [] for i in [*ids, bystander]}
    for event in engine.stream():
        events[event.request_id].append(event)
    assert driver.failures_thrown == 1
    for i in ids:
        assert [e.token for e in events[i]] == [-1] and "DriverError" in events[i][0].error
        assert isinstance(engine.failed[i], _core.DriverError)
    assert len(events[bystander]) == 12 and bystander not in engine.failed
    assert not manager.stats()["poisoned"]
    again = engine.submit_samples(request, 3)
    assert token_lists(events_of(engine, again)) == token_lists(independent(engine, request, 3))
    check_nothing_leaks(manager, driver)


def test_best_samples_rank_by_cumulative_logprob_the_earlier_first_among_equals():
    assert best_samples([-3.0, -1.0, -2.0, -1.0], 2) == [1, 3]
    assert best_samples([-0.5], 1) == [0]
    assert best_samples([-4.0, -3.0, -2.0], 3) == [2, 1, 0]


def test_sample_requests_seed_each_sample_as_vllm_does():
    request = Request(prompt=[1, 2], seed=(1 << 64) - 1)
    assert [r.seed for r in sample_requests(request, 3)] == [(1 << 64) - 1, 0, 1]
    assert [r.seed for r in sample_requests(Request(prompt=[1]), 2)] == [None, None]
