"""Writing new keys and values into a cache without touching anything else.

On a virtual cache only pages that hold live tokens are mapped; a write to any
other position would land on an unmapped page and kill the CUDA context. The
write here is therefore a scatter whose every dropped token gets an
out-of-bounds index, which XLA skips entirely, instead of a masked
``dynamic_update_slice`` that would still store the whole window.

On the CPU backend a bfloat16 or FP8 cache is written by a host callback that
stores the tokens in place: XLA's CPU compiler has no bfloat16 (or float8)
scatter (nor dynamic-update-slice) and converts the whole buffer to a wider
type and back around one, which reads and writes every page of the cache, so
the OS commits them all; a bit-cast to an integer type is a whole-buffer copy
there too.

An FP8 cache (:mod:`jax_vattention.cache.quantization`) takes keys and values
in the model's dtype and stores their codes: quantizing is part of the write,
so nothing else ever puts unscaled values into it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jax.experimental.buffer_callback import buffer_callback

from jax_vattention.cache.config import CPU_HOST_INDEXED_DTYPES
from jax_vattention.cache.kv_cache import KVCache
from jax_vattention.cache.quantization import quantize


def _store_on_host(context, out, buffer, indices, updates) -> None:
    """The CPU bfloat16 / FP8 scatter: ``out`` is ``buffer`` (aliased); rows of ``indices`` that are out of
    bounds are dropped, as ``FILL_OR_DROP`` does. Only the pages of the kept tokens are touched."""
    del context, buffer  # the same memory as out
    target = np.asarray(out)
    indices = np.asarray(indices)
    updates = np.asarray(updates)
    keep = np.all((indices >= 0) & (indices < np.asarray(target.shape[:indices.shape[1]])), axis=1)
    target[tuple(indices[keep].T)] = updates[keep]


def _scatter_in_place_on_host(buffer, indices, updates):
    store = buffer_callback(_store_on_host, jax.ShapeDtypeStruct(buffer.shape, buffer.dtype),
                            input_output_aliases={0: 0})
    return store(buffer, indices, updates)


def scatter_tokens(buffer: jax.Array, new: jax.Array, start: jax.Array,
                   count: jax.Array, slots: jax.Array | None = None, layer: int | None = None) -> jax.Array:
    """Write ``new[b, t]`` at ``buffer[slots[b], start[b] + t(, layer)]`` for ``t < count[b]``.

    Parameters
    ----------
    buffer : [max_batch, capacity, kv_heads, head_dim], or [max_batch, capacity, layers, kv_heads,
        head_dim] with ``layer`` given (a layer-interleaved cache)
    new : [batch, tokens, kv_heads, head_dim], the same dtype as ``buffer``
    start : int32 [batch], the position of each row's first new token
    count : int32 [batch], how many of the row's tokens are real (the rest is padding)
    slots : int32 [batch] or None, the slot of each row (default: row ``b`` is slot ``b``)
    layer : int or None, static: the layer to write in an interleaved buffer

    Returns
    -------
    The updated buffer. Tokens past ``count``, past the capacity or at a negative
    position are dropped: nothing is written for them.
    """
    max_batch, capacity = buffer.shape[:2]
    batch, tokens = new.shape[:2]
    if slots is None:
        slots = jnp.arange(batch, dtype=jnp.int32)
    offsets = jnp.arange(tokens, dtype=jnp.int32)[None, :]                  # [1, T]
    positions = start.astype(jnp.int32)[:, None] + offsets                 # [B, T]
    keep = (offsets < count[:, None]) & (positions >= 0) & (positions < capacity)
    dropped_row = max_batch + jnp.arange(batch, dtype=jnp.int32)[:, None]  # [B, 1], out of bounds and unique
    rows = jnp.where(keep, slots.astype(jnp.int32)[:, None], dropped_row)  # [B, T]
    coordinates = [rows, positions]
    if layer is not None:
        coordinates.append(jnp.full_like(rows, layer))
    indices = jnp.stack(coordinates, axis=-1).reshape(batch * tokens, len(coordinates))
    updates = new.reshape(batch * tokens, *new.shape[2:])
    indexed = tuple(range(len(coordinates)))
    dimension_numbers = lax.ScatterDimensionNumbers(
        update_window_dims=(1, 2), inserted_window_dims=indexed, scatter_dims_to_operand_dims=indexed)

    def scatter(buffer, indices, updates):
        return lax.scatter(buffer, indices, updates, dimension_numbers,
                           indices_are_sorted=False, unique_indices=True,
                           mode=lax.GatherScatterMode.FILL_OR_DROP)

    if jnp.dtype(buffer.dtype) not in CPU_HOST_INDEXED_DTYPES:
        return scatter(buffer, indices, updates)
    return lax.platform_dependent(buffer, indices, updates, cpu=_scatter_in_place_on_host, default=scatter)


def write_kv(cache: KVCache, layer: int, k: jax.Array, v: jax.Array, start: jax.Array,
             count: jax.Array, slots: jax.Array | None = None) -> KVCache:
    """Write one layer's new keys and values; see :func:`scatter_tokens` for the shapes.

    ``k`` and ``v`` are in the cache's dtype, or for an FP8 cache in any 16- or 32-bit float dtype
    (the model's): their codes are stored, ``k / cache.k_scale`` and ``v / cache.v_scale`` rounded
    to e4m3 and saturated at +-448 (:func:`~jax_vattention.cache.quantization.quantize`).

    Example::

        cache = write_kv(cache, layer=0, k=k_new, v=v_new, start=lengths, count=jnp.ones_like(lengths))
    """
    k_buffer, v_buffer, index = cache.layer(layer)
    for name, new, buffer in (("k", k, k_buffer), ("v", v, v_buffer)):
        if new.ndim != 4 or new.shape[2:] != buffer.shape[-2:]:
            raise ValueError(f"{name} has shape {new.shape}; expected [batch, tokens, "
                             f"{buffer.shape[-2]}, {buffer.shape[-1]}] for this cache")
        if cache.quantized:
            if not jnp.issubdtype(new.dtype, jnp.floating) or jnp.dtype(new.dtype).itemsize < 2:
                raise ValueError(f"{name} has dtype {new.dtype}; an FP8 cache takes keys and values in the "
                                 "model's 16- or 32-bit float dtype and quantizes them itself")
        elif new.dtype != buffer.dtype:
            raise ValueError(f"{name} has dtype {new.dtype}; the cache holds {buffer.dtype}: cast it first")
    if start.shape != (k.shape[0],) or count.shape != (k.shape[0],):
        raise ValueError(f"start and count must have shape [batch] = ({k.shape[0]},); "
                         f"got {start.shape} and {count.shape}")
    position = 0 if cache.interleaved else layer
    new_k = list(cache.k)
    new_v = list(cache.v)
    if cache.quantized:
        k, v = quantize(k, cache.k_scale, k_buffer.dtype), quantize(v, cache.v_scale, v_buffer.dtype)
    new_k[position] = scatter_tokens(k_buffer, k, start, count, slots, index)
    new_v[position] = scatter_tokens(v_buffer, v, start, count, slots, index)
    return cache.replace(k=tuple(new_k), v=tuple(new_v))
