"""Tensor-parallel generation: the model's weights and the virtual cache split over a mesh.

Megatron-style: every device holds ``1/N`` of the query and KV heads (``w_qkv`` split on its KV
heads axis, each KV head with its query heads; ``wo`` on its rows), of the MLP's columns (``w_gate_up``)
and of ``w_down``'s rows; one ``psum`` after each block's attention output and one after its MLP. The
embeddings, norms and ``lm_head`` are replicated: every device then computes the same logits and
samples the same token with no gather, and generation's sampling code runs unchanged (a
vocabulary split would save ``vocab x hidden / N`` per device at the price of a gather per step).

The whole generation loop (:func:`jax_vattention.generate`'s traced body) runs inside
``shard_map``: each device runs the mapping op on its own cache shard, and the cache stays in
place per shard under donation (under plain ``jit`` XLA would gather the sharded cache instead).
The engine's fixed-shape step (:class:`~jax_vattention.engine.runner.StepRunner`, given a
:class:`~jax_vattention.ShardedCacheManager`) and the decode benchmark's chunk run the same way:
:meth:`TPSpecs.shard_jit` is the one place that wraps a traced body for the mesh.

Example::

    mesh = tp_mesh(2)
    model = shard_model(Llama(get_config("tiny"), rngs=nnx.Rngs(0)), mesh)
    manager = ShardedCacheManager(CacheConfig(num_layers=2, max_batch=4, max_len=128, kv_heads=2,
                                              head_dim=16, dtype=jnp.float32), mesh)
    result = generate_tp_in_manager(model, manager, [[5, 6, 7]], max_new_tokens=8)
"""

from __future__ import annotations

import dataclasses
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
_SPLIT_AXIS = {"w_qkv": 1, "wo": 0, "w_gate_up": 2, "w_down": 0}


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


def split_axis(name: str) -> int | None:
    """The axis a Llama weight named ``name`` (``w_qkv``, ``w_down``, ...) is split on; None: replicated."""
    return _SPLIT_AXIS.get(name)


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


# An output position of :meth:`TPSpecs.shard_jit` that is the cache (sharded on the KV heads).
CACHE = "cache"


@dataclasses.dataclass(frozen=True)
class TPSpecs:
    """How a sharded model and a :class:`~jax_vattention.ShardedCacheManager`'s cache lie on a mesh:
    the PartitionSpec of every weight and of every cache buffer. Hashable, so it can key the caches
    of compiled functions. Built by :func:`tp_specs`.
    """

    mesh: Mesh
    axis: str
    state: "_Specs"
    cache: KVCache

    def shard_jit(self, body, replicated_inputs: int, outputs: tuple, *, flat_state: bool = False):
        """``body(state, cache, *replicated)`` inside ``shard_map`` over the mesh, jitted with the
        cache donated (:func:`~jax_vattention.donation.cache_jit`).

        Every device runs ``body`` on its shards of the weights and the cache (its mapping op on its
        own shard) and the ``replicated_inputs`` other arguments whole. ``outputs`` names each
        output: :data:`CACHE` for the cache, anything else for a replicated value (every device
        computes the same logits, so the same tokens). With ``flat_state``, ``state`` is the tuple
        of the model state's leaves (``jax.tree_util.tree_leaves(nnx.state(model))``) instead of
        the state itself.
        """
        out_specs = tuple(self.cache if name == CACHE else P() for name in outputs)
        state = self.state.tree()
        if flat_state:
            state = tuple(jax.tree_util.tree_leaves(state, is_leaf=lambda x: isinstance(x, P)))
        sharded = jax.shard_map(body, mesh=self.mesh, in_specs=(state, self.cache,
                                                                 *(P(),) * replicated_inputs),
                                out_specs=out_specs, check_vma=False)
        return cache_jit(sharded)


def tp_specs(model, manager) -> TPSpecs:
    """The :class:`TPSpecs` of a model from :func:`shard_model` / :func:`init_sharded` and a
    :class:`~jax_vattention.ShardedCacheManager` over the same mesh and axis; ``ValueError`` otherwise."""
    axis = getattr(model, "tp_axis", None)
    if axis is None or manager is None or not hasattr(manager, "mesh"):
        raise ValueError("tensor parallelism needs a model from shard_model/init_sharded and the cache of a "
                         "ShardedCacheManager; use one device's functions otherwise")
    if manager.axis != axis:
        raise ValueError(f"the model is split over axis {axis!r} but the cache over {manager.axis!r}")
    cache = manager.cache
    spec = manager._spec
    state = nnx.state(model)
    return TPSpecs(manager.mesh, axis, _hashable_specs(param_specs(state, axis)),
                   cache.replace(k=(spec,) * len(cache.k), v=(spec,) * len(cache.v)))


def for_manager(model, manager):
    """``(model, specs)`` to run ``model`` over ``manager``'s cache: for a
    :class:`~jax_vattention.ShardedCacheManager`, the model split over its mesh (as it is if it
    already is, else through :func:`shard_model`) and its :class:`TPSpecs`; for one device's
    manager, the model and None (``ValueError`` for a sharded model there)."""
    if not hasattr(manager, "mesh"):
        if getattr(model, "tp_axis", None) is not None:
            raise ValueError("the model is split over a mesh but the cache is one device's: use a "
                             "ShardedCacheManager over the same mesh")
        return model, None
    if getattr(model, "tp_axis", None) is None:
        model = shard_model(model, manager.mesh, manager.axis)
    return model, tp_specs(model, manager)


@functools.lru_cache(maxsize=32)
def _sharded_generate_fn(graphdef, backend: str, return_logits: bool, specs: TPSpecs):
    """Generation's traced loop inside ``shard_map``, jitted with the cache donated."""
    body = functools.partial(generation._generate, graphdef, backend, return_logits)
    # prompts, lengths, slots, max_new_tokens, stops, 3 sampling knobs, key
    return specs.shard_jit(body, 9, (None, None, None, CACHE))


@functools.lru_cache(maxsize=16)
def sharded_decode_chunk_fn(graphdef, backend: str, steps: int, specs: TPSpecs, sampling: bool | None = None):
    """:func:`~jax_vattention.engine.steps.decode_chunk_fn` inside ``shard_map`` over the mesh."""
    from jax_vattention.engine.steps import _decode_chunk

    body = functools.partial(_decode_chunk, graphdef, backend, steps, sampling)
    # last, lengths, running, generated, max_new, stops, 3 sampling knobs, key
    return specs.shard_jit(body, 10, (CACHE, None, None, None, None, None, None))


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
    manager = manager_for(cache)
    specs = tp_specs(model, manager)
    manager.check_cache(cache)
    backend = resolve_backend(backend, cache)
    request = generation.prepare_request(model, cache, prompts, slots=slots, max_len=max_len,
                                         max_new_tokens=max_new_tokens, stop_tokens=stop_tokens,
                                         temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    check_slots(manager, request.slots, request.lengths)
    manager.reserve_growth(int(request.new_tokens.max()) - 1)

    graphdef, state = nnx.split(model)
    fn = _sharded_generate_fn(graphdef, backend, return_logits, specs)
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
