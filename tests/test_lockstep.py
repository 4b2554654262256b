"""The lockstep of one engine over processes, in one process: a leader's journal replayed by a follower
thread on a second engine over its own cache, through a key-value store shared by both."""

import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_vattention as jv
from jax_vattention.engine import Engine, EngineConfig, Request
from jax_vattention.engine.lockstep import (PREFIX, LockstepLeader, ProcessGroupError, decode_request,
                                            encode_request, follow, plan_fingerprint)
from jax_vattention.models import get_config

CONFIG = get_config("tiny")
CPU = jax.devices("cpu")[0]


class SharedStore:
    """The key-value store of two threads (JAX's stands between processes): set, blocking get, delete."""

    def __init__(self):
        self.values: dict[str, bytes] = {}
        self.changed = threading.Condition()
        self.most_keys = 0

    def set(self, key, value):
        with self.changed:
            self.values[key] = value
            self.most_keys = max(self.most_keys, len(self.values))
            self.changed.notify_all()

    def get(self, key, timeout):
        with self.changed:
            self.changed.wait_for(lambda: key in self.values, timeout)
            return self.values.get(key)

    def delete(self, key):
        with self.changed:
            self.values.pop(key, None)


def engine(model, **config):
    """An engine over its own cache of 4 KiB pages (32 tokens of a buffer), 20 pages at most."""
    cache = jv.CacheConfig(num_layers=CONFIG.num_layers, max_batch=3, max_len=80, kv_heads=CONFIG.num_kv_heads,
                           head_dim=CONFIG.head_dim, dtype=jnp.float32, budget_bytes=20 * 4096)
    settings = dict(token_budget=16, chunk_tokens=8, overlap=False)
    settings.update(config)
    manager = jv.CacheManager(cache, CPU, driver=jv._core.FakeDriver(4096))
    return Engine(model, manager, EngineConfig(**settings))


def requests():
    rng = np.random.default_rng(7)
    return [Request(prompt=rng.integers(2, 256, int(rng.integers(20, 40))).tolist(), max_new_tokens=int(rng.integers(8, 20)),
                    temperature=0.7, seed=i, stop_tokens=(9,))
            for i in range(5)]


def test_requests_travel_whole():
    request = Request(prompt=[1, 2], logit_bias={7: -3.0, 11: 1.5}, stop_token_ids=(4,), stop_tokens=(2, 3), seed=9,
                      logprobs=2, temperature=0.5)
    assert decode_request(encode_request(request)) == request


def test_a_follower_replays_the_leaders_calls_into_the_same_plan_and_tokens(model):
    leader, follower = engine(model), engine(model)
    store = SharedStore()
    lockstep = LockstepLeader(store, [1], timeout=30)
    followed = {}
    thread = threading.Thread(target=lambda: followed.update(steps=follow(follower, store, 1, timeout=30)))
    thread.start()
    outputs: dict[int, list[int]] = {}
    work = requests()
    ids = []
    for turn in range(200):        # submits arrive between steps, one is cancelled, as a server's would
        if work and turn % 3 == 0:
            request = work.pop()
            ids += leader.submit_samples(request, 2 if turn == 3 else 1)
            lockstep.record_submit(request, 2 if turn == 3 else 1, ids[-2:] if turn == 3 else ids[-1:])
        if turn == 10:
            leader.cancel(ids[0])
            lockstep.record_cancel(ids[0])
        if leader.idle and not work:
            break
        if leader.idle:
            lockstep.keep_alive(leader)
            continue
        lockstep.before_step(leader)
        for event in leader.step():
            if event.error is None:
                outputs.setdefault(event.request_id, []).append(event.token)
    lockstep.stop(leader)
    thread.join(30)
    assert not thread.is_alive() and followed["steps"] == leader.stats.steps > 10
    assert plan_fingerprint(follower) == plan_fingerprint(leader)
    assert np.array_equal(follower.manager.mapped_pages(), leader.manager.mapped_pages())
    assert follower.manager.stats()["pages_mapped_total"] == leader.manager.stats()["pages_mapped_total"]
    assert store.most_keys <= 2               # one entry and its ack at a time: the journal stays bounded
    assert set(outputs) >= set(ids[1:])       # every request but the cancelled one streamed its tokens
    for manager in (leader.manager, follower.manager):
        manager.close()


def test_a_stalled_follower_is_named_within_the_timeout(model):
    leader = engine(model)
    store = SharedStore()
    lockstep = LockstepLeader(store, [1, 2], timeout=0.5)
    store.set(f"{PREFIX}/ack/1/0", b"x")      # process 1 acks the first entry; process 2 never does
    leader.submit(Request(prompt=[1, 2, 3], max_new_tokens=4))
    lockstep.before_step(leader)
    leader.step()
    started = time.monotonic()
    with pytest.raises(ProcessGroupError, match="process 2 did not finish entry 0"):
        lockstep.before_step(leader)
    assert time.monotonic() - started < 2
    with pytest.raises(ProcessGroupError, match="process 2"):   # and it stays failed
        lockstep.keep_alive(leader)
    leader.manager.close()


def test_the_watchdog_names_a_stalled_follower_while_the_leader_is_blocked(model):
    leader = engine(model)
    store = SharedStore()
    stalls = []
    lockstep = LockstepLeader(store, [1], timeout=0.4, on_stall=stalls.append)
    lockstep.before_step(leader)              # published; the leader's thread now "blocks" in the step
    deadline = time.monotonic() + 3
    while not stalls and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(stalls) == 1 and "process 1 did not finish entry 0" in str(stalls[0])
    leader.manager.close()


def test_a_silent_leader_stops_a_follower_within_the_timeout(model):
    follower = engine(model)
    started = time.monotonic()
    with pytest.raises(ProcessGroupError, match="process 0 sent nothing for 0.3 s"):
        follow(follower, SharedStore(), 1, timeout=0.3)
    assert time.monotonic() - started < 2
    follower.manager.close()


def test_a_follower_whose_plan_differs_stops(model):
    leader, follower = engine(model), engine(model, token_budget=8)   # another budget: another plan
    store = SharedStore()
    lockstep = LockstepLeader(store, [1], timeout=5)
    errors = []

    def run():
        try:
            follow(follower, store, 1, timeout=10)
        except ProcessGroupError as error:
            errors.append(error)
    thread = threading.Thread(target=run)
    thread.start()
    request = Request(prompt=list(range(2, 30)), max_new_tokens=3)
    lockstep.record_submit(request, 1, leader.submit_samples(request, 1))
    with pytest.raises(ProcessGroupError, match="process 1 did not finish entry"):   # the follower left
        for _ in range(3):
            lockstep.before_step(leader)
            leader.step()
    thread.join(10)
    assert errors and "process 1's plan differs from process 0's before entry" in str(errors[0])
    for manager in (leader.manager, follower.manager):
        manager.close()
