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


@pytest.mark.parametrize("layout", ["per_layer", pytest.param("interleaved", marks=pytest.mark.slow)])
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


@pytest.mark.slow
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
    class Never(NgramProposer):
        def propose(self, context, k):
            return ()

    speculator = Speculator(Never(), num_tokens=4, max_len=1000)
    state = RequestState(0, Request(prompt=[1, 2, 3], max_new_tokens=500), 0.0, generated=[4, 5], slot=0,
                         computed=4, prefilled=True)
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


def test_metrics_report_the_acceptance(model):
    from types import SimpleNamespace

    from jax_vattention.app.server.metrics import ServerMetrics
    from jax_vattention.engine.stats import EngineStats

    stats = EngineStats()
    stats.verified(4, 3)
    stats.verified(4, 0)
    assert stats.acceptance_rate == 3 / 8 and stats.mean_accepted_length == 2.5
    engine = SimpleNamespace(running=1, stats=stats)
    loop = SimpleNamespace(engine=engine, waiting=0, health=None, failed_steps=0,
                           stats=lambda: dict(budget_pages=10, mapped_pages=2, mapped_bytes=8192, page_bytes=4096,
                                              static_bytes=1 << 20))
    text = ServerMetrics().render(SimpleNamespace(loops=[loop]))
    assert "vattention:spec_decode_num_drafts_total 2" in text
    assert "vattention:spec_decode_num_accepted_tokens_total 3" in text
    assert "vattention:spec_decode_acceptance_rate 0.375" in text
    assert "vattention:spec_decode_mean_accepted_length 2.5" in text


def test_generate_with_speculation_prints_plain_generations_tokens(capsys, tmp_path):
    from random_checkpoints import write_random_checkpoint

    from jax_vattention.app.cli import main

    # A draft checkpoint of another shape that shares the tiny model's 256-token vocabulary.
    write_random_checkpoint(str(tmp_path), dict(
        model_type="llama", vocab_size=256, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=512,
        rms_norm_eps=1e-6, torch_dtype="float32"))
    lines = {}
    for options in ((), ("--speculate", "ngram", "--num-speculative-tokens", "3"),
                    ("--speculate", f"draft:{tmp_path}", "--num-speculative-tokens", "2")):
        assert main(["generate", "--batch", "2", "--prompt-len", "24", "--max-new-tokens", "16", "--rounds", "1",
                     "--max-len", "128", *options]) == 0
        out = capsys.readouterr().out
        lines[options] = [line for line in out.splitlines() if line.startswith("[")]
        assert ("speculation (" in out) == bool(options), out
    plain, *speculative = lines.values()
    assert len(plain) == 2 and speculative == [plain, plain]
    for options, message in ((("--num-speculative-tokens", "0"), "--num-speculative-tokens must be between 1 and 16"),
                             (("--speculate", "medusa"), "--speculate takes ngram or draft:PATH")):
        assert main(["generate", *options]) == 2
        assert message in capsys.readouterr().err


def test_verification_variants_have_no_control_flow_and_only_sampling_ones_sort(model):
    """On a GPU the host would wait for a conditional's predicate every step."""
    from jax_vattention.engine.runner import StepVariant

    manager, _ = make_manager(model, layout="per_layer")
    engine = Engine(model, manager, EngineConfig(token_budget=16, chunk_tokens=8, speculate="ngram"))
    runner = engine.runner
    for rows in (0, runner.chunk_rows):
        inputs = runner._inputs(StepPlan((), (), ()), {}, rows, verify=True)
        arguments = runner._arguments(manager.cache, inputs, engine._no_tokens, engine._sampler)
        for variant in (StepVariant(verify=True), StepVariant(sampling=True, adjust=True, verify=True)):
            program = runner.step_for(variant).lower(*arguments).as_text()
            assert "stablehlo.case" not in program and "stablehlo.if" not in program, variant
            assert ("stablehlo.sort" in program) == variant.sampling, variant
    manager.close()


@pytest.mark.parametrize("draft_seed", [0, pytest.param(1, marks=pytest.mark.slow)])
def test_a_draft_model_proposes_from_its_own_cache_and_greedy_tokens_stay_plain(model, draft_seed):
    """Seed 0: the draft is the target itself (nearly every proposal is accepted); seed 1: other random
    weights (few are). Either way the tokens are plain decoding's, and both caches give every page back."""
    from flax import nnx

    from jax_vattention.engine.draft import DraftProposer
    from jax_vattention.models import Llama, get_config

    draft_model = model if draft_seed == 0 else Llama(get_config("tiny"), rngs=nnx.Rngs(draft_seed))
    requests = copying_requests(seed=4, count=3)
    manager, driver = make_manager(model, layout="per_layer")
    draft_manager, draft_driver = make_manager(draft_model, layout="per_layer")
    engine = Engine(model, manager, EngineConfig(token_budget=24, chunk_tokens=8, speculate="draft",
                                                 num_speculative_tokens=3),
                    draft=DraftProposer(draft_model, draft_manager))
    ids = [engine.submit(request) for request in requests]
    outputs = engine.run()
    assert [outputs[i] for i in ids] == plain_tokens(model, requests)
    stats = engine.stats
    assert stats.verifications > 0
    if draft_seed == 0:
        assert stats.acceptance_rate > 0.9, stats.acceptance_rate
    check_no_page_leaked(manager, driver)
    check_no_page_leaked(draft_manager, draft_driver)
    with pytest.raises(ValueError, match="needs a draft model"):
        Engine(model, manager, EngineConfig(speculate="draft"))
    manager.close()
    draft_manager.close()


@pytest.mark.slow
def test_bench_speculate_compares_the_engines_on_cpu(tmp_path, capsys):
    import csv

    from jax_vattention.app.cli import main

    out = tmp_path / "rows.csv"
    assert main(["bench", "speculate", "--batches", "2", "--max-new-tokens", "12", "--repeats", "1",
                 "--workloads", "grounded", "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert [row["speculate"] for row in rows] == ["off", "ngram"]
    assert all(row["same_tokens"] == "True" for row in rows)
    assert float(rows[1]["tokens_per_s"]) > 0 and "mean accepted length" in capsys.readouterr().out


def test_a_seeded_sampling_request_speculates_to_the_same_tokens_in_any_batch(model):
    requests = copying_requests(seed=5, count=2)
    sampled = dataclasses.replace(requests[1], temperature=0.7, top_k=20, seed=1234)
    manager, driver = make_manager(model, layout="per_layer")
    engine = Engine(model, manager, EngineConfig(token_budget=24, chunk_tokens=8, speculate="ngram"))
    greedy_id, sampled_id = engine.submit(requests[0]), engine.submit(sampled)
    together = engine.run()
    alone_id = engine.submit(sampled)
    alone = engine.run()[alone_id]
    assert together[greedy_id] == plain_tokens(model, requests[:1])[0]
    assert together[sampled_id] == alone and len(alone) == sampled.max_new_tokens
    assert engine.stats.verifications > 0
    check_no_page_leaked(manager, driver)
    manager.close()
