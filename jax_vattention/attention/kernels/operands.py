"""The checks every attention kernel over the cache makes of its cache operands.

A kernel reads ``[max_batch, max_len, kv_heads, head_dim]`` caches, or one ``layer`` of
layer-interleaved ``[max_batch, max_len, layers, kv_heads, head_dim]`` ones, in place: the
shapes, dtypes and the layer are checked before anything is traced, so a mistake is a
``ValueError`` that names it rather than an error from inside a compiled kernel.

A cache is the query's dtype, or an FP8 cache (``float8_e4m3fn`` codes) under a 16- or 32-bit
query: the kernels convert its tiles to the query's dtype as they load them.
"""

from __future__ import annotations

import jax.numpy as jnp

from jax_vattention.cache.quantization import is_quantized

SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)


def supported(dtype, head_dim: int) -> bool:
    """Whether the kernels take a cache of ``dtype`` (16- or 32-bit, or FP8) with ``head_dim`` (a power
    of two in [16, 256])."""
    return ((jnp.dtype(dtype) in tuple(map(jnp.dtype, SUPPORTED_DTYPES)) or is_quantized(dtype))
            and 16 <= head_dim <= 256 and not head_dim & (head_dim - 1))


def check_cache_operands(q_dtype, q_heads: int, head_dim: int, k_cache, v_cache, layer) -> None:
    """``ValueError`` unless ``k_cache`` and ``v_cache`` are caches of one shape and the query's dtype
    (or both FP8),
    ``layer`` is given exactly for an interleaved one and in range, ``head_dim`` is the cache's and
    supported, and ``q_heads`` is a multiple of the cache's KV heads (GQA)."""
    if k_cache.ndim not in (4, 5):
        raise ValueError(
            "k_cache must be [max_batch, max_len, kv_heads, head_dim] or "
            f"[max_batch, max_len, layers, kv_heads, head_dim], got shape {k_cache.shape}"
        )
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"k_cache and v_cache shapes differ: {k_cache.shape} vs {v_cache.shape}")
    if k_cache.ndim == 5 and layer is None:
        raise ValueError(
            "a layer-interleaved cache [max_batch, max_len, layers, kv_heads, head_dim] needs `layer`"
        )
    if k_cache.ndim == 4 and layer is not None:
        raise ValueError(
            f"`layer` applies only to a 5-D layer-interleaved cache; k_cache has shape {k_cache.shape}"
        )
    if layer is not None and not 0 <= layer < k_cache.shape[2]:
        raise ValueError(f"layer {layer} out of range for {k_cache.shape[2]} layers")
    cache_dtype = q_dtype if is_quantized(k_cache.dtype) else k_cache.dtype
    if not (q_dtype == cache_dtype and k_cache.dtype == v_cache.dtype):
        raise ValueError(f"q, k_cache and v_cache dtypes differ: {q_dtype}, {k_cache.dtype}, {v_cache.dtype} "
                         "(a cache is the query's dtype, or float8_e4m3fn for both K and V)")
    if q_dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype {q_dtype} not supported; use bfloat16, float16 or float32")
    kv_heads, cache_head_dim = k_cache.shape[-2], k_cache.shape[-1]
    if cache_head_dim != head_dim:
        raise ValueError(f"head_dim of q ({head_dim}) and of the cache ({cache_head_dim}) differ")
    if not supported(q_dtype, head_dim):
        raise ValueError(f"head_dim must be a power of two in [16, 256], got {head_dim}")
    if q_heads % kv_heads:
        raise ValueError(f"q_heads ({q_heads}) must be a multiple of kv_heads ({kv_heads})")


def check_decode_operands(q, k_cache, v_cache, lengths, layer) -> None:
    """``ValueError`` unless a decode kernel takes these operands: ``q [batch, q_heads, head_dim]``
    over caches of at least ``batch`` slots (:func:`check_cache_operands`), ``lengths`` int32 ``[batch]``."""
    if q.ndim != 3:
        raise ValueError(f"q must be [batch, q_heads, head_dim], got shape {q.shape}")
    batch, q_heads, head_dim = q.shape
    check_cache_operands(q.dtype, q_heads, head_dim, k_cache, v_cache, layer)
    if batch > k_cache.shape[0]:
        raise ValueError(f"batch ({batch}) exceeds the cache's max_batch ({k_cache.shape[0]})")
    if lengths.shape != (batch,) or lengths.dtype != jnp.int32:
        raise ValueError(f"lengths must be int32 [batch={batch}], got {lengths.dtype} {lengths.shape}")


def check_chunk_operands(q, k_cache, v_cache, slots, q_positions, kv_lengths, layer) -> None:
    """``ValueError`` unless a chunk kernel takes these operands: ``q [rows, q_len, q_heads, head_dim]``
    over caches (:func:`check_cache_operands`), ``slots`` and ``kv_lengths`` int32 ``[rows]``,
    ``q_positions`` int32 ``[rows, q_len]``."""
    if q.ndim != 4:
        raise ValueError(f"q must be [rows, q_len, q_heads, head_dim], got shape {q.shape}")
    rows, q_len, q_heads, head_dim = q.shape
    check_cache_operands(q.dtype, q_heads, head_dim, k_cache, v_cache, layer)
    if slots.shape != (rows,) or slots.dtype != jnp.int32:
        raise ValueError(f"slots must be int32 [rows={rows}], got {slots.dtype} {slots.shape}")
    if q_positions.shape != (rows, q_len) or q_positions.dtype != jnp.int32:
        raise ValueError(
            f"q_positions must be int32 [rows={rows}, q_len={q_len}], got {q_positions.dtype} {q_positions.shape}")
    if kv_lengths.shape != (rows,) or kv_lengths.dtype != jnp.int32:
        raise ValueError(f"kv_lengths must be int32 [rows={rows}], got {kv_lengths.dtype} {kv_lengths.shape}")
