"""The plain-XLA attention kernels: ``xla`` (the reference) and ``blocked`` (the CPU default).

Both read per-layer caches ``[max_batch, capacity, kv_heads, head_dim]`` or one layer of an
interleaved cache ``[max_batch, capacity, layers, kv_heads, head_dim]``; :func:`xla_attention`
reads the whole capacity and masks (dense caches and tests), :func:`blocked_attention` only each
row's first ``kv_lengths[b]`` positions, and with a ``window`` only the last ``window`` of them
its queries see (safe on a partly mapped cache, and on one whose pages behind the window are gone).

Every kernel of the package takes the same three optional knobs of the attention itself:
``scale`` (the logits' scale, ``head_dim ** -0.5`` when None), ``window`` (a query at position
``p`` sees only keys ``s > p - window``: a sliding window of ``window`` positions, its own
included) and ``softcap`` (logits become ``softcap * tanh(logits / softcap)``, after the scale).

An FP8 cache (:mod:`jax_vattention.cache.quantization`) is read the same way: every kernel converts
the codes it loads to the query's dtype (exactly) and computes as for a 16-bit cache; the per-tensor
scales are folded in by the caller (:func:`fold_kv_scales`): the key scale into the logit scale, the
value scale into the output.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental.buffer_callback import buffer_callback

from jax_vattention.cache.config import CPU_HOST_INDEXED_DTYPES
from jax_vattention.cache.quantization import is_quantized


def check_shapes(q, k_cache, v_cache, q_positions, kv_lengths, slots, layer):
    if q.ndim != 4:
        raise ValueError(f"q must be [batch, q_len, q_heads, head_dim]; got shape {q.shape}")
    rank = 4 if layer is None else 5
    if k_cache.ndim != rank or k_cache.shape != v_cache.shape:
        expected = ("[max_batch, capacity, kv_heads, head_dim]" if layer is None else
                    "[max_batch, capacity, layers, kv_heads, head_dim] (an interleaved cache, with layer=)")
        raise ValueError(f"k_cache and v_cache must both be {expected}; got {k_cache.shape} and {v_cache.shape}")
    if layer is not None and not 0 <= layer < k_cache.shape[2]:
        raise ValueError(f"layer {layer} is out of range for a cache of {k_cache.shape[2]} layers")
    batch, q_len, q_heads, head_dim = q.shape
    kv_heads = k_cache.shape[-2]
    if head_dim != k_cache.shape[-1]:
        raise ValueError(f"q has head_dim {head_dim}; the cache has {k_cache.shape[-1]}")
    if q_heads % kv_heads:
        raise ValueError(f"q_heads ({q_heads}) must be a multiple of kv_heads ({kv_heads})")
    if q_positions.shape != (batch, q_len):
        raise ValueError(f"q_positions must have shape {(batch, q_len)}; got {q_positions.shape}")
    if kv_lengths.shape != (batch,):
        raise ValueError(f"kv_lengths must have shape {(batch,)}; got {kv_lengths.shape}")
    if slots is None and batch > k_cache.shape[0]:
        raise ValueError(f"batch {batch} exceeds the cache's max_batch {k_cache.shape[0]}; pass slots")
    if slots is not None and slots.shape != (batch,):
        raise ValueError(f"slots must have shape {(batch,)}; got {slots.shape}")


def logit_scale(scale: float | None, head_dim: int) -> float:
    """``scale``, or ``head_dim ** -0.5`` for None."""
    return head_dim ** -0.5 if scale is None else scale


def compute_dtype(q_dtype, cache_dtype):
    """The dtype a kernel computes its products in: the cache's, or the query's for an FP8 cache
    (whose codes it converts to that dtype, exactly, as it loads them)."""
    return jnp.dtype(q_dtype) if is_quantized(cache_dtype) else jnp.dtype(cache_dtype)


def fold_kv_scales(scale: float | None, head_dim: int, k_scale: float = 1.0) -> float | None:
    """The logit scale of a kernel that reads FP8 codes: ``scale`` (``head_dim ** -0.5`` for None)
    times ``k_scale``, since ``q . (k_scale * codes) = k_scale * (q . codes)``; ``scale`` itself for
    a ``k_scale`` of 1 (None stays None: the kernels' default)."""
    if k_scale == 1.0:
        return scale
    return logit_scale(scale, head_dim) * k_scale


def scale_values(out: jax.Array, v_scale: float = 1.0) -> jax.Array:
    """A kernel's output over FP8 value codes times ``v_scale``: the weighted sum of the codes is
    ``1 / v_scale`` times that of the values (unchanged for 1)."""
    if v_scale == 1.0:
        return out
    return (out.astype(jnp.float32) * jnp.float32(v_scale)).astype(out.dtype)


def scaled_logits(dot: jax.Array, scale: float, softcap: float | None) -> jax.Array:
    """Float32 logits from float32 dot products: scaled, then soft-capped (``softcap`` None: not)."""
    logits = dot * jnp.float32(scale)
    if softcap is None:
        return logits
    return jnp.tanh(logits / jnp.float32(softcap)) * jnp.float32(softcap)


def window_start(q_positions: jax.Array, window: int | None) -> jax.Array:
    """int32 [B]: the first key position any query of each row sees, ``min_t q_positions[b, t] -
    window + 1`` (at least 0); 0 without a window."""
    if window is None:
        return jnp.zeros(q_positions.shape[:1], jnp.int32)
    return jnp.maximum(jnp.min(q_positions, axis=1) - (window - 1), 0).astype(jnp.int32)


def xla_attention(q, k_cache, v_cache, q_positions, kv_lengths, layer=None, *, scale=None, window=None,
                  softcap=None):
    """Reference attention: key ``s`` is visible to query ``t`` of row ``b`` when
    ``s < kv_lengths[b]``, ``s <= q_positions[b, t]`` and, with a ``window``,
    ``s > q_positions[b, t] - window``. Rows with no visible key give zeros.

    Shapes: q [B, T, N, H], caches [B, S, K, H], q_positions [B, T], kv_lengths [B] -> [B, T, N, H].
    With ``layer``, the caches are interleaved [B, S, layers, K, H] and that layer is sliced out
    (a copy: this backend is for CPU and tests).
    """
    if layer is not None:
        k_cache, v_cache = k_cache[:, :, layer], v_cache[:, :, layer]  # [B, S, K, H]
    batch, q_len, q_heads, head_dim = q.shape
    capacity, kv_heads = k_cache.shape[1], k_cache.shape[2]
    groups = q_heads // kv_heads
    dtype = compute_dtype(q.dtype, k_cache.dtype)
    k_cache, v_cache = k_cache.astype(dtype), v_cache.astype(dtype)  # an FP8 cache's codes, converted
    q = q.astype(dtype).reshape(batch, q_len, kv_heads, groups, head_dim)  # [B, T, K, G, H]
    logits = jnp.einsum('BTKGH,BSKH->BKGTS', q, k_cache,
                        preferred_element_type=jnp.float32)  # [B, K, G, T, S]
    logits = scaled_logits(logits, logit_scale(scale, head_dim), softcap)  # [B, K, G, T, S]
    key_positions = jnp.arange(capacity, dtype=jnp.int32)  # [S]
    visible = ((key_positions[None, None, :] < kv_lengths[:, None, None])
               & (key_positions[None, None, :] <= q_positions[:, :, None]))  # [B, T, S]
    if window is not None:
        visible &= key_positions[None, None, :] > q_positions[:, :, None] - window  # [B, T, S]
    visible = visible[:, None, None]  # [B, 1, 1, T, S]
    logits = jnp.where(visible, logits, jnp.float32(-1e30))  # [B, K, G, T, S]
    probs = jax.nn.softmax(logits, axis=-1)  # [B, K, G, T, S]
    probs = jnp.where(visible, probs, 0.0)  # [B, K, G, T, S]
    out = jnp.einsum('BKGTS,BSKH->BTKGH', probs.astype(v_cache.dtype), v_cache,
                     preferred_element_type=jnp.float32)  # [B, T, K, G, H]
    return out.reshape(batch, q_len, q_heads, head_dim).astype(q.dtype)  # [B, T, N, H]


# Keys per block of the ``blocked`` backend: 64 tokens of a small model's K is a few KiB, so a
# row reads at most one block's worth past what it needs (it never reads past its length).
BLOCK_TOKENS = 64


def _read_on_host(context, out, cache, *index) -> None:
    del context
    np.asarray(out)[...] = np.asarray(cache)[tuple(np.asarray(i) for i in index)]


def _gather_block(cache: jax.Array, index: tuple) -> jax.Array:
    """``cache[index]`` for in-bounds ``index``: ``(rows [B, 1], positions [B, S'](, layer))``.

    A bfloat16 or FP8 cache on the CPU backend is read by a host callback: XLA's CPU compiler has
    no gather of those types, converts the gathered operand to a wider type, and in a loop hoists
    that conversion of the whole cache out of it, which reads every page.
    """
    def gather(cache, *index):
        return cache.at[index].get(mode="promise_in_bounds")

    if jnp.dtype(cache.dtype) not in CPU_HOST_INDEXED_DTYPES:
        return gather(cache, *index)
    shape = jnp.broadcast_shapes(*(jnp.shape(i) for i in index)) + cache.shape[len(index):]
    read = buffer_callback(_read_on_host, jax.ShapeDtypeStruct(shape, cache.dtype))
    index = tuple(jnp.asarray(i, jnp.int32) for i in index)
    return lax.platform_dependent(cache, *index, cpu=read, default=gather)


def blocked_attention(q, k_cache, v_cache, q_positions, kv_lengths, layer=None, *, slots=None, scale=None,
                      window=None, softcap=None):
    """:func:`xla_attention`'s result, reading each row's cache only below its length (and, with a
    ``window``, only from the first position its queries see).

    A ``lax.fori_loop`` walks blocks of ``BLOCK_TOKENS`` key positions up to the longest row and
    keeps an online softmax in float32. Each row gathers its block's positions clamped to its own
    ``[start, length - 1]`` (``start`` from :func:`window_start`, 0 without a window), and a row of
    length 0 reads the longest row instead (its logits are all masked): no byte at or past a row's
    length, nor behind its window, is loaded, so pages the OS never committed stay so, and a partly
    mapped GPU cache is never read where it has no page (a block that starts outside a row's range
    is clamped inside it, whatever the page size). The loop starts at the block of the lowest
    ``start``. An interleaved cache is read one layer at a time in place.

    Several query tokens per row with their own positions make it the chunk kernel of chunked
    prefill: a chunk written at ``start`` attends with ``q_positions = start + t`` and
    ``kv_lengths = start + count`` to its cached prefix and, causally, to its own keys.

    Shapes: q [B, T, N, H], caches [M, S, K, H] (or [M, S, layers, K, H] with ``layer``),
    q_positions [B, T], kv_lengths [B], slots int32 [B] or None (row ``b`` reads cache row
    ``slots[b]``; None: ``B == M`` and row ``b`` reads row ``b``; a slot ``>= M`` is padding and
    must come with length 0) -> [B, T, N, H].
    """
    batch, q_len, q_heads, head_dim = q.shape
    max_batch, capacity, kv_heads = k_cache.shape[0], k_cache.shape[1], k_cache.shape[-2]
    groups = q_heads // kv_heads
    block = min(BLOCK_TOKENS, capacity)
    dtype = compute_dtype(q.dtype, k_cache.dtype)
    q = q.astype(dtype).reshape(batch, q_len, kv_heads, groups, head_dim)  # [B, T, K, G, H]
    rows = jnp.arange(batch, dtype=jnp.int32) if slots is None else slots.astype(jnp.int32)  # [B]
    lengths = jnp.where(rows < max_batch, jnp.clip(kv_lengths, 0, capacity), 0)  # [B]
    longest = jnp.argmax(lengths)  # []
    source = jnp.where(lengths > 0, rows, rows[longest])  # [B]; empty rows read the longest row
    last = jnp.maximum(jnp.where(lengths > 0, lengths, lengths[longest]) - 1, 0)  # [B], last readable
    source = jnp.clip(source, 0, max_batch - 1)  # [B]; all rows empty: no block is read at all
    first = jnp.minimum(window_start(q_positions, window), last)  # [B], first readable
    first = jnp.where(lengths > 0, first, first[longest])  # [B]; empty rows: the longest row's
    blocks = (jnp.max(lengths) + block - 1) // block  # []; stop: past the longest row
    start = 0
    if window is not None:  # from the block of the lowest window start
        start = jnp.minimum(jnp.min(jnp.where(lengths > 0, first, capacity)) // block, blocks)  # []
    offsets = jnp.arange(block, dtype=jnp.int32)  # [S']
    scale = logit_scale(scale, head_dim)
    layer_index = () if layer is None else (layer,)

    def body(i, carry):
        top, total, acc = carry  # [B, K, G, T], [B, K, G, T], [B, K, G, T, H]
        positions = i * block + offsets  # [S']
        read_at = jnp.clip(positions[None, :], first[:, None], last[:, None])  # [B, S']
        index = (source[:, None], read_at, *layer_index)
        keys = _gather_block(k_cache, index).astype(dtype)  # [B, S', K, H]; FP8 codes converted
        values = _gather_block(v_cache, index).astype(dtype)  # [B, S', K, H]
        logits = scaled_logits(jnp.einsum('BTKGH,BSKH->BKGTS', q, keys, preferred_element_type=jnp.float32),
                               scale, softcap)  # [B, K, G, T, S']
        visible = ((positions[None, None, :] < lengths[:, None, None])
                   & (positions[None, None, :] <= q_positions[:, :, None]))  # [B, T, S']
        if window is not None:
            visible &= positions[None, None, :] > q_positions[:, :, None] - window  # [B, T, S']
        visible = visible[:, None, None]  # [B, 1, 1, T, S']
        logits = jnp.where(visible, logits, jnp.float32(-1e30))  # [B, K, G, T, S']
        new_top = jnp.maximum(top, jnp.max(logits, axis=-1))  # [B, K, G, T]
        probs = jnp.where(visible, jnp.exp(logits - new_top[..., None]), 0.0)  # [B, K, G, T, S']
        rescale = jnp.exp(top - new_top)  # [B, K, G, T]
        total = total * rescale + jnp.sum(probs, axis=-1)  # [B, K, G, T]
        acc = acc * rescale[..., None] + jnp.einsum(
            'BKGTS,BSKH->BKGTH', probs.astype(values.dtype), values,
            preferred_element_type=jnp.float32)  # [B, K, G, T, H]
        return new_top, total, acc

    stats_shape = (batch, kv_heads, groups, q_len)
    carry = (jnp.full(stats_shape, -1e30, jnp.float32), jnp.zeros(stats_shape, jnp.float32),
             jnp.zeros((*stats_shape, head_dim), jnp.float32))
    _, total, acc = lax.fori_loop(start, blocks, body, carry)
    out = acc / jnp.where(total > 0, total, 1.0)[..., None]  # [B, K, G, T, H]; no visible key: zeros
    out = jnp.transpose(out, (0, 3, 1, 2, 4))  # [B, T, K, G, H]
    return out.reshape(batch, q_len, q_heads, head_dim).astype(q.dtype)  # [B, T, N, H]
