"""Tensor-parallel cases on 4 forced CPU devices, run in their own process.

``python tests/tp_cases.py`` sets ``XLA_FLAGS=--xla_force_host_platform_device_count=4`` before
JAX is imported (the rest of the suite keeps its usual devices), runs every case and prints
``CASE OK`` or ``CASE FAILED`` with the traceback for each; ``tests/test_tensor_parallel.py``
runs it once and checks each case.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS"),
                                                 "--xla_force_host_platform_device_count=4"]))

import dataclasses  # noqa: E402
import functools  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import Mesh, PartitionSpec as P  # noqa: E402

import jax_vattention as jv  # noqa: E402
from jax_vattention import _core  # noqa: E402
from jax_vattention.generate import generate_in_manager  # noqa: E402
from jax_vattention.models.configs import get_config  # noqa: E402
from jax_vattention.models.llama import Llama  # noqa: E402
from jax_vattention.tensor_parallel import (generate_tp, generate_tp_in_manager, init_sharded,  # noqa: E402
                                            shard_model, tp_mesh)

MODEL = dataclasses.replace(get_config("tiny"), num_heads=8, num_kv_heads=4)  # 4 KV heads: TP 1, 2 and 4
PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], list(range(20, 60))]
NEW_TOKENS = 24


def cache_config(layout: str = "per_layer", kv_heads: int = 4) -> jv.CacheConfig:
    return jv.CacheConfig(num_layers=MODEL.num_layers, max_batch=4, max_len=96, kv_heads=kv_heads,
                          head_dim=MODEL.head_dim, dtype=jnp.float32, layout=layout, budget_bytes=1 << 24)


@functools.lru_cache(maxsize=None)
def model() -> Llama:
    return Llama(MODEL, rngs=nnx.Rngs(0))


@functools.lru_cache(maxsize=None)
def reference_tokens() -> list[list[int]]:
    with jv.CacheManager(cache_config()) as manager:
        return generate_in_manager(model(), manager, PROMPTS, max_new_tokens=NEW_TOKENS).tokens


def shard_pointers(cache: jv.KVCache) -> list[list[int]]:
    """Per buffer, the address of each device's shard, in device order."""
    return [[shard.data.unsafe_buffer_pointer() for shard in sorted(b.addressable_shards, key=lambda s: s.device.id)]
            for b in (*cache.k, *cache.v)]


def check_tp(count: int, layout: str) -> None:
    """TP ``count`` gives TP 1's greedy tokens; every shard stays at its device's reserved base."""
    mesh = tp_mesh(count)
    with jv.ShardedCacheManager(cache_config(layout), mesh) as manager:
        bases = [[m._core.buffer_bases()[i] for m in manager.managers] for i in range(manager.config.num_buffers)]
        assert shard_pointers(manager.cache) == bases
        shard_shape = manager.cache.k[0].addressable_shards[0].data.shape
        assert shard_shape[-2] == 4 // count, shard_shape
        tokens = generate_tp_in_manager(shard_model(model(), mesh), manager, PROMPTS,
                                        max_new_tokens=NEW_TOKENS).tokens
        assert tokens == reference_tokens(), (tokens, reference_tokens())
        assert shard_pointers(manager.cache) == bases
        assert manager.stats()["grow_calls"] == NEW_TOKENS - 1


def tokens_tp2_per_layer() -> None:
    check_tp(2, "per_layer")


def tokens_tp4_interleaved() -> None:
    check_tp(4, "interleaved")


def random_weights_straight_into_shards() -> None:
    """init_sharded gives the unsharded model's weights, each device holding only its share."""
    mesh = tp_mesh(2)
    sharded = init_sharded(Llama, MODEL, mesh, seed=0)
    wq = sharded.layers[0].attention.wq[...]
    assert np.array_equal(np.asarray(wq), np.asarray(model().layers[0].attention.wq[...]))
    assert wq.addressable_shards[0].data.shape == (MODEL.hidden_size, MODEL.num_heads // 2, MODEL.head_dim)
    w_down = sharded.layers[1].mlp.w_down[...]
    assert w_down.addressable_shards[1].data.shape == (MODEL.intermediate_size // 2, MODEL.hidden_size)
    assert sharded.embed[...].addressable_shards[1].data.shape == (MODEL.vocab_size, MODEL.hidden_size)


def pages_per_device_are_exact() -> None:
    """Every device's manager holds exactly what one manager of kv_heads / N heads holds."""
    for count in (2, 4):
        single = jv.CacheManager(cache_config(kv_heads=4 // count))
        sharded = jv.ShardedCacheManager(cache_config(), tp_mesh(count))
        for manager in (single, sharded):
            assert manager.alloc(10) == 0
            assert manager.alloc(70, lookahead=5) == 1
            manager.grow(3)
            manager.free(0)
            assert manager.alloc(33) == 0
            manager.reclaim()
        expected = {k: v for k, v in single.stats().items() if not k.endswith("seconds")}
        stats = sharded.stats()
        for device_stats in stats["per_device"]:
            assert {k: v for k, v in device_stats.items() if not k.endswith("seconds")} == expected
        assert stats["mapped_pages"] == count * expected["mapped_pages"]
        assert stats["mapped_bytes"] == count * expected["mapped_bytes"]
        assert stats["used_tokens"] == expected["used_tokens"]
        assert np.array_equal(sharded.lengths(), single.lengths())
        single.close()
        sharded.close()


def a_copied_shard_gets_the_donation_error() -> None:
    """The mapping op on a copied (not donated) shard names the copy instead of growing."""
    mesh = tp_mesh(2)
    with jv.ShardedCacheManager(cache_config(), mesh) as manager:
        manager.alloc(4)
        spec = manager.cache.k[0].sharding.spec
        specs = manager.cache.replace(k=(spec,) * 2, v=(spec,) * 2)
        step = jax.jit(jax.shard_map(lambda cache: jv.grow(cache, 1), mesh=mesh, in_specs=(specs,),
                                     out_specs=specs, check_vma=False))
        try:
            jax.block_until_ready(step(manager.cache))
        except jax.errors.JaxRuntimeError as error:
            assert "no device's reserved address" in str(error) and "Donate" in str(error), str(error)
        else:
            raise AssertionError("a copied cache shard was grown")
        assert manager.lengths()[0] == 4


def bad_meshes_and_head_counts() -> None:
    def refused(call, words):
        try:
            call()
        except ValueError as error:
            assert words in str(error), (words, str(error))
        else:
            raise AssertionError(f"accepted: expected an error with {words!r}")

    refused(lambda: jv.ShardedCacheManager(cache_config(kv_heads=2), tp_mesh(4)), "kv_heads=2 does not divide")
    refused(lambda: jv.ShardedCacheManager(cache_config(), Mesh(np.array(jax.devices()).reshape(2, 2), ("a", "b"))),
            "one-dimensional mesh")
    refused(lambda: jv.ShardedCacheManager(cache_config(), tp_mesh(2), axis="model"), "no axis 'model'")
    refused(lambda: tp_mesh(5), "only 4 are available")
    refused(lambda: tp_mesh(0), "positive integer")
    refused(lambda: shard_model(Llama(get_config("tiny"), rngs=nnx.Rngs(0)), tp_mesh(4)), "num_kv_heads=2")
    with jv.ShardedCacheManager(cache_config(), tp_mesh(2)) as manager:
        manager.alloc(3)
        refused(lambda: generate_tp(model(), manager.cache, [[1, 2, 3]]), "needs a model from shard_model")
        refused(lambda: generate_tp(shard_model(model(), tp_mesh(2)), manager.cache, [[1, 2, 3]] * 5),
                "5 prompts")


def a_failure_on_a_later_device_poisons_the_group() -> None:
    """Out of pages on device 0 changes nothing anywhere; a driver failure on device 1 after device 0
    succeeded leaves them disagreeing, so the group is poisoned, and still closes."""
    drivers = {}

    def fake(device):
        drivers[device.id] = _core.FakeDriver(64 * 1024)
        return drivers[device.id]

    page = 64 * 1024
    short = jv.ShardedCacheManager(dataclasses.replace(cache_config(), budget_bytes=2 * page), tp_mesh(2),
                                   driver_factory=fake)
    try:
        short.alloc(10)  # a page in each of 4 buffers: beyond a 2-page budget
    except jv.OutOfPagesError:
        pass
    else:
        raise AssertionError("a prompt beyond the budget was allocated")
    assert short.stats()["mapped_pages"] == 0 and not short.active().any()
    short.close()
    manager = jv.ShardedCacheManager(dataclasses.replace(cache_config(), budget_bytes=8 * page), tp_mesh(2),
                                     driver_factory=fake)
    drivers[1].fail_on("map", 1)
    try:
        manager.alloc(10)
    except jv.DriverError:
        pass
    else:
        raise AssertionError("the injected failure did not surface")
    try:
        manager.alloc(1)
    except jv.CacheManagerPoisonedError as error:
        assert "no longer agree" in str(error)
    else:
        raise AssertionError("the group was not poisoned")
    assert manager.stats()["poisoned"]
    manager.close()
    assert all(driver.mappings() == {} and driver.handles() == [] for driver in drivers.values())


def cli_generate_tp() -> None:
    """``vattention generate --tp 2`` prints the tokens of ``--tp 1``; a degree beyond the devices is refused."""
    import contextlib
    import io

    from jax_vattention import cli

    def run(*options) -> tuple[int, list[str]]:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main(["generate", "--batch", "2", "--rounds", "1", "--max-new-tokens", "6",
                             "--max-len", "64", *options])
        return code, [line for line in (out.getvalue() + err.getvalue()).splitlines() if " new: ids " in line
                      or "error" in line]

    code, one = run("--tp", "1")
    assert code == 0 and len(one) == 2, one
    code, two = run("--tp", "2")
    assert code == 0 and two == one, (two, one)
    code, refused = run("--tp", "5")
    assert code == 2 and "--tp must be between 1 and the 4 devices" in refused[0], refused


CASES = ["tokens_tp2_per_layer", "tokens_tp4_interleaved", "random_weights_straight_into_shards",
         "pages_per_device_are_exact", "a_copied_shard_gets_the_donation_error", "bad_meshes_and_head_counts",
         "a_failure_on_a_later_device_poisons_the_group", "cli_generate_tp"]

if __name__ == "__main__":
    assert len(jax.devices()) == 4, jax.devices()
    for name in sys.argv[1:] or CASES:
        try:
            globals()[name]()
            print(f"{name} OK", flush=True)
        except Exception:
            print(f"{name} FAILED\n{traceback.format_exc()}", flush=True)
