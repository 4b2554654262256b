"""Cases of one job over two processes (``jax.distributed`` on localhost, gloo collectives), one CPU
device each, and their single-process reference (two forced CPU devices).

``python tests/multiprocess_cases.py CASES PROCESS_ID PORT`` joins the job of two processes whose
coordinator listens on ``PORT`` as process ``PROCESS_ID`` and runs the cases (names, comma-separated);
``python tests/multiprocess_cases.py CASES reference`` runs them in one process over two forced
devices. Each prints ``RESULT`` and the cases' outcomes as JSON (by name);
``tests/test_multiprocess.py`` compares them.
"""

from __future__ import annotations

import json
import os
import sys
import time

CASE, WHERE = sys.argv[1], sys.argv[2]
if WHERE == "reference":
    os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS"),
                                                     "--xla_force_host_platform_device_count=2"]))

import dataclasses  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

TIMEOUT = 10
if WHERE != "reference":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{sys.argv[3]}", num_processes=2, process_id=int(WHERE),
                               initialization_timeout=60, heartbeat_timeout_seconds=TIMEOUT)

import jax_vattention as jv  # noqa: E402
from jax_vattention import _core  # noqa: E402
from jax_vattention.decode.generate import generate_in_manager  # noqa: E402
from jax_vattention.decode.mesh import shard_model, tp_mesh  # noqa: E402
from jax_vattention.engine import Engine, EngineConfig, Request  # noqa: E402
from jax_vattention.models.configs import get_config  # noqa: E402
from jax_vattention.models.llama import Llama  # noqa: E402

MODEL = dataclasses.replace(get_config("tiny"), num_heads=8, num_kv_heads=4)
PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], list(range(20, 60))]


def cache_config(layout: str, **overrides) -> jv.CacheConfig:
    settings = dict(num_layers=MODEL.num_layers, max_batch=4, max_len=96, kv_heads=MODEL.num_kv_heads,
                    head_dim=MODEL.head_dim, dtype=jnp.float32, layout=layout, budget_bytes=1 << 24)
    settings.update(overrides)
    return jv.CacheConfig(**settings)


def model():
    return shard_model(Llama(MODEL, rngs=nnx.Rngs(0)), tp_mesh(2))


def generate() -> dict:
    """``generate`` over the per-layer layout (the engine's case takes the interleaved one): each
    process holds one device's pages."""
    outcome = {}
    for layout in ("per_layer",):
        with jv.ShardedCacheManager(cache_config(layout), tp_mesh(2)) as manager:
            result = generate_in_manager(model(), manager, PROMPTS, max_new_tokens=16)
            outcome[layout] = result.tokens
            outcome[f"{layout} pages here"] = int(manager.stats()["mapped_pages"])
            outcome[f"{layout} devices here"] = len(manager.managers)
    return outcome


def engine_prefixes_and_preemption() -> dict:
    """The engine under prefix sharing (a fake driver whose aliased pages show the same bytes) and a
    budget that preempts, sampling included: every process runs the same plan."""
    system = list(range(100, 140))
    prompts = [(system + [5, 6, 7], 20), (system + [9, 10], 24), (system + list(range(200, 220)), 16),
               (list(range(30, 70)), 20)]
    fake = lambda device: _core.FakeDriver(4096, host_pages=True)  # noqa: E731
    config = cache_config("interleaved", budget_bytes=14 * 4096)
    with jv.ShardedCacheManager(config, tp_mesh(2), driver_factory=fake) as manager:
        engine = Engine(model(), manager, EngineConfig(token_budget=24, chunk_tokens=8, overlap=False))
        ids = [engine.submit(Request(prompt=p, max_new_tokens=n, temperature=0.8 * (i % 2), seed=i))
               for i, (p, n) in enumerate(prompts)]
        outputs = engine.run()
        return {"tokens": [outputs[i] for i in ids], "failed": sorted(engine.failed),
                "preemptions": engine.stats.preemptions, "shared_admissions": engine.stats.shared_admissions}


def a_process_dies() -> dict:
    """Process 1 dies after the first generation; process 0 goes on generating until JAX's
    coordination service ends it (within the heartbeat timeout)."""
    with jv.ShardedCacheManager(cache_config("interleaved"), tp_mesh(2)) as manager:
        model_ = model()
        generate_in_manager(model_, manager, PROMPTS, max_new_tokens=4)
        if WHERE == "1":
            print(f"DYING {time.time()}", flush=True)
            os._exit(3)
        started = time.monotonic()
        while time.monotonic() - started < 10 * TIMEOUT:
            generate_in_manager(model_, manager, PROMPTS, max_new_tokens=4)
    return {"survived": True}


CASES = {case.__name__: case for case in (generate, engine_prefixes_and_preemption, a_process_dies)}

if __name__ == "__main__":
    print("RESULT " + json.dumps({case: CASES[case]() for case in CASE.split(",")}), flush=True)
