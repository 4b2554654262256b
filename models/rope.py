"""Rotary position embeddings with transformers' frequencies, bit for bit: default, linear, dynamic
(NTK), llama3, YaRN and LongRoPE.

The rotation pairs dimension ``i`` with ``i + head_dim / 2`` (the "rotate half" layout Hugging
Face checkpoints are stored in), so weights load without any permutation.

Why float32 step by step: an angle is ``position * frequency``, so one ulp of a frequency near 1
moves the rotation of a token at position 2,000 by 1e-4 radians, and the logits with it.
transformers computes the frequencies with torch in float32; every step of that is a correctly
rounded float32 operation except ``pow``, which we take in float64 and round once (a float32
``np.power`` can be 2 ulp off, depending on the CPU's vector library; the correctly rounded value
is within 1 ulp of torch's). Each function below repeats torch's steps in that order, a Python
number in an operation with a tensor being rounded to float32 first (``a / tensor`` is
``tensor.reciprocal() * a``).

Two kinds depend on the sequence: dynamic NTK raises the base once a sequence passes
``max_position_embeddings``, and LongRoPE switches from its short to its long factors past
``original_max_position_embeddings``. transformers takes, for each forward pass, the frequencies
of its longest position + 1 (the keys already in the cache keep the rotation they were written
with). :class:`RotaryTable` holds every set of frequencies a cache of ``capacity`` positions can
need, and each row of a pass picks its set by its own length, in the graph.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from .configs import LlamaConfig, RopeScaling


def _f32(x) -> np.ndarray:
    return np.asarray(x, np.float32)


def _pow(base, exponent) -> np.ndarray:
    """``base ** exponent`` of float32 operands, correctly rounded to float32."""
    return _f32(np.power(np.float64(_f32(base)), _f32(exponent).astype(np.float64)))


def _exponents(head_dim: int) -> np.ndarray:
    """``arange(0, dim, 2).float() / dim``, float32 ``[head_dim / 2]``."""
    return _f32(np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim))


def _default(theta: float, head_dim: int) -> np.ndarray:
    """``1.0 / base ** (arange(0, dim, 2) / dim)``, float32 ``[head_dim / 2]``."""
    return _f32(np.float32(1.0) / _pow(theta, _exponents(head_dim)))


def _llama3(inv_freq: np.ndarray, scaling: RopeScaling) -> np.ndarray:
    factor = np.float32(scaling.factor)
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


def _dynamic(theta: float, head_dim: int, factor: float, max_positions: int, seq_len: int) -> np.ndarray:
    """Dynamic NTK at a sequence of ``seq_len`` positions (> ``max_positions``): transformers' steps
    on a tensor ``seq_len``, in float32."""
    ratio = _f32(_f32(np.float32(factor) * np.float32(seq_len)) / np.float32(max_positions))
    ratio = _f32(ratio - np.float32(factor - 1))
    # A tensor to a Python power: torch takes the power in double precision and rounds once.
    power = _f32(np.power(np.float64(ratio), head_dim / (head_dim - 2)))
    base = _f32(np.float32(theta) * power)
    return _f32(np.float32(1.0) / _pow(base, _exponents(head_dim)))


def _yarn(theta: float, head_dim: int, scaling: RopeScaling) -> tuple[np.ndarray, float]:
    factor = scaling.factor
    attention = scaling.attention_factor
    if attention is None:
        def mscale(scale, m=1.0):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0
        if scaling.mscale and scaling.mscale_all_dim:
            attention = float(mscale(factor, scaling.mscale) / mscale(factor, scaling.mscale_all_dim))
        else:
            attention = mscale(factor)
    original = scaling.original_max_position_embeddings

    def correction_dim(rotations):
        return (head_dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(scaling.beta_fast), correction_dim(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    powers = _pow(theta, _exponents(head_dim))  # [H/2]
    extrapolation = _f32(np.float32(1.0) / powers)  # [H/2]
    interpolation = _f32(np.float32(1.0) / _f32(np.float32(factor) * powers))  # [H/2]
    ramp = _f32(_f32(np.arange(head_dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low))
    keep = _f32(np.float32(1.0) - np.clip(ramp, np.float32(0.0), np.float32(1.0)))  # [H/2]
    inv_freq = _f32(_f32(interpolation * _f32(np.float32(1.0) - keep)) + _f32(extrapolation * keep))
    return inv_freq, attention


def _longrope(theta: float, head_dim: int, factors) -> np.ndarray:
    return _f32(np.float32(1.0) / _f32(_f32(factors) * _pow(theta, _exponents(head_dim))))


def _longrope_attention(scaling: RopeScaling, max_positions: int) -> float:
    if scaling.attention_factor is not None:
        return scaling.attention_factor
    original = scaling.original_max_position_embeddings
    factor = scaling.factor if scaling.factor is not None else max_positions / original
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


@dataclasses.dataclass(frozen=True)
class RotaryTable:
    """Every set of inverse frequencies a sequence may rotate with, and how a row picks its set.

    Attributes
    ----------
    sets : float32 ``[S, head_dim / 2]``
    first : a row whose sequence is ``n`` positions long takes set ``clip(n - first, 0, S - 1)``
        (``S == 1``: one set for every row)
    attention_scaling : cos and sin are multiplied by it (YaRN and LongRoPE's attention factor)
    """

    sets: np.ndarray
    first: int
    attention_scaling: float

    def frequencies(self, seq_lens: jax.Array) -> jax.Array:
        """The frequencies of each token, float32 ``[B, T, head_dim / 2]`` from its row's
        sequence length ``seq_lens`` int32 ``[B, T]``; ``[head_dim / 2]`` when there is one set."""
        if len(self.sets) == 1:
            return jnp.asarray(self.sets[0])
        index = jnp.clip(seq_lens - self.first, 0, len(self.sets) - 1)  # [B, T]
        return jnp.asarray(self.sets)[index]  # [B, T, H/2]


def rotary_table(config: LlamaConfig, *, sliding: bool = False, capacity: int | None = None) -> RotaryTable:
    """The :class:`RotaryTable` of the full layers of ``config`` (``sliding``: of its sliding layers,
    which Gemma 3 rotates with their own base), for a cache of ``capacity`` positions (dynamic NTK
    holds one set per sequence length up to it; default ``max_position_embeddings``)."""
    theta, scaling = config.rope_theta, config.rope_scaling
    if sliding and config.sliding_rope_theta is not None:
        theta, scaling = config.sliding_rope_theta, config.sliding_rope_scaling
    head_dim = config.head_dim
    if scaling is None:
        return RotaryTable(_default(theta, head_dim)[None], 0, 1.0)
    if scaling.kind == "linear":
        return RotaryTable(_f32(_default(theta, head_dim) / np.float32(scaling.factor))[None], 0, 1.0)
    if scaling.kind == "llama3":
        return RotaryTable(_llama3(_default(theta, head_dim), scaling)[None], 0, 1.0)
    if scaling.kind == "yarn":
        inv_freq, attention = _yarn(theta, head_dim, scaling)
        return RotaryTable(inv_freq[None], 0, attention)
    if scaling.kind == "longrope":
        original = scaling.original_max_position_embeddings
        sets = np.stack([_longrope(theta, head_dim, scaling.short_factor),
                         _longrope(theta, head_dim, scaling.long_factor)])  # [2, H/2]
        return RotaryTable(sets, original, _longrope_attention(scaling, config.max_position_embeddings))
    # Dynamic NTK: up to max_position_embeddings the base is theta; each longer length its own.
    limit = config.max_position_embeddings
    longest = max(capacity or limit, limit)
    sets = [_default(theta, head_dim)] + [
        _dynamic(theta, head_dim, scaling.factor, limit, n) for n in range(limit + 1, longest + 1)]
    return RotaryTable(np.stack(sets), limit, 1.0)


def inverse_frequencies(config: LlamaConfig, *, sliding: bool = False) -> np.ndarray:
    """The rotary frequencies of a sequence within ``max_position_embeddings`` (and LongRoPE's
    original length), float32 ``[head_dim / 2]``, after any rope scaling: the first set of
    :func:`rotary_table`."""
    return rotary_table(config, sliding=sliding).sets[0]


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq, attention_scaling: float = 1.0) -> jax.Array:
    """Rotate ``x`` by its positions.

    Parameters
    ----------
    x : [batch, tokens, heads, head_dim]
    positions : int32 [batch, tokens]
    inv_freq : float32 [head_dim / 2], or [batch, tokens, head_dim / 2] (a set per token:
        :meth:`RotaryTable.frequencies`)
    attention_scaling : cos and sin are multiplied by it in float32 (YaRN, LongRoPE)

    Returns
    -------
    [batch, tokens, heads, head_dim], the dtype of ``x``.
    """
    inv_freq = jnp.asarray(inv_freq, jnp.float32)
    if inv_freq.ndim == 1:
        inv_freq = inv_freq[None, None, :]  # [1, 1, H/2]
    angles = positions.astype(jnp.float32)[:, :, None] * inv_freq  # [B, T, H/2]
    angles = jnp.concatenate([angles, angles], axis=-1)  # [B, T, H]
    cos, sin = jnp.cos(angles), jnp.sin(angles)  # [B, T, H]
    if attention_scaling != 1.0:
        cos, sin = cos * jnp.float32(attention_scaling), sin * jnp.float32(attention_scaling)
    cos = cos.astype(x.dtype)[:, :, None, :]  # [B, T, 1, H]
    sin = sin.astype(x.dtype)[:, :, None, :]  # [B, T, 1, H]
    first, second = jnp.split(x, 2, axis=-1)  # [B, T, N, H/2] each
    rotated = jnp.concatenate([-second, first], axis=-1)  # [B, T, N, H]
    return x * cos + rotated * sin
