"""Data parallelism (``serve --dp``): the routing rule, and :class:`Replicas` behind the real server.

The rule is checked as a pure function first. Then two replicas of the tiny model (each its own
engine, engine thread and cache manager, over fake drivers whose pages alias host memory, so
prefix sharing works on the CPU) serve through the HTTP app and the official ``openai`` client,
against a one-replica server of the same engine options. They share one CPU device here: what
``--dp 2`` adds on disjoint devices (the devices of ``serve``'s path, one compile each) runs in
``tests/dp_server_case.py``, in its own process with 4 forced CPU devices (slow: each replica's
programs compiled for its own devices), ``--dp 2 --tp 2`` included.
"""

import asyncio
import concurrent.futures
import time
from pathlib import Path

import httpx
import jax
import jax.numpy as jnp
import openai
import pytest

import jax_vattention as jv
from jax_vattention import _core
from jax_vattention.app.commands.model_source import ByteTokenizer, LoadedModel
from jax_vattention.app.server.chat import ChatFormat
from jax_vattention.app.server.engine_loop import EngineLoop, EngineUnusable
from jax_vattention.app.server.replicas import Replicas
from jax_vattention.app.server.routing import LOAD_BOUND, ReplicaView, choose_replica, load_bound, preference
from jax_vattention.app.server.service import Service
from jax_vattention.engine import Engine, EngineConfig, Request
from own_process import run_case
from server_harness import PAGE, compile_cache, serve_in_thread, start_server, tiny_model

BUDGET_PAGES = 4000
SYSTEM = "You are a careful assistant who answers in one short sentence. " * 2   # 4 pages of 32 tokens
OPTIONS = dict(token_budget=16, chunk_tokens=4)


# ------------------------------------------------------------------ the rule
def test_the_longest_cached_prefix_wins_over_room_and_load_within_the_load_bound():
    views = [ReplicaView(cached_pages=1, free_pages=900, waiting=3, running=3),
             ReplicaView(cached_pages=4, free_pages=3, waiting=5, running=3, needed_pages=10),
             ReplicaView(cached_pages=2, free_pages=900, waiting=2, running=4)]
    assert load_bound(views) == 9    # 1.25 x (21 + 1) / 3, rounded up: 8 requests are within it
    assert choose_replica(views) == 1
    assert preference(views) == [1, 2, 0]


def test_a_replica_at_the_load_bound_loses_its_prefix_credit():
    views = [ReplicaView(cached_pages=0, free_pages=900, waiting=0),
             ReplicaView(cached_pages=4, free_pages=900, waiting=2, running=1),
             ReplicaView(cached_pages=2, free_pages=900, waiting=0)]
    assert load_bound(views) == 2    # 1.25 x (3 + 1) / 3, rounded up
    # Replica 1 is over it: the next longest prefix, on a replica under it, wins.
    assert preference(views) == [2, 0, 1]
    # A replica with nothing waiting keeps its credit however busy (it starts the request at once);
    # unusable replicas count for nothing.
    assert choose_replica([ReplicaView(0, 900, 0), ReplicaView(4, 900, 0, running=30)]) == 1
    assert load_bound([ReplicaView(4, 900, 0), ReplicaView(0, 900, 0)]) == 1
    assert preference([ReplicaView(4, 900, 1), ReplicaView(0, 900, 9, usable=False), ReplicaView(0, 900, 0)]) == [0, 2]


def test_one_hot_prompt_spreads_within_the_bound_and_stays_cached_where_it_went():
    """Requests of one system prompt arrive faster than they finish: each routed one joins its
    replica's queue, and the replica it lands on caches the prompt. A plain prefix-first rule would
    send all of them to one replica; bounded loads keep every replica within the bound, while most
    requests still find the prompt cached."""
    replicas, requests = 4, 200
    waiting, cached = [0] * replicas, [False] * replicas
    hits = 0
    for _ in range(requests):
        views = [ReplicaView(8 if cached[i] else 0, 900, waiting[i]) for i in range(replicas)]
        bound = load_bound(views)
        chosen = choose_replica(views)
        hits += cached[chosen]
        cached[chosen] = True
        waiting[chosen] += 1
        assert waiting[chosen] <= bound
    assert max(waiting) - min(waiting) <= 2 * LOAD_BOUND * requests / replicas - requests / replicas
    assert hits >= requests - replicas   # each replica computes the prompt once at most


def test_without_a_cached_prefix_room_then_waiting_then_running_then_free_pages():
    # No room for the request's 8 pages loses to a queue with room.
    assert choose_replica([ReplicaView(0, 7, 0, needed_pages=8), ReplicaView(0, 8, 3, needed_pages=8)]) == 1
    # Room on both: fewer waiting wins over more free pages.
    assert choose_replica([ReplicaView(0, 900, 2), ReplicaView(0, 20, 1)]) == 1
    # Same queue: fewer running.
    assert choose_replica([ReplicaView(0, 900, 1, running=4), ReplicaView(0, 20, 1, running=3)]) == 1
    # Same load: most free pages, then the lower index.
    assert choose_replica([ReplicaView(0, 20, 1), ReplicaView(0, 21, 1)]) == 1
    assert choose_replica([ReplicaView(0, 20, 1), ReplicaView(0, 20, 1)]) == 0
    # A tie of cached prefixes is settled the same way, among the tied only.
    assert preference([ReplicaView(2, 20, 2), ReplicaView(2, 20, 1), ReplicaView(0, 900, 2, running=2)]) == [1, 0, 2]


def test_unusable_replicas_get_nothing():
    views = [ReplicaView(9, 900, 0, usable=False), ReplicaView(0, 1, 7)]
    assert choose_replica(views) == 1 and preference(views) == [1]
    assert choose_replica([ReplicaView(0, 900, 0, usable=False)] * 2) is None


# ------------------------------------------------------------------ two replicas behind the server
def replica_loop() -> EngineLoop:
    model = tiny_model()
    config = model.config
    cache_config = jv.CacheConfig(num_layers=config.num_layers, max_batch=4, max_len=256, kv_heads=config.num_kv_heads,
                                  head_dim=config.head_dim, dtype=jnp.float32, page_bytes=PAGE,
                                  budget_bytes=BUDGET_PAGES * PAGE)
    manager = jv.CacheManager(cache_config, jax.devices("cpu")[0], driver=_core.FakeDriver(PAGE, host_pages=True))
    engine = Engine(model, manager, EngineConfig(**OPTIONS))
    with compile_cache():
        engine.compile()
    return EngineLoop(engine)


@pytest.fixture(scope="module")
def pair():
    """A server over two replicas: ``(replicas, base url, openai client)``."""
    replicas = Replicas([replica_loop(), replica_loop()])
    replicas.start()
    loaded = LoadedModel(tiny_model(), ByteTokenizer(), (), "tiny", "config tiny (random weights)")
    service = Service(replicas, loaded, ChatFormat())
    server, thread, base = serve_in_thread(service)
    yield replicas, base, openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=60)
    server.should_exit = True
    thread.join(30)
    service.close()
    assert replicas.stop(30)
    for host in replicas.hosts():
        host.close()


def wait_idle(replicas, timeout=30.0):
    deadline = time.monotonic() + timeout
    while replicas.stats()["running"] or replicas.waiting or replicas.stats()["active_slots"]:
        assert time.monotonic() < deadline, replicas.stats()
        time.sleep(0.02)


PROMPTS = ["Hello, world", "The quick brown fox", "Once upon a time", "abc" * 9, "Data parallel", "0123456789"]


def burst(client, prompts, **kwargs):
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(lambda prompt: client.completions.create(
            model="tiny", prompt=prompt, max_tokens=6, temperature=0, **kwargs), prompts))


def test_greedy_answers_are_one_replicas_and_spread_over_both(pair):
    replicas, _, client = pair
    single = start_server(host_pages=True, budget_pages=BUDGET_PAGES, **OPTIONS)
    try:
        reference = [answer.choices[0].text for answer in burst(
            openai.OpenAI(base_url=single.url, api_key="none", max_retries=0, timeout=60), PROMPTS)]
    finally:
        single.stop()
    routed = list(replicas.routed)
    steps = [loop.engine.stats.steps for loop in replicas.loops]
    assert [answer.choices[0].text for answer in burst(client, PROMPTS)] == reference
    assert all(now > before for now, before in zip(replicas.routed, routed)), (routed, replicas.routed)
    assert sum(replicas.routed) - sum(routed) == len(PROMPTS)
    assert all(loop.engine.stats.steps > before for loop, before in zip(replicas.loops, steps))


def test_a_shared_system_prompt_goes_to_the_replica_that_has_it_cached(pair):
    replicas, _, client = pair
    wait_idle(replicas)
    tokens_per_page = replicas.engine.manager.tokens_per_page
    assert tokens_per_page > 0 and len(SYSTEM) >= 3 * tokens_per_page
    first = client.completions.create(model="tiny", prompt=SYSTEM + "Name a color.", max_tokens=2, temperature=0)
    assert first.choices[0].text is not None
    holder = max(range(2), key=lambda i: replicas.loops[i].engine.manager.cached_pages(
        jv.cache.prefix.page_keys(list(SYSTEM.encode()), tokens_per_page)))
    other = 1 - holder

    # Load the holder: a long request runs there (the other replica is closed to it meanwhile), so
    # that by room and load alone the other replica would be chosen.
    replicas.loops[other].unusable = "closed by the test"
    try:
        busy = client.completions.create(model="tiny", prompt="A long story: ", max_tokens=200, temperature=0,
                                         stream=True)
        next(iter(busy))
    finally:
        replicas.loops[other].unusable = None
    question = list((SYSTEM + "Name a fruit.").encode())
    assert preference(replicas.views(list(b"Something else entirely."), 40))[0] == other
    assert preference(replicas.views(question, 40))[0] == holder

    routed, shared = list(replicas.routed), replicas.loops[holder].engine.stats.shared_tokens
    answer = client.completions.create(model="tiny", prompt=SYSTEM + "Name a fruit.", max_tokens=2, temperature=0)
    assert answer.usage.prompt_tokens == len(question)
    assert replicas.routed[holder] == routed[holder] + 1 and replicas.routed[other] == routed[other]
    assert replicas.loops[holder].engine.stats.shared_tokens - shared >= 3 * tokens_per_page
    busy.close()


def test_the_samples_of_one_request_stay_on_one_replica_and_cancel_reaches_it(pair):
    replicas, _, client = pair
    wait_idle(replicas)
    routed = list(replicas.routed)
    answer = client.completions.create(model="tiny", prompt="Pick a number", max_tokens=5, n=3, temperature=1.0,
                                       seed=7)
    assert len(answer.choices) == 3
    assert sum(replicas.routed) == sum(routed) + 1        # one routing decision for the three samples

    async def submit_and_cancel():
        streams = [await replicas.submit(Request(prompt=list(b"Keep going"), max_new_tokens=200)) for _ in range(3)]
        ids = [stream.request_id for stream in streams]
        assert len(set(ids)) == 3
        holders = [replicas.replica_of(request_id) for request_id in ids]
        assert set(holders) == {0, 1}                      # they spread, and every id is the server's own
        for stream in streams:
            await stream.tokens.get()                      # running
        for stream in streams:
            replicas.cancel(stream.request_id)
        deadline = time.monotonic() + 30
        while replicas.stats()["running"]:                 # each cancel freed its slot where it ran
            assert time.monotonic() < deadline, replicas.stats()
            await asyncio.sleep(0.02)

    asyncio.run(submit_and_cancel())
    wait_idle(replicas)


def test_unusable_replicas_are_skipped_and_health_and_metrics_cover_both(pair):
    from prometheus_client.parser import text_string_to_metric_families

    replicas, base, client = pair
    wait_idle(replicas)
    routed = list(replicas.routed)
    replicas.loops[0].unusable = "closed by the test"
    try:
        health = httpx.get(base + "/health", timeout=10)
        assert health.status_code == 200 and health.json()["unusable_replicas"] == {"0": "closed by the test"}
        burst(client, PROMPTS[:3])
        assert replicas.routed[0] == routed[0] and replicas.routed[1] == routed[1] + 3
        replicas.loops[1].unusable = "closed too"
        health = httpx.get(base + "/health", timeout=10)
        assert health.status_code == 503 and "replica 1: closed too" in health.json()["reason"]
        with pytest.raises(openai.APIStatusError) as refused:
            client.completions.create(model="tiny", prompt="Hi", max_tokens=2)
        assert refused.value.status_code == 503
        with pytest.raises(EngineUnusable):
            asyncio.run(replicas.submit(Request(prompt=[1, 2], max_new_tokens=1)))
    finally:
        replicas.loops[0].unusable = replicas.loops[1].unusable = None

    families = {family.name: family for family in text_string_to_metric_families(
        httpx.get(base + "/metrics", timeout=10).text)}
    steps = {sample.labels.get("replica"): sample.value for sample in families["vattention:engine_steps"].samples}
    assert steps == {None: steps["0"] + steps["1"], "0": replicas.loops[0].engine.stats.steps,
                     "1": replicas.loops[1].engine.stats.steps}
    budget = {sample.labels.get("replica"): sample.value
              for sample in families["vattention:kv_cache_pages_budget"].samples}
    assert budget == {None: 2 * BUDGET_PAGES, "0": BUDGET_PAGES, "1": BUDGET_PAGES}
    healthy = {sample.labels.get("replica"): sample.value for sample in families["vattention:engine_healthy"].samples}
    assert healthy == {None: 1, "0": 1, "1": 1}


# ------------------------------------------------------------------ serve --dp 2 on two devices
@pytest.mark.slow
def test_serve_dp2_on_forced_cpu_devices_answers_as_one_replica():
    """``tests/dp_server_case.py`` in its own process (4 forced CPU devices): ``--dp 2``, ``--dp 2 --tp 2``."""
    run_case(Path(__file__).with_name("dp_server_case.py"), "data_parallel_serving")


def test_too_few_devices_for_dp_times_tp_is_refused_naming_both():
    from jax_vattention.app.assembly import replica_devices

    count = len(jax.devices())
    with pytest.raises(ValueError, match=rf"--dp {count + 1} replicas of --tp 1 devices each need {count + 1} "
                                         rf"devices; JAX sees {count}"):
        replica_devices(count + 1, 1)
    with pytest.raises(ValueError, match=f"--dp {count} replicas of --tp 2 devices each need {2 * count} devices"):
        replica_devices(count, 2)
    assert replica_devices(1, 1) == [[jax.devices()[0]]]


def test_dp_over_several_processes_is_refused(monkeypatch):
    from jax_vattention.app.assembly import replica_devices

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(ValueError, match="--dp runs replicas on one process's devices; over 2 processes"):
        replica_devices(2, 1)
    assert replica_devices(1, 1) == [[jax.devices()[0]]]
