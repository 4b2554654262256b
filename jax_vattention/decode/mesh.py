"""A model and a virtual cache split over a mesh (tensor parallelism): the helpers of the one path.

:func:`~jax_vattention.decode.generate.generate`, the engine's step and the decode benchmark run a
model on one device or over a mesh through the same code: :func:`place` gives the model as the
cache host needs it (split over its mesh where it has one) and the :class:`MeshSpecs` that wrap a
traced body for the mesh, or None on one device. Inside ``shard_map`` every device runs the body
on its shards of the weights and the cache (its mapping op on its own shard), and the cache stays
in place per shard under donation (under plain ``jit`` XLA would gather the sharded cache).

How a model's weights split is the model's own answer
(:meth:`~jax_vattention.decode.model.DecoderModel.partition_specs`); the backend knows no weight
names.

Example::

    mesh = tp_mesh(2)
    model = shard_model(Llama(get_config("tiny"), rngs=nnx.Rngs(0)), mesh)
    manager = ShardedCacheManager(CacheConfig(num_layers=2, max_batch=4, max_len=128, kv_heads=2,
                                              head_dim=16, dtype=jnp.float32), mesh)
    result = generate_in_manager(model, manager, [[5, 6, 7]], max_new_tokens=8)
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jax_vattention.cache.donation import cache_jit
from jax_vattention.cache.host import CacheHost
from jax_vattention.cache.kv_cache import KVCache
from jax_vattention.cache.sharded_manager import mesh_axis


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


def _shardings(mesh: Mesh, specs):
    return jax.tree_util.tree_map(lambda spec: NamedSharding(mesh, spec), specs, is_leaf=lambda x: isinstance(x, P))


def shard_model(model, mesh: Mesh, axis: str | None = None):
    """A copy of ``model`` (a :class:`~jax_vattention.decode.model.DecoderModel`) whose weights lie in
    their shards over ``mesh`` (its :meth:`partition_specs`) and that sums over ``axis``. Its arrays
    are global ``jax.Array`` s."""
    axis = mesh_axis(mesh, axis)
    specs = model.partition_specs(axis, mesh.size)
    graphdef, state = nnx.split(model)
    sharded = nnx.merge(graphdef, jax.device_put(state, _shardings(mesh, specs)))
    sharded.tp_axis = axis
    return sharded


def init_sharded(model_class, config, mesh: Mesh, seed: int = 0, axis: str | None = None):
    """A model of random weights (``model_class(config, rngs=nnx.Rngs(seed))``) created straight in
    its shards: no device ever holds more than its share of a split weight. Same values as the
    unsharded ``model_class(config, rngs=nnx.Rngs(seed))``."""
    axis = mesh_axis(mesh, axis)
    abstract = nnx.eval_shape(lambda: model_class(config, rngs=nnx.Rngs(seed)))
    graphdef, _ = nnx.split(abstract)
    shardings = _shardings(mesh, abstract.partition_specs(axis, mesh.size))
    state = jax.jit(lambda: nnx.split(model_class(config, rngs=nnx.Rngs(seed)))[1], out_shardings=shardings)()
    model = nnx.merge(graphdef, state)
    model.tp_axis = axis
    return model


# An output position of :meth:`MeshSpecs.shard_jit` that is the cache (sharded on the KV heads).
CACHE = "cache"


@dataclasses.dataclass(frozen=True)
class MeshSpecs:
    """How a sharded model and a :class:`~jax_vattention.ShardedCacheManager`'s cache lie on a mesh:
    the PartitionSpec of every weight and of every cache buffer. Hashable, so it can key the caches
    of compiled functions. Built by :func:`place`.
    """

    mesh: Mesh
    axis: str
    state: "_Specs"
    cache: KVCache

    def shard_jit(self, body, replicated_inputs: int, outputs: tuple, *, flat_state: bool = False,
                  donate: tuple[str, ...] = ()):
        """``body(state, cache, *replicated)`` inside ``shard_map`` over the mesh, jitted with the
        cache donated (:func:`~jax_vattention.cache.donation.cache_jit`).

        Every device runs ``body`` on its shards of the weights and the cache (its mapping op on its
        own shard) and the ``replicated_inputs`` other arguments whole. ``outputs`` names each
        output: :data:`CACHE` for the cache, anything else for a replicated value (every device
        computes the same logits, so the same tokens). With ``flat_state``, ``state`` is the tuple
        of the model state's leaves (``jax.tree_util.tree_leaves(nnx.state(model))``) instead of
        the state itself. ``donate`` names arguments of ``body`` donated besides the cache.
        """
        out_specs = tuple(self.cache if name == CACHE else P() for name in outputs)
        state = self.state.tree()
        if flat_state:
            state = tuple(jax.tree_util.tree_leaves(state, is_leaf=lambda x: isinstance(x, P)))
        sharded = jax.shard_map(body, mesh=self.mesh, in_specs=(state, self.cache,
                                                                 *(P(),) * replicated_inputs),
                                out_specs=out_specs, check_vma=False)
        return cache_jit(sharded, donate_argnames=donate)


def place(model, host: CacheHost | None):
    """``(model, specs)`` to run ``model`` over ``host``'s cache.

    On a mesh (``host.mesh``), the model split over it (as it is if it already is, else through
    :func:`shard_model`) and its :class:`MeshSpecs`; on one device or a dense cache (``host`` None),
    the model and None. ``ValueError`` for a split model over one device's cache, or a model split
    over another axis than the cache.
    """
    axis = model.tp_axis
    if host is None or host.mesh is None:
        if axis is not None:
            raise ValueError("the model is split over a mesh but the cache is one device's: use a "
                             "ShardedCacheManager over the same mesh")
        return model, None
    if axis is None:
        model = shard_model(model, host.mesh, host.axis)
    elif axis != host.axis:
        raise ValueError(f"the model is split over axis {axis!r} but the cache over {host.axis!r}")
    cache = host.cache
    specs = model.partition_specs(host.axis, host.mesh.size)
    return model, MeshSpecs(host.mesh, host.axis, _hashable_specs(specs),
                            cache.replace(k=(host.spec,) * len(cache.k), v=(host.spec,) * len(cache.v)))


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
