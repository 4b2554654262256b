"""Tensor-parallel generation: the model's weights and the virtual cache split over a mesh.

Megatron-style: every device holds ``1/N`` of the query and KV heads (``wq``, ``wk``, ``wv``
split on their heads axis, ``wo`` on its rows), of the MLP's columns (``w_gate``, ``w_up``) and of
``w_down``'s rows; one ``psum`` after each block's attention output and one after its MLP. The
embeddings, norms and ``lm_head`` are replicated: every device then computes the same logits and
samples the same token with no gather, and generation's sampling code runs unchanged (a
vocabulary split would save ``vocab x hidden / N`` per device at the price of a gather per step).

The whole generation loop (:func:`jax_vattention.generate`'s traced body) runs inside
``shard_map``: each device runs the mapping op on its own cache shard, and the cache stays in
place per shard under donation (under plain ``jit`` XLA would gather the sharded cache instead).

Example::

    mesh = tp_mesh(2)
    model = shard_model(Llama(get_config("tiny"), rngs=nnx.Rngs(0)), mesh)
    manager = ShardedCacheManager(CacheConfig(num_layers=2, max_batch=4, max_len=128, kv_heads=2,
                                              head_dim=16, dtype=jnp.float32), mesh)
    result = generate_tp_in_manager(model, manager, [[5, 6, 7]], max_new_tokens=8)
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jax_vattention import generate as generation
from jax_vattention.attention import resolve_backend
from jax_vattention.cache import KVCache
from jax_vattention.donation import cache_jit
from jax_vattention.manager import manager_for
from jax_vattention.preflight import check_slots, mapping_failures
from jax_vattention.sharded_manager import mesh_axis

# The split axis of each weight, by its name: which axis holds heads or MLP columns.
_SPLIT_AXIS = {"wq": 1, "wk": 1, "wv": 1, "wo": 0, "w_gate": 1, "w_up": 1, "w_down": 0}


def tp_mesh(count: int, devices: Sequence[jax.Device] | None = None, axis: str = "tp") -> Mesh:
    """A one-dimensional mesh named ``axis`` over the first ``count`` devices (default
    ``jax.devices()``); ``ValueError`` if there are fewer."""
    devices = list(jax.devices() if devices is None else devices)
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1:
        raise ValueError(f"the tensor-parallel degree must be a positive integer, got {count!r}")
    if count > len(devices):
        raise ValueError(f"tensor parallelism over {count} devices, but only {len(devices)} are available "
                         f"({devices[0].platform})")
    return Mesh(np.array(devices[:count]), (axis,))


def check_divisible(config, count: int) -> None:
    """``ValueError`` unless the query heads, KV heads and MLP width divide by ``count``."""
    for name in ("num_heads", "num_kv_heads", "intermediate_size"):
        if getattr(config, name) % count:
            raise ValueError(f"{name}={getattr(config, name)} does not divide by the tensor-parallel degree "
                             f"{count}: every device must hold the same share")


def param_specs(state: nnx.State, axis: str):
    """The PartitionSpec of every weight in a Llama's ``state``: split per ``_SPLIT_AXIS``, else replicated."""
    def spec(path, value):
        name = next((str(getattr(key, "key", getattr(key, "name", ""))) for key in reversed(path)
                     if str(getattr(key, "key", getattr(key, "name", ""))) in _SPLIT_AXIS), None)
        if name is None:
            return P()
        axes = [None] * value.ndim
        axes[_SPLIT_AXIS[name]] = axis
        return P(*axes)
    return jax.tree_util.tree_map_with_path(spec, state)


def shard_model(model, mesh: Mesh, axis: str | None = None):
    """A copy of ``model`` whose weights are placed in their shards over ``mesh`` and that sums
    over ``axis`` (see the module docstring). Its arrays are global ``jax.Array`` s."""
    axis = mesh_axis(mesh, axis)
    check_divisible(model.config, mesh.size)
    graphdef, state = nnx.split(model)
    shardings = jax.tree_util.tree_map(lambda spec: NamedSharding(mesh, spec), param_specs(state, axis),
                                       is_leaf=lambda x: isinstance(x, P))
    sharded = nnx.merge(graphdef, jax.device_put(state, shardings))
    sharded.tp_axis = axis
    return sharded


def init_sharded(model_class, config, mesh: Mesh, seed: int = 0, axis: str | None = None):
    """A model of random weights (``model_class(config, rngs=nnx.Rngs(seed))``) created straight in
    its shards: no device ever holds more than its share of a split weight. Same values as the
    unsharded ``model_class(config, rngs=nnx.Rngs(seed))``."""
    axis = mesh_axis(mesh, axis)
    check_divisible(config, mesh.size)
    abstract = nnx.eval_shape(lambda: model_class(config, rngs=nnx.Rngs(seed)))
    graphdef, abstract_state = nnx.split(abstract)
    shardings = jax.tree_util.tree_map(lambda spec: NamedSharding(mesh, spec),
                                       param_specs(abstract_state, axis), is_leaf=lambda x: isinstance(x, P))
    state = jax.jit(lambda: nnx.split(model_class(config, rngs=nnx.Rngs(seed)))[1], out_shardings=shardings)()
    model = nnx.merge(graphdef, state)
    model.tp_axis = axis
    return model


@functools.lru_cache(maxsize=32)
def _sharded_generate_fn(graphdef, backend: str, return_logits: bool, mesh: Mesh, state_specs,
                         cache_specs):
    """Generation's traced loop inside ``shard_map`` over ``mesh``, jitted with the cache donated."""
    body = functools.partial(generation._generate, graphdef, backend, return_logits)
    replicated = (P(),) * 9  # prompts, lengths, slots, max_new_tokens, stops, 3 sampling knobs, key
    sharded = jax.shard_map(body, mesh=mesh, in_specs=(state_specs.tree(), cache_specs, *replicated),
                            out_specs=(P(), P(), P(), cache_specs), check_vma=False)
    return cache_jit(sharded)


def _hashable_specs(tree):
    leaves, treedef = jax.tree_util.tree_flatten(tree, is_leaf=lambda x: isinstance(x, P))
    return _Specs(treedef, tuple(leaves))


class _Specs:
    """A spec tree that can key the compiled-function cache (the tree's structure and leaves)."""

    def __init__(self, treedef, leaves):
        self.treedef, self.leaves = treedef, leaves

    def tree(self):
        return jax.tree_util.tree_unflatten(self.treedef, self.leaves)

    def __hash__(self):
        return hash((self.treedef, self.leaves))

    def __eq__(self, other):
        return isinstance(other, _Specs) and (self.treedef, self.leaves) == (other.treedef, other.leaves)


def generate_tp(model, cache: KVCache, prompts: Sequence[Sequence[int]], *, max_len: int | None = None,
                slots: Sequence[int] | None = None, max_new_tokens: int | Sequence[int] = 32, stop_tokens=None,
                temperature=0.0, top_k=0, top_p=1.0, seed: int = 0, backend: str | None = None,
                return_logits: bool = False) -> tuple[generation.GenerationResult, KVCache]:
    """:func:`jax_vattention.generate` for a model of :func:`shard_model` and the cache of a
    :class:`~jax_vattention.ShardedCacheManager` over the same mesh; same arguments and results.

    The cache (arrays ``[max_batch, capacity, (layers,) kv_heads, head_dim]``, sharded on
    ``kv_heads``) is donated: use the returned one.
    """
    axis = getattr(model, "tp_axis", None)
    manager = manager_for(cache)
    if axis is None or manager is None or not hasattr(manager, "mesh"):
        raise ValueError("generate_tp needs a model from shard_model/init_sharded and the cache of a "
                         "ShardedCacheManager; use generate for one device")
    if manager.axis != axis:
        raise ValueError(f"the model is split over axis {axis!r} but the cache over {manager.axis!r}")
    manager.check_cache(cache)
    backend = resolve_backend(backend, cache)
    request = generation.prepare_request(model, cache, prompts, slots=slots, max_len=max_len,
                                         max_new_tokens=max_new_tokens, stop_tokens=stop_tokens,
                                         temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    check_slots(manager, request.slots, request.lengths)
    manager.reserve_growth(int(request.new_tokens.max()) - 1)

    graphdef, state = nnx.split(model)
    cache_spec = manager._spec
    cache_specs = cache.replace(k=(cache_spec,) * len(cache.k), v=(cache_spec,) * len(cache.v))
    fn = _sharded_generate_fn(graphdef, backend, return_logits, manager.mesh,
                              _hashable_specs(param_specs(state, axis)), cache_specs)
    with mapping_failures(manager, cache, "generate_tp"):
        outputs = fn(state, cache, *request.arrays)
        result, cache = generation.unpack_results(outputs, len(prompts), return_logits)
    return result, cache


def generate_tp_in_manager(model, manager, prompts: Sequence[Sequence[int]], *,
                           max_new_tokens: int | Sequence[int] = 32, **options) -> generation.GenerationResult:
    """Allocates a slot per prompt in the :class:`~jax_vattention.ShardedCacheManager`, generates
    with :func:`generate_tp`, stores the returned cache in the manager and frees the slots."""
    slots = []
    try:
        for prompt in prompts:
            slots.append(manager.alloc(len(prompt)))
        result, manager.cache = generate_tp(model, manager.cache, prompts, slots=slots,
                                            max_new_tokens=max_new_tokens, **options)
    finally:
        if not manager.lost:
            for slot in slots:
                manager.free(slot)
    return result
