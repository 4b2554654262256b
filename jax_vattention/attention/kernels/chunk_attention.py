"""Chunked-prefill GQA attention over a virtually contiguous KV cache, with the key loop on the device.

A prefill chunk is ``T`` query tokens of one slot, already written into the cache at positions
``[start, start + count)``. Its query at position ``p`` sees the cached prefix and, causally, its own
chunk: keys ``s <= p`` with ``s < length``. The cache is read where it lies, ``[max_batch, max_len,
kv_heads, head_dim]`` or one layer of a layer-interleaved ``[max_batch, max_len, layers, kv_heads,
head_dim]``, and the cache row is chosen by ``slots[r]`` at run time. No byte at or past a row's length
is loaded: past it a vAttention cache may have no physical page, and one load there kills the CUDA
context::

    row r -> cache row slots[r], kv head h:
        | tile 0 | tile 1 | ... | tile n-1 |###### unmapped ######|
        ^ token 0                 length ^  (last tile masked; no tile past it)
    query block j of row r (block_q tokens x group heads) streams tiles 0 .. n-1, where
        n = cdiv(min(length, highest position in the block + 1), block_k)

With a sliding ``window`` a query at position ``p`` sees keys ``s > p - window`` only, and the
block's tiles start at the one that holds its lowest query's first key, that tile's lanes below it
masked: nothing behind the block's window is loaded, so pages behind every slot's window may be
unmapped.

Why a kernel: the XLA version (:func:`jax_vattention.attention.blocked_attention`) loops over key
blocks with a trip count read from the data, which XLA on a GPU fetches to the host at every
iteration. Here one program per (row, kv head, block of query tokens) runs that loop itself, so a
mixed step's attention never waits on the host.

Each program takes all ``G = q_heads / kv_heads`` query heads of one GQA group for its ``block_q``
query tokens as one ``[block_q * G', head_dim]`` operand (``G'`` is ``G`` rounded up to a power of two;
the padding heads, and padding query tokens past ``T``, get position -1 and see no key), so every K/V
byte is read once per group and query block. Logits and the online softmax are float32, in base 2.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jax_vattention.attention.kernels.operands import check_chunk_operands, supported

__all__ = ["chunk_attention", "default_block_k", "default_block_q", "default_num_warps", "supported"]


# Smallest row count of a Triton `dot` operand.
_MIN_DOT_ROWS = 16
# Query rows (tokens x group heads) per program by default: the tile of a Triton flash-attention forward.
_DEFAULT_BLOCK_ROWS = 64
_LOG2_E = math.log2(math.e)


def default_block_k(head_dim: int) -> int:
    """Tokens per K/V tile: 16 KiB of K and 16 KiB of V per tile in 16-bit types up to head_dim 128."""
    return 64 if head_dim <= 128 else 32


def default_block_q(q_len: int, group: int) -> int:
    """Query tokens per program: ``_DEFAULT_BLOCK_ROWS`` rows of ``group`` heads each, no more tokens
    than the chunk has (rounded up to a power of two), and at least the 16 rows a Triton ``dot`` needs.

    Parameters
    ----------
    q_len : int
      Query tokens per chunk row.
    group : int
      Query heads per kv head, rounded up to a power of two.
    """
    block_q = max(1, _DEFAULT_BLOCK_ROWS // group)
    block_q = min(block_q, pl.next_power_of_2(max(q_len, 1)))
    return max(block_q, pl.cdiv(_MIN_DOT_ROWS, group))


def default_num_warps(head_dim: int) -> int:
    """Warps per program: 4, or 8 above head_dim 128, whose float32 accumulator needs twice the registers."""
    return 4 if head_dim <= 128 else 8


def _chunk_kernel(
    slot_ref,
    length_ref,
    position_ref,
    q_ref,
    k_ref,
    v_ref,
    out_ref,
    *,
    scale: float,
    block_k: int,
    exact_dots: bool,
    window: int | None,
    softcap: float | None,
):
    """One program: one block of query tokens (all heads of one GQA group) of one chunk row.

    Refs (the leading grid axes are squeezed away by the BlockSpecs)::

      slot_ref      []                         int32  the cache row to read, in [0, max_batch)
      length_ref    []                         int32  keys of that row this chunk row sees (0: padding)
      position_ref  [rows]                     int32  position of each query row; -1: a padding row
      q_ref         [rows, head_dim]                  rows = block_q * G', token-major
      k_ref         [max_batch, max_len, head_dim]    this kv head's keys of the whole cache, in place
      v_ref         [max_batch, max_len, head_dim]    this kv head's values of the whole cache
      out_ref       [rows, head_dim]
    """
    rows, head_dim = q_ref.shape
    slot = slot_ref[()]
    length = length_ref[()]
    position = position_ref[...]  # [rows]
    q = q_ref[...]  # [rows, head_dim]
    # Keys any row of this block may see: below the length and at most the highest position; with a
    # window, from the lowest real row's first key on.
    seen = jnp.maximum(jnp.minimum(length, position.max() + 1), 0)
    num_tiles = pl.cdiv(seen, block_k)
    if window is None:
        lower = 0
    else:
        lowest = jnp.min(jnp.where(position >= 0, position, jnp.iinfo(jnp.int32).max))
        lower = jnp.maximum(lowest - (window - 1), 0)
    precision = jax.lax.Precision.HIGHEST if exact_dots else None
    # Logits in base 2: exp2 is the native instruction, and the scale absorbs log2(e).
    scale_log2 = scale * _LOG2_E

    def attend_tile(tile, carry):
        acc, row_max, row_sum = carry  # [rows, head_dim], [rows], [rows]
        token = tile * block_k + jnp.arange(block_k)  # [block_k]
        token_valid = (token < length) & (token >= lower)
        tokens = pl.ds(tile * block_k, block_k)
        # other=0.0, a float: Pallas' Triton lowering casts it to any cache dtype (an int, not to FP8).
        k = plgpu.load(k_ref.at[slot, tokens, :], mask=token_valid[:, None], other=0.0)  # [block_k, head_dim]
        k = k.astype(q.dtype)  # FP8 codes to the query's dtype (exact); else a no-op
        dots = plgpu.dot(q, k, trans_b=True, precision=precision)  # [rows, block_k]
        if softcap is None:
            logits = dots * scale_log2
        else:
            logits = jnp.tanh(dots * (scale / softcap)) * (softcap * _LOG2_E)
        visible = token_valid[None, :] & (token[None, :] <= position[:, None])  # [rows, block_k]
        if window is not None:
            visible &= token[None, :] > position[:, None] - window
        logits = jnp.where(visible, logits, -jnp.inf)
        new_max = jnp.maximum(row_max, logits.max(axis=1))  # [rows]; -inf while a row has seen nothing
        safe_max = jnp.where(new_max == -jnp.inf, 0.0, new_max)
        rescale = jnp.exp2(row_max - safe_max)  # [rows]
        probs = jnp.exp2(logits - safe_max[:, None])  # [rows, block_k]; 0 where not visible
        v = plgpu.load(v_ref.at[slot, tokens, :], mask=token_valid[:, None], other=0.0)  # [block_k, head_dim]
        v = v.astype(q.dtype)  # FP8 codes to the query's dtype (exact); else a no-op
        acc = acc * rescale[:, None] + plgpu.dot(probs.astype(v.dtype), v, precision=precision)
        row_sum = row_sum * rescale + probs.sum(axis=1)
        return acc, new_max, row_sum

    acc = jnp.zeros((rows, head_dim), jnp.float32)
    row_max = jnp.full((rows,), -jnp.inf, jnp.float32)
    row_sum = jnp.zeros((rows,), jnp.float32)
    first_tile = lower // block_k
    acc, row_max, row_sum = jax.lax.fori_loop(first_tile, num_tiles, attend_tile, (acc, row_max, row_sum))
    # A row that saw no key has row_sum == 0 and acc == 0: its output is 0.
    out = acc / jnp.where(row_sum == 0, 1.0, row_sum)[:, None]
    plgpu.store(out_ref.at[pl.ds(0, rows), :], out.astype(out_ref.dtype))


@functools.partial(
    jax.jit,
    static_argnames=("layer", "scale", "window", "softcap", "block_q", "block_k", "num_warps", "num_stages",
                     "interpret"),
)
def chunk_attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    slots: jax.Array,
    q_positions: jax.Array,
    kv_lengths: jax.Array,
    *,
    layer: int | None = None,
    scale: float | None = None,
    window: int | None = None,
    softcap: float | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
    num_warps: int | None = None,
    num_stages: int = 2,
    interpret: bool | None = None,
) -> jax.Array:
    """Grouped-query attention of prefill chunks over their slots' caches, reading the cache in place.

    Row ``r`` reads cache row ``slots[r]``; its query ``t`` at position ``q_positions[r, t]`` sees keys
    ``s <= q_positions[r, t]`` with ``s < kv_lengths[r]`` (and ``s > q_positions[r, t] - window`` with a
    ``window``). Query head ``i`` attends to kv head
    ``i // (q_heads // kv_heads)``. Rows of one slot may follow each other (consecutive chunks).

    Parameters
    ----------
    q : jax.Array
      ``[rows, q_len, q_heads, head_dim]``, bfloat16, float16 or float32.
    k_cache, v_cache : jax.Array
      ``[max_batch, max_len, kv_heads, head_dim]``, or a layer-interleaved ``[max_batch, max_len, layers,
      kv_heads, head_dim]`` read at ``layer``. Same dtype as ``q``, or FP8 codes (``float8_e4m3fn``,
      converted to ``q``'s dtype as loaded; their scales are the caller's: see
      :func:`~jax_vattention.attention.reference.fold_kv_scales`). Only tokens ``[0, kv_lengths[r])`` of
      cache row ``slots[r]`` are read.
    slots : jax.Array
      int32 ``[rows]``. A slot outside ``[0, max_batch)`` is padding: its row reads nothing and gets zeros.
    q_positions : jax.Array
      int32 ``[rows, q_len]``.
    kv_lengths : jax.Array
      int32 ``[rows]``, clipped to ``[0, max_len]``.
    layer : int, optional
      The layer to read from a 5-D cache (static).
    scale : float, optional
      Logit scale; ``1 / sqrt(head_dim)`` by default.
    window : int, optional
      A sliding window of ``window`` positions, a query's own included; nothing behind the window of a
      block's lowest query is read.
    softcap : float, optional
      Logits become ``softcap * tanh(logits / softcap)`` (after the scale).
    block_q : int, optional
      Query tokens per program, a power of two with ``block_q * G' >= 16`` (``G'``: the group size rounded
      up to a power of two); :func:`default_block_q` by default.
    block_k : int, optional
      Tokens per K/V tile, a power of two >= 16; :func:`default_block_k` by default.
    num_warps : int, optional
      Warps per program (Triton); :func:`default_num_warps` by default.
    num_stages : int
      Software-pipeline depth of the tile loop (Triton).
    interpret : bool, optional
      Run the Pallas interpreter; by default when the default backend is not a GPU.

    Returns
    -------
    jax.Array
      ``[rows, q_len, q_heads, head_dim]``, the dtype of ``q``; zeros where a query sees no key.

    Examples
    --------
    >>> q = jnp.ones((2, 4, 8, 64), jnp.float32)
    >>> k = v = jnp.ones((4, 256, 2, 64), jnp.float32)
    >>> positions = jnp.array([[96, 97, 98, 99], [0, 1, 2, 3]], jnp.int32)
    >>> out = chunk_attention(q, k, v, jnp.array([1, 4], jnp.int32), positions,
    ...                       jnp.array([100, 4], jnp.int32), block_k=64)
    >>> out.shape, round(float(out[0, 0, 0, 0]), 4), float(out[1, 0, 0, 0])
    ((2, 4, 8, 64), 1.0, 0.0)
    """
    check_chunk_operands(q, k_cache, v_cache, slots, q_positions, kv_lengths, layer)
    rows, q_len, q_heads, head_dim = q.shape
    max_batch, max_len, kv_heads = k_cache.shape[0], k_cache.shape[1], k_cache.shape[-2]
    group = q_heads // kv_heads
    group_pad = pl.next_power_of_2(group)
    if block_q is None:
        block_q = default_block_q(q_len, group_pad)
    if block_q < 1 or block_q & (block_q - 1) or block_q * group_pad < _MIN_DOT_ROWS:
        raise ValueError(
            f"block_q must be a power of two with block_q * {group_pad} >= {_MIN_DOT_ROWS}, got {block_q}"
        )
    if block_k is None:
        block_k = default_block_k(head_dim)
    if block_k < 16 or block_k & (block_k - 1):
        raise ValueError(f"block_k must be a power of two >= 16, got {block_k}")
    if num_warps is None:
        num_warps = default_num_warps(head_dim)
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    if window is not None and window < 1:
        raise ValueError(f"window must be positive or None, got {window}")
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    if rows == 0 or q_len == 0:
        return jnp.zeros(q.shape, q.dtype)

    # A padding row reads cache row 0 with length 0: an address in bounds, and no tile loaded.
    real = (slots >= 0) & (slots < max_batch)  # [R]
    cache_rows = jnp.where(real, slots, 0)  # [R]
    lengths = jnp.where(real, jnp.clip(kv_lengths, 0, max_len), 0)  # [R]

    # Query rows token-major, padded to whole blocks of tokens and a power-of-two group: [R, K, T' * G', H].
    q_blocks = pl.cdiv(q_len, block_q)
    padded_len = q_blocks * block_q
    block_rows = block_q * group_pad
    q_grouped = q.reshape(rows, q_len, kv_heads, group, head_dim)
    q_grouped = jnp.pad(q_grouped, ((0, 0), (0, padded_len - q_len), (0, 0), (0, group_pad - group), (0, 0)))
    q_grouped = q_grouped.transpose(0, 2, 1, 3, 4).reshape(rows, kv_heads, padded_len * group_pad, head_dim)
    real_query = (jnp.arange(padded_len)[:, None] < q_len) & (jnp.arange(group_pad)[None, :] < group)  # [T', G']
    positions = jnp.pad(q_positions, ((0, 0), (0, padded_len - q_len)))  # [R, T']
    positions = jnp.where(real_query[None], positions[:, :, None], -1)  # [R, T', G']
    positions = positions.reshape(rows, padded_len * group_pad)

    if k_cache.ndim == 4:
        cache_spec = pl.BlockSpec((max_batch, max_len, None, head_dim), lambda r, h, j: (0, 0, h, 0))
    else:
        cache_spec = pl.BlockSpec((max_batch, max_len, None, None, head_dim), lambda r, h, j: (0, 0, layer, h, 0))
    kernel = functools.partial(
        _chunk_kernel, scale=scale, block_k=block_k, exact_dots=q.dtype == jnp.float32, window=window,
        softcap=softcap,
    )
    out = pl.pallas_call(
        kernel,
        grid=(rows, kv_heads, q_blocks),
        in_specs=[
            pl.BlockSpec((None,), lambda r, h, j: (r,)),  # cache_rows
            pl.BlockSpec((None,), lambda r, h, j: (r,)),  # lengths
            pl.BlockSpec((None, block_rows), lambda r, h, j: (r, j)),  # positions
            pl.BlockSpec((None, None, block_rows, head_dim), lambda r, h, j: (r, h, j, 0)),  # q
            cache_spec,  # k_cache
            cache_spec,  # v_cache
        ],
        out_specs=pl.BlockSpec((None, None, block_rows, head_dim), lambda r, h, j: (r, h, j, 0)),
        out_shape=jax.ShapeDtypeStruct((rows, kv_heads, padded_len * group_pad, head_dim), q.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=f"vattention_chunk_{block_q=}_{block_k=}",
    )(cache_rows, lengths, positions, q_grouped, k_cache, v_cache)

    out = out.reshape(rows, kv_heads, padded_len, group_pad, head_dim)[:, :, :q_len, :group]
    return out.transpose(0, 2, 1, 3, 4).reshape(rows, q_len, q_heads, head_dim)
