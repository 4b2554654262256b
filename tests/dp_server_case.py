"""``vattention serve --dp 2`` on 2 forced CPU devices, driven by the official ``openai`` client, in
its own process.

``python tests/dp_server_case.py`` sets ``XLA_FLAGS=--xla_force_host_platform_device_count=4``
before JAX is imported, serves the tiny model with one replica and then with two (each over
``build_service``, the path ``vattention serve`` takes, and uvicorn on a free port), then builds
``--dp 2 --tp 2`` (two tensor-parallel replicas over the 4 devices), and prints ``CASE OK`` or
``CASE FAILED`` with the traceback; ``tests/test_replicas.py`` runs it (``own_process.run_case``).

What it checks: the two-replica server's greedy answers are the one-replica server's, a burst of
requests is spread over both replicas (each replica's engine on its own device), ``/metrics``
parses and adds the replicas up, and ``/health`` names a replica that cannot serve while the other
still serves; ``--dp 2 --tp 2`` answers as ``--dp 1``. The CPU backend's own driver does not alias
pages (its ``tokens_per_page`` is 0), so prefix affinity is checked in ``tests/test_replicas.py``
over fake-driver managers instead.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS"),
                                                 "--xla_force_host_platform_device_count=4"]))
os.environ["JAX_PLATFORMS"] = "cpu"

import concurrent.futures  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402

import httpx  # noqa: E402
import jax  # noqa: E402
import openai  # noqa: E402
from server_harness import serve_in_thread  # noqa: E402

PROMPTS = ["Hello, world", "The quick brown fox", "Once upon a time", "abc" * 9, "Data parallel", "0123456789",
           "What is the capital", "zz"]
ARGS = ["serve", "--config", "tiny", "--max-len", "128", "--max-batch", "2", "--token-budget", "16",
        "--chunk-tokens", "8"]


def serving(dp: int, *more: str):
    """``(service, uvicorn server, thread, base url)`` of ``vattention serve --dp dp`` (and ``more``
    options), started."""
    from jax_vattention.app.cli import build_parser
    from jax_vattention.app.commands.serve import build_service

    service = build_service(build_parser().parse_args([*ARGS, "--dp", str(dp), *more]))
    return (service, *serve_in_thread(service))


def stop(service, server, thread) -> None:
    from jax_vattention.app.server.lifecycle import close_engine

    server.should_exit = True
    thread.join(30)
    assert close_engine(service)


def answers(base: str) -> list[str]:
    """Greedy completions of every prompt, sent at once (8 requests, 2 slots a replica)."""
    client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=120)

    def one(prompt):
        return client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0).choices[0].text

    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
        return list(pool.map(one, PROMPTS))


REFERENCE: list[str] = []


def dp_server() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    service, server, thread, base = serving(1)
    try:
        reference = answers(base)
        REFERENCE[:] = reference
    finally:
        stop(service, server, thread)

    service, server, thread, base = serving(2)
    try:
        replicas = service.replicas
        devices = [next(iter(loop.engine.manager.cache.k[0].devices())) for loop in replicas.loops]
        assert devices == jax.devices()[:2], devices                   # one replica a device, disjoint
        for loop, device in zip(replicas.loops, devices):              # each replica's weights on its device
            weights = jax.tree_util.tree_leaves(nnx_state(loop.engine.model))
            assert all(leaf.devices() == {device} for leaf in weights), device
        got = answers(base)
        assert got == reference, (got, reference)
        assert all(count > 0 for count in replicas.routed), replicas.routed   # spread over both
        assert sum(replicas.routed) == len(PROMPTS)
        steps = [loop.engine.stats.steps for loop in replicas.loops]
        assert all(count > 1 for count in steps), steps                 # both engines computed

        families = {f.name: f for f in text_string_to_metric_families(httpx.get(base + "/metrics").text)}
        samples = {(s.name, s.labels.get("replica")): s.value for s in families["vattention:engine_steps"].samples}
        assert samples[("vattention:engine_steps_total", None)] == sum(steps), samples
        assert [samples[("vattention:engine_steps_total", str(i))] for i in range(2)] == steps, samples
        budget = {s.labels.get("replica"): s.value for s in families["vattention:kv_cache_pages_budget"].samples}
        assert budget[None] == budget["0"] + budget["1"], budget

        health = httpx.get(base + "/health").json()
        assert health["status"] == "ok" and len(health["replicas"]) == 2, health
        replicas.loops[1].unusable = "a test stopped replica 1"
        health = httpx.get(base + "/health")
        assert health.status_code == 200, health.text                  # replica 0 still serves
        assert "replica 1" not in health.json()["unusable_replicas"].get("0", "")
        assert health.json()["unusable_replicas"] == {"1": "a test stopped replica 1"}, health.json()
        routed = list(replicas.routed)
        assert answers(base) == reference
        assert replicas.routed[1] == routed[1] and replicas.routed[0] == routed[0] + len(PROMPTS)
        replicas.loops[0].unusable = "a test stopped replica 0"
        assert httpx.get(base + "/health").status_code == 503
        replicas.loops[0].unusable = replicas.loops[1].unusable = None
    finally:
        stop(service, server, thread)


def nnx_state(model):
    from flax import nnx

    return nnx.split(model)[1]


def dp2_tp2() -> None:
    """``--dp 2 --tp 2``: two replicas, each a ShardedCacheManager and a split model over its own 2
    devices, answering as ``--dp 1`` did."""
    import jax_vattention as jv

    service, server, thread, base = serving(2, "--tp", "2")
    try:
        groups = []
        for loop in service.replicas.loops:
            assert isinstance(loop.engine.manager, jv.ShardedCacheManager)
            group = list(loop.engine.manager.mesh.devices.flat)
            weights = jax.tree_util.tree_leaves(nnx_state(loop.engine.model))
            assert all(leaf.devices() == set(group) for leaf in weights), group
            groups.append(group)
        assert groups == [jax.devices()[:2], jax.devices()[2:]], groups
        got = answers(base)
        assert REFERENCE and got == REFERENCE, (got, REFERENCE)
        assert all(count > 0 for count in service.replicas.routed), service.replicas.routed
    finally:
        stop(service, server, thread)


def data_parallel_serving() -> None:
    """Both cases in one process: ``--dp 2 --tp 2`` is checked against ``--dp 1``'s answers."""
    dp_server()
    dp2_tp2()


CASES = ["data_parallel_serving"]

if __name__ == "__main__":
    assert len(jax.devices()) == 4, jax.devices()
    for name in sys.argv[1:] or CASES:
        try:
            globals()[name]()
            print(f"{name} OK", flush=True)
        except Exception:
            print(f"{name} FAILED\n{traceback.format_exc()}", flush=True)
