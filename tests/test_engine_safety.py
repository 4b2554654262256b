"""The engine refuses bad requests at submit, fails a request alone, and picks a safe default backend."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest

import jax_vattention as jv
from jax_vattention import _core
from jax_vattention.engine import Engine, EngineConfig, Request
from jax_vattention.decode.generate import generate

CPU = jax.devices("cpu")[0]
PAGE = 4096          # a fake driver's page: 32 tokens of the tiny model's K or V of one layer


def make_manager(model, *, max_batch=2, max_len=64, budget_pages=10_000):
    config = model.config
    return jv.CacheManager(jv.CacheConfig(num_layers=config.num_layers, max_batch=max_batch, max_len=max_len,
                                          kv_heads=config.num_kv_heads, head_dim=config.head_dim,
                                          dtype=jnp.float32, page_bytes=PAGE, budget_bytes=budget_pages * PAGE),
                           CPU, driver=_core.FakeDriver(PAGE))


def alone(model, request):
    config = model.config
    cache = jv.KVCache.dense(num_layers=config.num_layers, max_batch=1, capacity=64,
                             kv_heads=config.num_kv_heads, head_dim=config.head_dim, dtype=jnp.float32)
    result, _ = generate(model, cache, [request.prompt], max_new_tokens=request.max_new_tokens)
    return result.tokens[0]


@pytest.mark.parametrize("field, value, message", [
    ("max_new_tokens", 2.5, "max_new_tokens must be an integer"),
    ("max_new_tokens", 0, "max_new_tokens 0 is below 1"),
    ("prompt", [3, 2.0], "prompt token id must be an integer"),
    ("prompt", "abc", "list of token ids"),
    ("prompt", [3, 256], "prompt token id 256 is outside"),
    ("stop_tokens", (-1,), "stop token id -1 is outside"),
    ("temperature", -0.5, "temperature must be in"),
    ("temperature", "hot", "temperature must be a number"),
    ("top_k", -2, "top_k -2 is outside"),
    ("top_p", 0.0, "top_p must be in"),
    ("top_p", True, "top_p must be a number"),
])
def test_submit_refuses_each_bad_field(model, field, value, message):
    with make_manager(model) as manager:
        engine = Engine(model, manager)
        with pytest.raises(ValueError, match=message):
            engine.submit(dataclasses.replace(Request(prompt=[3, 4]), **{field: value}))
        assert engine.idle


def test_a_request_that_fails_later_fails_alone(model):
    good = Request(prompt=[5, 6, 7], max_new_tokens=6)
    with make_manager(model) as manager:
        engine = Engine(model, manager, EngineConfig(token_budget=16, chunk_tokens=2))
        assert engine.backend == "blocked"                          # the CPU default
        bad_id = engine.submit(Request(prompt=[8, 9], max_new_tokens=4))
        good_id = engine.submit(good)
        state = engine._waiting[0]
        state.request = dataclasses.replace(state.request, temperature="hot")   # broken after submit
        events = list(engine.stream())
        errors = [event for event in events if event.error is not None]
        assert [(event.request_id, event.finished) for event in errors] == [(bad_id, True)]
        assert "temperature" in errors[0].error or "hot" in errors[0].error
        assert [event.token for event in events if event.request_id == good_id] == alone(model, good)
        assert set(engine.failed) == {bad_id} and engine.idle
        assert not manager.active().any()
        again = engine.submit(good)
        assert engine.run()[again] == alone(model, good)


def test_a_lone_request_the_budget_cannot_grow_is_failed_not_the_engine(model):
    # The step's growth is refused (as if the budget were spent): the lone running request is
    # failed, and the engine goes on with the next one.
    with make_manager(model) as manager:
        engine = Engine(model, manager, EngineConfig(token_budget=16, chunk_tokens=2))
        manager_growth = manager.grow_slots

        def refuse(counts):
            raise jv.OutOfPagesError("the budget is spent (test)")

        first = engine.submit(Request(prompt=[3] * 10, max_new_tokens=5))
        manager.grow_slots = refuse
        events = engine.step()
        manager.grow_slots = manager_growth
        assert [event.error is not None for event in events if event.request_id == first][-1]
        assert not manager.active().any()
        later = engine.submit(Request(prompt=[3] * 10, max_new_tokens=3))
        assert len(engine.run()[later]) == 3


def test_a_step_the_budget_cannot_grow_preempts_the_youngest_and_loses_nothing(model):
    requests = [Request(prompt=[3 + i] * (5 + i), max_new_tokens=6) for i in range(3)]
    with make_manager(model) as manager:
        engine = Engine(model, manager, EngineConfig(token_budget=32, chunk_tokens=8))
        ids = [engine.submit(request) for request in requests]
        first = engine.step()                                       # two admitted (two slots) and prefilled
        manager_growth = manager.grow_slots
        refusals = iter([True])

        def refuse_once(counts):
            if next(refusals, False):
                raise jv.OutOfPagesError("the budget is spent (test)")
            manager_growth(counts)

        manager.grow_slots = refuse_once
        outputs = engine.run()
        assert engine.stats.preemptions == 1 and not engine.failed
        for request_id, request in zip(ids, requests):
            streamed = [e.token for e in first if e.request_id == request_id] + outputs[request_id]
            assert streamed == alone(model, request)
        assert not manager.active().any()
