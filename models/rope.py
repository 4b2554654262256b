"""Rotary position embeddings, with Llama 3.1's frequency scaling.

The rotation pairs dimension ``i`` with ``i + head_dim / 2`` (the "rotate half"
layout Hugging Face checkpoints are stored in), so weights load without any
permutation.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from .configs import LlamaConfig


def inverse_frequencies(config: LlamaConfig) -> np.ndarray:
    """The ``head_dim / 2`` rotary frequencies, float32, after any rope scaling.

    Computed on the host in float32, as Hugging Face does, so both sides agree to the last bit.
    """
    exponents = np.arange(0, config.head_dim, 2, dtype=np.float32) / np.float32(config.head_dim)
    inv_freq = (np.float32(1.0) / np.power(np.float32(config.rope_theta), exponents)).astype(np.float32)
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling.kind == "linear":
        return (inv_freq / np.float32(scaling.factor)).astype(np.float32)
    old_context = scaling.original_max_position_embeddings
    low_freq_wavelen = old_context / scaling.low_freq_factor
    high_freq_wavelen = old_context / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_context / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotate ``x`` by its positions.

    Parameters
    ----------
    x : [batch, tokens, heads, head_dim]
    positions : int32 [batch, tokens]
    inv_freq : float32 [head_dim / 2], from :func:`inverse_frequencies`

    Returns
    -------
    [batch, tokens, heads, head_dim], the dtype of ``x``.
    """
    angles = positions.astype(jnp.float32)[:, :, None] * jnp.asarray(inv_freq)[None, None, :]  # [B, T, H/2]
    angles = jnp.concatenate([angles, angles], axis=-1)  # [B, T, H]
    cos = jnp.cos(angles).astype(x.dtype)[:, :, None, :]  # [B, T, 1, H]
    sin = jnp.sin(angles).astype(x.dtype)[:, :, None, :]  # [B, T, 1, H]
    first, second = jnp.split(x, 2, axis=-1)  # [B, T, N, H/2] each
    rotated = jnp.concatenate([-second, first], axis=-1)  # [B, T, N, H]
    return x * cos + rotated * sin
