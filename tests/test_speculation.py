"""Speculative decoding on CPU: the verification rows against decoding one token at a time, greedy
output identical to plain decoding (both layouts, prefix sharing, preemption, stop tokens,
penalties), the rejection sampler against the exact target distribution, lengths and pages after
rejections, cancellation, and the proposer and its switch-off."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_vattention as jv
from jax_vattention import _core
from jax_vattention.decode.generate import generate
from jax_vattention.decode.sampling import SamplingParams, sampling_row
from jax_vattention.decode.step_batch import StepBatch, decode_batch
from jax_vattention.decode.verification import verify_tokens
from jax_vattention.engine import Engine, EngineConfig, Request
from jax_vattention.engine.proposers import NgramProposer
from jax_vattention.engine.requests import RequestState
from jax_vattention.engine.scheduler import StepPlan
from jax_vattention.engine.speculation import OFF_BELOW, RETRY_AFTER, WINDOW, Speculator

CPU = jax.devices("cpu")[0]
PAGE = 4096          # a fake driver's page: 32 tokens of the tiny model's K or V of one layer


def make_manager(model, *, layout, budget_pages=10_000, max_batch=4, max_len=160):
    config = model.config
    cache_config = jv.CacheConfig(num_layers=config.num_layers, max_batch=max_batch, max_len=max_len,
                                  kv_heads=config.num_kv_heads, head_dim=config.head_dim, dtype=jnp.float32,
                                  page_bytes=PAGE, budget_bytes=budget_pages * PAGE, layout=layout)
    driver = _core.FakeDriver(PAGE, host_pages=True)   # pages that several addresses share: prefix sharing
    return jv.CacheManager(cache_config, CPU, driver=driver), driver


def copying_requests(seed, count, penalized=False):
    """Prompts that repeat a phrase after one shared system prefix (the random model's output then
    loops, which prompt lookup finds); with ``penalized`` the second has penalties."""
    rng = np.random.default_rng(seed)
    system = rng.integers(2, 256, 24).tolist()
    requests = []
    for i in range(count):
        phrase = rng.integers(2, 256, int(rng.integers(4, 12))).tolist()
        requests.append(Request(prompt=system + phrase * 3, max_new_tokens=int(rng.integers(32, 48))))
    if penalized:
        requests[1] = dataclasses.replace(requests[1], repetition_penalty=1.3, presence_penalty=0.5)
    return requests


def plain_tokens(model, requests):
    """The reference: every request decoded one token at a time by ``generate`` on a dense cache."""
    config = model.config
    cache = jv.KVCache.dense(num_layers=config.num_layers, max_batch=len(requests), capacity=256,
                             kv_heads=config.num_kv_heads, head_dim=config.head_dim, dtype=jnp.float32)
    result, _ = generate(model, cache, [r.prompt for r in requests],
                         max_new_tokens=[r.max_new_tokens for r in requests],
                         stop_tokens=[list(r.stop_tokens) for r in requests],
                         repetition_penalty=[r.repetition_penalty for r in requests],
                         presence_penalty=[r.presence_penalty for r in requests])
    return result.tokens


def check_no_page_leaked(manager, driver):
    """Every slot is free, and once the prefix cache and the free slots give their pages back
    nothing is mapped and every handle the driver made is pooled."""
    assert manager.stats()["active_slots"] == 0
    manager.reclaim()
    manager.evict()
    manager.trim()
    stats = manager.stats()
    assert stats["cached_pages"] == stats["created_pages"] == stats["mapped_pages"] == 0
    assert driver.handles() == [] and driver.mappings() == {}


def test_verification_rows_give_the_logits_of_decoding_one_token_at_a_time(model):
    config = model.config
    cache = jv.KVCache.dense(num_layers=config.num_layers, max_batch=2, capacity=64,
                             kv_heads=config.num_kv_heads, head_dim=config.head_dim, dtype=jnp.float32)
    rng = np.random.default_rng(0)
    prompt = jnp.asarray(rng.integers(2, 256, 20), jnp.int32)
    fed = [int(t) for t in rng.integers(2, 256, 5)]        # the last token and four proposals
    no_chunk = jnp.zeros((0,), jnp.int32)
    prefill = StepBatch(jnp.zeros(2, jnp.int32), jnp.arange(2, dtype=jnp.int32), jnp.zeros(2, jnp.int32),
                        jnp.zeros(2, jnp.int32), prompt[None], jnp.array([1], jnp.int32), jnp.array([0], jnp.int32),
                        jnp.array([20], jnp.int32))
    _, cache = model.run_step(prefill, cache, backend="xla")
    # One step: slot 1's verification row of 5 tokens at its length 20 (a row of width 6, one padding
    # token), beside an empty decode part.
    verify = dataclasses.replace(
        decode_batch(jnp.zeros(2, jnp.int32), jnp.arange(2, dtype=jnp.int32), jnp.zeros(2, jnp.int32),
                     jnp.zeros(2, jnp.int32)),
        verify_tokens=jnp.array([[0] * 6, fed + [0]], jnp.int32), verify_slots=jnp.array([2, 1], jnp.int32),
        verify_start=jnp.array([0, 20], jnp.int32), verify_count=jnp.array([0, 5], jnp.int32))
    logits, _ = model.run_step(verify, cache, backend="xla")        # [2 + 12, V]
    verified = np.asarray(logits[2 + 6:2 + 11])                       # slot 1's five real tokens
    step_cache = cache
    for i, token in enumerate(fed):
        one = decode_batch(jnp.array([0, token], jnp.int32), jnp.arange(2, dtype=jnp.int32),
                           jnp.array([0, 20 + i], jnp.int32), jnp.array([0, 1], jnp.int32))
        single, step_cache = model.run_step(one, step_cache, backend="xla")
        np.testing.assert_allclose(verified[i], np.asarray(single[1]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["per_layer", "interleaved"])
def test_greedy_tokens_are_plain_decodings_with_sharing_preemption_and_stops(model, layout):
    requests = copying_requests(seed=0, count=6, penalized=True)
    reference = plain_tokens(model, requests)
    # A stop token inside a run the proposals would cover: the request must end on it.
    requests[2] = dataclasses.replace(requests[2], stop_tokens=(reference[2][9],))
    reference[2] = reference[2][:reference[2].index(reference[2][9]) + 1]
    manager, driver = make_manager(model, layout=layout, budget_pages=30)
    engine = Engine(model, manager, EngineConfig(token_budget=24, chunk_tokens=8, speculate="ngram",
                                                 num_speculative_tokens=4))
    ids = [engine.submit(request) for request in requests]
    outputs = engine.run()
    assert not engine.failed
    assert [outputs[i] for i in ids] == reference
    stats = engine.stats
    assert stats.verifications > 0 and 0 < stats.accepted_tokens < stats.proposed_tokens
    assert stats.preemptions > 0 and stats.shared_admissions > 0
    check_no_page_leaked(manager, driver)
    manager.close()


def test_an_engine_that_does_not_pipeline_speculates_to_the_same_tokens(model):
    requests = copying_requests(seed=2, count=4)
    manager, driver = make_manager(model, layout="per_layer")
    engine = Engine(model, manager, EngineConfig(token_budget=24, chunk_tokens=8, speculate="ngram",
                                                 num_speculative_tokens=3, pipeline=False))
    ids = [engine.submit(request) for request in requests]
    outputs = engine.run()
    assert [outputs[i] for i in ids] == plain_tokens(model, requests)
    assert engine.stats.accepted_tokens > 0
    check_no_page_leaked(manager, driver)
    manager.close()


def test_rejected_tokens_lower_the_length_and_cancel_mid_speculation_frees_the_slot(model):
    manager, driver = make_manager(model, layout="per_layer")
    engine = Engine(model, manager, EngineConfig(token_budget=24, chunk_tokens=8, speculate="ngram", pipeline=False))
    request = copying_requests(seed=0, count=1)[0]    # its output loops, then leaves the loop
    request_id = engine.submit(dataclasses.replace(request, max_new_tokens=80))
    stats = engine.stats
    while stats.accepted_tokens == 0 or stats.accepted_tokens == stats.proposed_tokens:
        engine.step()
        state = engine.scheduler.running[0]
        if state.prefilled:
            # The slot holds exactly the tokens the request computed: rejected ones were dropped.
            assert manager.lengths()[0] == state.computed == len(state.context) - 1
    assert engine.cancel(request_id)
    assert engine.idle and manager.stats()["active_slots"] == 0
    check_no_page_leaked(manager, driver)
    manager.close()


def exact_distribution(logits, temperature, top_k):
    """The distribution sampling draws from, in numpy: softmax(logits / T) over the top_k tokens."""
    scaled = np.asarray(logits, np.float64) / temperature
    keep = np.argsort(-scaled)[:top_k] if top_k else np.arange(len(scaled))
    probs = np.zeros_like(scaled)
    probs[keep] = np.exp(scaled[keep] - scaled[keep].max())
    return probs / probs.sum()


def test_rejection_sampling_streams_the_targets_distribution():
    vocab, width, rows = 6, 3, 40_000
    rng = np.random.default_rng(0)
    position_logits = rng.normal(0, 1.5, (width, vocab)).astype(np.float32)   # P_0, P_1, P_2 of one row
    fed = np.array([3, 1, 4], np.int32)                  # the last token, then proposals 1 and 4
    temperature, top_k = 0.8, 5
    ints, floats = sampling_row(bias_width=0, stop_width=0, temperature=temperature, top_k=top_k)
    params = SamplingParams.unpack(jnp.asarray(np.tile(ints, (rows, 1))), jnp.asarray(np.tile(floats, (rows, 1))))
    no_chunk = jnp.zeros((0,), jnp.int32)
    batch = StepBatch(jnp.zeros(0, jnp.int32), no_chunk, no_chunk, no_chunk, jnp.zeros((0, 1), jnp.int32), no_chunk,
                      no_chunk, no_chunk, verify_tokens=jnp.asarray(np.tile(fed, (rows, 1))),
                      verify_slots=jnp.zeros(rows, jnp.int32), verify_start=jnp.full(rows, 10, jnp.int32),
                      verify_count=jnp.full(rows, 3, jnp.int32))
    logits = jnp.asarray(np.tile(position_logits, (rows, 1)))                    # [rows * width, V]
    tokens, accepted, _ = jax.jit(verify_tokens, static_argnames="sampling")(
        logits, batch, params, jax.random.key(7), sampling=True)
    tokens, accepted = np.asarray(tokens), np.asarray(accepted)
    target = [exact_distribution(position_logits[i], temperature, top_k) for i in range(width)]
    # The first streamed token is always tokens[:, 0]: distributed as P_0, whatever was proposed.
    first = np.bincount(tokens[:, 0], minlength=vocab) / rows
    np.testing.assert_allclose(first, target[0], atol=0.01)   # ~4 standard errors at 40,000 draws
    assert np.array_equal(accepted >= 1, tokens[:, 0] == fed[1])
    # Where proposal 1 was accepted, the second streamed token is distributed as P_1.
    after = tokens[accepted >= 1, 1]
    np.testing.assert_allclose(np.bincount(after, minlength=vocab) / len(after), target[1], atol=0.015)
    # Acceptance is exactly P_0(proposal), and a token the filters drop is never streamed.
    assert abs((accepted >= 1).mean() - target[0][fed[1]]) < 0.01
    assert first[target[0] == 0].sum() == 0


def test_prompt_lookup_proposes_what_followed_the_latest_match():
    proposer = NgramProposer(min_n=1, max_n=3)
    assert proposer.propose([5, 6, 7, 8, 9, 1, 5, 6, 7], k=3) == (8, 9, 1)
    assert proposer.propose([1, 2, 3, 1, 2, 4, 1, 2], k=2) == (4, 1)          # the latest match wins
    assert proposer.propose([1, 2, 3, 9, 2, 3], k=5) == (9, 2, 3)             # the longest n first
    assert proposer.propose([1, 2, 3, 4], k=3) == ()
    assert proposer.propose([7], k=3) == ()
    with pytest.raises(ValueError, match="min_n"):
        NgramProposer(min_n=3, max_n=2)


def test_a_request_that_gains_too_little_stops_speculating_then_retries():
    class Never:
        def propose(self, context, k):
            return ()

    speculator = Speculator(Never(), num_tokens=4, max_len=1000)
    state = RequestState(0, Request(prompt=[1, 2, 3], max_new_tokens=500), 0.0, generated=[4], slot=0,
                         computed=3, prefilled=True)
    plan = StepPlan((state,), (), ())
    for _ in range(WINDOW):
        assert speculator.synchronous(plan) and not speculator.propose(plan).proposals
        speculator.observe(plan, {}, {})
    assert not speculator.synchronous(plan)                   # off: its steps are pipelined again
    for _ in range(RETRY_AFTER):
        speculator.observe(plan, {}, {})
    assert speculator.synchronous(plan)
    # A request that gains enough goes on.
    for _ in range(3 * WINDOW):
        speculator.observe(plan, {0: int(OFF_BELOW) + 2}, {0: 3})
    assert speculator.synchronous(plan) and speculator.tokens_for(state) == 4


def test_bad_speculation_settings_are_refused(model):
    with pytest.raises(ValueError, match="speculate"):
        EngineConfig(speculate="medusa")
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        EngineConfig(speculate="ngram", num_speculative_tokens=0)
