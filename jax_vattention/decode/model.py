"""What the decode loop and the engine need of a model: the :class:`DecoderModel` protocol.

The backend calls a model in exactly two ways, and asks it one question for a mesh:

* ``model(tokens, positions, cache, start=..., count=..., slots=..., backend=..., logit_index=...)``
  runs rows of tokens at given positions (the prefill of :func:`~jax_vattention.decode.generate.generate`);
* ``model.run_step(step, cache, backend=...)`` runs one
  :class:`~jax_vattention.decode.step_batch.StepBatch` (decode rows and prefill chunks, the engine's
  and the decode loop's step);
* ``model.partition_specs(axis, count)`` says how its weights split over ``count`` devices of a mesh
  axis (a tree of ``PartitionSpec`` shaped like ``nnx.state(model)``).

The model keeps its static facts in ``config`` (:class:`ModelShape`) and its mesh axis in
``tp_axis`` (None on one device; :func:`~jax_vattention.decode.mesh.shard_model` sets it). The Llama
family in ``jax_vattention.models`` implements it; nothing in the backend imports a model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import jax

if TYPE_CHECKING:
    from jax_vattention.cache.kv_cache import KVCache
    from jax_vattention.decode.step_batch import StepBatch


class ModelShape(Protocol):
    """The config fields the backend reads."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int

    def layer_window(self, layer: int) -> int | None:
        """The sliding window ``layer`` attends within (None: the whole sequence)."""


@runtime_checkable
class DecoderModel(Protocol):
    """A decoder-only model over a :class:`~jax_vattention.KVCache` (see the module docstring)."""

    config: ModelShape
    tp_axis: str | None

    def __call__(self, tokens: jax.Array, positions: jax.Array, cache: "KVCache", *, start: jax.Array,
                 count: jax.Array, slots: jax.Array | None = None, backend: str = "xla",
                 logit_index: jax.Array | None = None) -> tuple[jax.Array, "KVCache"]:
        """tokens, positions int32 [B, T]; start, count, slots int32 [B] -> (float32 logits [B, V] with
        ``logit_index`` [B], else [B, T, V]; the cache)."""

    def run_step(self, step: "StepBatch", cache: "KVCache", *, backend: str) -> tuple[jax.Array, "KVCache"]:
        """float32 logits [decode rows + chunk rows, V] and the cache."""

    def partition_specs(self, axis: str, count: int) -> Any:
        """The ``PartitionSpec`` of every weight split over ``count`` devices on ``axis``;
        ``ValueError`` where the model does not divide."""


def check_model_fits(model: DecoderModel, config) -> None:
    """``ValueError`` unless a cache of ``config`` (a :class:`~jax_vattention.CacheConfig`) has the
    model's layers, KV heads and head_dim."""
    shape = model.config
    expected = (shape.num_layers, shape.num_kv_heads, shape.head_dim)
    have = (config.num_layers, config.kv_heads, config.head_dim)
    if have != expected:
        raise ValueError(f"the cache has (layers, kv_heads, head_dim) = {have}; the model needs {expected}")
    check_windows(model, config)


def check_windows(model: DecoderModel, config) -> None:
    """``ValueError`` unless every layer whose pages a cache of ``config`` unmaps behind a window of
    ``config.window`` tokens attends within at most that window: a layer that attends further back
    would read unmapped pages."""
    for layer in range(config.num_layers):
        window = config.layer_window(layer)
        if window is None:
            continue
        attends = model.config.layer_window(layer)
        if attends is None or attends > window:
            raise ValueError(f"the cache unmaps layer {layer}'s pages behind a window of {window} tokens, but the "
                             f"model attends within {'the whole sequence' if attends is None else attends} there: "
                             f"give the cache the model's windows (CacheConfig(window=..., window_layers=...))")
