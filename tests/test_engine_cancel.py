"""Engine.cancel: a request whose client went away gives back its slot and pages, and the others
go on as if it had never been there."""

import jax
import pytest
import jax.numpy as jnp
from flax import nnx

import jax_vattention as jv
from jax_vattention import _core
from jax_vattention.engine import Engine, EngineConfig, Request
from jax_vattention.models.configs import get_config
from jax_vattention.models.llama import Llama

PAGE = 4096          # a fake driver's page: 32 tokens of the tiny model's K or V of one layer


def make_engine(max_batch=2, pipeline=False):
    model = Llama(get_config("tiny"), rngs=nnx.Rngs(0))
    config = model.config
    cache_config = jv.CacheConfig(num_layers=config.num_layers, max_batch=max_batch, max_len=128,
                                  kv_heads=config.num_kv_heads, head_dim=config.head_dim, dtype=jnp.float32,
                                  page_bytes=PAGE, budget_bytes=1000 * PAGE)
    manager = jv.CacheManager(cache_config, jax.devices("cpu")[0], driver=_core.FakeDriver(PAGE))
    return Engine(model, manager, EngineConfig(token_budget=16, chunk_tokens=4, deferred_reclamation=False,
                                               pipeline=pipeline)), manager


@pytest.mark.parametrize("pipeline", [True, False])
def test_cancel_running_and_waiting_requests(pipeline):
    """Pipelined, the running request is cancelled with its next token in flight: it is dropped."""
    engine, manager = make_engine(max_batch=2, pipeline=pipeline)
    kept = Request(prompt=[5, 6, 7], max_new_tokens=20)
    reference_id = engine.submit(kept)
    reference = engine.run()[reference_id]

    kept_id = engine.submit(kept)
    running_id = engine.submit(Request(prompt=[9, 10, 11, 12], max_new_tokens=60))
    waiting_id = engine.submit(Request(prompt=[3, 4], max_new_tokens=60))   # no third slot: it waits
    events = engine.step()
    if pipeline:
        assert not events, "the first step's tokens are read during the second"
        events = engine.step()
    assert {event.request_id for event in events} == {kept_id, running_id}
    assert engine.running == 2 and engine.waiting == 1

    assert engine.cancel(waiting_id) and engine.waiting == 0
    assert engine.cancel(running_id) and engine.running == 1
    assert manager.stats()["active_slots"] == 1
    assert not engine.cancel(running_id), "a cancelled request is gone"

    tokens = [event.token for event in events if event.request_id == kept_id]
    for event in engine.stream():
        assert event.request_id == kept_id
        tokens.append(event.token)
    assert tokens == reference
    stats = manager.stats()
    assert stats["active_slots"] == 0 and stats["used_tokens"] == 0 and stats["mapped_pages"] == 0
    assert not engine.cancel(kept_id), "a finished request cannot be cancelled"
