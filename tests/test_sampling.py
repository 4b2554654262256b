"""Sampling: each of vLLM's parameters against a numpy reference of its definition, the per-request
seed, the token counts behind the penalties, log-probabilities, and the same tokens from the engine's
compiled step (chunked, pipelined, preempted) as from ``generate``."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_vattention as jv
from jax_vattention import _core
from jax_vattention.decode.generate import generate
from jax_vattention.decode.sampling import (GREEDY_BELOW, SamplingParams, adjust_logits, row_keys, sample_tokens,
                                            sampling_row, token_logprobs)
from jax_vattention.decode.token_counts import TokenCounts
from jax_vattention.engine import Engine, EngineConfig, Request
from jax_vattention.engine.runner import MAX_PROGRAMS, StepVariant

CPU = jax.devices("cpu")[0]
PAGE = 4096
BIAS, STOPS = 4, 3


# ----------------------------------------------------------------- numpy references of the definitions
def reference_adjust(logits, *, counts, in_prompt, generated, min_tokens=0, stops=(), bias=None,
                     presence=0.0, frequency=0.0, repetition=1.0):
    """vLLM's order: min_tokens masks the stop tokens, logit_bias adds, then the penalties (OpenAI's)."""
    x = np.array(logits, np.float64)
    if generated < min_tokens:
        x[list(stops)] = -np.inf
    for token, value in (bias or {}).items():
        x[token] += value
    seen = in_prompt | (counts > 0)
    x = np.where(seen, np.where(x > 0, x / repetition, x * repetition), x)
    return x - frequency * counts - presence * (counts > 0)


def reference_distribution(logits, *, temperature, min_p=0.0, top_k=0, top_p=1.0):
    """The probabilities a row draws from: temperature, min_p, top_k, then top_p."""
    p = np.exp(logits / temperature - np.max(logits / temperature))
    p /= p.sum()
    keep = p >= min_p * p.max()
    order = np.argsort(-p, kind="stable")
    if top_k > 0:
        keep[order[top_k:]] = False
    q = np.where(keep, p, 0.0)
    q /= q.sum()
    before = np.cumsum(q[order]) - q[order]
    keep[order[(before >= top_p) & (np.arange(len(p)) > 0)]] = False
    q = np.where(keep, p, 0.0)
    return q / q.sum()


def log_softmax(x):
    x = np.asarray(x, np.float64)
    return x - np.max(x) - np.log(np.exp(x - np.max(x)).sum())


def params_of(rows):
    """SamplingParams of ``rows`` (dicts of sampling_row's keywords)."""
    ints, floats = zip(*[sampling_row(bias_width=BIAS, stop_width=STOPS, **row) for row in rows])
    return SamplingParams.unpack(jnp.asarray(np.stack(ints)), jnp.asarray(np.stack(floats)))


# ----------------------------------------------------------------------------------------- unit tests
def test_adjusted_logits_follow_each_definition_and_default_rows_keep_theirs_bit_for_bit():
    rng = np.random.default_rng(0)
    vocab = 40
    logits = rng.normal(0, 3, (6, vocab)).astype(np.float32)
    counts = rng.integers(0, 3, (6, vocab)) * (rng.random((6, vocab)) < 0.3)
    in_prompt = rng.random((6, vocab)) < 0.2
    rows = [dict(),
            dict(presence_penalty=1.5),
            dict(frequency_penalty=-0.7),
            dict(repetition_penalty=1.8),
            dict(logit_bias={3: 100.0, 7: -2.5}, repetition_penalty=0.6, presence_penalty=-1.0),
            dict(min_tokens=4, stop_tokens=[5, 9], logit_bias={5: 3.0}, frequency_penalty=2.0)]
    generated = np.array([0, 5, 5, 5, 5, 2], np.int32)
    got = np.asarray(adjust_logits(jnp.asarray(logits), params_of(rows), jnp.asarray(counts, jnp.int32),
                                   jnp.asarray(in_prompt), jnp.asarray(generated)))
    np.testing.assert_array_equal(got[0], logits[0])
    for i, row in enumerate(rows):
        want = reference_adjust(logits[i], counts=counts[i], in_prompt=in_prompt[i], generated=generated[i],
                                min_tokens=row.get("min_tokens", 0), stops=row.get("stop_tokens", ()),
                                bias=row.get("logit_bias"), presence=row.get("presence_penalty", 0.0),
                                frequency=row.get("frequency_penalty", 0.0),
                                repetition=row.get("repetition_penalty", 1.0))
        np.testing.assert_allclose(got[i], want, rtol=1e-6, atol=1e-5)
    assert np.isneginf(got[5, [5, 9]]).all()                       # masked until min_tokens
    unmasked = np.asarray(adjust_logits(jnp.asarray(logits), params_of(rows), jnp.asarray(counts, jnp.int32),
                                        jnp.asarray(in_prompt), jnp.full(6, 4, jnp.int32)))
    assert np.isfinite(unmasked[5, [5, 9]]).all()                   # and free from it on


@pytest.mark.parametrize("knobs", [
    dict(temperature=1.0), dict(temperature=0.5, top_k=3), dict(temperature=1.3, top_p=0.8),
    dict(temperature=1.0, min_p=0.2), dict(temperature=0.7, min_p=0.05, top_k=5, top_p=0.9)])
def test_draws_follow_the_reference_distribution(knobs):
    logits = np.log(np.array([0.30, 0.22, 0.16, 0.12, 0.08, 0.06, 0.04, 0.02], np.float32))
    draws = 6000
    want = reference_distribution(logits, **knobs)
    params = params_of([knobs] * draws)
    keys = jax.random.split(jax.random.key(3), draws)
    tokens = np.asarray(sample_tokens(jnp.asarray(np.tile(logits, (draws, 1))), keys, params, sampling=True))
    seen = np.bincount(tokens, minlength=len(logits)) / draws
    assert (seen[want == 0] == 0).all() and (seen[want > 0] > 0).all()     # exactly the kept set
    np.testing.assert_allclose(seen, want, atol=0.025)


def test_a_temperature_below_the_threshold_is_greedy_and_the_static_flag_draws_what_the_device_draws():
    logits = jax.random.normal(jax.random.key(1), (6, 50), jnp.float32)
    keys = jax.random.split(jax.random.key(2), 6)
    temperatures = [0.0, 0.8, 1.2, GREEDY_BELOW / 2, 0.5, 0.0]
    rows = [dict(temperature=t, top_k=k, top_p=p) for t, k, p in
            zip(temperatures, [0, 5, 0, 3, 0, 0], [1.0, 1.0, 0.9, 1.0, 0.7, 1.0])]
    mixed = sample_tokens(logits, keys, params_of(rows))
    np.testing.assert_array_equal(sample_tokens(logits, keys, params_of(rows), sampling=True), mixed)
    greedy = np.argmax(np.asarray(logits), axis=-1)
    np.testing.assert_array_equal(np.asarray(mixed)[[0, 3, 5]], greedy[[0, 3, 5]])
    greedy_rows = params_of([dict(temperature=0.0)] * 6)
    np.testing.assert_array_equal(sample_tokens(logits, keys, greedy_rows, sampling=False), greedy)
    np.testing.assert_array_equal(sample_tokens(logits, keys, greedy_rows), greedy)


def test_a_seeded_row_draws_by_its_seed_and_position_alone():
    vocab = 1000
    logits = jnp.zeros((4, vocab))                                 # uniform: the key decides
    rows = [dict(temperature=1.0, seed=42), dict(temperature=1.0), dict(temperature=1.0, seed=42),
            dict(temperature=1.0, seed=43)]
    params = params_of(rows)

    def draw(stream, positions):
        keys = row_keys(jax.random.key(stream), params, jnp.asarray(positions, jnp.int32))
        return np.asarray(sample_tokens(logits, keys, params, sampling=True))

    a, b = draw(0, [10, 10, 10, 10]), draw(1, [10, 10, 10, 10])
    assert a[0] == a[2] == b[0] == b[2]                            # the same seed and position, any row or stream
    assert a[1] != b[1]                                            # an unseeded row follows the stream
    later = [draw(0, [p, 0, p, p]) for p in range(11, 16)]
    assert len({d[0] for d in later} | {a[0]}) > 1                 # another position, another draw
    assert sum(d[0] != d[3] for d in later) >= 4                   # another seed, other draws


def test_rows_pack_and_unpack_with_64_bit_seeds():
    big = (1 << 40) + 5
    params = params_of([dict(seed=5), dict(seed=big), dict(seed=-2), dict(top_k=7, logit_bias={9: -1.5},
                                                                          stop_tokens=[4], min_tokens=2,
                                                                          prompt_len=11)])
    halves = np.stack([np.asarray(params.seed_low), np.asarray(params.seed_high)], 1).view(np.uint32)
    assert halves.tolist()[:3] == [[5, 0], [5, 256], [(1 << 32) - 2, (1 << 32) - 1]]
    assert np.asarray(params.seeded).tolist() == [True, True, True, False]
    assert int(params.top_k[3]) == 7 and int(params.prompt_len[3]) == 11 and int(params.min_tokens[3]) == 2
    assert np.asarray(params.bias_tokens[3]).tolist() == [9, -1, -1, -1]
    assert np.asarray(params.bias_values[3]).tolist() == [-1.5, 0, 0, 0]
    assert np.asarray(params.stop_tokens[3]).tolist() == [4, -1, -1]
    assert float(params.repetition_penalty[0]) == 1.0 and float(params.top_p[0]) == 1.0
    with pytest.raises(ValueError, match="do not fit"):
        sampling_row(bias_width=1, stop_width=0, logit_bias={1: 1.0, 2: 1.0})


def test_logprobs_are_the_log_softmax_of_the_raw_logits():
    logits = np.random.default_rng(2).normal(0, 2, (3, 30)).astype(np.float32)
    tokens = np.array([4, 29, 30], np.int32)                       # the last is outside the vocabulary
    got = token_logprobs(jnp.asarray(logits), jnp.asarray(tokens), 5)
    for row in range(3):
        want = log_softmax(logits[row])
        order = np.argsort(-want, kind="stable")[:5]
        np.testing.assert_array_equal(np.asarray(got.top_tokens[row]), order)
        np.testing.assert_allclose(np.asarray(got.top[row]), want[order], atol=1e-5)
    np.testing.assert_allclose(np.asarray(got.chosen[:2]), [log_softmax(logits[0])[4], log_softmax(logits[1])[29]],
                               atol=1e-5)
    assert np.isneginf(float(got.chosen[2]))


def test_token_counts_count_fed_tokens_as_prompt_or_output_and_reset_per_slot():
    rng = np.random.default_rng(4)
    sequences, vocab, fed = 3, 12, 40
    slots, tokens = rng.integers(0, sequences + 1, fed), rng.integers(0, vocab, fed)   # slot 3: out of range
    positions, prompt_len, valid = rng.integers(0, 10, fed), rng.integers(1, 8, fed), rng.random(fed) < 0.8
    counts = TokenCounts.zeros(sequences, vocab).add(*(jnp.asarray(x) for x in (slots, tokens, positions,
                                                                                prompt_len, valid)))
    output, prompt = np.zeros((sequences, vocab), int), np.zeros((sequences, vocab), bool)
    for s, t, p, n, v in zip(slots, tokens, positions, prompt_len, valid):
        if v and s < sequences:
            if p < n:
                prompt[s, t] = True
            else:
                output[s, t] += 1
    np.testing.assert_array_equal(np.asarray(counts.output), output)
    np.testing.assert_array_equal(np.asarray(counts.prompt), prompt)
    counts = counts.reset(jnp.array([False, True, False]))
    out, seen = counts.rows(jnp.array([1, 2, 7]))
    assert not np.asarray(out[0]).any() and not np.asarray(seen[0]).any()
    np.testing.assert_array_equal(np.asarray(out[1]), output[2])
    np.testing.assert_array_equal(np.asarray(out[2]), output[2])   # out of range reads the last row


# ------------------------------------- the model, end to end (conftest's ``model``: the tiny Llama)
def make_manager(model, *, max_batch=4, max_len=160, budget_pages=10_000):
    config = model.config
    cache_config = jv.CacheConfig(num_layers=config.num_layers, max_batch=max_batch, max_len=max_len,
                                  kv_heads=config.num_kv_heads, head_dim=config.head_dim, dtype=jnp.float32,
                                  page_bytes=PAGE, budget_bytes=budget_pages * PAGE)
    return jv.CacheManager(cache_config, CPU, driver=_core.FakeDriver(PAGE))


def dense_cache(model, max_batch=4, capacity=96):
    config = model.config
    return jv.KVCache.dense(num_layers=config.num_layers, max_batch=max_batch, capacity=capacity,
                            kv_heads=config.num_kv_heads, head_dim=config.head_dim, dtype=jnp.float32)


def run_on(engine, requests):
    """Runs ``requests`` at once on ``engine``; returns their events, per request."""
    ids = [engine.submit(request) for request in requests]
    events = {i: [] for i in ids}
    for event in engine.stream():
        events[event.request_id].append(event)
    assert not engine.failed and engine.idle
    return [events[i] for i in ids]


def run_engine(model, requests, *, budget_pages=10_000, **config):
    """Runs ``requests`` at once on a fresh engine; returns (their events by request, the engine)."""
    with make_manager(model, budget_pages=budget_pages) as manager:
        engine = Engine(model, manager, EngineConfig(**{"token_budget": 16, "chunk_tokens": 4, **config}))
        return run_on(engine, requests), engine


@pytest.fixture(scope="module")
def engine(model):
    """One pipelined engine for the tests that need no other (its programs compile once); ``used``
    records the (variant, packed shape) of every step it runs."""
    with make_manager(model) as manager:
        engine = Engine(model, manager, EngineConfig(token_budget=16, chunk_tokens=4))
        engine.used = set()
        inputs = engine.runner.inputs

        def recorded(plan, knobs):
            step = inputs(plan, knobs)
            engine.used.add((step.variant, step.ints.shape))
            return step

        engine.runner.inputs = recorded
        yield engine


def alone(model, request):
    """The request's tokens from ``generate`` (whole-prompt prefill, the loop's own counts)."""
    result, _ = generate(model, dense_cache(model, max_batch=1), [request.prompt],
                         max_new_tokens=request.max_new_tokens, stop_tokens=[list(request.stop_tokens)],
                         temperature=request.temperature, top_k=request.top_k, top_p=request.top_p,
                         min_p=request.min_p, presence_penalty=request.presence_penalty,
                         frequency_penalty=request.frequency_penalty, repetition_penalty=request.repetition_penalty,
                         logit_bias=[request.logit_bias], min_tokens=request.min_tokens,
                         prompt_seeds=[request.seed])
    return result.tokens[0]


PROMPTS = [np.random.default_rng(9).integers(2, 256, n).tolist() for n in (13, 6, 21, 9, 17)]
KNOBS = [dict(repetition_penalty=1.6, presence_penalty=0.8, frequency_penalty=0.5),
         dict(temperature=0.9, seed=11, min_p=0.02, top_k=40),
         dict(temperature=1.1, seed=12, top_p=0.9, frequency_penalty=1.2, logit_bias={7: 2.0, 100: -5.0}),
         dict(logit_bias={33: 4.0}, repetition_penalty=0.8),
         dict(temperature=0.8, seed=13, presence_penalty=-0.5, min_tokens=4, stop_tokens=(50, 60, 70))]
REQUESTS = [Request(prompt=p, max_new_tokens=10, **k) for p, k in zip(PROMPTS, KNOBS)]


def test_generate_applies_penalties_bias_and_min_tokens_token_by_token(model):
    prompts = PROMPTS[:3]
    knobs = dict(repetition_penalty=[1.6, 1.0, 0.7], presence_penalty=[0.8, 0.0, -1.0],
                 frequency_penalty=[0.5, 1.5, 0.0], logit_bias=[{7: 2.0}, None, {40: 1.0, 41: -3.0}],
                 min_tokens=[0, 5, 3])
    first_free, _ = generate(model, dense_cache(model), prompts, max_new_tokens=12, stop_tokens=[], **knobs)
    stops = [[first_free.tokens[i][1]] for i in range(3)]          # a token each row would pick early
    result, _ = generate(model, dense_cache(model), prompts, max_new_tokens=12, stop_tokens=stops,
                         return_logits=True, **knobs)
    for i, prompt in enumerate(prompts):
        counts, in_prompt = np.zeros(256, int), np.zeros(256, bool)
        in_prompt[prompt] = True
        for n, (token, logits) in enumerate(zip(result.tokens[i], result.logits[i])):
            adjusted = reference_adjust(logits, counts=counts, in_prompt=in_prompt, generated=n,
                                        min_tokens=knobs["min_tokens"][i], stops=stops[i],
                                        bias=knobs["logit_bias"][i], presence=knobs["presence_penalty"][i],
                                        frequency=knobs["frequency_penalty"][i],
                                        repetition=knobs["repetition_penalty"][i])
            assert token == int(np.argmax(adjusted)), (i, n)
            counts[token] += 1
        ended = result.tokens[i][-1] in stops[i]
        assert len(result.tokens[i]) == 12 or (ended and len(result.tokens[i]) > knobs["min_tokens"][i])


def test_the_engine_gives_generates_tokens_with_every_knob(model, engine):
    """Chunked prefill in mixed steps and the pipelined step's fed tokens: the same tokens as
    ``generate`` of each request alone (a whole-prompt prefill, counted by its own loop)."""
    events = run_on(engine, REQUESTS)
    assert [[e.token for e in request] for request in events] == [alone(model, r) for r in REQUESTS]


@pytest.mark.parametrize("pipeline", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_preempted_requests_are_counted_again_from_their_recomputed_context(model, pipeline):
    """16 pages (4 buffers of 32 tokens a page) for requests of up to 51 tokens: preemptions, whose
    recomputed contexts (prompt and generated tokens) are counted again in a fresh slot."""
    requests = [dataclasses.replace(r, max_new_tokens=30) for r in REQUESTS]
    events, engine = run_engine(model, requests, pipeline=pipeline, budget_pages=16)
    assert engine.stats.preemptions > 0
    assert [[e.token for e in request] for request in events] == [alone(model, r) for r in requests]


def test_a_seed_gives_the_same_tokens_alone_or_batched_and_another_seed_others(engine):
    request = Request(prompt=PROMPTS[0], max_new_tokens=12, temperature=1.0, seed=123)
    tokens = [e.token for e in run_on(engine, [request])[0]]
    crowd = run_on(engine, [REQUESTS[1], REQUESTS[0], request, REQUESTS[2]])
    assert [e.token for e in crowd[2]] == tokens
    assert [e.token for e in run_on(engine, [request])[0]] == tokens
    assert [e.token for e in run_on(engine, [dataclasses.replace(request, seed=124)])[0]] != tokens
    unseeded = run_on(engine, [dataclasses.replace(request, seed=None)] * 2)    # the engine's stream
    assert [e.token for e in unseeded[0]] != [e.token for e in unseeded[1]]


def test_logprobs_are_the_models_log_softmax_with_the_prompts(model, engine):
    prompt = PROMPTS[2]                                            # 21 tokens: 6 chunks of 4 over 2 steps
    request = Request(prompt=prompt, max_new_tokens=5, temperature=0.7, seed=5, logprobs=3, prompt_logprobs=2,
                      repetition_penalty=1.3)
    events = run_on(engine, [request, REQUESTS[0]])[0]
    tokens = [e.token for e in events]
    cache = dense_cache(model, max_batch=1)
    sequence = prompt + tokens
    logits, _ = model(jnp.asarray([sequence], jnp.int32), jnp.arange(len(sequence))[None], cache,
                      start=jnp.zeros(1, jnp.int32), count=jnp.full(1, len(sequence), jnp.int32))
    want = np.stack([log_softmax(row) for row in np.asarray(logits[0])])   # [T, V]: position t predicts t + 1
    total = 0.0
    for n, event in enumerate(events):
        position = len(prompt) + n
        assert event.logprobs.token == event.token
        assert abs(event.logprobs.logprob - want[position - 1, event.token]) < 1e-4
        assert [t for t, _ in event.logprobs.top] == np.argsort(-want[position - 1], kind="stable")[:3].tolist()
        total += event.logprobs.logprob
        assert abs(event.cumulative_logprob - total) < 1e-4
    scored = events[0].prompt_logprobs
    assert len(scored) == len(prompt) and scored[0] is None and all(e.prompt_logprobs is None for e in events[1:])
    for position in range(1, len(prompt)):
        entry = scored[position]
        assert entry.token == prompt[position]
        assert abs(entry.logprob - want[position - 1, prompt[position]]) < 1e-4
        assert [t for t, _ in entry.top] == np.argsort(-want[position - 1], kind="stable")[:2].tolist()


def test_min_tokens_ignore_eos_and_stop_token_ids(model, engine):
    prompt = PROMPTS[1]
    free = alone(model, Request(prompt=prompt, max_new_tokens=8))
    eos, later = free[1], free[3]
    runs = [Request(prompt=prompt, max_new_tokens=8, stop_tokens=(eos,)),
            Request(prompt=prompt, max_new_tokens=8, stop_tokens=(eos,), ignore_eos=True),
            Request(prompt=prompt, max_new_tokens=8, stop_tokens=(eos,), ignore_eos=True, stop_token_ids=(later,)),
            Request(prompt=prompt, max_new_tokens=8, stop_tokens=(eos,), min_tokens=3)]
    tokens = [[e.token for e in request] for request in run_on(engine, runs)]
    assert tokens[0] == free[:2]                                   # ends at the end-of-sequence token
    assert tokens[1] == free                                       # goes past it
    assert tokens[2] == free[:4]                                   # a stop token id stops it anyway
    assert eos not in tokens[3][:3] and len(tokens[3]) >= 3        # masked before min_tokens
    assert tokens[3] == alone(model, runs[3])


def test_requests_with_penalties_or_prompt_logprobs_take_no_shared_prefix(model):
    system = np.random.default_rng(3).integers(2, 256, 64).tolist()
    first = Request(prompt=system + [5, 6, 7], max_new_tokens=3)
    later = [Request(prompt=system + [8, 9], max_new_tokens=4, repetition_penalty=1.4),
             Request(prompt=system + [8, 9], max_new_tokens=4, prompt_logprobs=1),
             Request(prompt=system + [8, 9], max_new_tokens=4)]
    config = model.config
    cache_config = jv.CacheConfig(num_layers=config.num_layers, max_batch=4, max_len=160,
                                  kv_heads=config.num_kv_heads, head_dim=config.head_dim, dtype=jnp.float32,
                                  page_bytes=PAGE, budget_bytes=10_000 * PAGE)
    with jv.CacheManager(cache_config, CPU, driver=_core.FakeDriver(PAGE, host_pages=True)) as manager:
        engine = Engine(model, manager, EngineConfig(token_budget=16, chunk_tokens=8))
        engine.submit(first)
        engine.run()
        shared = []
        for request in later:
            before = engine.stats.shared_tokens
            request_id = engine.submit(request)
            events = [e for e in engine.stream() if e.request_id == request_id]
            shared.append(engine.stats.shared_tokens - before)
            if request.prompt_logprobs is not None:
                assert all(entry is not None for entry in events[0].prompt_logprobs[1:])
    assert shared[0] == shared[1] == 0 and shared[2] == 64


def test_the_step_compiles_per_variant_and_shape_never_per_request(engine):
    run_on(engine, [*REQUESTS, Request(prompt=PROMPTS[0], max_new_tokens=6, logprobs=2, prompt_logprobs=1)])
    traces = engine.runner.traces
    assert traces == len(engine.used) <= MAX_PROGRAMS
    assert {variant for variant, _ in engine.used} >= {StepVariant(True, True), StepVariant(False, True),
                                                       StepVariant(True, True, True, True)}
    run_on(engine, [dataclasses.replace(r, prompt=r.prompt[::-1], seed=7) for r in REQUESTS])  # same kinds
    assert engine.runner.traces == traces


@pytest.mark.slow
def test_every_variant_compiles_once_and_a_hundred_requests_of_any_knobs_add_none(model):
    rng = np.random.default_rng(8)
    with make_manager(model, budget_pages=40) as manager:
        engine = Engine(model, manager, EngineConfig(token_budget=24, chunk_tokens=8))
        engine.compile(sampling=True, adjust=True, logprobs=True)
        assert engine.runner.traces == MAX_PROGRAMS == len(StepVariant.all(0)) + len(StepVariant.all(3))
        for _ in range(100):
            knobs = dict(temperature=float(rng.choice([0.0, 0.8])), seed=int(rng.integers(-5, 5)) or None,
                         repetition_penalty=float(rng.choice([1.0, 1.3])), min_p=float(rng.choice([0.0, 0.1])),
                         logit_bias={int(rng.integers(256)): 1.0} if rng.random() < 0.3 else {},
                         logprobs=int(rng.integers(0, 4)) if rng.random() < 0.3 else None,
                         prompt_logprobs=1 if rng.random() < 0.2 else None, min_tokens=int(rng.integers(0, 3)),
                         stop_tokens=(int(rng.integers(256)),))
            engine.submit(Request(prompt=rng.integers(2, 256, int(rng.integers(1, 60))).tolist(),
                                  max_new_tokens=int(rng.integers(3, 12)), **knobs))
        outputs = engine.run()
        assert len(outputs) == 100 and not engine.failed
        assert engine.runner.traces == MAX_PROGRAMS


def test_no_variant_of_the_step_has_control_flow_and_only_the_sampling_ones_sort(engine):
    """On a GPU the host would wait for a conditional's predicate every step (see test_stall_free)."""
    runner = engine.runner
    for rows in (0, runner.chunk_rows):
        inputs = runner._inputs(jv.engine.scheduler.StepPlan((), (), ()), {}, rows)
        arguments = runner._arguments(engine.manager.cache, inputs, engine._no_tokens, engine._sampler)
        for variant in StepVariant.all(rows):
            program = runner.step_for(variant).lower(*arguments).as_text()
            assert "stablehlo.case" not in program and "stablehlo.if" not in program, variant
            assert ("stablehlo.sort" in program) == variant.sampling, variant


@pytest.mark.parametrize("field, value, message", [
    ("min_p", 1.5, "min_p must be in"),
    ("presence_penalty", 3.0, "presence_penalty must be in"),
    ("frequency_penalty", -2.5, "frequency_penalty must be in"),
    ("repetition_penalty", 0.0, "repetition_penalty must be in"),
    ("repetition_penalty", float("nan"), "repetition_penalty must be in"),
    ("logit_bias", {300: 1.0}, "logit_bias token id 300 is outside"),
    ("logit_bias", {3: 200.0}, r"logit_bias\[3\] must be in"),
    ("logit_bias", {t: 1.0 for t in range(40)}, "logit_bias has 40 entries; at most 32"),
    ("logit_bias", [(3, 1.0)], "logit_bias must be a dict"),
    ("seed", 1 << 64, "seed .* is outside"),
    ("seed", 1.5, "seed must be an integer"),
    ("stop_token_ids", (300,), "stop_token_ids entry 300 is outside"),
    ("stop_token_ids", tuple(range(2, 11)), "at most 8 stop tokens"),
    ("ignore_eos", "yes", "ignore_eos must be True or False"),
    ("min_tokens", 40, "min_tokens 40 is more than max_new_tokens 32"),
    ("logprobs", 21, "logprobs 21 is more than the engine returns: at most 20"),
    ("prompt_logprobs", -1, "prompt_logprobs -1 is below 0"),
])
def test_submit_refuses_each_bad_sampling_field(engine, field, value, message):
    with pytest.raises(ValueError, match=message):
        engine.submit(dataclasses.replace(Request(prompt=[3, 4]), **{field: value}))
    assert engine.idle


def test_submit_normalizes_as_vllm_does(engine):
    engine.submit(Request(prompt=[3, 4], max_new_tokens=2, top_k=-1, seed=-1, stop_token_ids=(5, 5, 6),
                          logit_bias={np.int64(7): np.float32(1.5)}))
    request = engine.scheduler.waiting[-1].request
    assert (request.top_k, request.seed, request.stop_token_ids) == (0, None, (5, 6))
    assert request.logit_bias == {7: 1.5} and type(next(iter(request.logit_bias))) is int
    engine.run()
