"""The engine's failure policy with the fake driver's injected failures: a driver error fails only the
requests it touched (or none, where trying again works), the map-ahead's failures fail nobody, and
the engine goes on."""

import time

import pytest

from caches import model_manager
from jax_vattention.engine import Engine, EngineConfig, Request
from jax_vattention.engine.failures import ADMISSION_ATTEMPTS
from server_harness import compile_cache
# Two requests whose slots cross their first page boundary (32 tokens) at different steps.
SHORT, LONG = Request(prompt=[5, 6, 7] * 3, max_new_tokens=40), Request(prompt=[8, 9] * 10, max_new_tokens=30)


@pytest.fixture(scope="module")
def mapping_on_growth(model):
    """An engine that maps each slot's pages when a step's growth needs them (no map-ahead)."""
    manager, driver = model_manager(model, max_batch=4, max_len=256, budget_pages=400)
    engine = Engine(model, manager, EngineConfig(token_budget=16, chunk_tokens=4, eager_allocation=False,
                                                 overlap=False))
    with compile_cache():
        engine.compile(sampling=False)
    ids = [engine.submit(SHORT), engine.submit(LONG)]
    outputs = engine.run()
    yield engine, manager, driver, [outputs[i] for i in ids]
    manager.close()


def fresh(manager):
    """Every page back to the driver: the next admission creates and maps its pages."""
    manager.reclaim()
    manager.trim()
    assert manager.stats()["created_pages"] == 0


def run(engine, until=None, tokens=None, timeout=30.0):
    """Steps until idle (or ``until(engine)``); returns ``{id: tokens}`` (added to ``tokens``) and
    ``{id: error}`` of the events."""
    tokens, errors = tokens if tokens is not None else {}, {}
    deadline = time.monotonic() + timeout
    while not engine.idle and not (until and until(engine)):
        assert time.monotonic() < deadline, "the engine did not finish"
        for event in engine.step():
            if event.error is not None:
                errors[event.request_id] = event.error
            else:
                tokens.setdefault(event.request_id, []).append(event.token)
    return tokens, errors


def decoding(engine):
    """Both requests hold a slot and decode: the next steps' growth is all that maps."""
    running = engine.scheduler.running.values()
    return len(running) == 2 and all(state.prefilled for state in running)


def test_an_admission_the_driver_fails_is_tried_again_and_loses_nothing(mapping_on_growth):
    engine, manager, driver, reference = mapping_on_growth
    fresh(manager)
    driver.fail_on("create", 1)
    first = engine.submit(SHORT)
    assert engine.step() == [] and driver.failures_thrown >= 1
    assert engine.waiting == 1 and not manager.active().any()       # it waits; nothing was kept
    tokens, errors = run(engine)
    assert errors == {} and tokens[first] == reference[0]


def test_an_admission_that_keeps_failing_fails_alone_and_the_engine_goes_on(mapping_on_growth):
    engine, manager, driver, reference = mapping_on_growth
    fresh(manager)
    thrown = driver.failures_thrown
    for _ in range(ADMISSION_ATTEMPTS):
        driver.fail_on("create", 1)
    doomed = engine.submit(SHORT)
    tokens, errors = run(engine)
    assert driver.failures_thrown - thrown == ADMISSION_ATTEMPTS
    assert list(errors) == [doomed] and "DriverError" in errors[doomed] and "injected" in errors[doomed]
    assert doomed in engine.failed and not manager.active().any()
    later = engine.submit(SHORT)
    tokens, errors = run(engine)
    assert errors == {} and tokens[later] == reference[0]


def test_a_growth_the_driver_fails_once_fails_nobody(mapping_on_growth):
    engine, manager, driver, reference = mapping_on_growth
    fresh(manager)                                      # no pages a finished request left in the slots
    ids = [engine.submit(SHORT), engine.submit(LONG)]
    tokens, _ = run(engine, until=decoding)             # both admitted, their prompts mapped
    thrown = driver.failures_thrown
    driver.fail_on("map", 1)                            # the first page a step's growth maps
    tokens, errors = run(engine, tokens=tokens)
    assert driver.failures_thrown == thrown + 1 and engine.stats.step_failures >= 1
    assert errors == {} and [tokens[i] for i in ids] == reference


def test_a_growth_that_fails_again_fails_only_its_request(mapping_on_growth):
    engine, manager, driver, reference = mapping_on_growth
    fresh(manager)
    short, long = engine.submit(SHORT), engine.submit(LONG)
    tokens, _ = run(engine, until=decoding)
    thrown = driver.failures_thrown
    driver.fail_on("map", 1)     # the growth of the step where a slot first crosses a page...
    driver.fail_on("map", 1)     # ...and that slot's growth on its own
    tokens, errors = run(engine, tokens=tokens)
    assert len(errors) == 1 and driver.failures_thrown == thrown + 2, errors
    (failed, error), = errors.items()
    assert "injected" in error
    other = long if failed == short else short
    assert tokens[other] == reference[[short, long].index(other)]   # the other request never noticed
    assert len(tokens.get(failed, [])) < len(reference[[short, long].index(failed)])
    assert not manager.active().any() and manager.stats()["used_tokens"] == 0


def test_a_step_that_fails_fails_its_requests_and_the_next_step_streams_their_errors(mapping_on_growth):
    engine, manager, driver, reference = mapping_on_growth
    first = engine.submit(SHORT)
    runner_run = engine.runner.run

    def fail(*args, **kwargs):
        raise RuntimeError("the device failed (test)")

    engine.runner.run = fail
    try:
        with pytest.raises(RuntimeError, match="the device failed"):
            engine.step()
    finally:
        engine.runner.run = runner_run
    assert not engine.idle                               # its error event is still to be streamed
    events = engine.step()
    assert [(e.request_id, e.token, e.finished) for e in events] == [(first, -1, True)]
    assert "the device failed" in events[0].error and engine.idle and not manager.active().any()
    again = engine.submit(SHORT)
    tokens, errors = run(engine)
    assert errors == {} and tokens[again] == reference[0]


def test_a_map_ahead_failure_fails_no_request(model):
    """The best-effort map-ahead while the device runs fails in the driver: the step ran, its tokens
    are streamed, and the next step maps what it needs."""
    manager, driver = model_manager(model, max_batch=4, max_len=256, budget_pages=400)
    # Mapping 64 tokens ahead: the first map-ahead (after the first step) maps pages.
    engine = Engine(model, manager, EngineConfig(token_budget=16, chunk_tokens=4, eager_allocation=False,
                                                 prefetch_tokens=64))
    with compile_cache():
        engine.compile(sampling=False)
    ids = [engine.submit(SHORT), engine.submit(LONG)]
    reference = engine.run()
    fresh(manager)
    prefetch = manager.prefetch_while_busy
    failures = []

    def failing_once(pending, tokens, deadline=None):
        if failures:
            return prefetch(pending, tokens, deadline)
        # The first map-ahead maps at once (however soon the step ends), and its first page fails.
        thrown = driver.failures_thrown
        driver.fail_on("map", 1)
        try:
            return manager.prefetch(tokens)
        finally:
            failures.append(driver.failures_thrown - thrown)

    manager.prefetch_while_busy = failing_once
    again = [engine.submit(SHORT), engine.submit(LONG)]
    tokens, errors = run(engine)
    assert failures == [1] and engine.stats.map_ahead_failures == 1
    assert errors == {} and [tokens[i] for i in again] == [reference[i] for i in ids]
    manager.close()
