"""The readings of JAX internals (jax_vattention.cache.jax_internals) hold on the installed JAX.

Each test names what it reads; a JAX release that changes it fails here, by name, before the
donation check or the failure handling that rely on it misbehave elsewhere.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_vattention as jv
from jax_vattention.cache import jax_internals


def test_the_installed_jax_is_one_we_support():
    version = tuple(int(part) for part in jax.__version__.split(".")[:2])
    assert (0, 10) <= version < (0, 13), jax.__version__


def test_aliased_outputs_of_a_single_device_program():
    """Argument 1 donated into output 0 (both [4, 8]); argument 0 aliases nothing."""
    @functools.partial(jax.jit, donate_argnums=1)
    def step(scale, buffer):
        return buffer * scale, scale + 1

    lowered = step.lower(jnp.float32(2), jnp.zeros((4, 8), jnp.float32))
    assert jax_internals.aliased_outputs(lowered, 2) == [None, 0]


def test_aliased_outputs_skip_pruned_arguments():
    """An unused argument is pruned from the lowered program: the others keep their places."""
    @functools.partial(jax.jit, donate_argnums=2)
    def step(unused, scale, buffer):
        return scale, buffer * scale

    lowered = step.lower(jnp.zeros(3), jnp.float32(2), jnp.zeros((4, 8), jnp.float32))
    assert jax_internals.aliased_outputs(lowered, 3) == [None, None, 1]


def test_aliased_outputs_skip_hoisted_constants():
    """A closed-over array is a constant of the program (jax 0.12 passes large ones as leading
    parameters): the arguments keep their places, the pruned one included."""
    table = jnp.arange(64 * 64, dtype=jnp.float32).reshape(64, 64)
    other = jnp.ones((64, 64), jnp.float32)

    @functools.partial(jax.jit, donate_argnums=1)
    def step(unused, buffer, scale):
        return scale * 2, buffer + table * other

    lowered = step.lower(jnp.zeros(3), jnp.zeros((64, 64), jnp.float32), jnp.float32(2))
    assert jax_internals.aliased_outputs(lowered, 3) == [None, 1, None]


def test_aliased_outputs_of_a_sharded_program_with_constants():
    """The compiled program's parameter numbers count the hoisted constants too."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("tp",))
    spec = jax.sharding.PartitionSpec(None, "tp")
    table = jnp.arange(64 * 64, dtype=jnp.float32).reshape(64, 64)
    body = jax.shard_map(lambda x, y: (y[:2] + 1, x * 2 + table), mesh=mesh, in_specs=(spec, spec),
                         out_specs=(spec, spec))
    jitted = jax.jit(body, donate_argnums=0)
    lowered = jitted.lower(jnp.zeros((64, 64)), jnp.zeros((64, 64)))  # only output 1 has argument 0's shape
    assert jax_internals.aliased_outputs(lowered, 2) == [1, None]


def test_aliased_outputs_of_a_sharded_program():
    """shard_map leaves the aliasing of a donated argument to XLA: read from the compiled program."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("tp",))
    spec = jax.sharding.PartitionSpec(None, "tp")
    body = jax.shard_map(lambda x, y: (y[:2] + 1, x * 2), mesh=mesh, in_specs=(spec, spec), out_specs=(spec, spec))
    jitted = jax.jit(body, donate_argnums=0)
    lowered = jitted.lower(jnp.zeros((4, 8)), jnp.zeros((4, 8)))  # only output 1 has argument 0's shape
    assert jax_internals.aliased_outputs(lowered, 2) == [1, None]


def test_a_mapping_op_failure_is_recognised_by_its_target_and_its_kind():
    """A real failure of the in-graph mapping op (the budget runs out inside a compiled step) is named
    by failed_in and out_of_memory; an unrelated runtime failure is neither."""
    from jax_vattention.cache import _ffi

    page = 64 << 10
    config = jv.CacheConfig(num_layers=1, max_batch=1, max_len=4096, kv_heads=1, head_dim=64, dtype=jnp.float32,
                            page_bytes=page, budget_bytes=page * 2)
    with jv.CacheManager(config, driver=jv._core.FakeDriver(page)) as manager:
        manager.alloc(1)
        step = jv.cache_jit(lambda cache: jv.grow(cache, tokens=3000))
        with pytest.raises(jax.errors.JaxRuntimeError) as failure:
            manager.cache = step(manager.cache)
        assert jax_internals.failed_in(failure.value, _ffi.GROW_TARGET)
        assert jax_internals.out_of_memory(failure.value)
        # JAX puts the status first, then the handler's own message.
        assert jax_internals.first_line(failure.value).startswith("RESOURCE_EXHAUSTED: vattention_grow: growing")
    other = ValueError("RESOURCE_EXHAUSTED vattention_grow")
    assert not jax_internals.failed_in(other, _ffi.GROW_TARGET) and not jax_internals.out_of_memory(other)
