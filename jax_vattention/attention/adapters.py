"""Adapters from the one attention signature to kernels: cuDNN, our Pallas kernels, JAX's Mosaic GPU one.

Each adapter takes ``(q [B, T, N, H], k_cache, v_cache, q_positions [B, T], kv_lengths [B],
layer=None, *, scale=None, window=None, softcap=None)`` and reads the cache in place, only below
each row's length and, with a ``window``, only within it (see :mod:`.reference` for the knobs).
cuDNN takes a window for prefill from position 0 (a top-left window, as its causal mask) but not
for decode, and no soft-capping: those calls run our Pallas kernels instead. An FP8 cache is read by
our Triton kernels (and the blocked one), which convert its codes as they load them; cuDNN and the
Mosaic GPU kernels refuse it (see :func:`~jax_vattention.attention.backends.check_backend_on`).
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

from jax_vattention.attention.kernel_implementation import pallas_implementation
from jax_vattention.attention.reference import (blocked_attention, check_shapes, compute_dtype, fold_kv_scales,
                                                scale_values)
from jax_vattention.cache.quantization import is_quantized

# The dtypes cuDNN's fused attention takes.
CUDNN_DTYPES = frozenset({jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)})
# Why cuDNN does not read an FP8 cache: JAX's cuDNN FP8 attention takes no sequence lengths (nor a
# padding mask), so it would read every position of the capacity, unmapped pages included.
CUDNN_FP8_REFUSAL = ("cuDNN cannot read an FP8 cache: JAX's cuDNN FP8 attention takes no sequence lengths, so it "
                     "would read the whole capacity (unmapped pages included); use backend 'pallas' (our Triton "
                     "kernels dequantize it) or 'blocked'")


def chunk_attention(q, k_cache, v_cache, *, slots, q_positions, kv_lengths, layer=None, backend=None, scale=None,
                    window=None, softcap=None, k_scale=1.0, v_scale=1.0):
    """Attention of prefill chunks (several query tokens per row) over their slots' caches, in place.

    Row ``b`` is a chunk of slot ``slots[b]`` already written into the cache; its query ``t`` at
    position ``q_positions[b, t]`` sees keys ``s <= q_positions[b, t]`` and ``s < kv_lengths[b]``
    (the cached prefix plus the chunk's own keys, causal within the chunk: a bottom-right causal
    mask), and with a ``window`` only keys ``s > q_positions[b, t] - window``. Nothing at or past
    ``kv_lengths[b]`` is read, nor behind the window of the chunk's first query, so it is safe on
    a virtual cache mapped up to the lengths and unmapped behind the windows. Rows of one slot may follow each other in one call (consecutive chunks of a
    long prompt), since every chunk is written before any is attended.

    Shapes: q [R, T, N, H]; caches [M, S, K, H] (or [M, S, layers, K, H] with ``layer``);
    slots int32 [R] (``>= M``: padding, with length 0); q_positions int32 [R, T]; kv_lengths
    int32 [R] -> [R, T, N, H] (zeros where a query sees no key). ``k_scale``, ``v_scale``: an FP8
    cache's scales (:class:`~jax_vattention.cache.kv_cache.KVCache` ``.kv_scales``).

    On a GPU, with a bfloat16, float16, float32 or FP8 cache and a power-of-two ``head_dim`` in [16, 256],
    our Pallas chunk kernel runs it, its loop over key tiles on the device: the Mosaic GPU one
    (:mod:`~jax_vattention.attention.kernels.mosaic_chunk_attention`) where ``backend`` resolves to
    it (:func:`~jax_vattention.attention.kernel_implementation.pallas_implementation`) and no ``scale``,
    ``window`` or ``softcap`` is given (it takes none), the Triton one
    (:mod:`~jax_vattention.attention.kernels.chunk_attention`) otherwise; elsewhere
    :func:`blocked_attention`, whose loop bound XLA on a GPU would read on the host at every block.

    Example::

        out = chunk_attention(q, cache.k[0], cache.v[0], slots=jnp.array([3]),
                              q_positions=jnp.arange(40, 48)[None], kv_lengths=jnp.array([48]))
    """
    check_shapes(q, k_cache, v_cache, q_positions, kv_lengths, slots, layer)
    scale = fold_kv_scales(scale, q.shape[-1], k_scale)
    out = _chunk_attention(q, k_cache, v_cache, slots, q_positions.astype(jnp.int32), kv_lengths.astype(jnp.int32),
                           layer=layer, backend=backend, scale=scale, window=window, softcap=softcap)
    return scale_values(out, v_scale)


def _chunk_attention(q, k_cache, v_cache, slots, q_positions, kv_lengths, *, layer, backend, scale, window, softcap):
    """:func:`chunk_attention` with the scales folded in."""
    dtype = compute_dtype(q.dtype, k_cache.dtype)
    if jax.default_backend() == "gpu":
        from jax_vattention.attention.kernels.chunk_attention import chunk_attention as chunk_kernel, supported
        rows = jnp.arange(q.shape[0], dtype=jnp.int32) if slots is None else slots.astype(jnp.int32)
        implementation = pallas_implementation(backend, k_cache.dtype, k_cache.shape[-1],
                                               q.shape[2] // k_cache.shape[-2], k_cache.shape[1])
        if implementation == "mosaic_gpu" and scale is None and window is None and softcap is None:
            from jax_vattention.attention.kernels.mosaic_chunk_attention import mosaic_chunk_attention
            out = mosaic_chunk_attention(q.astype(dtype), k_cache, v_cache, rows, q_positions, kv_lengths,
                                         layer=layer)
            return out.astype(q.dtype)  # [R, T, N, H]
        if supported(k_cache.dtype, k_cache.shape[-1]):
            out = chunk_kernel(q.astype(dtype), k_cache, v_cache, rows, q_positions, kv_lengths,
                               layer=layer, scale=scale, window=window, softcap=softcap, interpret=False)
            return out.astype(q.dtype)  # [R, T, N, H]
    return blocked_attention(q, k_cache, v_cache, q_positions, kv_lengths, layer, slots=slots, scale=scale,
                             window=window, softcap=softcap)


def dot_product_attention(q, k_cache, v_cache, q_positions, kv_lengths, layer=None, *,
                          implementation="cudnn", scale=None, window=None, softcap=None):
    """``jax.nn.dot_product_attention`` over the cache, bounded by ``kv_lengths``.

    Decode (``T == 1``) attends the first ``kv_lengths[b]`` keys; prefill (``T > 1``)
    is causal from position 0, and a ``window`` is its ``local_window_size`` (``window - 1``
    keys to the left). ``implementation=None`` runs JAX's own XLA version of the same call,
    which is how the argument mapping is tested on CPU. It has no soft-capping, nor a window
    for decode (its window is top-left aligned): ``ValueError`` for those.
    """
    del q_positions  # decode: the query sees all kv_lengths keys; prefill: top-left causal from 0
    if layer is not None:
        raise ValueError("cuDNN cannot read one layer of an interleaved cache in place (it would copy the "
                         "whole cache): use backend='pallas' with the interleaved layout")
    if is_quantized(k_cache.dtype):
        raise ValueError(CUDNN_FP8_REFUSAL)
    q_len = q.shape[1]
    if softcap is not None or (window is not None and q_len == 1):
        raise ValueError("jax.nn.dot_product_attention has no soft-capping and no decode window: use "
                         "cudnn_attention, which runs the Pallas kernels for those")
    q = q.astype(k_cache.dtype)  # [B, T, N, H]
    if q_len == 1:
        return jax.nn.dot_product_attention(
            q, k_cache, v_cache, key_value_seq_lengths=kv_lengths, scale=scale,
            implementation=implementation)  # [B, 1, N, H]
    return jax.nn.dot_product_attention(
        q, k_cache, v_cache, is_causal=True, key_value_seq_lengths=kv_lengths,
        query_seq_lengths=jnp.minimum(kv_lengths, q_len), scale=scale,
        local_window_size=None if window is None else (window - 1, 0),
        implementation=implementation)  # [B, T, N, H]


def cudnn_attention(q, k_cache, v_cache, q_positions, kv_lengths, layer=None, *, scale=None, window=None,
                    softcap=None):
    """cuDNN flash attention (see :func:`dot_product_attention`); a decode window or soft-capping,
    which cuDNN lacks, runs the Pallas kernels (:func:`pallas_attention`)."""
    if softcap is not None or (window is not None and q.shape[1] == 1):
        return pallas_attention(q, k_cache, v_cache, q_positions, kv_lengths, layer, scale=scale, window=window,
                                softcap=softcap)
    return dot_product_attention(q, k_cache, v_cache, q_positions, kv_lengths, layer, implementation="cudnn",
                                 scale=scale, window=window)


def pallas_attention(q, k_cache, v_cache, q_positions, kv_lengths, layer=None, *, backend="pallas", scale=None,
                     window=None, softcap=None):
    """The project's Pallas decode kernel, on the implementation ``backend`` names (``"pallas"``: the
    platform's, :func:`~jax_vattention.attention.kernel_implementation.pallas_implementation`; a ``scale``, a
    ``window`` or a ``softcap``, which only the Triton kernels take, runs those); prefill falls back to
    cuDNN (a 16-bit cache on a GPU, no soft-capping), else to :func:`chunk_attention` (our chunk
    kernel on a GPU, the blocked kernel elsewhere)."""
    mask = dict(scale=scale, window=window, softcap=softcap)
    if q.shape[1] > 1:
        on_gpu = jax.default_backend() == "gpu"
        if on_gpu and jnp.dtype(k_cache.dtype) in CUDNN_DTYPES and softcap is None and layer is None:
            return dot_product_attention(q, k_cache, v_cache, q_positions, kv_lengths, layer, scale=scale,
                                         window=window)
        if on_gpu:
            return chunk_attention(q, k_cache, v_cache, slots=None, q_positions=q_positions, kv_lengths=kv_lengths,
                                   layer=layer, backend=backend, **mask)
        return blocked_attention(q, k_cache, v_cache, q_positions, kv_lengths, layer, **mask)
    implementation = pallas_implementation(backend, k_cache.dtype, k_cache.shape[-1],
                                           q.shape[2] // k_cache.shape[-2], k_cache.shape[1])
    if implementation == "mosaic_gpu" and all(value is None for value in mask.values()):
        if jax.default_backend() != "gpu":
            raise ValueError(f"backend {backend!r} runs our Mosaic GPU kernels, which need a Hopper GPU; JAX runs "
                             f"on {jax.default_backend()} here: use 'blocked' or 'pallas_triton'")
        from jax_vattention.attention.kernels.mosaic_decode_attention import mosaic_decode_attention
        out = mosaic_decode_attention(q[:, 0].astype(compute_dtype(q.dtype, k_cache.dtype)), k_cache, v_cache,
                                      kv_lengths, layer=layer)  # [B, N, H]
        return out[:, None]  # [B, 1, N, H]
    try:
        from jax_vattention.attention.kernels.decode_attention import decode_attention
    except ModuleNotFoundError as error:
        raise ValueError(f"backend {backend!r} needs jax_vattention.attention.kernels.decode_attention, "
                         f"which cannot be imported ({error})") from error
    out = decode_attention(q[:, 0].astype(compute_dtype(q.dtype, k_cache.dtype)), k_cache, v_cache, kv_lengths,
                           layer=layer, **mask)  # [B, N, H]
    return out[:, None]  # [B, 1, N, H]


# Query rows per warpgroup of the Mosaic kernel; each program takes two warpgroups' rows, so a
# prompt is padded to a multiple of 2 * MOSAIC_BLOCK_Q tokens.
MOSAIC_BLOCK_Q = 64


def check_mosaic_shapes(dtype, head_dim: int | None) -> None:
    """``ValueError`` unless the Mosaic kernel takes a cache of ``dtype`` and ``head_dim``."""
    if jnp.dtype(dtype) not in CUDNN_DTYPES:
        raise ValueError(f"backend 'mosaic' takes bfloat16 or float16 caches, not {jnp.dtype(dtype)}: use "
                         "'blocked' (or a 16-bit model dtype)")
    if head_dim is not None and head_dim % 64:
        raise ValueError(f"backend 'mosaic' needs head_dim a multiple of 64 (its wgmma tiles); this cache has "
                         f"{head_dim}: use 'cudnn' or 'pallas'")


def mosaic_prompt_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, kernel: Callable | None = None,
                            scale: float | None = None) -> jax.Array:
    """Causal attention of prompts from position 0 over their own keys, by Mosaic GPU flash attention.

    The kernel has no lengths and no scale, needs sequences in whole tiles and (jax 0.10–0.11)
    stages its operands in float16 shared memory. So the queries are scaled first, everything is
    cast to float16 and padded with zeros to a multiple of ``2 * MOSAIC_BLOCK_Q`` tokens; the causal
    mask keeps every real query (``t < length``) off the padding keys (``s > t``).

    Shapes: q [B, T, N, H]; k, v [B, T, K, H] -> [B, T, N, H] in ``q``'s dtype (rows past a
    prompt's length hold values that are never read). ``kernel(q, k, v)`` replaces the Mosaic
    call (tests run ``attention_mgpu.attention_reference`` on a CPU through it).
    """
    batch, tokens, _, head_dim = q.shape
    check_mosaic_shapes(q.dtype, head_dim)
    padded = -(-tokens // (2 * MOSAIC_BLOCK_Q)) * (2 * MOSAIC_BLOCK_Q)
    if kernel is None:
        from jax.experimental.pallas.ops.gpu import attention_mgpu
        # 128-key blocks where they fit: two of K and two of V in shared memory up to head_dim 128.
        block_kv = 128 if padded >= 256 and head_dim <= 128 else 64
        config = attention_mgpu.TuningConfig(block_q=MOSAIC_BLOCK_Q, block_kv=block_kv, max_concurrent_steps=2,
                                             causal=True)
        kernel = functools.partial(attention_mgpu.attention, config=config)
    pad = ((0, 0), (0, padded - tokens), (0, 0), (0, 0))
    scaled = q.astype(jnp.float32) * jnp.float32(head_dim ** -0.5 if scale is None else scale)  # [B, T, N, H]
    q16, k16, v16 = (jnp.pad(x.astype(jnp.float16), pad) for x in (scaled, k, v))  # [B, T', ., H]
    return kernel(q16, k16, v16)[:, :tokens].astype(q.dtype)  # [B, T, N, H]


def mosaic_attention(q, k_cache, v_cache, q_positions, kv_lengths, layer=None, *, scale=None, window=None,
                     softcap=None):
    """The ``mosaic`` backend over a cache: decode only (cuDNN per-layer, the Pallas kernel interleaved).

    The Mosaic kernel cannot read a cache in place (it has no lengths: it would read past them),
    so prefill goes through :func:`attend_prompt` (see :func:`prefill_attends_prompt`); a
    soft-capped prefill, which neither it nor cuDNN computes, reads the cache with the Pallas
    chunk kernel (:func:`pallas_attention`)."""
    mask = dict(scale=scale, window=window, softcap=softcap)
    if q.shape[1] > 1 and softcap is None:
        raise ValueError("backend 'mosaic' prefills through attend_prompt (from position 0, over the prompt's "
                         "own keys): its kernel takes no lengths, so it cannot read a cache in place")
    decode = cudnn_attention if layer is None else pallas_attention
    return decode(q, k_cache, v_cache, q_positions, kv_lengths, layer, **mask)

