"""Unpaged attention over a KV cache, with the kernel chosen by one argument.

Every backend reads the per-layer cache arrays ``[max_batch, capacity,
kv_heads, head_dim]`` as they are, with no slice, transpose or copy of a whole
cache array, and uses only each row's first ``kv_lengths[b]`` positions (the
``xla`` reference alone copies a layer out of an interleaved cache). That
is what lets a virtual cache, whose pages past the live tokens are unmapped,
serve unmodified kernels: switching kernels is a change of ``backend=``.

Backends
--------
``xla``
    The reference: plain einsums with float32 softmax. It reads the whole
    capacity and masks, so it is for dense caches and tests; it is refused for
    a virtual cache on a GPU (see :func:`resolve_backend`).
``blocked``
    Plain XLA too, but a loop over blocks of ``BLOCK_TOKENS`` keys with an online
    softmax that stops at the longest row, each row reading only positions below
    its own length. The default on CPU: the OS commits only the pages that hold
    live tokens, and it is safe on a partly mapped GPU cache.
``cudnn``
    ``jax.nn.dot_product_attention(implementation="cudnn")`` with
    ``key_value_seq_lengths``: it stops at each row's length, safe on a partly
    mapped cache. Prefill (``q_len > 1``) assumes each row's queries start at
    position 0 (top-left causal mask), which is how :mod:`jax_vattention.generate`
    prefills.
``pallas``
    Decode (``q_len == 1``) runs
    ``jax_vattention.kernels.decode_attention.decode_attention``; prefill falls
    back to ``cudnn`` on GPU and ``blocked`` elsewhere.
``mosaic``
    JAX's Mosaic GPU flash attention (FlashAttention-3 on Hopper,
    ``jax.experimental.pallas.ops.gpu.attention_mgpu``), a kernel we did not write
    and that has no paged version, for prompt prefill from position 0: it takes no
    lengths, so it attends each prompt over the prompt's own keys and values
    (:func:`attend_prompt`, causal: a real query never sees a padding key). Hopper
    only, 16-bit caches, ``head_dim`` a multiple of 64. Decode runs cuDNN on a
    per-layer cache and the Pallas decode kernel on an interleaved one.

Which backend may run is one rule, :func:`resolve_backend`, used by
:func:`attend`, :func:`jax_vattention.generate.generate` and the engine: no
backend is given, the device and layout pick one (:func:`default_backend`);
a backend that reads past the lengths is refused for a virtual cache on a GPU.

Rows and slots: a batch row ``b`` may live in any cache slot ``slots[b]``. The
kernels pair query row ``i`` with cache row ``i``, so the (small) queries are
scattered into a ``[max_batch, ...]`` array, attended, and the rows gathered
back; the cache itself is never gathered.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental.buffer_callback import buffer_callback


def _check_shapes(q, k_cache, v_cache, q_positions, kv_lengths, slots, layer):
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


def xla_attention(q, k_cache, v_cache, q_positions, kv_lengths, layer=None):
    """Reference attention: key ``s`` is visible to query ``t`` of row ``b`` when
    ``s < kv_lengths[b]`` and ``s <= q_positions[b, t]``. Rows with no visible key give zeros.

    Shapes: q [B, T, N, H], caches [B, S, K, H], q_positions [B, T], kv_lengths [B] -> [B, T, N, H].
    With ``layer``, the caches are interleaved [B, S, layers, K, H] and that layer is sliced out
    (a copy: this backend is for CPU and tests).
    """
    if layer is not None:
        k_cache, v_cache = k_cache[:, :, layer], v_cache[:, :, layer]  # [B, S, K, H]
    batch, q_len, q_heads, head_dim = q.shape
    capacity, kv_heads = k_cache.shape[1], k_cache.shape[2]
    groups = q_heads // kv_heads
    q = q.astype(k_cache.dtype).reshape(batch, q_len, kv_heads, groups, head_dim)  # [B, T, K, G, H]
    logits = jnp.einsum('BTKGH,BSKH->BKGTS', q, k_cache,
                        preferred_element_type=jnp.float32)  # [B, K, G, T, S]
    logits = logits * jnp.float32(head_dim ** -0.5)  # [B, K, G, T, S]
    key_positions = jnp.arange(capacity, dtype=jnp.int32)  # [S]
    visible = ((key_positions[None, None, :] < kv_lengths[:, None, None])
               & (key_positions[None, None, :] <= q_positions[:, :, None]))  # [B, T, S]
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

    A bfloat16 cache on the CPU backend is read by a host callback: XLA's CPU compiler has no
    bfloat16 gather, converts the gathered operand to float32, and in a loop hoists that
    conversion of the whole cache out of it, which reads every page.
    """
    def gather(cache, *index):
        return cache.at[index].get(mode="promise_in_bounds")

    if jnp.dtype(cache.dtype) != jnp.dtype(jnp.bfloat16):
        return gather(cache, *index)
    shape = jnp.broadcast_shapes(*(jnp.shape(i) for i in index)) + cache.shape[len(index):]
    read = buffer_callback(_read_on_host, jax.ShapeDtypeStruct(shape, cache.dtype))
    index = tuple(jnp.asarray(i, jnp.int32) for i in index)
    return lax.platform_dependent(cache, *index, cpu=read, default=gather)


def blocked_attention(q, k_cache, v_cache, q_positions, kv_lengths, layer=None, *, slots=None):
    """:func:`xla_attention`'s result, reading each row's cache only below its length.

    A ``lax.fori_loop`` walks blocks of ``BLOCK_TOKENS`` key positions up to the longest row and
    keeps an online softmax in float32. Each row gathers its block's positions clamped to its own
    ``length - 1``, and a row of length 0 reads the longest row instead (its logits are all masked):
    no byte at or past a row's length is loaded, so pages the OS never committed stay so, and a
    partly mapped GPU cache is never read where it has no page (a block that starts below a row's
    length is clamped inside it, whatever the page size). An interleaved cache is read one layer at
    a time in place.

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
    q = q.astype(k_cache.dtype).reshape(batch, q_len, kv_heads, groups, head_dim)  # [B, T, K, G, H]
    rows = jnp.arange(batch, dtype=jnp.int32) if slots is None else slots.astype(jnp.int32)  # [B]
    lengths = jnp.where(rows < max_batch, jnp.clip(kv_lengths, 0, capacity), 0)  # [B]
    longest = jnp.argmax(lengths)  # []
    source = jnp.where(lengths > 0, rows, rows[longest])  # [B]; empty rows read the longest row
    last = jnp.maximum(jnp.where(lengths > 0, lengths, lengths[longest]) - 1, 0)  # [B], last readable
    source = jnp.clip(source, 0, max_batch - 1)  # [B]; all rows empty: no block is read at all
    blocks = (jnp.max(lengths) + block - 1) // block  # []; stop: past the longest row
    offsets = jnp.arange(block, dtype=jnp.int32)  # [S']
    scale = jnp.float32(head_dim ** -0.5)
    layer_index = () if layer is None else (layer,)

    def body(i, carry):
        top, total, acc = carry  # [B, K, G, T], [B, K, G, T], [B, K, G, T, H]
        positions = i * block + offsets  # [S']
        read_at = jnp.minimum(positions[None, :], last[:, None])  # [B, S']
        index = (source[:, None], read_at, *layer_index)
        keys = _gather_block(k_cache, index)  # [B, S', K, H]
        values = _gather_block(v_cache, index)  # [B, S', K, H]
        logits = jnp.einsum('BTKGH,BSKH->BKGTS', q, keys,
                            preferred_element_type=jnp.float32) * scale  # [B, K, G, T, S']
        visible = ((positions[None, None, :] < lengths[:, None, None])
                   & (positions[None, None, :] <= q_positions[:, :, None]))[:, None, None]  # [B, 1, 1, T, S']
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
    _, total, acc = lax.fori_loop(0, blocks, body, carry)
    out = acc / jnp.where(total > 0, total, 1.0)[..., None]  # [B, K, G, T, H]; no visible key: zeros
    out = jnp.transpose(out, (0, 3, 1, 2, 4))  # [B, T, K, G, H]
    return out.reshape(batch, q_len, q_heads, head_dim).astype(q.dtype)  # [B, T, N, H]


def chunk_attention(q, k_cache, v_cache, *, slots, q_positions, kv_lengths, layer=None):
    """Attention of prefill chunks (several query tokens per row) over their slots' caches, in place.

    Row ``b`` is a chunk of slot ``slots[b]`` already written into the cache; its query ``t`` at
    position ``q_positions[b, t]`` sees keys ``s <= q_positions[b, t]`` and ``s < kv_lengths[b]``
    (the cached prefix plus the chunk's own keys, causal within the chunk: a bottom-right causal
    mask). Nothing at or past ``kv_lengths[b]`` is read, so it is safe on a virtual cache mapped
    up to the lengths. Rows of one slot may follow each other in one call (consecutive chunks of a
    long prompt), since every chunk is written before any is attended.

    Shapes: q [R, T, N, H]; caches [M, S, K, H] (or [M, S, layers, K, H] with ``layer``);
    slots int32 [R] (``>= M``: padding, with length 0); q_positions int32 [R, T]; kv_lengths
    int32 [R] -> [R, T, N, H] (zeros where a query sees no key).

    On a GPU, with a bfloat16, float16 or float32 cache and a power-of-two ``head_dim`` in [16, 256],
    the Pallas kernel :func:`jax_vattention.kernels.chunk_attention.chunk_attention` runs it, its loop
    over key tiles on the device; elsewhere :func:`blocked_attention`, whose loop bound XLA on a GPU
    would read on the host at every block.

    Example::

        out = chunk_attention(q, cache.k[0], cache.v[0], slots=jnp.array([3]),
                              q_positions=jnp.arange(40, 48)[None], kv_lengths=jnp.array([48]))
    """
    _check_shapes(q, k_cache, v_cache, q_positions, kv_lengths, slots, layer)
    q_positions, kv_lengths = q_positions.astype(jnp.int32), kv_lengths.astype(jnp.int32)
    if jax.default_backend() == "gpu":
        from jax_vattention.kernels.chunk_attention import chunk_attention as chunk_kernel, supported
        if supported(k_cache.dtype, k_cache.shape[-1]):
            rows = jnp.arange(q.shape[0], dtype=jnp.int32) if slots is None else slots.astype(jnp.int32)
            out = chunk_kernel(q.astype(k_cache.dtype), k_cache, v_cache, rows, q_positions, kv_lengths,
                               layer=layer, interpret=False)
            return out.astype(q.dtype)  # [R, T, N, H]
    return blocked_attention(q, k_cache, v_cache, q_positions, kv_lengths, layer, slots=slots)


def dot_product_attention(q, k_cache, v_cache, q_positions, kv_lengths, layer=None, *,
                          implementation="cudnn"):
    """``jax.nn.dot_product_attention`` over the cache, bounded by ``kv_lengths``.

    Decode (``T == 1``) attends the first ``kv_lengths[b]`` keys; prefill (``T > 1``)
    is causal from position 0. ``implementation=None`` runs JAX's own XLA version of the
    same call, which is how the argument mapping is tested on CPU.
    """
    del q_positions  # decode: the query sees all kv_lengths keys; prefill: top-left causal from 0
    if layer is not None:
        raise ValueError("cuDNN cannot read one layer of an interleaved cache in place (it would copy the "
                         "whole cache): use backend='pallas' with the interleaved layout")
    q_len = q.shape[1]
    q = q.astype(k_cache.dtype)  # [B, T, N, H]
    if q_len == 1:
        return jax.nn.dot_product_attention(
            q, k_cache, v_cache, key_value_seq_lengths=kv_lengths,
            implementation=implementation)  # [B, 1, N, H]
    return jax.nn.dot_product_attention(
        q, k_cache, v_cache, is_causal=True, key_value_seq_lengths=kv_lengths,
        query_seq_lengths=jnp.minimum(kv_lengths, q_len),
        implementation=implementation)  # [B, T, N, H]


def cudnn_attention(q, k_cache, v_cache, q_positions, kv_lengths, layer=None):
    """cuDNN flash attention; see :func:`dot_product_attention`."""
    return dot_product_attention(q, k_cache, v_cache, q_positions, kv_lengths, layer, implementation="cudnn")


def pallas_attention(q, k_cache, v_cache, q_positions, kv_lengths, layer=None):
    """The project's Pallas decode kernel; prefill falls back to cuDNN (a 16-bit cache on a GPU) or the blocked kernel."""
    if q.shape[1] > 1:
        use_cudnn = jax.default_backend() == "gpu" and jnp.dtype(k_cache.dtype) in CUDNN_DTYPES
        fallback = cudnn_attention if use_cudnn else blocked_attention
        return fallback(q, k_cache, v_cache, q_positions, kv_lengths, layer)
    try:
        from jax_vattention.kernels.decode_attention import decode_attention
    except ModuleNotFoundError as error:
        raise ValueError("backend 'pallas' needs jax_vattention.kernels.decode_attention, "
                         f"which cannot be imported ({error})") from error
    out = decode_attention(q[:, 0].astype(k_cache.dtype), k_cache, v_cache, kv_lengths, layer=layer)  # [B, N, H]
    return out[:, None]  # [B, 1, N, H]


# Query rows per warpgroup of the Mosaic kernel; each program takes two warpgroups' rows, so a
# prompt is padded to a multiple of 2 * MOSAIC_BLOCK_Q tokens.
MOSAIC_BLOCK_Q = 64


def check_mosaic_shapes(dtype, head_dim: int) -> None:
    """``ValueError`` unless the Mosaic kernel takes a cache of ``dtype`` and ``head_dim``."""
    if jnp.dtype(dtype) not in CUDNN_DTYPES:
        raise ValueError(f"backend 'mosaic' takes bfloat16 or float16 caches, not {jnp.dtype(dtype)}: use "
                         "'blocked' (or a 16-bit model dtype)")
    if head_dim % 64:
        raise ValueError(f"backend 'mosaic' needs head_dim a multiple of 64 (its wgmma tiles); this cache has "
                         f"{head_dim}: use 'cudnn' or 'pallas'")


def mosaic_prompt_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, kernel: Callable | None = None) -> jax.Array:
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
    scaled = q.astype(jnp.float32) * jnp.float32(head_dim ** -0.5)  # [B, T, N, H]
    q16, k16, v16 = (jnp.pad(x.astype(jnp.float16), pad) for x in (scaled, k, v))  # [B, T', ., H]
    return kernel(q16, k16, v16)[:, :tokens].astype(q.dtype)  # [B, T, N, H]


def mosaic_attention(q, k_cache, v_cache, q_positions, kv_lengths, layer=None):
    """The ``mosaic`` backend over a cache: decode only (cuDNN per-layer, the Pallas kernel interleaved).

    The Mosaic kernel cannot read a cache in place (it has no lengths: it would read past them),
    so prefill goes through :func:`attend_prompt` (see :func:`prefill_attends_prompt`)."""
    if q.shape[1] > 1:
        raise ValueError("backend 'mosaic' prefills through attend_prompt (from position 0, over the prompt's "
                         "own keys): its kernel takes no lengths, so it cannot read a cache in place")
    decode = cudnn_attention if layer is None else pallas_attention
    return decode(q, k_cache, v_cache, q_positions, kv_lengths, layer)


def prefill_attends_prompt(backend: str, interleaved: bool) -> bool:
    """Whether a prefill from position 0 attends over the prompt's own keys and values
    (:func:`attend_prompt`) instead of reading the cache: for every backend but the ``xla``
    reference on an interleaved cache (cuDNN cannot read one layer of it in place), and for
    backends whose prefill kernel takes no lengths (:data:`PROMPT_KERNELS`)."""
    return backend in PROMPT_KERNELS or (interleaved and backend != "xla")


def attend_prompt(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array, *, backend: str) -> jax.Array:
    """Causal attention of a prompt over its own keys and values, starting at position 0.

    Prefill needs nothing from the cache when every row starts at position 0, so it can run on
    the new keys and values directly: the way to prefill an interleaved cache, whose layers
    cuDNN cannot read in place.

    Parameters
    ----------
    q : [batch, tokens, q_heads, head_dim]; k, v : [batch, tokens, kv_heads, head_dim]
    lengths : int32 [batch], the real tokens of each row (the rest is padding)
    backend : ``"cudnn"`` or ``"pallas"`` use cuDNN on a GPU; elsewhere JAX's XLA version;
        ``"mosaic"`` JAX's Mosaic GPU flash attention (:func:`mosaic_prompt_attention`)

    Returns
    -------
    [batch, tokens, q_heads, head_dim]; rows past their length hold zeros or garbage that is never read.
    """
    check_backend(backend)
    if backend == "mosaic":
        if jax.default_backend() != "gpu":
            raise ValueError("backend 'mosaic' needs a Hopper GPU; use 'blocked' here")
        return mosaic_prompt_attention(q, k.astype(q.dtype), v.astype(q.dtype))  # [B, T, N, H]
    cudnn = (jax.default_backend() == "gpu" and backend in ("cudnn", "pallas")
             and jnp.dtype(q.dtype) in CUDNN_DTYPES)
    implementation = "cudnn" if cudnn else None
    return jax.nn.dot_product_attention(
        q, k.astype(q.dtype), v.astype(q.dtype), is_causal=True, query_seq_lengths=lengths,
        key_value_seq_lengths=lengths, implementation=implementation)  # [B, T, N, H]


BACKENDS: dict[str, Callable] = {
    "xla": xla_attention,
    "blocked": blocked_attention,
    "cudnn": cudnn_attention,
    "pallas": pallas_attention,
    "mosaic": mosaic_attention,
}


# Backends that read every position of the capacity, not only each row's first kv_lengths[b].
READS_WHOLE_CAPACITY = frozenset({"xla"})

# Backends whose prefill kernel takes no lengths: a prompt attends over its own keys (attend_prompt).
PROMPT_KERNELS = frozenset({"mosaic"})


def check_backend(backend: str) -> None:
    """Raises ``ValueError`` unless ``backend`` names one of :data:`BACKENDS`."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")


# The dtypes cuDNN's fused attention takes.
CUDNN_DTYPES = frozenset({jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)})


def default_backend(layout: str, platform: str, dtype=None) -> str:
    """The kernel a device runs when none is named: on a GPU cuDNN for per-layer caches and the
    Pallas kernel for interleaved ones; ``blocked`` elsewhere, and for a float32 cache (``dtype``)
    on a GPU, which cuDNN (and so Pallas' prefill) cannot take. ``platform`` is
    ``jax.Device.platform``."""
    if platform != "gpu" or (dtype is not None and jnp.dtype(dtype) not in CUDNN_DTYPES):
        return "blocked"
    return "pallas" if layout == "interleaved" else "cudnn"


def check_backend_on(backend: str, layout: str, platform: str, virtual: bool = True, *,
                     compute_capability: str | None = None) -> None:
    """The one rule for which attention backend may read which cache; ``ValueError`` if it may not.

    ``layout`` is the cache's (``"per_layer"`` or ``"interleaved"``), ``platform`` its device's
    ``jax.Device.platform``, ``virtual`` whether a manager serves it, ``compute_capability`` the
    GPU's (``jax.Device.compute_capability``, e.g. ``"9.0"``; None: not checked). Refused: an
    unknown backend; cuDNN off a GPU, or on an interleaved cache (it cannot read one layer in
    place); Mosaic off a Hopper GPU (its kernel is written for sm_90's wgmma); and a backend in
    :data:`READS_WHOLE_CAPACITY` on a virtual cache on a GPU, whose pages past the lengths are
    unmapped: one read there kills the CUDA context.
    """
    check_backend(backend)
    if backend == "mosaic" and platform != "gpu":
        raise ValueError(f"backend 'mosaic' (JAX's Mosaic GPU flash attention) needs an NVIDIA Hopper GPU; JAX "
                         f"runs on {platform} here: use 'blocked'")
    if backend == "mosaic" and compute_capability is not None and str(compute_capability).split(".")[0] != "9":
        raise ValueError(f"backend 'mosaic' needs a Hopper GPU (compute capability 9.x: its kernel uses wgmma); "
                         f"this GPU's is {compute_capability}: use 'cudnn' or 'pallas'")
    if backend == "cudnn" and platform != "gpu":
        raise ValueError(f"backend 'cudnn' needs a CUDA GPU; JAX runs on {platform} here: use 'blocked' "
                         "(or 'pallas', which is interpreted and slow off a GPU)")
    if backend == "cudnn" and layout == "interleaved":
        raise ValueError("backend 'cudnn' cannot read one layer of an interleaved cache in place: use the "
                         "per_layer layout or backend 'pallas'")
    if backend in READS_WHOLE_CAPACITY and virtual and platform == "gpu":
        raise ValueError(f"backend {backend!r} reads the whole cache capacity, which a virtual cache on a GPU "
                         "has not mapped (the read would kill the CUDA context): use 'cudnn', 'pallas' or "
                         "'blocked', or None for the device's default")


def resolve_backend(backend: str | None, cache) -> str:
    """The backend that reads ``cache`` (a :class:`KVCache`): ``backend``, checked by
    :func:`check_backend_on`, or for ``None`` the :func:`default_backend` of the cache's device
    and layout. Raises ``ValueError`` for an unknown or unsafe backend.
    """
    device = next(iter(cache.k[0].devices()))
    layout = "interleaved" if cache.interleaved else "per_layer"
    if backend is None:
        return default_backend(layout, device.platform, cache.k[0].dtype)
    check_backend_on(backend, layout, device.platform, virtual=not cache.is_dense,
                     compute_capability=getattr(device, "compute_capability", None))
    if backend == "mosaic":
        check_mosaic_shapes(cache.k[0].dtype, cache.k[0].shape[-1])
    return backend


def attend(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, *, q_positions: jax.Array,
           kv_lengths: jax.Array, backend: str | None = None, slots: jax.Array | None = None,
           layer: int | None = None) -> jax.Array:
    """Attention of new queries over one layer's cache, read in place.

    Parameters
    ----------
    q : [batch, q_len, q_heads, head_dim], already rotated
    k_cache, v_cache : [max_batch, capacity, kv_heads, head_dim], this layer's cache
        (holding the new tokens' keys and values already)
    q_positions : int32 [batch, q_len], each query's position in its sequence
    kv_lengths : int32 [batch], how many cache positions of each row are valid
    backend : ``"xla"``, ``"blocked"``, ``"cudnn"``, ``"pallas"``, ``"mosaic"`` (decode only: see
        :func:`mosaic_attention`), or None for the default backend's
        :func:`default_backend` (on the platform JAX runs on; an interleaved cache when ``layer`` is
        given). Callers holding a :class:`KVCache` pass :func:`resolve_backend`'s answer.
    slots : int32 [batch] or None, the cache slot of each row (default: row ``b`` is slot ``b``);
        rows whose slot is ``>= max_batch`` are padding and get zeros
    layer : int or None, static: with an interleaved cache ``[max_batch, capacity, layers,
        kv_heads, head_dim]``, the layer to read (see :meth:`KVCache.layer`)

    Returns
    -------
    [batch, q_len, q_heads, head_dim], the dtype of ``q``.

    Example::

        out = attend(q, cache.k[0], cache.v[0], q_positions=lengths[:, None],
                     kv_lengths=lengths + 1, backend="cudnn")
    """
    if backend is None:
        backend = default_backend("per_layer" if layer is None else "interleaved", jax.default_backend())
    check_backend(backend)
    _check_shapes(q, k_cache, v_cache, q_positions, kv_lengths, slots, layer)
    kernel = functools.partial(BACKENDS[backend], layer=layer)
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
