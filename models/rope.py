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


def _f32(x) -> np.ndarray:
    return np.asarray(x, np.float32)


def inverse_frequencies(config: LlamaConfig) -> np.ndarray:
    """The ``head_dim / 2`` rotary frequencies, float32 ``[head_dim / 2]``, after any rope scaling.

    Bit for bit what transformers computes, on any machine. transformers evaluates
    ``1.0 / base ** (arange(0, dim, 2) / dim)`` in float32 with torch; every step of that is a
    correctly rounded float32 operation except ``pow``, which we take in float64 and round once
    (a float32 ``np.power`` can be 2 ulp off, depending on the CPU's vector library). Why it
    matters: an angle is ``position * frequency``, so one ulp of a frequency near 1 moves the
    rotation of a token at position 2,000 by 1e-4 radians, and the logits with it. The llama3
    scaling repeats torch's float32 steps too (``a / tensor`` is ``tensor.reciprocal() * a``).
    """
    exponents = _f32(np.arange(0, config.head_dim, 2, dtype=np.float32) / np.float32(config.head_dim))
    powers = _f32(np.power(np.float64(_f32(config.rope_theta)), exponents.astype(np.float64)))  # [H/2]
    inv_freq = _f32(np.float32(1.0) / powers)  # [H/2]
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    factor = np.float32(scaling.factor)
    if scaling.kind == "linear":
        return _f32(inv_freq / factor)
    old_context = scaling.original_max_position_embeddings
    low_freq_wavelen = old_context / scaling.low_freq_factor
    high_freq_wavelen = old_context / scaling.high_freq_factor
    wavelen = _f32(_f32(np.float32(1.0) / inv_freq) * np.float32(2 * math.pi))  # [H/2]
    scaled = np.where(wavelen > low_freq_wavelen, _f32(inv_freq / factor), inv_freq)  # [H/2]
    ratio = _f32(_f32(np.float32(1.0) / wavelen) * np.float32(old_context))  # [H/2]
    smooth = _f32(_f32(ratio - np.float32(scaling.low_freq_factor))
                  / np.float32(scaling.high_freq_factor - scaling.low_freq_factor))  # [H/2]
    smoothed = _f32(_f32(_f32(np.float32(1.0) - smooth) * scaled) / factor) + _f32(smooth * scaled)  # [H/2]
    medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return _f32(np.where(medium, smoothed, scaled))


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
