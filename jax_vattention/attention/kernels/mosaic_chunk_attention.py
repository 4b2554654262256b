"""Chunked-prefill GQA attention on Mosaic GPU (TMA, wgmma), reading the virtual cache in place.

The Mosaic GPU twin of :mod:`jax_vattention.attention.kernels.chunk_attention` (Triton), with the same
arguments and the same meaning: row ``r`` is a chunk of query tokens of cache row ``slots[r]``, already
written into the cache; its query at position ``p`` sees keys ``s <= p`` with ``s < kv_lengths[r]``.
One program (one warpgroup) takes 64 query rows, ``64 // G'`` tokens of one chunk row times the ``G'``
query heads of one GQA group (``G'``: the group rounded up to a power of two; padding rows get position
-1 and see nothing), and streams that row's keys through the key loop of
:mod:`jax_vattention.attention.kernels.mosaic_keys`, which loads no byte at or past ``kv_lengths[r]``::

    program (row r, kv head h, query block j):  q rows [64] x keys [0, end) of cache row slots[r]
        end = min(kv_lengths[r], highest position in the block + 1)

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
from jax_vattention.attention.kernels.mosaic_decode_attention import check_supported
from jax_vattention.attention.kernels.operands import check_chunk_operands

__all__ = ["default_block_k", "mosaic_chunk_attention"]


def default_block_k(head_dim: int) -> int:
    """Tokens per K/V tile: 128 up to head_dim 128 (64 query rows do twice a decode program's work per
    key, so bigger tiles for fewer barriers), 64 above, where two stages of 128 would not fit."""
    return 128 if head_dim <= 128 else 64


def _chunk_kernel(slots_ref, ends_ref, positions_ref, q_ref, k_ref, v_ref, out_ref, q_smem, o_smem, positions_smem,
                  q_barrier, *key_scratch, layer, block_k, scale, interpreted):
    """One program: 64 query rows (tokens x group heads) of one chunk row against that row's keys.

    Refs (global memory)::

      slots_ref      [rows]                        int32  cache row of each chunk row (0 for padding)
      ends_ref       [rows, q_blocks]              int32  keys each query block may see: [0, end)
      positions_ref  [rows, q_blocks * 64]         int32  position of each query row; -1: padding
      q_ref          [rows, kv_heads, q_blocks * 64, head_dim]   token-major query rows
      k_ref/v_ref    the cache, [max_batch, max_len, (layers,) kv_heads, head_dim], in place
      out_ref        [rows, kv_heads, q_blocks * 64, head_dim]
    """
    row, head, block = lax.axis_index("row"), lax.axis_index("head"), lax.axis_index("block")
    dtype = q_smem.dtype
    head_dim = q_smem.shape[1]
    buffers = keys.KeyBuffers(*key_scratch)
    buffers.zero(dtype)
    query_rows = pl.ds(block * keys.ROWS, keys.ROWS)
    plgpu.copy_gmem_to_smem(q_ref.at[row, head, query_rows], q_smem, q_barrier)
    plgpu.copy_gmem_to_smem(positions_ref.at[row, query_rows], positions_smem, q_barrier)
    plgpu.barrier_wait(q_barrier)
    positions = plgpu.layout_cast(positions_smem[...], keys.row_layout())  # [64]
    slot = slots_ref[row]

    def rows(which, start, size):
        ref = k_ref if which == "k" else v_ref
        tokens = start if size is None else pl.ds(start, size)
        return ref.at[(slot, tokens, head) if layer is None else (slot, tokens, layer, head)]

    acc = plgpu.layout_cast(jnp.zeros((keys.ROWS, head_dim), jnp.float32), plgpu.Layout.WGMMA)
    row_max = plgpu.layout_cast(jnp.full((keys.ROWS,), -jnp.inf, jnp.float32), keys.row_layout())
    row_sum = plgpu.layout_cast(jnp.zeros((keys.ROWS,), jnp.float32), keys.row_layout())
    acc, _, row_sum = keys.attend_keys(
        q_smem, rows, buffers, keys.KeyPlan(0, ends_ref[row, block], block_k), (acc, row_max, row_sum),
        scale_log2=scale * keys.LOG2_E, accumulate_in_place=not interpreted, positions=positions)

    # A query row that saw no key has row_sum == 0 and acc == 0: its output is 0.
    out = acc / lax.broadcast_in_dim(jnp.where(row_sum == 0, 1.0, row_sum), acc.shape, [0])
    o_smem[...] = out.astype(dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, out_ref.at[row, head, query_rows])
    plgpu.wait_smem_to_gmem(0)


def check_inputs(q, k_cache, v_cache, slots, q_positions, kv_lengths, layer) -> None:
    """``ValueError`` unless the Mosaic GPU chunk kernel takes these operands."""
    check_chunk_operands(q, k_cache, v_cache, slots, q_positions, kv_lengths, layer)
    check_supported(k_cache.dtype, q.shape[-1], q.shape[2] // k_cache.shape[-2], k_cache.shape[1])
    keys.check_tma_extent(k_cache.shape)


@functools.partial(jax.jit, static_argnames=("layer", "scale", "block_k", "stages", "interpret"))
def mosaic_chunk_attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    slots: jax.Array,
    q_positions: jax.Array,
    kv_lengths: jax.Array,
    *,
    layer: int | None = None,
    scale: float | None = None,
    block_k: int | None = None,
    stages: int = 2,
    interpret=None,
) -> jax.Array:
    """Grouped-query attention of prefill chunks over their slots' caches on Mosaic GPU, in place.

    Row ``r`` reads cache row ``slots[r]``; its query ``t`` at position ``q_positions[r, t]`` sees keys
    ``s <= q_positions[r, t]`` with ``s < kv_lengths[r]``. Query head ``i`` attends to kv head
    ``i // (q_heads // kv_heads)``.

    Parameters
    ----------
    q : jax.Array
      ``[rows, q_len, q_heads, head_dim]``, bfloat16 or float16, ``head_dim`` a multiple of 64 up to 256.
    k_cache, v_cache : jax.Array
      ``[max_batch, max_len, kv_heads, head_dim]``, or a layer-interleaved ``[max_batch, max_len, layers,
      kv_heads, head_dim]`` read at ``layer``; the dtype of ``q``. Only tokens ``[0, kv_lengths[r])`` of
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
    block_k : int, optional
      Tokens per K/V tile, 64 or 128; :func:`default_block_k` by default.
    stages : int
      K/V tiles in flight per program.
    interpret : optional
      Pallas' Mosaic GPU interpreter parameters (``InterpretGPUParams``), or None to compile.

    Returns
    -------
    jax.Array
      ``[rows, q_len, q_heads, head_dim]``, the dtype of ``q``; zeros where a query sees no key.

    Examples
    --------
    On a Hopper GPU::

        out = mosaic_chunk_attention(q, cache.k[0], cache.v[0], slots, positions, lengths)  # [R, T, N, H]
    """
    check_inputs(q, k_cache, v_cache, slots, q_positions, kv_lengths, layer)
    rows, q_len, q_heads, head_dim = q.shape
    max_batch, max_len, kv_heads = k_cache.shape[0], k_cache.shape[1], k_cache.shape[-2]
    group = q_heads // kv_heads
    group_pad = pl.next_power_of_2(group)
    block_q = keys.ROWS // group_pad  # query tokens per program
    block_k = default_block_k(head_dim) if block_k is None else block_k
    if block_k not in (64, 128):
        raise ValueError(f"block_k must be 64 or 128 (a wgmma tile), got {block_k}")
    if stages < 1:
        raise ValueError(f"stages must be >= 1, got {stages}")
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    if rows == 0 or q_len == 0:
        return jnp.zeros(q.shape, q.dtype)

    # A padding row reads cache row 0 with length 0: an address in bounds, and no tile loaded.
    real = (slots >= 0) & (slots < max_batch)  # [R]
    cache_rows = jnp.where(real, slots, 0)  # [R]
    lengths = jnp.where(real, jnp.clip(kv_lengths, 0, max_len), 0)  # [R]

    # Query rows token-major, padded to whole blocks of tokens and a power-of-two group: [R, K, T' * G', H].
    q_blocks = -(-q_len // block_q)
    padded_len = q_blocks * block_q
    q_grouped = q.reshape(rows, q_len, kv_heads, group, head_dim)
    q_grouped = jnp.pad(q_grouped, ((0, 0), (0, padded_len - q_len), (0, 0), (0, group_pad - group), (0, 0)))
    q_grouped = q_grouped.transpose(0, 2, 1, 3, 4).reshape(rows, kv_heads, padded_len * group_pad, head_dim)
    real_query = (jnp.arange(padded_len)[:, None] < q_len) & (jnp.arange(group_pad)[None, :] < group)  # [T', G']
    positions = jnp.pad(q_positions, ((0, 0), (0, padded_len - q_len)))  # [R, T']
    positions = jnp.where(real_query[None], positions[:, :, None], -1)  # [R, T', G']
    positions = positions.reshape(rows, q_blocks, keys.ROWS)
    # Keys a block may see: below the length and at most its highest position.
    ends = jnp.clip(jnp.minimum(lengths[:, None], positions.max(axis=2) + 1), 0, None)  # [R, q_blocks]
    positions = positions.reshape(rows, q_blocks * keys.ROWS)

    dtype = q.dtype
    scratch = (
        plgpu.SMEM((keys.ROWS, head_dim), dtype, transforms=keys.smem_transforms(dtype)),  # q
        plgpu.SMEM((keys.ROWS, head_dim), dtype, transforms=keys.smem_transforms(dtype)),  # out
        plgpu.SMEM((keys.ROWS,), jnp.int32),  # positions
        plgpu.Barrier(num_arrivals=2, num_barriers=1),  # q and positions
        *keys.KeyBuffers.scratch(stages, block_k, head_dim, dtype),
    )
    out = plgpu.kernel(
        functools.partial(_chunk_kernel, layer=layer, block_k=block_k, scale=scale,
                          interpreted=interpret is not None),
        out_type=jax.ShapeDtypeStruct((rows, kv_heads, padded_len * group_pad, head_dim), dtype),
        grid=(rows, kv_heads, q_blocks),
        grid_names=("row", "head", "block"),
        scratch_types=scratch,
        compiler_params=keys.compiler_params(),
        interpret=interpret,
    )(cache_rows.astype(jnp.int32), ends.astype(jnp.int32), positions, q_grouped, k_cache, v_cache)

    out = out.reshape(rows, kv_heads, padded_len, group_pad, head_dim)[:, :, :q_len, :group]
    return out.transpose(0, 2, 1, 3, 4).reshape(rows, q_len, q_heads, head_dim)
