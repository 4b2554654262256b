"""Tensor-parallel cases on 4 forced CPU devices, run in their own process.

``python tests/tp_cases.py`` sets ``XLA_FLAGS=--xla_force_host_platform_device_count=4`` before
JAX is imported (the rest of the suite keeps its usual devices), runs the cases named on its
command line (default: all) and prints ``CASE OK`` or ``CASE FAILED`` with the traceback for each;
``tests/test_tensor_parallel.py`` runs it once per group of cases and checks each case.
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
from jax.sharding import Mesh  # noqa: E402

import jax_vattention as jv  # noqa: E402
from jax_vattention import _core  # noqa: E402
from jax_vattention.models.configs import get_config  # noqa: E402
from jax_vattention.models.llama import Llama  # noqa: E402
from jax_vattention.decode.generate import generate, generate_in_manager  # noqa: E402
from jax_vattention.decode.mesh import init_sharded, shard_model, tp_mesh  # noqa: E402

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
        tokens = generate_in_manager(shard_model(model(), mesh), manager, PROMPTS,
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
    w_qkv = sharded.layers[0].attention.w_qkv[...]
    assert np.array_equal(np.asarray(w_qkv), np.asarray(model().layers[0].attention.w_qkv[...]))
    groups = MODEL.num_heads // MODEL.num_kv_heads
    assert w_qkv.addressable_shards[0].data.shape == (MODEL.hidden_size, MODEL.num_kv_heads // 2, groups + 2,
                                                      MODEL.head_dim)
    w_gate_up = sharded.layers[0].mlp.w_gate_up[...]
    assert w_gate_up.addressable_shards[1].data.shape == (MODEL.hidden_size, 2, MODEL.intermediate_size // 2)
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
        refused(lambda: generate(shard_model(model(), tp_mesh(2)), manager.cache, [[1, 2, 3]] * 5), "5 prompts")
    with jv.CacheManager(cache_config()) as single:
        single.alloc(3)
        refused(lambda: generate(shard_model(model(), tp_mesh(2)), single.cache, [[1, 2, 3]]),
                "the cache is one device's")


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


def a_failed_prefix_admission_on_a_later_device_poisons_the_group() -> None:
    """A driver call of a prefix admission (``alloc_prefix``: the cached pages mapped, the rest created)
    that fails on device 1 after device 0 admitted leaves them disagreeing: the group is poisoned, and
    closing it gives every page back on both devices."""
    from jax_vattention.cache.prefix import page_keys

    prompt = list(range(100, 150))
    for operation in ("create", "map", "set_access"):
        drivers = {}

        def fake(device):
            drivers[device.id] = _core.FakeDriver(4096, host_pages=True)
            return drivers[device.id]

        manager = jv.ShardedCacheManager(cache_config("interleaved"), tp_mesh(2), driver_factory=fake)
        keys = page_keys(prompt[:-1], manager.tokens_per_page)
        first = manager.alloc(len(prompt))
        assert manager.publish(first, prompt) == len(keys) == 3
        drivers[1].fail_on(operation, 1)
        try:
            manager.alloc_prefix(keys, len(prompt), lookahead=8)
        except jv.DriverError:
            pass
        else:
            raise AssertionError(f"the injected {operation} failure did not surface")
        assert manager.stats()["poisoned"], operation
        manager.close()
        assert all(driver.mappings() == {} and driver.handles() == [] for driver in drivers.values()), operation


def forks_at_tp2() -> None:
    """A fork over a ShardedCacheManager (fake drivers whose aliased pages show the same bytes, as
    CUDA's do): the same new slot, shared pages and copied page on both devices, and the child's K
    and V are its parent's; a copy that fails on device 1 poisons the group, and closing it gives
    every page back on both devices."""
    prompt = PROMPTS[2]                             # 40 tokens: 2 full pages of 16 on each device, and 8
    mesh = tp_mesh(2)
    drivers = {}

    def fake(device):
        drivers[device.id] = _core.FakeDriver(4096, host_pages=True)
        return drivers[device.id]

    with jv.ShardedCacheManager(cache_config("interleaved"), mesh, driver_factory=fake) as manager:
        parent = manager.alloc(len(prompt))
        _, manager.cache = generate(shard_model(model(), mesh), manager.cache, [prompt], slots=[parent],
                                    max_new_tokens=1)
        child = manager.fork(parent)
        assert list(manager.lengths()[[parent, child]]) == [40, 40]
        for shard in manager.managers:
            view = shard.page_manager.view()
            assert view["slots"][child][:2] == view["slots"][parent][:2]
            assert view["slots"][child][2] != view["slots"][parent][2]
        k, v = (np.asarray(buffers[0][:, :40]) for buffers in (manager.cache.k, manager.cache.v))
        assert np.array_equal(k[child], k[parent]) and np.array_equal(v[child], v[parent])
        assert np.abs(k[parent]).sum() > 0
        per_device = manager.stats()["per_device"]
        assert per_device[0]["forked_pages"] == per_device[1]["forked_pages"] == 2 * manager.config.num_buffers
    drivers.clear()
    manager = jv.ShardedCacheManager(cache_config("interleaved"), mesh, driver_factory=fake)
    parent = manager.alloc(len(prompt))
    drivers[1].fail_on("copy", 1)
    try:
        manager.fork(parent)
    except jv.DriverError:
        pass
    else:
        raise AssertionError("the injected copy failure did not surface")
    assert manager.stats()["poisoned"]
    manager.close()
    assert all(driver.mappings() == {} and driver.handles() == [] for driver in drivers.values())


def cli_generate_tp() -> None:
    """``vattention generate --tp 2`` prints the tokens of ``--tp 1``; a degree beyond the devices is refused."""
    import contextlib
    import io

    from jax_vattention.app import cli

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


def engine_tokens(manager, **config) -> list[list[int]]:
    """The engine's greedy tokens for ENGINE_PROMPTS over ``manager`` (a long prompt takes several
    prefill chunks, and decodes run beside them in mixed steps)."""
    from jax_vattention.engine import Engine, EngineConfig, Request

    engine = Engine(model(), manager, EngineConfig(token_budget=24, chunk_tokens=8, **config))
    ids = [engine.submit(Request(prompt=p, max_new_tokens=n)) for p, n in ENGINE_PROMPTS]
    outputs = engine.run()
    mixed = sum(1 for r in engine.stats.records if r.chunk_tokens and r.decodes)
    assert mixed >= 3 and engine.runner.traces == 2, (mixed, engine.runner.traces)
    return [outputs[i] for i in ids]


ENGINE_PROMPTS = [([5, 6, 7, 8, 9], 12), ([10, 11, 12], 16), (list(range(20, 60)), 10), (list(range(70, 95)), 8),
                  ([3] * 30, 6)]


@functools.lru_cache(maxsize=None)
def engine_reference() -> list[list[int]]:
    with jv.CacheManager(cache_config()) as manager:
        return engine_tokens(manager)


class RecordingManager:
    """A :class:`ShardedCacheManager` whose host-side page operations are logged, to replay them on
    one device's manager of ``kv_heads / N`` heads."""

    OPERATIONS = ("alloc", "free", "grow_slots", "reclaim", "prefetch", "reserve_growth", "grow", "trim")

    def __init__(self, manager):
        self.log = []
        for name in self.OPERATIONS:
            method = getattr(manager, name)

            def logged(*args, _name=name, _method=method, **kwargs):
                self.log.append((_name, args, kwargs))
                return _method(*args, **kwargs)
            setattr(manager, name, logged)


def engine_tp2_and_tp4_give_tp1_tokens_with_exact_pages() -> None:
    """The engine over a ShardedCacheManager (TP 2 per-layer without overlap, TP 4 interleaved with
    it) streams TP 1's greedy tokens through mixed steps; each device's manager then holds exactly
    what one manager of kv_heads / N heads holds after the same page operations."""
    for count, layout, overlap in ((2, "per_layer", False), (4, "interleaved", True)):
        with jv.ShardedCacheManager(cache_config(layout), tp_mesh(count)) as manager:
            recording = RecordingManager(manager)
            tokens = engine_tokens(manager, overlap=overlap)
            assert tokens == engine_reference(), (count, tokens, engine_reference())
            with jv.CacheManager(cache_config(layout, kv_heads=4 // count)) as single:
                for name, args, kwargs in recording.log:
                    getattr(single, name)(*args, **kwargs)
                expected = {k: v for k, v in single.stats().items() if not k.endswith("seconds")}
                stats = manager.stats()
                assert expected["mapped_pages"] > 0
                for device_stats in stats["per_device"]:
                    assert {k: v for k, v in device_stats.items() if not k.endswith("seconds")} == expected
                for device_manager in manager.managers:
                    assert np.array_equal(device_manager.mapped_pages(), single.mapped_pages())
                    assert np.array_equal(device_manager.lengths(), single.lengths())


def engine_tp2_speculates_to_tp1_plain_tokens() -> None:
    """At TP 2 the verification rows run inside shard_map like the rest of the step: prompt lookup's
    greedy tokens are TP 1's plain ones, with proposals accepted and rejected."""
    from jax_vattention.engine import Engine, EngineConfig, Request

    with jv.ShardedCacheManager(cache_config(), tp_mesh(2)) as manager:
        engine = Engine(model(), manager, EngineConfig(token_budget=24, chunk_tokens=8, speculate="ngram"))
        ids = [engine.submit(Request(prompt=p, max_new_tokens=n)) for p, n in ENGINE_PROMPTS]
        outputs = engine.run()
        assert [outputs[i] for i in ids] == engine_reference(), ([outputs[i] for i in ids], engine_reference())
        stats = engine.stats
        assert 0 < stats.accepted_tokens < stats.proposed_tokens, (stats.accepted_tokens, stats.proposed_tokens)
        assert manager.stats()["active_slots"] == 0


def engine_tp2_samples_as_tp1_with_every_knob() -> None:
    """Seeded sampling, penalties, logit_bias, min_tokens and log-probabilities through the sharded
    step (the sampler's state whole on every device): TP 2 streams TP 1's tokens and log-probabilities."""
    from jax_vattention.engine import Engine, EngineConfig, Request

    knobs = [dict(temperature=0.9, seed=3, repetition_penalty=1.4, logprobs=2, prompt_logprobs=1),
             dict(presence_penalty=0.7, frequency_penalty=0.4, logit_bias={9: 3.0}, logprobs=0),
             dict(temperature=1.1, seed=4, min_p=0.05, top_k=30, min_tokens=3, stop_tokens=(1,))]

    def run(manager):
        engine = Engine(model(), manager, EngineConfig(token_budget=24, chunk_tokens=8))
        ids = [engine.submit(Request(prompt=p, max_new_tokens=n, **k)) for (p, n), k in zip(ENGINE_PROMPTS, knobs)]
        events = [e for e in engine.stream()]
        assert not engine.failed
        return [[(e.token, e.logprobs) for e in events if e.request_id == i] for i in ids]

    with jv.CacheManager(cache_config()) as single:
        want = run(single)
    with jv.ShardedCacheManager(cache_config(), tp_mesh(2)) as manager:
        got = run(manager)
    assert [[t for t, _ in r] for r in got] == [[t for t, _ in r] for r in want], (got, want)
    for request_got, request_want in zip(got, want):
        for (_, a), (_, b) in zip(request_got, request_want):
            assert (a is None) == (b is None) and (a is None or abs(a.logprob - b.logprob) < 1e-4), (a, b)


def engine_shares_prefixes_at_tp2() -> None:
    """Prefix sharing over a ShardedCacheManager (a fake driver whose aliased pages show the same bytes,
    as CUDA's do): every device maps the same cached pages into the same slots, and the engine streams
    the tokens of one device's engine that shares nothing."""
    from jax_vattention.engine import Engine, EngineConfig, Request

    system = list(range(100, 140))
    prompts = [(system + [5, 6, 7], 8), (system + [9, 10], 8), (system + list(range(200, 220)), 6)]

    def run(manager, **config):
        engine = Engine(model(), manager, EngineConfig(token_budget=24, chunk_tokens=8, **config))
        ids = [engine.submit(Request(prompt=p, max_new_tokens=n)) for p, n in prompts]
        outputs = engine.run()
        return [outputs[i] for i in ids], engine.stats

    with jv.CacheManager(cache_config("interleaved")) as single:
        want, _ = run(single, prefix_sharing=False)
    fake = lambda device: _core.FakeDriver(4096, host_pages=True)  # noqa: E731
    with jv.ShardedCacheManager(cache_config("interleaved"), tp_mesh(2), driver_factory=fake) as manager:
        assert manager.tokens_per_page == 16
        got, stats = run(manager)
        per_device = manager.stats()["per_device"]
    assert got == want, (got, want)
    assert stats.shared_admissions >= 2 and stats.shared_tokens >= 2 * 32, stats
    assert per_device[0]["cached_pages"] == per_device[1]["cached_pages"] > 0, per_device


def engine_refuses_a_mismatched_model() -> None:
    """A model split over another axis than the cache's, or a split model over one device's cache."""
    from jax_vattention.engine import Engine

    mesh = tp_mesh(2)
    with jv.CacheManager(cache_config()) as single:
        try:
            Engine(shard_model(model(), mesh), single)
        except ValueError as error:
            assert "one device's" in str(error), str(error)
        else:
            raise AssertionError("a split model ran over one device's cache")
    other = Mesh(np.array(jax.devices()[:2]), ("model",))
    with jv.ShardedCacheManager(cache_config(), mesh) as manager:
        try:
            Engine(shard_model(model(), other), manager)
        except ValueError as error:
            assert "axis 'model'" in str(error), str(error)
        else:
            raise AssertionError("a model split over another axis was accepted")


def write_checkpoint(directory: str) -> None:
    """A tiny Llama checkpoint of MODEL's shape, written with safetensors (float32, two files)."""
    import json

    from safetensors.numpy import save_file

    d, f, n, k, h, v = (MODEL.hidden_size, MODEL.intermediate_size, MODEL.num_heads, MODEL.num_kv_heads,
                        MODEL.head_dim, MODEL.vocab_size)
    rng = np.random.default_rng(1)
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,), "lm_head.weight": (v, d)}
    for i in range(MODEL.num_layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
                       p + "self_attn.q_proj.weight": (n * h, d), p + "self_attn.k_proj.weight": (k * h, d),
                       p + "self_attn.v_proj.weight": (k * h, d), p + "self_attn.o_proj.weight": (d, n * h),
                       p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
                       p + "mlp.down_proj.weight": (d, f)})
    tensors = {name: (rng.normal(size=shape) / np.sqrt(shape[-1])).astype(np.float32) for name, shape in shapes.items()}
    names = sorted(tensors)
    files = {"model-1.safetensors": names[:len(names) // 2], "model-2.safetensors": names[len(names) // 2:]}
    for file, members in files.items():
        save_file({name: tensors[name] for name in members}, os.path.join(directory, file))
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as out:
        json.dump({"weight_map": {name: file for file, members in files.items() for name in members}}, out)
    with open(os.path.join(directory, "config.json"), "w") as out:
        json.dump(dict(model_type="llama", vocab_size=v, hidden_size=d, intermediate_size=f,
                       num_hidden_layers=MODEL.num_layers, num_attention_heads=n, num_key_value_heads=k, head_dim=h,
                       max_position_embeddings=512, torch_dtype="float32"), out)


def checkpoint_straight_into_shards() -> None:
    """A checkpoint loaded over a mesh equals the one loaded whole, every device holding only its
    share of each split weight; TP 2 generates TP 1's tokens from it, in the library and the CLI."""
    import contextlib
    import io
    import tempfile

    from jax_vattention.app import cli
    from jax_vattention.models.hf_loader import load_model

    with tempfile.TemporaryDirectory() as directory:
        write_checkpoint(directory)
        whole = load_model(directory)
        for count in (2, 4):
            sharded = load_model(directory, mesh=tp_mesh(count))
            assert sharded.tp_axis == "tp"
            for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(nnx.state(whole)),
                                         jax.tree_util.tree_leaves_with_path(nnx.state(sharded))):
                assert np.array_equal(np.asarray(a), np.asarray(b)), path
            w_qkv = sharded.layers[1].attention.w_qkv[...]
            shard = (MODEL.hidden_size, 4 // count, 2 + 2, MODEL.head_dim)
            assert [s.data.shape for s in w_qkv.addressable_shards] == [shard] * count
            wo = sharded.layers[0].attention.wo[...]
            assert wo.addressable_shards[-1].data.shape == (8 // count, MODEL.head_dim, MODEL.hidden_size)
            w_down = sharded.layers[0].mlp.w_down[...]
            assert w_down.addressable_shards[0].data.shape == (MODEL.intermediate_size // count, MODEL.hidden_size)
        with jv.CacheManager(cache_config()) as manager:
            want = generate_in_manager(whole, manager, PROMPTS, max_new_tokens=12).tokens
        with jv.ShardedCacheManager(cache_config(), tp_mesh(2)) as manager:
            got = generate_in_manager(load_model(directory, mesh=tp_mesh(2)), manager, PROMPTS,
                                      max_new_tokens=12).tokens
        assert got == want, (got, want)

        def run(*options) -> tuple[int, list[str]]:
            out = io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                code = cli.main(["generate", "--model", directory, "--batch", "2", "--rounds", "1",
                                 "--max-new-tokens", "6", "--max-len", "64", *options])
            return code, [line for line in out.getvalue().splitlines() if " new: " in line or "error" in line]

        code, one = run("--tp", "1")
        assert code == 0 and len(one) == 2, one
        assert run("--tp", "2") == (0, one)


def families_tp2_give_tp1_tokens() -> None:
    """Qwen 2 (q/k/v biases split with their heads, a window in its top layer) and Gemma 3 (q/k
    norms, sandwich norms, GeGLU, windows) loaded straight into shards: TP 2 generates TP 1's tokens
    through the virtual cache."""
    import tempfile

    from jax_vattention.models.hf_loader import load_model
    from random_checkpoints import write_random_checkpoint

    shape = dict(vocab_size=MODEL.vocab_size, hidden_size=MODEL.hidden_size, intermediate_size=MODEL.intermediate_size,
                 num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4, head_dim=MODEL.head_dim,
                 max_position_embeddings=512, torch_dtype="float32")
    families = [dict(model_type="qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=1,
                     attention_bias=True),
                dict(model_type="gemma3_text", sliding_window=8, sliding_window_pattern=2)]
    for family in families:
        with tempfile.TemporaryDirectory() as directory:
            write_random_checkpoint(directory, {**shape, **family})
            whole = load_model(directory)
            sharded = load_model(directory, mesh=tp_mesh(2))
            for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(nnx.state(whole)),
                                         jax.tree_util.tree_leaves_with_path(nnx.state(sharded))):
                assert np.array_equal(np.asarray(a), np.asarray(b)), path
            if whole.config.qkv_bias:
                b_qkv = sharded.layers[0].attention.b_qkv[...]
                assert [s.data.shape for s in b_qkv.addressable_shards] == [(2, 4, MODEL.head_dim)] * 2
            with jv.CacheManager(cache_config()) as manager:
                want = generate_in_manager(whole, manager, PROMPTS, max_new_tokens=12).tokens
            with jv.ShardedCacheManager(cache_config(), tp_mesh(2)) as manager:
                got = generate_in_manager(sharded, manager, PROMPTS, max_new_tokens=12).tokens
            assert got == want, (family["model_type"], got, want)


def fused_checkpoint_weights_per_device() -> None:
    """Over a mesh, each device's blocks of ``w_qkv`` and ``w_gate_up`` equal the whole load's and
    are read from the checkpoint's rows of that device's KV heads and MLP columns only: no read of
    ``q_proj``, ``k_proj``, ``v_proj``, ``gate_proj`` or ``up_proj`` spans more than one device's share."""
    import tempfile

    import safetensors

    from jax_vattention.models.hf_loader import load_model

    reads: list[tuple[str, tuple[slice, ...]]] = []
    real_open = safetensors.safe_open

    class RecordingSlice:
        def __init__(self, name, stored):
            self.name, self.stored = name, stored

        def get_shape(self):
            return self.stored.get_shape()

        def __getitem__(self, index):
            reads.append((self.name, index))
            return self.stored[index]

    class RecordingFile:
        def __init__(self, *args, **kwargs):
            self.file = real_open(*args, **kwargs)

        def __enter__(self):
            self.opened = self.file.__enter__()
            return self

        def __exit__(self, *exc):
            return self.file.__exit__(*exc)

        def get_slice(self, name):
            return RecordingSlice(name, self.opened.get_slice(name))

    d, f, k, h = MODEL.hidden_size, MODEL.intermediate_size, MODEL.num_kv_heads, MODEL.head_dim
    groups = MODEL.num_heads // k
    with tempfile.TemporaryDirectory() as directory:
        write_checkpoint(directory)
        whole = load_model(directory)
        for count in (2, 4):
            reads.clear()
            safetensors.safe_open = RecordingFile
            try:
                sharded = load_model(directory, mesh=tp_mesh(count))
            finally:
                safetensors.safe_open = real_open
            for layer in range(MODEL.num_layers):
                w_qkv = np.asarray(whole.layers[layer].attention.w_qkv[...])  # [D, K, G + 2, H]
                for shard in sharded.layers[layer].attention.w_qkv[...].addressable_shards:
                    assert np.array_equal(np.asarray(shard.data), w_qkv[shard.index]), (layer, shard.index)
                    assert shard.data.shape == (d, k // count, groups + 2, h)
                w_gate_up = np.asarray(whole.layers[layer].mlp.w_gate_up[...])  # [D, 2, F]
                for shard in sharded.layers[layer].mlp.w_gate_up[...].addressable_shards:
                    assert np.array_equal(np.asarray(shard.data), w_gate_up[shard.index]), (layer, shard.index)
                    assert shard.data.shape == (d, 2, f // count)
            share = {"q_proj": k * groups * h // count, "k_proj": k * h // count, "v_proj": k * h // count,
                     "gate_proj": f // count, "up_proj": f // count}
            fused_reads = [(name, index) for name, index in reads if name.split(".")[-2] in share]
            assert len(fused_reads) == MODEL.num_layers * len(share) * count, len(fused_reads)
            for name, (rows, columns) in fused_reads:
                size = share[name.split(".")[-2]]
                assert rows.stop - rows.start == size and rows.start % size == 0, (name, rows)
                assert columns == slice(0, d), (name, columns)


def cli_output(*argv) -> tuple[int, str]:
    """``vattention ARGV``'s exit status and everything it printed."""
    import contextlib
    import io

    from jax_vattention.app import cli

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            code = cli.main(list(argv))
        except SystemExit as exit_:
            code = exit_.code
    return code, out.getvalue()


def bad_tp_degrees_are_refused_in_one_line() -> None:
    """More devices than there are, or heads that do not divide: exit 2, one line naming the problem."""
    import tempfile

    with tempfile.TemporaryDirectory() as out:
        for argv, words in (
                (("serve-bench", "--tp", "5", "--out", out), "--tp must be between 1 and the 4 devices"),
                (("serve-bench", "--tp", "4", "--out", out), "num_kv_heads=2 does not divide by the tensor-parallel "
                                                             "degree 4"),
                (("bench", "decode", "--tp", "1", "4", "--out", out), "num_kv_heads=2 does not divide"),
                (("bench", "decode", "--tp", "8", "--out", out), "--tp must be between 1 and the 4 devices"),
                (("generate", "--tp", "4"), "num_kv_heads=2 does not divide")):
            code, printed = cli_output(*argv)
            lines = [line for line in printed.splitlines() if line.strip()]
            assert code == 2 and len(lines) == 1 and words in lines[0], (argv, code, printed)


def serve_bench_tp2() -> None:
    """serve-bench --tp 2 on the tiny model serves every request and reports each device's memory."""
    import tempfile

    with tempfile.TemporaryDirectory() as out:
        code, printed = cli_output("serve-bench", "--tp", "2", "--requests", "6", "--rate", "200", "--prompt-len",
                                   "8", "40", "--output-len", "4", "10", "--max-batch", "4", "--max-len", "64",
                                   "--token-budget", "24", "--chunk-tokens", "8", "--out", out)
    assert code == 0, printed
    assert "tensor parallel over 2 devices" in printed and "prefills 6" in printed, printed
    for device in (0, 1):
        line = next(line for line in printed.splitlines() if line.startswith(f"device {device} "))
        assert "cache mapped" in line and " pages" in line, line


def bench_decode_tp2() -> None:
    """bench decode --tp 1 2 times both degrees and prints TP 2 against TP 1."""
    import tempfile

    with tempfile.TemporaryDirectory() as out:
        code, printed = cli_output("bench", "decode", "--tp", "1", "2", "--batch", "2", "--context", "16",
                                   "--steps", "2", "--repeats", "1", "--modes", "static", "virtual_interleaved",
                                   "--out", out)
    assert code == 0, printed
    assert "TP 2: the static and paged caches run at TP 1 only" in printed, printed
    assert "TP 2 / TP 1, batch 2 context 16 virtual_interleaved:" in printed, printed


CASES = ["tokens_tp2_per_layer", "tokens_tp4_interleaved", "random_weights_straight_into_shards",
         "pages_per_device_are_exact", "a_copied_shard_gets_the_donation_error", "bad_meshes_and_head_counts",
         "a_failure_on_a_later_device_poisons_the_group",
         "a_failed_prefix_admission_on_a_later_device_poisons_the_group", "forks_at_tp2", "cli_generate_tp"]

def serve_tp2() -> None:
    """``vattention serve --tp 2`` builds its engine over a ShardedCacheManager of the first 2 devices,
    and that engine answers as ``--tp 1``'s does."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        print("serve_tp2: no FastAPI/uvicorn here, nothing to check")
        return
    from jax_vattention.app.cli import build_parser
    from jax_vattention.app.commands.serve import build_service
    from jax_vattention.engine import Request

    answers = []
    for degree in ("1", "2"):
        service = build_service(build_parser().parse_args(["serve", "--max-len", "128", "--max-batch", "4",
                                                           "--token-budget", "16", "--chunk-tokens", "8",
                                                           "--tp", degree]))
        service.replicas.stop()
        engine = service.replicas.engine
        assert isinstance(engine.manager, jv.ShardedCacheManager) == (degree == "2")
        ids = [engine.submit(Request(prompt=list(b"Hello, world"), max_new_tokens=8)),
               engine.submit(Request(prompt=list(range(40, 90)), max_new_tokens=5))]
        outputs = engine.run()
        answers.append([outputs[i] for i in ids])
        engine.manager.close()
    assert answers[0] == answers[1], answers


def engine_tp2_forks_speculating_samples() -> None:
    """Samples (n = 2) forked over a ShardedCacheManager, speculating by prompt lookup, under a
    tight budget: each sample streams TP 1's plain greedy tokens, and every device's
    manager gives every page back."""
    from jax_vattention.engine import Engine, EngineConfig, Request

    prompts = [([5, 6, 7, 8, 9] * 6, 14), (list(range(20, 60)), 10)]
    fake = lambda device: _core.FakeDriver(4096, host_pages=True)  # noqa: E731
    config = dataclasses.replace(cache_config("interleaved"), budget_bytes=14 * 4096, page_bytes=4096)
    with jv.ShardedCacheManager(config, tp_mesh(2), driver_factory=fake) as manager:
        engine = Engine(model(), manager, EngineConfig(token_budget=24, chunk_tokens=8, speculate="ngram",
                                                       prefetch_tokens=4))
        groups = [engine.submit_samples(Request(prompt=p, max_new_tokens=n), 2) for p, n in prompts]
        outputs = engine.run()
        assert not engine.failed, engine.failed
        got = [[outputs[i] for i in ids] for ids in groups]
        stats = engine.stats
        assert stats.verifications > 0 and stats.unforked_samples == 0, stats
        assert manager.stats()["active_slots"] == 0
        manager.reclaim()
        manager.evict()
        manager.trim()
        for device in manager.stats()["per_device"]:
            assert device["mapped_pages"] == device["created_pages"] == 0, device
    with jv.CacheManager(cache_config()) as single:
        engine = Engine(model(), single, EngineConfig(token_budget=24, chunk_tokens=8, pipeline=False))
        ids = [engine.submit(Request(prompt=p, max_new_tokens=n)) for p, n in prompts]
        plain = engine.run()
    assert got == [[plain[i]] * 2 for i in ids], (got, plain)


def engine_tp2_fp8_and_windows_give_one_devices_tokens() -> None:
    """An FP8 cache and a sliding-window cache (a Gemma-like model: layer 0 slides) over a
    ShardedCacheManager: the engine streams what it streams over one device's manager of the same
    kind, and every device gives its pages back."""
    from jax_vattention.engine import Engine, EngineConfig, Request

    windowed = Llama(dataclasses.replace(MODEL, sliding_window=16, sliding_layers=(0,), rope_scaling=None),
                     rngs=nnx.Rngs(1))
    prompts = [([5, 6, 7, 8, 9] * 6, 14), (list(range(20, 60)), 10), ([3] * 12, 20)]
    for target, kind in ((model(), dict(dtype=jnp.float8_e4m3fn)),
                         (windowed, dict(window=16, window_layers=windowed.config.window_layers))):
        config = dataclasses.replace(cache_config("per_layer"), **kind)

        def run(manager):
            engine = Engine(target, manager, EngineConfig(token_budget=24, chunk_tokens=8))
            ids = [engine.submit(Request(prompt=p, max_new_tokens=n)) for p, n in prompts]
            outputs = engine.run()
            assert not engine.failed, engine.failed
            assert manager.stats()["active_slots"] == 0
            return [outputs[i] for i in ids]

        with jv.CacheManager(config) as single:
            want = run(single)
        with jv.ShardedCacheManager(config, tp_mesh(2)) as manager:
            got = run(manager)
            manager.reclaim()
            manager.trim()
            for device in manager.stats()["per_device"]:
                assert device["mapped_pages"] == 0, device
        assert got == want, (kind, got, want)


ENGINE_CASES = ["engine_tp2_and_tp4_give_tp1_tokens_with_exact_pages", "engine_tp2_samples_as_tp1_with_every_knob",
                "engine_shares_prefixes_at_tp2", "engine_tp2_speculates_to_tp1_plain_tokens",
                "engine_tp2_forks_speculating_samples",
                "engine_tp2_fp8_and_windows_give_one_devices_tokens",
                "engine_refuses_a_mismatched_model",
                "checkpoint_straight_into_shards", "families_tp2_give_tp1_tokens", "fused_checkpoint_weights_per_device",
                "bad_tp_degrees_are_refused_in_one_line"]
SLOW_CASES = ["serve_bench_tp2", "bench_decode_tp2", "serve_tp2"]
if __name__ == "__main__":
    assert len(jax.devices()) == 4, jax.devices()
    for name in sys.argv[1:] or CASES + ENGINE_CASES + SLOW_CASES:
        try:
            globals()[name]()
            print(f"{name} OK", flush=True)
        except Exception:
            print(f"{name} FAILED\n{traceback.format_exc()}", flush=True)
