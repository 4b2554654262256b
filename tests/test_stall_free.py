"""Stall-free serving on the CPU: the scheduler's exact decisions, chunked prefill against unchunked
``generate`` on both layouts, and a bounded number of compiled programs over many requests."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jax_vattention as jv
from jax_vattention import _core
from jax_vattention.engine import Engine, EngineConfig, Request
from jax_vattention.engine.requests import RequestState
from jax_vattention.engine.scheduler import Scheduler
from jax_vattention.decode.generate import generate
from jax_vattention.models.configs import get_config
from jax_vattention.models.llama import Llama

CPU = jax.devices("cpu")[0]
PAGE = 4096


@pytest.fixture(scope="module")
def model():
    return Llama(get_config("tiny"), rngs=nnx.Rngs(0))


def make_manager(model, *, layout="per_layer", max_batch=4, max_len=160, budget_pages=10_000):
    config = model.config
    cache_config = jv.CacheConfig(num_layers=config.num_layers, max_batch=max_batch, max_len=max_len,
                                  kv_heads=config.num_kv_heads, head_dim=config.head_dim, dtype=jnp.float32,
                                  page_bytes=PAGE, budget_bytes=budget_pages * PAGE, layout=layout)
    driver = _core.FakeDriver(PAGE)
    return jv.CacheManager(cache_config, CPU, driver=driver), driver


def unchunked(model, requests):
    """The reference: ``generate`` of all prompts at once on a dense cache (one whole prefill each)."""
    config = model.config
    cache = jv.KVCache.dense(num_layers=config.num_layers, max_batch=len(requests), capacity=256,
                             kv_heads=config.num_kv_heads, head_dim=config.head_dim, dtype=jnp.float32)
    result, _ = generate(model, cache, [r.prompt for r in requests],
                         max_new_tokens=[r.max_new_tokens for r in requests])
    return result.tokens


def state(request_id, prompt_len, *, computed=0, generated=()):
    return RequestState(request_id, Request(prompt=list(range(1, prompt_len + 1))), 0.0,
                        generated=list(generated), computed=computed)


def test_the_scheduler_fills_the_budget_with_decodes_first_then_chunks_with_exact_slots_and_boundaries():
    scheduler = Scheduler(max_batch=4, token_budget=12, chunk_tokens=4, chunk_rows=4)
    free = [2, 0, 3, 1]
    for request_id, length in enumerate((10, 3, 5)):
        scheduler.add(state(request_id, length))
    plan = scheduler.schedule(lambda s: free.pop(0))
    # Request 0 takes three rows in slot 2 (its whole prompt); request 1 the 2 tokens left of the budget.
    assert [(c.slot, c.start, c.count, c.last) for c in plan.chunks] == [
        (2, 0, 4, False), (2, 4, 4, False), (2, 8, 2, True), (0, 0, 2, False)]
    assert [s.request_id for s in plan.admitted] == [0, 1] and not plan.decodes
    assert plan.growth(4) == [2, 0, 10, 0]
    scheduler.completed(plan)
    scheduler.running[2].generated.append(7)                     # request 0 sampled its first token
    plan = scheduler.schedule(lambda s: free.pop(0))
    # Request 0 decodes (slot 2, position 10); request 1 ends its prompt; request 2 goes to slot 3.
    assert [(s.request_id, s.slot, s.computed) for s in plan.decodes] == [(0, 2, 10)]
    assert [(c.slot, c.start, c.count, c.last) for c in plan.chunks] == [
        (0, 2, 1, True), (3, 0, 4, False), (3, 4, 1, True)]
    assert plan.tokens == 7 and [s.request_id for s in plan.admitted] == [2]
    assert plan.growth(4) == [1, 0, 1, 5]
    assert scheduler.youngest().request_id == 2
    scheduler.preempt(scheduler.youngest())
    assert [s.request_id for s in scheduler.waiting] == [2] and sorted(scheduler.running) == [0, 2]


def test_a_prefill_may_start_at_an_offset_and_admission_stops_at_back_pressure():
    scheduler = Scheduler(max_batch=2, token_budget=8, chunk_tokens=8, chunk_rows=2)
    scheduler.add(state(0, 20, computed=16))                    # 16 tokens already cached (a shared prefix)
    scheduler.add(state(1, 4))
    plan = scheduler.schedule(lambda s: 1 if s.request_id == 0 else None)
    assert [(c.slot, c.start, c.count, c.last) for c in plan.chunks] == [(1, 16, 4, True)]
    assert [s.request_id for s in scheduler.waiting] == [1]


def test_a_token_in_flight_holds_back_the_decode_that_would_pass_the_limit_and_a_requeued_admission():
    scheduler = Scheduler(max_batch=2, token_budget=8, chunk_tokens=4, chunk_rows=2)
    running = state(0, 3, computed=3)
    running.request.max_new_tokens = 2
    running.prefilled, running.slot, running.generated = True, 0, [5]
    running.in_flight = 1                                        # its second (last) token is on the device
    scheduler.running[0] = running
    requeued = state(1, 4)
    requeued.in_flight = 1                                       # preempted while its token was in flight
    scheduler.add(requeued)
    plan = scheduler.schedule(lambda s: 1)
    assert plan.empty and [s.request_id for s in scheduler.waiting] == [1]
    requeued.in_flight = 0
    plan = scheduler.schedule(lambda s: 1)
    assert [s.request_id for s in plan.admitted] == [1] and not plan.decodes


PROMPTS = [np.random.default_rng(7).integers(2, 256, length).tolist() for length in (23, 9, 40)]


@pytest.fixture(scope="module")
def reference(model):
    requests = [Request(prompt=prompt, max_new_tokens=6) for prompt in PROMPTS]
    return requests, unchunked(model, requests)


@pytest.mark.parametrize(("layout", "chunk_tokens"), [
    ("per_layer", 1), ("per_layer", 5), ("per_layer", 64), ("interleaved", 5),
    pytest.param("interleaved", 1, marks=pytest.mark.slow), pytest.param("interleaved", 64, marks=pytest.mark.slow)])
def test_chunked_prefill_gives_the_tokens_of_unchunked_generate(model, reference, layout, chunk_tokens):
    requests, expected = reference
    manager, _ = make_manager(model, layout=layout)
    with manager:
        engine = Engine(model, manager, EngineConfig(token_budget=max(chunk_tokens, 8), chunk_tokens=chunk_tokens))
        ids = [engine.submit(request) for request in requests]
        outputs = engine.run()
    assert [outputs[i] for i in ids] == expected
    if chunk_tokens < 40:
        assert any(r.decodes and r.chunk_tokens for r in engine.stats.records)   # mixed steps ran


@pytest.mark.slow
def test_compiled_programs_stay_bounded_over_a_hundred_requests(model):
    rng = np.random.default_rng(5)
    manager, driver = make_manager(model, budget_pages=40)
    with manager:
        engine = Engine(model, manager, EngineConfig(token_budget=24, chunk_tokens=8))
        engine.compile()                      # decode-only and mixed, greedy and sampling, at once
        assert engine.runner.traces == 4
        for i in range(100):
            engine.submit(Request(prompt=rng.integers(2, 256, int(rng.integers(1, 60))).tolist(),
                                  max_new_tokens=int(rng.integers(1, 12)), temperature=0.8 * (i % 3 == 0)))
        outputs = engine.run()
        assert len(outputs) == 100 and not engine.failed
        assert engine.runner.traces == 4      # whatever the prompt lengths and the mix of knobs
        assert manager.stats()["active_slots"] == 0
        manager.reclaim()


def test_a_greedy_engine_compiles_no_sampling_program(model):
    manager, driver = make_manager(model, budget_pages=40)
    with manager:
        engine = Engine(model, manager, EngineConfig(token_budget=24, chunk_tokens=8))
        engine.compile(sampling=False)
        assert engine.runner.traces == 2
        engine.submit(Request(prompt=list(range(2, 30)), max_new_tokens=6))
        engine.run()
        assert engine.runner.traces == 2      # greedy requests: the greedy pair only
        engine.submit(Request(prompt=list(range(2, 30)), max_new_tokens=6, temperature=1.0))
        engine.run()
        assert engine.runner.traces == 4      # a sampling request: its two programs compile when needed
        manager.reclaim()
        assert manager.stats()["mapped_pages"] == 0 and driver.mapped_bytes == 0


@pytest.mark.slow
def test_bench_decode_reports_every_mode_and_writes_the_csv(tmp_path, capsys):
    from jax_vattention.app.cli import main
    assert main(["bench", "decode", "--batch", "2", "--context", "16", "--steps", "2", "--repeats", "1",
                 "--out", str(tmp_path)]) == 0
    report = capsys.readouterr().out
    assert "NOT A GPU" in report
    rows = (tmp_path / "decode.csv").read_text().splitlines()
    assert rows[0].startswith("card,date,config,batch,context,mode") and len(rows) == 6
    assert [row.split(",")[5] for row in rows[1:]] == ["static", "virtual_per_layer", "virtual_interleaved",
                                                      "paged_cudnn", "paged_pallas"]
    assert all(float(row.split(",")[7]) > 0 for row in rows[1:])
    assert "virtual / best paged" in report


def test_the_greedy_step_has_no_control_flow_for_the_host_to_wait_on(model):
    """On a GPU XLA reads a conditional's predicate on the host, so the host's dispatch would wait for
    the device every step: neither version of the step has one, and only the sampling one sorts."""
    manager, _ = make_manager(model)
    with manager:
        engine = Engine(model, manager, EngineConfig(token_budget=8, chunk_tokens=4, backend="xla"))
        runner = engine.runner
        inputs = runner._inputs(jv.engine.scheduler.StepPlan((), (), ()), {}, 0)
        arguments = runner._arguments(manager.cache, inputs, engine._no_tokens, engine._key)
        greedy = runner._steps[False].lower(*arguments).as_text()
        sampling = runner._steps[True].lower(*arguments).as_text()
    for program in (greedy, sampling):
        assert "stablehlo.case" not in program and "stablehlo.if" not in program
    assert "stablehlo.sort" in sampling and "stablehlo.sort" not in greedy
