"""Attention entry points: :func:`attend` (new queries over one layer's cache, in place) and
:func:`attend_prompt` (a prompt over its own keys, for prefill from position 0)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jax_vattention.attention.adapters import CUDNN_DTYPES, mosaic_prompt_attention
from jax_vattention.attention.backends import BACKENDS, PALLAS_BACKENDS, check_backend, default_backend
from jax_vattention.attention.reference import check_shapes, fold_kv_scales, scale_values


def attend_prompt(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array, *, backend: str,
                  scale: float | None = None, window: int | None = None) -> jax.Array:
    """Causal attention of a prompt over its own keys and values, starting at position 0.

    Prefill needs nothing from the cache when every row starts at position 0, so it can run on
    the new keys and values directly: the way to prefill an interleaved cache, whose layers
    cuDNN cannot read in place.

    Parameters
    ----------
    q : [batch, tokens, q_heads, head_dim]; k, v : [batch, tokens, kv_heads, head_dim], as a read of
        the cache would see them (:meth:`~jax_vattention.cache.kv_cache.KVCache.as_stored`: for an
        FP8 cache, quantized and dequantized), so that prefill attends what later steps read
    lengths : int32 [batch], the real tokens of each row (the rest is padding)
    backend : ``"cudnn"`` or a Pallas backend (``"pallas"``, ``"pallas_triton"``, ``"pallas_mgpu"``) use
        cuDNN on a GPU; elsewhere JAX's XLA version;
        ``"mosaic"`` JAX's Mosaic GPU flash attention (:func:`mosaic_prompt_attention`), or cuDNN
        with a ``window``, which the Mosaic kernel lacks
    scale : the logits' scale (default ``head_dim ** -0.5``)
    window : a query at position ``p`` sees keys ``s > p - window`` only (default: all ``s <= p``)

    Returns
    -------
    [batch, tokens, q_heads, head_dim]; rows past their length hold zeros or garbage that is never read.
    """
    check_backend(backend)
    if backend == "mosaic" and jax.default_backend() != "gpu":
        raise ValueError("backend 'mosaic' needs a Hopper GPU; use 'blocked' here")
    if backend == "mosaic" and window is None:
        return mosaic_prompt_attention(q, k.astype(q.dtype), v.astype(q.dtype), scale=scale)  # [B, T, N, H]
    cudnn = (jax.default_backend() == "gpu" and backend in ("cudnn", "mosaic", *PALLAS_BACKENDS)
             and jnp.dtype(q.dtype) in CUDNN_DTYPES)
    implementation = "cudnn" if cudnn else None
    return jax.nn.dot_product_attention(
        q, k.astype(q.dtype), v.astype(q.dtype), is_causal=True, query_seq_lengths=lengths,
        key_value_seq_lengths=lengths, scale=scale, local_window_size=None if window is None else (window - 1, 0),
        implementation=implementation)  # [B, T, N, H]


def attend(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, *, q_positions: jax.Array,
           kv_lengths: jax.Array, backend: str | None = None, slots: jax.Array | None = None,
           layer: int | None = None, scale: float | None = None, window: int | None = None,
           softcap: float | None = None, k_scale: float = 1.0, v_scale: float = 1.0) -> jax.Array:
    """Attention of new queries over one layer's cache, read in place.

    Parameters
    ----------
    q : [batch, q_len, q_heads, head_dim], already rotated
    k_cache, v_cache : [max_batch, capacity, kv_heads, head_dim], this layer's cache
        (holding the new tokens' keys and values already)
    q_positions : int32 [batch, q_len], each query's position in its sequence
    kv_lengths : int32 [batch], how many cache positions of each row are valid
    backend : ``"xla"``, ``"blocked"``, ``"cudnn"``, ``"pallas"`` (or ``"pallas_triton"``,
        ``"pallas_mgpu"``: see :mod:`~jax_vattention.attention.backends`), ``"mosaic"`` (decode only: see
        :func:`mosaic_attention`), or None for the default backend's
        :func:`default_backend` (on the platform JAX runs on; an interleaved cache when ``layer`` is
        given). Callers holding a :class:`KVCache` pass :func:`resolve_backend`'s answer.
    slots : int32 [batch] or None, the cache slot of each row (default: row ``b`` is slot ``b``);
        rows whose slot is ``>= max_batch`` are padding and get zeros
    layer : int or None, static: with an interleaved cache ``[max_batch, capacity, layers,
        kv_heads, head_dim]``, the layer to read (see :meth:`KVCache.layer`)
    scale, window, softcap : static; the logits' scale (default ``head_dim ** -0.5``), a sliding
        window (a query at position ``p`` sees keys ``s > p - window``; the kernels read nothing
        behind it) and a logit soft-cap (``softcap * tanh(logits / softcap)``); see
        :mod:`~jax_vattention.attention.reference`
    k_scale, v_scale : static; an FP8 cache's per-tensor scales (``KVCache.kv_scales``), folded into
        the logit scale and the output (:func:`~jax_vattention.attention.reference.fold_kv_scales`)

    Returns
    -------
    [batch, q_len, q_heads, head_dim], the dtype of ``q``.

    Example::

        out = attend(q, cache.k[0], cache.v[0], q_positions=lengths[:, None],
                     kv_lengths=lengths + 1, backend="cudnn")
    """
    if backend is None:
        backend = default_backend("per_layer" if layer is None else "interleaved", jax.default_backend(),
                                  k_cache.dtype)
    check_backend(backend)
    check_shapes(q, k_cache, v_cache, q_positions, kv_lengths, slots, layer)
    if window is not None and window < 1:
        raise ValueError(f"window must be a positive number of positions or None; got {window}")
    scale = fold_kv_scales(scale, q.shape[-1], k_scale)
    attention = functools.partial(BACKENDS[backend], layer=layer, scale=scale, window=window, softcap=softcap)

    def kernel(*operands):
        return scale_values(attention(*operands), v_scale)

    batch, q_len = q.shape[:2]
    max_batch = k_cache.shape[0]
    kv_lengths = kv_lengths.astype(jnp.int32)
    q_positions = q_positions.astype(jnp.int32)
    if slots is None and batch == max_batch:
        return kernel(q, k_cache, v_cache, q_positions, kv_lengths).astype(q.dtype)
    if slots is None:
        slots = jnp.arange(batch, dtype=jnp.int32)
    full_q = jnp.zeros((max_batch, *q.shape[1:]), q.dtype).at[slots].set(q, mode="drop")  # [M, T, N, H]
    full_positions = jnp.zeros((max_batch, q_len), jnp.int32).at[slots].set(
        q_positions, mode="drop")  # [M, T]
    full_lengths = jnp.zeros((max_batch,), jnp.int32).at[slots].set(kv_lengths, mode="drop")  # [M]
    full_out = kernel(full_q, k_cache, v_cache, full_positions, full_lengths)  # [M, T, N, H]
    return full_out.at[slots].get(mode="fill", fill_value=0).astype(q.dtype)  # [B, T, N, H]
