"""Float32 reference for decode attention, shared by the tests and the benchmark."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def decode_attention_reference(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    lengths: jax.Array,
    *,
    layer: int | None = None,
    scale: float | None = None,
) -> jax.Array:
    """Grouped-query decode attention in float32, written as plainly as possible.

    Parameters
    ----------
    q : jax.Array
      ``[batch, q_heads, head_dim]``.
    k_cache, v_cache : jax.Array
      ``[max_batch, max_len, kv_heads, head_dim]``, or ``[max_batch, max_len, layers, kv_heads,
      head_dim]`` read at ``layer``.
    lengths : jax.Array
      int32 ``[batch]``; a slot of length 0 gets zeros.
    layer : int, optional
      The layer of a 5-D cache.
    scale : float, optional
      Logit scale; ``1 / sqrt(head_dim)`` by default.

    Returns
    -------
    jax.Array
      float32 ``[batch, q_heads, head_dim]``.
    """
    if layer is not None:
        k_cache, v_cache = k_cache[:, :, layer], v_cache[:, :, layer]
    batch, q_heads, head_dim = q.shape
    max_len, kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = q_heads // kv_heads
    scale = 1.0 / np.sqrt(head_dim) if scale is None else scale
    highest = jax.lax.Precision.HIGHEST
    q = q.astype(jnp.float32).reshape(batch, kv_heads, group, head_dim)  # [B, K, G, D]
    k = k_cache[:batch].astype(jnp.float32)  # [B, L, K, D]
    v = v_cache[:batch].astype(jnp.float32)  # [B, L, K, D]
    logits = jnp.einsum("bkgd,blkd->bkgl", q, k, precision=highest) * scale  # [B, K, G, L]
    valid = jnp.arange(max_len)[None, :] < lengths[:, None]  # [B, L]
    logits = jnp.where(valid[:, None, None, :], logits, -jnp.inf)
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isneginf(row_max), 0.0, row_max)
    weights = jnp.exp(logits - row_max)  # [B, K, G, L]; exactly 0 past the length
    total = weights.sum(axis=-1, keepdims=True)
    weights = weights / jnp.where(total == 0, 1.0, total)
    out = jnp.einsum("bkgl,blkd->bkgd", weights, v, precision=highest)  # [B, K, G, D]
    return out.reshape(batch, q_heads, head_dim)
