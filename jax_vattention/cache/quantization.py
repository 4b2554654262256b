"""An FP8 KV cache: keys and values stored as ``float8_e4m3fn`` codes with per-tensor scales.

A value ``x`` is stored as the code ``c = e4m3(clip(x / scale, -448, 448))`` (round to nearest
even, saturating at the format's largest finite value, as vLLM's ``scaled_fp8_conversion``) and
read back as ``c * scale``. Half the bytes of a 16-bit cache: twice the tokens per page and per
budget, half the bytes an attention call reads.

What is stored, and where
-------------------------
* The codes, in the cache's own buffers (``CacheConfig(dtype=jnp.float8_e4m3fn)``): nothing else is
  added to a page, so page arithmetic, prefix sharing (aliased pages) and forks (copied pages) are
  the same as for any dtype, with a token half the size.
* One ``k_scale`` and one ``v_scale`` per cache (vLLM's static per-tensor scales, 1.0 unless
  calibrated), static Python floats on the :class:`~jax_vattention.cache.config.CacheConfig` and the
  :class:`~jax_vattention.cache.kv_cache.KVCache`.

Why static per-tensor scales: a per-tensor scale factors out of both products of attention,
``q . (s_k c) = s_k (q . c)`` and ``sum p (s_v c) = s_v sum p c``, so a kernel dequantizes by
converting codes to the query's dtype (exact: every e4m3 value is a bfloat16 and a float16 value)
and folds ``s_k`` into the logit scale and ``s_v`` into its output: no per-element multiply, and
nothing to store or shard beside the codes. A scale that changed per token would need a cache of
its own (and its pages, mapped and aliased with the codes'); per-head scales would factor out the
same way but become vectors that every kernel takes and tensor parallelism splits with the heads,
for checkpoints we do not load.

Round trip (the bound the tests hold): for ``|x| <= 448 * scale``, ``|dequantize(quantize(x)) - x|
<= max(|x| * 2**-4, scale * 2**-10)``: three mantissa bits give a relative error of at most half a
step, 2**-4, down to the smallest normal code 2**-6; below it the codes are spaced 2**-9 apart.
Larger values saturate to ``+-448 * scale``; NaN stays NaN.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp

FP8 = jnp.dtype(jnp.float8_e4m3fn)
# The dtypes of a quantized cache: what write_kv quantizes into and the kernels dequantize from.
QUANTIZED_DTYPES = frozenset({FP8})
# The largest finite float8_e4m3fn value: quantization saturates there.
FP8_MAX = float(jnp.finfo(FP8).max)
# The round trip's bounds (see the module's docstring).
RELATIVE_ERROR = 2.0 ** -4
SUBNORMAL_ERROR = 2.0 ** -10


def is_quantized(dtype) -> bool:
    """Whether a cache of ``dtype`` holds quantized codes (with scales) rather than values."""
    return jnp.dtype(dtype) in QUANTIZED_DTYPES


def quantize(x: jax.Array, scale: float, dtype=FP8) -> jax.Array:
    """The codes of ``x``: ``x / scale`` rounded to ``dtype``, saturating at its largest finite value.

    ``x / scale`` is computed as ``x * float32(1 / scale)``, as vLLM's kernels do with an inverted scale:
    compilers turn a division by a constant into that product anyway (XLA's CPU compiler does), and
    writing it out makes every backend round the same way (a reference computes it in numpy alike).
    Infinities saturate too; NaN stays NaN.

    Example::

        quantize(jnp.array([1.0, 1000.0, 0.3]), 2.0)  # codes 0.5, 448 (saturated), 0.15625
    """
    largest = float(jnp.finfo(dtype).max)
    scaled = x.astype(jnp.float32) * jnp.float32(1.0 / scale)  # one rounding of 1 / scale, then one per value
    return jnp.clip(scaled, -largest, largest).astype(dtype)


def dequantize(codes: jax.Array, scale: float, dtype) -> jax.Array:
    """``codes * scale`` in ``dtype``."""
    return (codes.astype(jnp.float32) * jnp.float32(scale)).astype(dtype)


def as_stored(x: jax.Array, cache_dtype, scale: float) -> jax.Array:
    """What a kernel reading a cache of ``cache_dtype`` sees for ``x``: ``x`` cast to it, or for a
    quantized cache ``x`` quantized with ``scale`` and dequantized back to ``x``'s own dtype.

    Prefill that attends a prompt over its own keys (without reading the cache) attends these, so
    that it sees what a later read of the cache would."""
    if not is_quantized(cache_dtype):
        return x.astype(cache_dtype)
    return dequantize(quantize(x, scale, cache_dtype), scale, x.dtype)


def write_dtype(cache_dtype, model_dtype):
    """The dtype :func:`~jax_vattention.cache.writes.write_kv` takes for a cache of ``cache_dtype``
    from a model computing in ``model_dtype``: the cache's own, or the model's for a quantized cache
    (``write_kv`` quantizes)."""
    return jnp.dtype(model_dtype) if is_quantized(cache_dtype) else jnp.dtype(cache_dtype)


def check_scales(dtype, k_scale, v_scale, owner: str) -> tuple[float, float]:
    """``(k_scale, v_scale)`` as floats: positive finite numbers, and 1.0 unless ``dtype`` is
    quantized; else ``ValueError`` naming ``owner``'s field."""
    scales = []
    for name, scale in (("k_scale", k_scale), ("v_scale", v_scale)):
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not 0 < float(scale) < float("inf"):
            raise ValueError(f"{owner}.{name} must be a positive finite number (the quantization scale), "
                             f"got {scale!r}")
        if float(scale) != 1.0 and not is_quantized(dtype):
            raise ValueError(f"{owner}.{name}={scale} scales the codes of an FP8 cache; a {jnp.dtype(dtype)} "
                             "cache holds values: leave it 1.0 or use dtype=float8_e4m3fn")
        scales.append(float(scale))
    return scales[0], scales[1]
