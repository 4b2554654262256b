"""The key loop of our Mosaic GPU attention kernels: K/V tiles by TMA, read exactly below a bound.

One warpgroup attends 64 query rows (a ``[64, head_dim]`` tile in shared memory) to the keys
``[lo, hi)`` of one cache row and one kv head, read where they lie in the virtual cache. ``hi`` never
exceeds the row's length, and no byte at or past ``hi`` is loaded: past the length a vAttention cache
may have no physical page, and one load there kills the CUDA context.

What is read, exactly (``lo`` a multiple of 8; ``f = hi - hi % 8``)::

    token lo                         f       hi
       | tile 0 | tile 1 | ... |tile n-1|tail |  unread
       |<---- TMA, whole 8-token groups --->|<-->| one TMA copy per token

* tiles of ``block_k`` tokens, ``n = cdiv(f - lo, block_k)``: a tile wholly below ``f`` is one TMA copy;
  the last tile, when it ends past ``f``, is one TMA copy per 8-token group below ``f`` (the groups past
  it are not copied: their rows keep zeros or an earlier tile's keys, and are masked);
* the tail ``[f, hi)``, fewer than 8 tokens: one TMA copy per token into untiled rows of shared memory,
  attended one row at a time in registers.

Why 8-token groups: wgmma reads shared memory in (8, 64) tiles with a 128-byte swizzle, and a TMA copy
into such a buffer must start on a tile row (Mosaic addresses the copy as ``(start // 8, start % 8)``).
So a copy cannot end at an arbitrary length; one that ended at the next multiple of 8 would read up to 7
tokens past it, which is safe only where the page size is known to hold whole groups. Reading those
last tokens as rows keeps the bound exact for any page size and any token size.

Why the stale rows are harmless: shared memory is zeroed once at the start, and a tile slot afterwards
only ever holds keys and values below some length. A masked key gets probability 0, and ``0 * v`` is 0
for every finite ``v`` (a NaN or Inf there would spread, which is why nothing past a length may arrive).

The query tile, the scale and the causal positions come from the kernel; the loop returns the online
softmax state (base-2 logits, float32): ``acc [64, head_dim]``, ``row_max [64]``, ``row_sum [64]``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

# Query rows of one warpgroup's wgmma (its M); a kernel pads its rows to this.
ROWS = 64
# Tokens of one (8, 64) shared-memory tile row: the start granularity of a TMA copy into it.
GROUP = 8
# The 128-byte swizzle wgmma reads 16-bit operands with: 64 elements a row.
SWIZZLE_BYTES = 128
LOG2_E = math.log2(math.e)


def smem_transforms(dtype) -> tuple:
    """The tiling and swizzle of a 16-bit wgmma operand in shared memory."""
    columns = SWIZZLE_BYTES // jnp.dtype(dtype).itemsize
    return plgpu.TilingTransform((GROUP, columns)), plgpu.SwizzleTransform(SWIZZLE_BYTES)


def compiler_params():
    """The kernels' compiler parameters: approximate exp2 and log2, and Lane lowering semantics (each
    operation lowered straight to per-thread code in the layouts the kernel gives, not through Mosaic
    GPU's warpgroup dialect and its layout inference): the lowering these kernels are written and
    checked against, jax 0.10's default, which jax 0.11 changed to Warpgroup semantics."""
    return plgpu.CompilerParams(approx_math=True, lowering_semantics=plgpu.LoweringSemantics.Lane)


def row_layout():
    """One value per query row of a ``[64, n]`` wgmma tile (the layout of its row reductions)."""
    return plgpu.Layout.WGMMA.reduce(1)


def column_layout():
    """One value per column of a ``[64, n]`` wgmma tile."""
    return plgpu.Layout.WGMMA.reduce(0)


# The largest extent of one dimension of a TMA descriptor.
TMA_EXTENT_LIMIT = 2**32


def check_tma_extent(cache_shape) -> None:
    """``ValueError`` unless TMA can address the cache: Mosaic folds the slot, layer and head indices of a
    copy into one descriptor dimension of about ``prod(cache_shape[:-1])`` rows, which must stay below
    2**32."""
    rows = math.prod(cache_shape[:-1])
    if rows >= TMA_EXTENT_LIMIT:
        raise ValueError(f"a cache of shape {tuple(cache_shape)} has {rows} rows of head_dim, more than a TMA "
                         f"descriptor addresses (2**32): use the Triton kernels (backend 'pallas_triton')")


@dataclasses.dataclass(frozen=True)
class KeyPlan:
    """Which tokens of ``[lo, hi)`` each read covers; plain integer arithmetic, so that the kernel
    (on traced int32 scalars) and the tests (on Python ints) compute the same plan.

    ``lo`` must be a multiple of :data:`GROUP`; ``block_k`` a multiple of 64.
    """

    lo: object
    hi: object
    block_k: int

    @property
    def tiled_end(self):
        """``f``: the end of the whole 8-token groups, where the one-row tail starts."""
        return self.hi - self.hi % GROUP

    @property
    def num_tiles(self):
        return (self.tiled_end - self.lo + self.block_k - 1) // self.block_k

    def tile_start(self, tile):
        return self.lo + tile * self.block_k

    def tile_groups(self, tile):
        """8-token groups of ``tile`` below ``tiled_end``: ``block_k // 8`` for a whole tile."""
        groups = (self.tiled_end - self.tile_start(tile)) // GROUP
        if isinstance(groups, int):
            return max(0, min(groups, self.block_k // GROUP))
        return jnp.clip(groups, 0, self.block_k // GROUP)


def split_range(length, split, num_splits: int, block_k: int):
    """``(lo, hi)``: the keys split ``split`` of ``num_splits`` attends of a row of ``length`` tokens,
    whole tiles of ``block_k`` each (the last split's range ends at the length; an empty split has
    ``lo == hi``). Python ints or traced int32 scalars alike."""
    minimum, maximum = (min, max) if isinstance(length, int) else (jnp.minimum, jnp.maximum)
    num_tiles = (length + block_k - 1) // block_k
    per_split = (num_tiles + num_splits - 1) // num_splits
    first = split * per_split
    last = minimum(first + per_split, num_tiles)
    lo = first * block_k
    return lo, maximum(minimum(last * block_k, length), lo)


def token_reads(lo: int, hi: int, block_k: int) -> list[tuple[int, int]]:
    """The ``[start, stop)`` token ranges the key loop loads for ``[lo, hi)``, one per TMA copy or row
    load, in order: what the tests hold against the bound."""
    plan = KeyPlan(lo, hi, block_k)
    reads = []
    for tile in range(plan.num_tiles):
        start, groups = plan.tile_start(tile), plan.tile_groups(tile)
        if groups == block_k // GROUP:
            reads.append((start, start + block_k))
        else:
            reads.extend((start + GROUP * g, start + GROUP * (g + 1)) for g in range(groups))
    reads.extend((token, token + 1) for token in range(plan.tiled_end, hi))
    return reads


@dataclasses.dataclass(frozen=True)
class KeyBuffers:
    """Shared memory of the key loop: ``stages`` K and V tiles and their barriers.

    ``keys``, ``values``: ``[stages, block_k, head_dim]`` wgmma operands. A whole tile arrives on
    ``whole[stage]`` (one copy), a partial one on ``groups[stage]`` (``block_k // 8`` arrivals: a copy
    or a bare arrival per group), for K and V apart so that QK^T starts before V has landed.
    ``tail_keys``, ``tail_values``: ``[7, head_dim]`` untiled rows for the last tokens, which arrive on
    ``tail_barrier`` (14 arrivals: a copy or a bare arrival per row).
    """

    keys: object
    values: object
    key_whole: object
    key_groups: object
    value_whole: object
    value_groups: object
    tail_keys: object
    tail_values: object
    tail_barrier: object

    @staticmethod
    def scratch(stages: int, block_k: int, head_dim: int, dtype) -> tuple:
        """The scratch shapes to allocate (``pl.run_scoped``), in :class:`KeyBuffers` order."""
        tile = plgpu.SMEM((stages, block_k, head_dim), dtype, transforms=smem_transforms(dtype))
        whole = plgpu.Barrier(num_barriers=stages)
        groups = plgpu.Barrier(num_arrivals=block_k // GROUP, num_barriers=stages)
        tail = plgpu.SMEM((GROUP - 1, head_dim), dtype)
        tail_barrier = plgpu.Barrier(num_arrivals=2 * (GROUP - 1), num_barriers=1)
        return tile, tile, whole, groups, whole, groups, tail, tail, tail_barrier

    def zero(self, dtype) -> None:
        """Zeros every tile, so that a row no copy has reached yet is finite."""
        stages, block_k, head_dim = self.keys.shape
        zeros = plgpu.layout_cast(jnp.zeros((block_k, head_dim), dtype), plgpu.Layout.WGMMA)
        for stage in range(stages):
            self.keys.at[stage][...] = zeros
            self.values.at[stage][...] = zeros
        plgpu.commit_smem()


def attend_keys(
    q_smem,
    rows: Callable,
    buffers: KeyBuffers,
    plan: KeyPlan,
    carry,
    *,
    scale_log2: float,
    positions=None,
    accumulate_in_place: bool = True,
):
    """Streams keys ``[plan.lo, plan.hi)`` through the online softmax of 64 query rows.

    Parameters
    ----------
    q_smem
      ``[64, head_dim]`` query tile in shared memory (a wgmma operand), already waited for.
    rows
      ``rows(which, start, size)`` -> the global-memory view ``[size, head_dim]`` of tokens
      ``[start, start + size)`` of this row and kv head; ``which`` is ``"k"`` or ``"v"``;
      ``rows(which, token, None)`` -> the one token ``[head_dim]``.
    buffers
      The tile slots (:class:`KeyBuffers`), zeroed.
    plan
      The range and the tile size.
    carry
      ``(acc [64, head_dim] f32, row_max [64] f32, row_sum [64] f32)``: the softmax state so far.
    scale_log2
      The logit scale times log2(e).
    positions
      int32 ``[64]`` (row layout): row ``i`` attends only keys ``<= positions[i]`` (causal; -1: none);
      None: every row attends every key of the range.
    accumulate_in_place
      Add ``probs @ values`` into the output accumulator inside wgmma (``pl.run_state``: one
      ``[64, head_dim]`` float32 accumulator in registers). False for Pallas' interpreter, which has no
      rule for ``run_state``: a fresh accumulator, then an add.

    Returns
    -------
    The new ``carry``.
    """
    stages, block_k, head_dim = buffers.keys.shape
    dtype = buffers.keys.dtype
    whole_groups = block_k // GROUP
    num_tiles = plan.num_tiles

    def issue(tile):
        """Starts the K and V copies of ``tile`` into its stage."""
        stage = lax.rem(tile, stages)
        start, groups = plan.tile_start(tile), plan.tile_groups(tile)

        @pl.when(groups == whole_groups)
        def _whole():
            for which, tiles, barrier in (("k", buffers.keys, buffers.key_whole),
                                          ("v", buffers.values, buffers.value_whole)):
                plgpu.copy_gmem_to_smem(rows(which, start, block_k), tiles.at[stage], barrier.at[stage])

        @pl.when(groups < whole_groups)
        def _groups():
            for which, tiles, barrier in (("k", buffers.keys, buffers.key_groups),
                                          ("v", buffers.values, buffers.value_groups)):
                for group in range(whole_groups):
                    @pl.when(group < groups)
                    def _copy():
                        plgpu.copy_gmem_to_smem(rows(which, start + GROUP * group, GROUP),
                                                tiles.at[stage, pl.ds(GROUP * group, GROUP)], barrier.at[stage])

                    @pl.when(group >= groups)
                    def _skip():
                        plgpu.barrier_arrive(barrier.at[stage])

    def wait(tile, whole, groups):
        stage = lax.rem(tile, stages)
        complete = plan.tile_groups(tile) == whole_groups
        pl.when(complete)(lambda: plgpu.barrier_wait(whole.at[stage]))
        pl.when(~complete)(lambda: plgpu.barrier_wait(groups.at[stage]))

    for tile in range(stages):
        pl.when(tile < num_tiles)(lambda tile=tile: issue(jnp.int32(tile)))

    def attend_tile(tile, carry):
        acc, row_max, row_sum = carry
        stage = lax.rem(tile, stages)
        wait(tile, buffers.key_whole, buffers.key_groups)

        def logits_of(acc_ref):
            plgpu.wgmma(acc_ref, q_smem, buffers.keys.at[stage].transpose((1, 0)))
            return acc_ref[...]

        logits = pl.run_scoped(logits_of, plgpu.ACC((ROWS, block_k), jnp.float32))  # [64, block_k]
        token = plan.tile_start(tile) + plgpu.broadcasted_iota(
            jnp.int32, (ROWS, block_k), 1, layout=plgpu.Layout.WGMMA)  # [64, block_k]
        attended = token < plan.tiled_end
        if positions is not None:
            attended = attended & (token <= lax.broadcast_in_dim(positions, token.shape, [0]))
        logits = jnp.where(attended, logits * scale_log2, -jnp.inf)
        new_max = jnp.maximum(row_max, logits.max(axis=1))  # [64]; -inf while a row has seen nothing
        safe_max = jnp.where(new_max == -jnp.inf, 0.0, new_max)
        rescale = jnp.exp2(row_max - safe_max)  # [64]
        probs = jnp.exp2(logits - lax.broadcast_in_dim(safe_max, logits.shape, [0]))  # [64, block_k]
        row_sum = row_sum * rescale + probs.sum(axis=1)
        acc = acc * lax.broadcast_in_dim(rescale, acc.shape, [0])
        wait(tile, buffers.value_whole, buffers.value_groups)

        def weigh_values(acc_ref):
            plgpu.wgmma(acc_ref, probs.astype(dtype), buffers.values.at[stage])

        if accumulate_in_place:  # acc += probs @ values in the wgmma accumulator itself
            acc = pl.run_state(weigh_values)(plgpu.ACC.init(acc))
        else:  # the interpreter has no rule for run_state: the same sum through a fresh accumulator
            acc = acc + pl.run_scoped(lambda acc_ref: (weigh_values(acc_ref), acc_ref[...])[1],
                                      plgpu.ACC((ROWS, head_dim), jnp.float32))
        pl.when(tile + stages < num_tiles)(lambda: issue(tile + stages))
        return acc, new_max, row_sum

    carry = lax.fori_loop(0, num_tiles, attend_tile, carry)
    return _attend_tail(q_smem, rows, buffers, plan, carry, scale_log2=scale_log2, positions=positions)


def _attend_tail(q_smem, rows, buffers: KeyBuffers, plan: KeyPlan, carry, *, scale_log2, positions):
    """The last ``hi % 8`` tokens (``[tiled_end, hi)``): one TMA copy per token into the untiled
    staging rows, then one row at a time in registers."""
    acc, _, _ = carry
    shape = acc.shape  # [64, head_dim]
    count = plan.hi - plan.tiled_end  # [0, 8)
    for which, staging in (("k", buffers.tail_keys), ("v", buffers.tail_values)):
        for token in range(GROUP - 1):
            @pl.when(token < count)
            def _copy():
                plgpu.copy_gmem_to_smem(rows(which, plan.tiled_end + token, 1), staging.at[pl.ds(token, 1)],
                                        buffers.tail_barrier)

            @pl.when(token >= count)
            def _skip():
                plgpu.barrier_arrive(buffers.tail_barrier)
    plgpu.barrier_wait(buffers.tail_barrier)

    def attend_token(token, carry):
        acc, row_max, row_sum = carry
        q = q_smem[...].astype(jnp.float32)  # [64, head_dim]
        key = plgpu.layout_cast(buffers.tail_keys[token], column_layout()).astype(jnp.float32)  # [head_dim]
        logit = (q * lax.broadcast_in_dim(key, shape, [1])).sum(axis=1) * scale_log2  # [64]
        if positions is not None:
            logit = jnp.where(plan.tiled_end + token <= positions, logit, -jnp.inf)
        new_max = jnp.maximum(row_max, logit)
        safe_max = jnp.where(new_max == -jnp.inf, 0.0, new_max)
        rescale = jnp.exp2(row_max - safe_max)
        prob = jnp.exp2(logit - safe_max)  # [64]; 0 where not attended
        value = plgpu.layout_cast(buffers.tail_values[token], column_layout()).astype(jnp.float32)  # [head_dim]
        acc = (acc * lax.broadcast_in_dim(rescale, shape, [0])
               + lax.broadcast_in_dim(prob, shape, [0]) * lax.broadcast_in_dim(value, shape, [1]))
        return acc, new_max, row_sum * rescale + prob

    return lax.fori_loop(0, count, attend_token, carry)
