"""The engine's compiled step (engine/runner.py): a bounded number of programs over many requests,
no sampling program for greedy requests, no control flow for the host to wait on."""

import numpy as np
import pytest

import jax_vattention as jv
from caches import model_manager
from jax_vattention.engine import Engine, EngineConfig, Request
from jax_vattention.engine.runner import StepVariant



@pytest.mark.slow
def test_compiled_programs_stay_bounded_over_a_hundred_requests(model):
    rng = np.random.default_rng(5)
    manager, driver = model_manager(model, budget_pages=40)
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
    manager, driver = model_manager(model, budget_pages=40)
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


def test_the_greedy_step_has_no_control_flow_for_the_host_to_wait_on(model):
    """On a GPU XLA reads a conditional's predicate on the host, so the host's dispatch would wait for
    the device every step: neither version of the step has one, and only the sampling one sorts."""
    manager, _ = model_manager(model)
    with manager:
        engine = Engine(model, manager, EngineConfig(token_budget=8, chunk_tokens=4, backend="xla"))
        runner = engine.runner
        inputs = runner._inputs(jv.engine.scheduler.StepPlan((), (), ()), {}, 0)
        arguments = runner._arguments(manager.cache, inputs, engine._no_tokens, engine._sampler)
        greedy = runner.step_for(StepVariant()).lower(*arguments).as_text()
        sampling = runner.step_for(StepVariant(sampling=True)).lower(*arguments).as_text()
    for program in (greedy, sampling):
        assert "stablehlo.case" not in program and "stablehlo.if" not in program
    assert "stablehlo.sort" in sampling and "stablehlo.sort" not in greedy
