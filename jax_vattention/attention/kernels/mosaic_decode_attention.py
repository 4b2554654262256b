"""Split-K GQA decode attention on Mosaic GPU (TMA, wgmma), reading the virtual cache in place.

The Mosaic GPU twin of :mod:`jax_vattention.attention.kernels.decode_attention` (Triton): the same
arguments, the same splits and the same combine, with the key loop of
:mod:`jax_vattention.attention.kernels.mosaic_keys`, which loads no byte at or past a slot's length.
One program (one warpgroup) attends the ``G`` query heads of one GQA group of one slot, as the first
rows of a 64-row wgmma tile (the rest are zeros, and never written out), to one split of that slot's
context::

    program (slot b, kv head h, split s):  q rows [G of 64] x keys [lo, hi) of slot b, head h
        tiles [lo, hi) = split s of cdiv(lengths[b], block_k) tiles;  hi <= lengths[b]

Hopper only (wgmma), bfloat16 or float16, ``head_dim`` a multiple of 64 up to 256, groups up to 64.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from jax_vattention.attention.kernels import mosaic_keys as keys
from jax_vattention.attention.kernels.operands import check_decode_operands

__all__ = ["check_supported", "default_block_k", "default_num_splits", "mosaic_decode_attention", "supported"]

# Streaming multiprocessors of the cards this kernel is tuned for (H100 and H200 SXM).
_DEFAULT_NUM_SMS = 132
# Programs per SM: two warpgroups' worth of tiles in flight per SM.
_PROGRAMS_PER_SM = 2
_LN_2 = math.log(2.0)
MOSAIC_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def supported(dtype, head_dim: int, group: int = 1, max_len: int = 0) -> bool:
    """Whether the Mosaic GPU kernels take a cache of ``dtype``, ``head_dim`` and ``max_len`` tokens per
    slot with ``group`` query heads per kv head: 16-bit, ``head_dim`` a multiple of 64 up to 256 (whole
    128-byte swizzled rows), at most 64 query rows of one wgmma, ``max_len`` a multiple of 8 (TMA views
    the token axis in 8-row tiles)."""
    return (jnp.dtype(dtype) in MOSAIC_DTYPES and head_dim % 64 == 0 and 64 <= head_dim <= 256
            and 1 <= group <= keys.ROWS and max_len % keys.GROUP == 0)


def default_block_k(head_dim: int) -> int:
    """Tokens per K/V tile: 64. Up to head_dim 128 a program then holds about 100 KiB of shared memory
    (two stages of K and V, the query and output tiles), so two programs share an SM, as many as
    :func:`default_num_splits` plans for, with four tiles in flight between them."""
    del head_dim
    return 64


def default_num_splits(batch: int, kv_heads: int, max_len: int, block_k: int,
                       num_sms: int = _DEFAULT_NUM_SMS) -> int:
    """Splits per slot that give ``num_sms`` SMs ``_PROGRAMS_PER_SM`` programs each, never less than a
    tile of ``max_len`` per split."""
    wanted = -(-_PROGRAMS_PER_SM * num_sms // (batch * kv_heads))
    return max(1, min(wanted, -(-max_len // block_k)))


def _decode_kernel(lengths_ref, q_ref, k_ref, v_ref, out_ref, lse_ref, q_smem, o_smem, lse_smem, q_barrier,
                   *key_scratch, layer, block_k, num_splits, out_rows, scale, interpreted):
    """One program: the query rows of one GQA group of one slot against one split of its context.

    Refs (global memory)::

      lengths_ref [batch]                                   int32
      q_ref       [batch, kv_heads, out_rows, head_dim]      the groups' query heads, zero-padded
      k_ref/v_ref the cache, [max_batch, max_len, (layers,) kv_heads, head_dim], in place
      out_ref     [batch, kv_heads, num_splits, out_rows, head_dim]  each split normalized by its own sum
      lse_ref     [batch, kv_heads, num_splits, out_rows]    f32  its log-sum-exp (-inf: empty split)
    """
    slot, head, split = lax.axis_index("slot"), lax.axis_index("head"), lax.axis_index("split")
    dtype = q_smem.dtype
    buffers = keys.KeyBuffers(*key_scratch)
    buffers.zero(dtype)
    head_dim = q_smem.shape[1]
    q_smem[...] = plgpu.layout_cast(jnp.zeros((keys.ROWS, head_dim), dtype), plgpu.Layout.WGMMA)
    plgpu.commit_smem()
    plgpu.copy_gmem_to_smem(q_ref.at[slot, head], q_smem.at[pl.ds(0, out_rows)], q_barrier)
    plgpu.barrier_wait(q_barrier)

    lo, hi = keys.split_range(lengths_ref[slot], split, num_splits, block_k)

    def rows(which, start, size):
        ref = k_ref if which == "k" else v_ref
        tokens = start if size is None else pl.ds(start, size)
        return ref.at[(slot, tokens, head) if layer is None else (slot, tokens, layer, head)]

    acc = plgpu.layout_cast(jnp.zeros((keys.ROWS, head_dim), jnp.float32), plgpu.Layout.WGMMA)
    row_max = plgpu.layout_cast(jnp.full((keys.ROWS,), -jnp.inf, jnp.float32), keys.row_layout())
    row_sum = plgpu.layout_cast(jnp.zeros((keys.ROWS,), jnp.float32), keys.row_layout())
    acc, row_max, row_sum = keys.attend_keys(
        q_smem, rows, buffers, keys.KeyPlan(lo, hi, block_k), (acc, row_max, row_sum),
        scale_log2=scale * keys.LOG2_E, accumulate_in_place=not interpreted)

    # An empty split has row_sum == 0 and acc == 0: its output is 0 and its lse -inf.
    empty = row_sum == 0
    out = acc / lax.broadcast_in_dim(jnp.where(empty, 1.0, row_sum), acc.shape, [0])
    lse_smem[...] = jnp.where(empty, -jnp.inf, (row_max + jnp.log2(jnp.where(empty, 1.0, row_sum))) * _LN_2)
    o_smem[...] = out.astype(dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(0, out_rows)], out_ref.at[slot, head, split])
    plgpu.copy_smem_to_gmem(lse_smem.at[pl.ds(0, out_rows)], lse_ref.at[slot, head, split])
    plgpu.wait_smem_to_gmem(0)


def _combine_splits(partial_out: jax.Array, partial_lse: jax.Array) -> jax.Array:
    """Merges per-split outputs by their log-sum-exp.

    partial_out [batch, kv_heads, num_splits, rows, head_dim], partial_lse [..., num_splits, rows] f32
    -> float32 [batch, kv_heads, rows, head_dim]; a slot whose splits are all empty gets zeros.
    """
    lse_max = partial_lse.max(axis=2, keepdims=True)  # [B, K, 1, G]
    lse_max = jnp.where(jnp.isneginf(lse_max), 0.0, lse_max)
    weight = jnp.exp(partial_lse - lse_max)  # [B, K, S, G]
    total = weight.sum(axis=2)  # [B, K, G]
    out = (weight[..., None] * partial_out.astype(jnp.float32)).sum(axis=2)  # [B, K, G, D]
    return out / jnp.where(total == 0, 1.0, total)[..., None]


def check_supported(dtype, head_dim: int, group: int, max_len: int) -> None:
    """``ValueError`` unless :func:`supported`, naming what is not."""
    if not supported(dtype, head_dim, group, max_len):
        raise ValueError(f"the Mosaic GPU kernels take bfloat16 or float16, head_dim a multiple of 64 up to 256, at "
                         f"most 64 query heads per kv head and max_len a multiple of 8; got {jnp.dtype(dtype)}, "
                         f"head_dim {head_dim}, {group} per kv head, max_len {max_len}: use the Triton kernel")


def check_inputs(q, k_cache, v_cache, lengths, layer) -> None:
    """``ValueError`` unless the Mosaic GPU decode kernel takes these operands."""
    check_decode_operands(q, k_cache, v_cache, lengths, layer)
    check_supported(k_cache.dtype, q.shape[-1], q.shape[1] // k_cache.shape[-2], k_cache.shape[1])
    keys.check_tma_extent(k_cache.shape)


@functools.partial(jax.jit, static_argnames=("layer", "scale", "block_k", "num_splits", "stages", "interpret"))
def mosaic_decode_attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    lengths: jax.Array,
    *,
    layer: int | None = None,
    scale: float | None = None,
    block_k: int | None = None,
    num_splits: int | None = None,
    stages: int = 2,
    interpret=None,
) -> jax.Array:
    """One decode step of grouped-query attention on Mosaic GPU, reading the KV cache in place.

    Query head ``i`` attends to kv head ``i // (q_heads // kv_heads)`` over the first ``lengths[b]``
    tokens of cache slot ``b``.

    Parameters
    ----------
    q : jax.Array
      ``[batch, q_heads, head_dim]``, bfloat16 or float16, ``head_dim`` a multiple of 64 up to 256.
    k_cache, v_cache : jax.Array
      ``[max_batch, max_len, kv_heads, head_dim]`` with ``batch <= max_batch``, or a layer-interleaved
      ``[max_batch, max_len, layers, kv_heads, head_dim]`` read at ``layer``; the dtype of ``q``. Only
      tokens ``[0, lengths[b])`` of slots ``[0, batch)`` are read.
    lengths : jax.Array
      int32 ``[batch]``, each in ``[0, max_len]``. A slot of length 0 gets zeros.
    layer : int, optional
      The layer of a 5-D cache (static).
    scale : float, optional
      Logit scale; ``1 / sqrt(head_dim)`` by default.
    block_k : int, optional
      Tokens per K/V tile, 64 or 128; :func:`default_block_k` by default.
    num_splits : int, optional
      Splits of each slot's context; :func:`default_num_splits` by default.
    stages : int
      K/V tiles in flight per program.
    interpret : optional
      Pallas' Mosaic GPU interpreter parameters (``InterpretGPUParams``), or None to compile.

    Returns
    -------
    jax.Array
      ``[batch, q_heads, head_dim]``, the dtype of ``q``.

    Examples
    --------
    On a Hopper GPU::

        out = mosaic_decode_attention(q, cache.k[0], cache.v[0], lengths)  # [B, N, H]
    """
    check_inputs(q, k_cache, v_cache, lengths, layer)
    batch, q_heads, head_dim = q.shape
    max_len, kv_heads = k_cache.shape[1], k_cache.shape[-2]
    group = q_heads // kv_heads
    block_k = default_block_k(head_dim) if block_k is None else block_k
    if block_k not in (64, 128):
        raise ValueError(f"block_k must be 64 or 128 (a wgmma tile), got {block_k}")
    num_splits = default_num_splits(batch, kv_heads, max_len, block_k) if num_splits is None else num_splits
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    if stages < 1:
        raise ValueError(f"stages must be >= 1, got {stages}")
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    out_rows = -(-group // keys.GROUP) * keys.GROUP

    q_grouped = q.reshape(batch, kv_heads, group, head_dim)
    q_grouped = jnp.pad(q_grouped, ((0, 0), (0, 0), (0, out_rows - group), (0, 0)))  # [B, K, G', D]
    kernel = functools.partial(_decode_kernel, layer=layer, block_k=block_k, num_splits=num_splits,
                               out_rows=out_rows, scale=scale, interpreted=interpret is not None)
    dtype = q.dtype
    scratch = (
        plgpu.SMEM((keys.ROWS, head_dim), dtype, transforms=keys.smem_transforms(dtype)),  # q
        plgpu.SMEM((keys.ROWS, head_dim), dtype, transforms=keys.smem_transforms(dtype)),  # out
        plgpu.SMEM((keys.ROWS,), jnp.float32),  # lse
        plgpu.Barrier(num_barriers=1),  # q
        *keys.KeyBuffers.scratch(stages, block_k, head_dim, dtype),
    )
    partial_out, partial_lse = plgpu.kernel(
        kernel,
        out_type=(jax.ShapeDtypeStruct((batch, kv_heads, num_splits, out_rows, head_dim), dtype),
                  jax.ShapeDtypeStruct((batch, kv_heads, num_splits, out_rows), jnp.float32)),
        grid=(batch, kv_heads, num_splits),
        grid_names=("slot", "head", "split"),
        scratch_types=scratch,
        compiler_params=keys.compiler_params(),
        interpret=interpret,
    )(lengths, q_grouped, k_cache, v_cache)
    out = partial_out[:, :, 0] if num_splits == 1 else _combine_splits(partial_out, partial_lse)
    return out[:, :, :group].reshape(batch, q_heads, head_dim).astype(dtype)
