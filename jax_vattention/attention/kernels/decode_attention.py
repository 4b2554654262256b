"""Split-K (flash-decoding) GQA decode attention over a virtually contiguous KV cache.

The cache is read where it lies: ``[max_batch, max_len, kv_heads, head_dim]``, or one layer of a
layer-interleaved ``[max_batch, max_len, layers, kv_heads, head_dim]`` cache. Nothing is transposed or
copied, and no byte at or past a slot's length is ever loaded. That matters for vAttention: past the
length the virtual range may have no physical page behind it, and one load there kills the CUDA
context::

    slot b, kv head h:  | tile 0 | tile 1 | ... | tile n-1 |###### unmapped ######|
                        ^ token 0          length ^  (last tile masked; no tile past it)

With a sliding ``window`` the query (at position ``length - 1``) sees only the last ``window``
tokens, and nothing behind them is loaded either: the tiles start at the one that holds
``length - window`` and that tile's lanes below it are masked, so pages wholly behind every
slot's window may be unmapped while the slot goes on::

    slot b, kv head h:  |## unmapped ##| tile i | ... | tile n-1 |###### unmapped ######|
                          length - window ^              length ^

Why split-K: one decode step has a single query token per slot, so a kernel with one program per
(slot, kv head) pair leaves most of the GPU idle when ``batch * kv_heads`` is small against the SM count.
Each slot's context is cut into ``num_splits`` contiguous runs of ``block_k``-token tiles; one program
streams one run for all query heads of one GQA group (so every K/V byte is read once per group, not once
per query head), keeps an online softmax in float32 and writes a partial output with its log-sum-exp. A
small combine step in plain JAX merges the splits.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jax_vattention.attention.kernels.operands import check_decode_operands

__all__ = ["decode_attention", "default_block_k", "default_num_splits"]


# Streaming multiprocessors of the cards this kernel is tuned for (H100 and H200 SXM).
_DEFAULT_NUM_SMS = 132
# Programs in flight per SM that keep enough loads outstanding to reach the memory bandwidth.
_PROGRAMS_PER_SM = 2
# Smallest row count of a Triton `dot` operand; GQA groups smaller than this are padded with masked rows.
_MIN_DOT_ROWS = 16
_LOG2_E = math.log2(math.e)
_LN_2 = math.log(2.0)


def default_block_k(head_dim: int) -> int:
    """Tokens per K/V tile: 64 KiB of K and V per tile in 16-bit types (a multiple of every page size)."""
    return 128 if head_dim <= 128 else 64


def default_num_splits(
    batch: int, kv_heads: int, max_len: int, block_k: int, num_sms: int = _DEFAULT_NUM_SMS
) -> int:
    """Splits per slot that fill ``num_sms`` SMs with ``_PROGRAMS_PER_SM`` programs each.

    Parameters
    ----------
    batch, kv_heads : int
      The (slot, kv head) pairs; each pair is one independent stream of K/V tiles.
    max_len : int
      Tokens per slot in the cache; a split never gets less than one tile of it.
    block_k : int
      Tokens per tile.
    num_sms : int
      Streaming multiprocessors of the device.
    """
    pairs = batch * kv_heads
    max_tiles = max(1, pl.cdiv(max_len, block_k))
    wanted = pl.cdiv(_PROGRAMS_PER_SM * num_sms, pairs)
    return max(1, min(wanted, max_tiles))


def _decode_split_kernel(
    length_ref,
    q_ref,
    k_ref,
    v_ref,
    out_ref,
    lse_ref,
    *,
    scale: float,
    block_k: int,
    num_splits: int,
    group_size: int,
    exact_dots: bool,
    window: int | None,
    softcap: float | None,
):
    """One program: one GQA group of one slot against one split of that slot's context.

    Refs (the leading grid axes are squeezed away by the BlockSpecs)::

      length_ref  []                        int32  tokens of this slot
      q_ref       [block_h, head_dim]              the group's query heads; rows >= group_size padding
      k_ref       [max_len, head_dim]              this slot's keys of this kv head, strided in place
      v_ref       [max_len, head_dim]              this slot's values of this kv head
      out_ref     [block_h, head_dim]              this split's output, normalized by its own sum
      lse_ref     [block_h]                 f32    this split's log-sum-exp (-inf for an empty split)
    """
    block_h, head_dim = q_ref.shape
    split = pl.program_id(2)

    length = length_ref[()]
    lower = 0 if window is None else jnp.maximum(length - window, 0)  # the first token the query sees
    num_tiles = pl.cdiv(length, block_k)
    window_tile = lower // block_k
    tiles_per_split = pl.cdiv(num_tiles - window_tile, num_splits)
    first_tile = window_tile + split * tiles_per_split
    end_tile = jnp.minimum(first_tile + tiles_per_split, num_tiles)

    head_valid = jnp.arange(block_h) < group_size  # [block_h]
    q = plgpu.load(q_ref.at[pl.ds(0, block_h), :], mask=head_valid[:, None], other=0)
    precision = jax.lax.Precision.HIGHEST if exact_dots else None
    # Logits in base 2: exp2 is the native instruction, and the scale absorbs log2(e).
    scale_log2 = scale * _LOG2_E

    def attend_tile(tile, carry):
        acc, row_max, row_sum = carry  # [block_h, head_dim], [block_h], [block_h]
        token = tile * block_k + jnp.arange(block_k)  # [block_k]
        token_valid = (token < length) & (token >= lower)
        tokens = pl.ds(tile * block_k, block_k)
        # other=0.0, a float: Pallas' Triton lowering casts it to any cache dtype (an int, not to FP8).
        k = plgpu.load(k_ref.at[tokens, :], mask=token_valid[:, None], other=0.0)  # [block_k, head_dim]
        k = k.astype(q.dtype)  # FP8 codes to the query's dtype (exact); else a no-op
        dots = plgpu.dot(q, k, trans_b=True, precision=precision)  # [block_h, block_k]
        if softcap is None:
            logits = dots * scale_log2
        else:
            logits = jnp.tanh(dots * (scale / softcap)) * (softcap * _LOG2_E)
        logits = jnp.where(token_valid[None, :], logits, -jnp.inf)
        # Every tile holds at least one valid token, so the new maximum is finite.
        new_max = jnp.maximum(row_max, logits.max(axis=1))
        rescale = jnp.exp2(row_max - new_max)  # [block_h]
        probs = jnp.exp2(logits - new_max[:, None])  # [block_h, block_k]
        v = plgpu.load(v_ref.at[tokens, :], mask=token_valid[:, None], other=0.0)  # [block_k, head_dim]
        v = v.astype(q.dtype)  # FP8 codes to the query's dtype (exact); else a no-op
        acc = acc * rescale[:, None] + plgpu.dot(probs.astype(v.dtype), v, precision=precision)
        row_sum = row_sum * rescale + probs.sum(axis=1)
        return acc, new_max, row_sum

    acc = jnp.zeros((block_h, head_dim), jnp.float32)
    row_max = jnp.full((block_h,), -jnp.inf, jnp.float32)
    row_sum = jnp.zeros((block_h,), jnp.float32)
    acc, row_max, row_sum = jax.lax.fori_loop(first_tile, end_tile, attend_tile, (acc, row_max, row_sum))

    # An empty split (or slot) has row_sum == 0 and acc == 0: its output is 0 and its lse -inf.
    out = acc / jnp.where(row_sum == 0, 1.0, row_sum)[:, None]
    lse = row_max * _LN_2 + jnp.log(row_sum)
    plgpu.store(out_ref.at[pl.ds(0, block_h), :], out.astype(out_ref.dtype), mask=head_valid[:, None])
    plgpu.store(lse_ref.at[pl.ds(0, block_h)], lse, mask=head_valid)


def _combine_splits(partial_out: jax.Array, partial_lse: jax.Array) -> jax.Array:
    """Merges per-split outputs by their log-sum-exp.

    partial_out [batch, kv_heads, num_splits, group, head_dim] f32, partial_lse [..., num_splits, group]
    -> [batch, kv_heads, group, head_dim] f32. A slot whose splits are all empty gets zeros.
    """
    lse_max = partial_lse.max(axis=2, keepdims=True)  # [B, K, 1, G]
    lse_max = jnp.where(jnp.isneginf(lse_max), 0.0, lse_max)
    weight = jnp.exp(partial_lse - lse_max)  # [B, K, S, G]
    total = weight.sum(axis=2)  # [B, K, G]
    out = (weight[..., None] * partial_out).sum(axis=2)  # [B, K, G, D]; a fusion, not a matmul
    return out / jnp.where(total == 0, 1.0, total)[..., None]


@functools.partial(
    jax.jit,
    static_argnames=("layer", "scale", "window", "softcap", "block_k", "num_splits", "num_warps", "num_stages",
                     "interpret"),
)
def decode_attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    lengths: jax.Array,
    *,
    layer: int | None = None,
    scale: float | None = None,
    window: int | None = None,
    softcap: float | None = None,
    block_k: int | None = None,
    num_splits: int | None = None,
    num_warps: int = 4,
    num_stages: int = 3,
    interpret: bool | None = None,
) -> jax.Array:
    """One decode step of grouped-query attention, reading the KV cache in place.

    Query head ``i`` attends to kv head ``i // (q_heads // kv_heads)`` over the first ``lengths[b]``
    tokens of cache slot ``b`` (with a ``window``, over tokens ``[lengths[b] - window, lengths[b])``
    only); slot ``b`` of ``q`` is slot ``b`` of the cache.

    Parameters
    ----------
    q : jax.Array
      ``[batch, q_heads, head_dim]``, bfloat16, float16 or float32.
    k_cache, v_cache : jax.Array
      ``[max_batch, max_len, kv_heads, head_dim]`` with ``batch <= max_batch``, or a layer-interleaved
      ``[max_batch, max_len, layers, kv_heads, head_dim]`` read at ``layer``. Same dtype as ``q``, or
      FP8 codes (``float8_e4m3fn``, converted to ``q``'s dtype as loaded; their scales are the
      caller's: see :func:`~jax_vattention.attention.reference.fold_kv_scales`). Only tokens ``[0, lengths[b])`` of slots ``[0, batch)`` are read (with a ``window``, only
      ``[max(lengths[b] - window, 0), lengths[b])``).
    lengths : jax.Array
      int32 ``[batch]``, each in ``[0, max_len]``. A slot of length 0 gets zeros.
    layer : int, optional
      The layer to read from a 5-D cache (static).
    scale : float, optional
      Logit scale; ``1 / sqrt(head_dim)`` by default.
    window : int, optional
      A sliding window: the query sees the last ``window`` tokens of its slot, its own included.
    softcap : float, optional
      Logits become ``softcap * tanh(logits / softcap)`` (after the scale).
    block_k : int, optional
      Tokens per K/V tile, a power of two >= 16; :func:`default_block_k` by default.
    num_splits : int, optional
      Splits of each slot's context; :func:`default_num_splits` by default.
    num_warps, num_stages : int
      Triton launch parameters (warps per program, software-pipeline depth of the tile loop).
    interpret : bool, optional
      Run the Pallas interpreter; by default when the default backend is not a GPU.

    Returns
    -------
    jax.Array
      ``[batch, q_heads, head_dim]``, the dtype of ``q``.

    Examples
    --------
    >>> q = jnp.ones((2, 8, 64), jnp.float32)
    >>> k = v = jnp.ones((4, 256, 2, 64), jnp.float32)
    >>> out = decode_attention(q, k, v, jnp.array([100, 0], jnp.int32), block_k=64)
    >>> out.shape, float(out[0, 0, 0]), float(out[1, 0, 0])
    ((2, 8, 64), 1.0, 0.0)
    """
    check_decode_operands(q, k_cache, v_cache, lengths, layer)
    batch, q_heads, head_dim = q.shape
    max_len, kv_heads = k_cache.shape[1], k_cache.shape[-2]
    group_size = q_heads // kv_heads
    block_h = max(_MIN_DOT_ROWS, pl.next_power_of_2(group_size))
    if block_k is None:
        block_k = default_block_k(head_dim)
    if block_k < 16 or block_k & (block_k - 1):
        raise ValueError(f"block_k must be a power of two >= 16, got {block_k}")
    if num_splits is None:
        seen = max_len if window is None else min(max_len, window + block_k)  # tokens a slot's tiles span
        num_splits = default_num_splits(batch, kv_heads, seen, block_k)
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    if window is not None and window < 1:
        raise ValueError(f"window must be positive or None, got {window}")
    if interpret is None:
        interpret = jax.default_backend() != "gpu"

    if k_cache.ndim == 4:
        cache_spec = pl.BlockSpec((None, max_len, None, head_dim), lambda b, h, s: (b, 0, h, 0))
    else:
        cache_spec = pl.BlockSpec((None, max_len, None, None, head_dim), lambda b, h, s: (b, 0, layer, h, 0))
    partial_dtype = q.dtype if num_splits == 1 else jnp.float32
    kernel = functools.partial(
        _decode_split_kernel,
        scale=scale,
        block_k=block_k,
        num_splits=num_splits,
        group_size=group_size,
        exact_dots=q.dtype == jnp.float32,
        window=window,
        softcap=softcap,
    )
    q_grouped = q.reshape(batch, kv_heads, group_size, head_dim)
    partial_out, partial_lse = pl.pallas_call(
        kernel,
        grid=(batch, kv_heads, num_splits),
        in_specs=[
            pl.BlockSpec((None,), lambda b, h, s: (b,)),  # lengths
            pl.BlockSpec((None, None, block_h, head_dim), lambda b, h, s: (b, h, 0, 0)),  # q
            cache_spec,  # k_cache
            cache_spec,  # v_cache
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, block_h, head_dim), lambda b, h, s: (b, h, s, 0, 0)),
            pl.BlockSpec((None, None, None, block_h), lambda b, h, s: (b, h, s, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((batch, kv_heads, num_splits, group_size, head_dim), partial_dtype),
            jax.ShapeDtypeStruct((batch, kv_heads, num_splits, group_size), jnp.float32),
        ],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=f"vattention_decode_{block_k=}_{num_splits=}",
    )(lengths, q_grouped, k_cache, v_cache)

    if num_splits == 1:
        out = partial_out[:, :, 0]
    else:
        out = _combine_splits(partial_out, partial_lse)
    return out.reshape(batch, q_heads, head_dim).astype(q.dtype)
