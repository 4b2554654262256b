"""Tensor-parallel GPU cases (issue 13), each in its own process: ``python tests/gpu_tp_cases.py CASE``
prints ``CASE OK`` on success. ``tests/test_gpu_tensor_parallel.py`` runs them on a machine with at
least 2 GPUs; ``decode_step_timing`` is the benchmark (it prints its figures, and is run by
``scripts/gpu_check.sh tp``).

Models are the Llama-3-8B shape with random bfloat16 weights, split over the first 2 GPUs.
"""

from __future__ import annotations

import functools
import gc
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

import jax_vattention as jv
from jax_vattention.cache.mapping_op import grow
from jax_vattention.attention import resolve_backend
from jax_vattention.decode.generate import generate_in_manager
from jax_vattention.models.configs import get_config
from jax_vattention.models.llama import Llama
from jax_vattention.decode.mesh import init_sharded, tp_mesh

MiB = 1 << 20
GiB = 1 << 30
MODEL = get_config("llama-3-8b").replace(dtype="bfloat16")


def cache_config(max_batch: int, max_len: int, budget: int, layout: str = "interleaved") -> jv.CacheConfig:
    return jv.CacheConfig(num_layers=MODEL.num_layers, max_batch=max_batch, max_len=max_len,
                          kv_heads=MODEL.num_kv_heads, head_dim=MODEL.head_dim, dtype=jnp.bfloat16,
                          layout=layout, budget_bytes=budget)


def free_bytes(device: jax.Device) -> int:
    """The device's free memory, from the CUDA driver (cuda-python), independent of our manager."""
    from cuda.bindings import driver as cuda

    cuda.cuInit(0)
    _, handle = cuda.cuDeviceGet(device.local_hardware_id)
    _, context = cuda.cuDevicePrimaryCtxRetain(handle)
    cuda.cuCtxPushCurrent(context)
    try:
        error, free, _ = cuda.cuMemGetInfo()
        assert error == cuda.CUresult.CUDA_SUCCESS, error
        return free
    finally:
        cuda.cuCtxPopCurrent()
        cuda.cuDevicePrimaryCtxRelease(handle)


def llama8b_tp2_matches_tp1() -> None:
    """TP 2 gives TP 1's greedy tokens up to the first bf16 near tie, and logits close up to it."""
    prompts = [list(range(100, 100 + n)) for n in (7, 300, 45, 1000)]
    options = dict(max_new_tokens=32, return_logits=True)
    for layout in ("interleaved",):  # the default layout; one pass keeps the case within a few minutes
        model = Llama(MODEL, rngs=nnx.Rngs(0))
        with jv.CacheManager(cache_config(4, 1100, 4 * GiB, layout)) as manager:
            reference = generate_in_manager(model, manager, prompts, **options)
        del model
        gc.collect()
        mesh = tp_mesh(2)
        with jv.ShardedCacheManager(cache_config(4, 1100, 2 * GiB, layout), mesh) as manager:
            got = generate_in_manager(init_sharded(Llama, MODEL, mesh, seed=0), manager, prompts, **options)
        gc.collect()
        compared = 0
        for tokens, want, logits, want_logits in zip(got.tokens, reference.tokens, got.logits, reference.logits):
            same = next((i for i, (a, b) in enumerate(zip(tokens, want)) if a != b), len(tokens))
            steps = min(same + 1, len(tokens))  # bf16 sums in another order may break a near tie
            np.testing.assert_allclose(logits[:steps], want_logits[:steps], atol=0.1, rtol=0.05)
            compared += same
        print(f"{layout}: {compared} of {sum(map(len, got.tokens))} tokens equal before the first tie", flush=True)


def free_memory_per_device() -> None:
    """Each device's free memory moves by exactly the pages its manager created, and comes back."""
    mesh = tp_mesh(2)
    devices = list(mesh.devices.flat)
    with jv.ShardedCacheManager(cache_config(16, 8192, 8 * GiB), mesh) as manager:
        before = [free_bytes(d) for d in devices]
        rng = np.random.default_rng(0)
        for length in rng.integers(1, 8192, size=12):
            manager.alloc(int(length))
        stats = manager.stats()
        for device, was, device_stats in zip(devices, before, stats["per_device"]):
            assert was - free_bytes(device) == device_stats["created_pages"] * manager.page_bytes, device
            assert device_stats["mapped_pages"] == stats["per_device"][0]["mapped_pages"]
        print(f"per device: {stats['per_device'][0]['created_pages'] * manager.page_bytes / MiB:,.0f} MiB mapped, "
              f"free memory moved by the same", flush=True)
        for slot in range(12):
            manager.free(slot)
        manager.reclaim()
        manager.trim()
        jax.effects_barrier()
        assert [free_bytes(d) for d in devices] == before


def _decode_step(graphdef, backend, state, cache, last, lengths, slots):
    """One decode step: map, then the model on one token per row. last, lengths, slots int32 [B]."""
    model = nnx.merge(graphdef, state)
    cache = grow(cache, tokens=1)
    logits, cache = model(last[:, None], lengths[:, None], cache, start=lengths, count=jnp.ones_like(lengths),
                          slots=slots, backend=backend, logit_index=jnp.zeros_like(lengths))  # [B, V]
    return jnp.argmax(logits, axis=-1).astype(jnp.int32), cache  # [B]


def _time_steps(step, manager, state, batch: int, context: int, steps: int) -> float:
    """Median seconds of a decode step at ``batch`` rows of ``context`` tokens."""
    for _ in range(batch):
        manager.alloc(context)
    manager.reserve_growth(steps + 1)
    lengths = jnp.full((batch,), context, jnp.int32)
    last, slots = jnp.zeros((batch,), jnp.int32), jnp.arange(batch, dtype=jnp.int32)
    cache = manager.cache
    last, cache = step(state, cache, last, lengths, slots)  # compiles
    jax.block_until_ready(last)
    times = []
    for i in range(steps):
        started = time.perf_counter()
        last, cache = step(state, cache, last, lengths + 1 + i, slots)
        jax.block_until_ready(last)
        times.append(time.perf_counter() - started)
    manager.cache = cache
    return float(np.median(times))


def decode_step_timing(batch: int = 32, context: int = 4096, steps: int = 20) -> None:
    """Llama-3-8B shape, bf16: the decode step at TP 1 and TP 2 (target: TP 2 <= 0.60x TP 1)."""
    budget = batch * (context + 64) * MODEL.num_layers * 2 * MODEL.num_kv_heads * MODEL.head_dim * 2 + 2 * GiB
    config = cache_config(batch, context + 64, budget)
    model = Llama(MODEL, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    with jv.CacheManager(config) as manager:
        backend = resolve_backend(None, manager.cache)
        step = jv.cache_jit(functools.partial(_decode_step, graphdef, backend))
        one = _time_steps(step, manager, state, batch, context, steps)
    del model, state
    gc.collect()
    mesh = tp_mesh(2)
    sharded = init_sharded(Llama, MODEL, mesh, seed=0)
    graphdef, state = nnx.split(sharded)
    with jv.ShardedCacheManager(cache_config(batch, context + 64, budget // 2 + GiB), mesh) as manager:
        spec = manager.cache.k[0].sharding.spec
        specs = manager.cache.replace(k=(spec,) * len(manager.cache.k), v=(spec,) * len(manager.cache.v))
        body = jax.shard_map(functools.partial(_decode_step, graphdef, backend), mesh=mesh,
                             in_specs=(sharded.partition_specs("tp", 2), specs, P(), P(), P()), out_specs=(P(), specs),
                             check_vma=False)
        two = _time_steps(jv.cache_jit(body), manager, state, batch, context, steps)
    print(f"decode step, Llama-3-8B shape bf16, batch {batch}, context {context}, {backend}, "
          f"{jax.devices()[0].device_kind}: TP 1 {one * 1e3:.2f} ms, TP 2 {two * 1e3:.2f} ms "
          f"({two / one:.2f}x TP 1)", flush=True)


def engine_tp2_matches_tp1() -> None:
    """The engine on 2 GPUs (tiny model, float32, default kernels: mixed steps of prefill chunks and
    decodes) streams the tokens it streams on one, and each device's pages are the same."""
    from jax_vattention.engine import Engine, EngineConfig, Request
    from jax_vattention.models.configs import get_config

    config = get_config("tiny")
    prompts = [(list(range(3, 3 + n)), 24) for n in (5, 90, 33, 200, 17, 64)]

    def run(manager, model):
        engine = Engine(model, manager, EngineConfig(token_budget=64, chunk_tokens=16))
        ids = [engine.submit(Request(prompt=p, max_new_tokens=n)) for p, n in prompts]
        outputs = engine.run()
        return [outputs[i] for i in ids]

    cache = jv.CacheConfig(num_layers=config.num_layers, max_batch=4, max_len=320, kv_heads=config.num_kv_heads,
                           head_dim=config.head_dim, dtype=jnp.float32, budget_bytes=256 * MiB)
    model = Llama(config, rngs=nnx.Rngs(0))
    with jv.CacheManager(cache) as manager:
        want = run(manager, model)
    mesh = tp_mesh(2)
    with jv.ShardedCacheManager(cache, mesh) as manager:
        got = run(manager, init_sharded(Llama, config, mesh, seed=0))
        per_device = manager.stats()["per_device"]
        assert per_device[0]["mapped_pages"] == per_device[1]["mapped_pages"] > 0
    assert got == want, (got, want)
    print(f"engine at TP 2: {sum(map(len, got))} tokens equal to TP 1's; {per_device[0]['mapped_pages']} pages "
          f"mapped on each device", flush=True)


CASES = ["llama8b_tp2_matches_tp1", "free_memory_per_device", "decode_step_timing", "engine_tp2_matches_tp1"]

if __name__ == "__main__":
    name = sys.argv[1]
    if name not in CASES:
        raise SystemExit(f"unknown case {name!r}; cases: {CASES}")
    if len(jax.devices("gpu")) < 2:
        raise SystemExit("needs at least 2 GPUs")
    globals()[name]()
    print(f"{name} OK")
