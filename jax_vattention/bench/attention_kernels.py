"""The implementations `vattention bench attention` times, each as ``attend(q, *operands)``: our decode
kernels (Triton and Mosaic GPU) and chunk kernels, cuDNN, and the paged baselines with their page pools."""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp

from jax_vattention.attention.kernels import decode_attention
from jax_vattention.attention.kernels.decode_attention import default_block_k, default_num_splits
from jax_vattention.bench.paged_cache import pallas_paged_kernel

OURS, OURS_MGPU, CUDNN, PAGED_CUDNN, PAGED_PALLAS = "ours_triton", "ours_mgpu", "cudnn", "paged_cudnn", "paged_pallas"
# Our Triton decode kernel over an FP8 cache (the same K/V as e4m3 codes, scale 1): half the bytes read.
OURS_FP8 = "ours_triton_fp8"
IMPLEMENTATIONS = (OURS, OURS_FP8, OURS_MGPU, CUDNN, PAGED_CUDNN, PAGED_PALLAS)
# Our chunk kernels, timed with --chunk-tokens.
CHUNK_TRITON, CHUNK_MGPU = "chunk_triton", "chunk_mgpu"


def shuffled_page_pool(k_cache, v_cache, page_size: int, key):
    """The caches cut into pages and scattered in random order over a pool, as in a real page pool.

    Returns k_pool, v_pool [batch * pages_per_slot, page_size, kv_heads, head_dim] and the block
    table int32 [batch, pages_per_slot]: page i of slot b is ``pool[block_table[b, i]]``.
    """
    batch, context, kv_heads, head_dim = k_cache.shape
    pages_per_slot = context // page_size
    block_table = jax.random.permutation(key, batch * pages_per_slot).astype(jnp.int32)

    def scatter(cache):
        pages = cache.reshape(batch * pages_per_slot, page_size, kv_heads, head_dim)
        return jnp.zeros_like(pages).at[block_table].set(pages)

    return scatter(k_cache), scatter(v_cache), block_table.reshape(batch, pages_per_slot)


def paged_cudnn_attention(scale: float):
    from jax._src.cudnn.fused_attention_stablehlo import MaskType, paged_attention

    def attend(q, k_pool, v_pool, block_table, lengths):
        batch = q.shape[0]
        page_table = block_table[:, None, :, None]  # [batch, 1, pages_per_slot, 1]
        out = paged_attention(
            q[:, None],
            k_pool,
            v_pool,
            jnp.ones((batch,), jnp.int32),
            lengths,
            page_table,
            page_table,
            scale=scale,
            mask_type=MaskType.PADDING,
        )
        return out[:, 0]

    return attend


def paged_pallas_attention(page_size: int, pages_per_slot: int):
    paged_attention = pallas_paged_kernel()
    k_splits = math.gcd(16, pages_per_slot)
    pages_per_block = math.gcd(max(1, 128 // page_size), pages_per_slot // k_splits)

    def attend(q, k_pages, v_pages, block_table, lengths):
        return paged_attention(
            q,
            k_pages,
            v_pages,
            block_table,
            lengths,
            k_splits=k_splits,
            pages_per_compute_block=pages_per_block,
            interpret=jax.default_backend() != "gpu",
        )

    return attend, f"k_splits={k_splits},pages_per_compute_block={pages_per_block}"


def cudnn_attention(scale: float):
    def attend(q, k_cache, v_cache, lengths):
        out = jax.nn.dot_product_attention(
            q[:, None], k_cache, v_cache, scale=scale, key_value_seq_lengths=lengths, implementation="cudnn"
        )
        return out[:, 0]

    return attend


def ours_attention(**config):
    return lambda q, k_cache, v_cache, lengths: decode_attention(q, k_cache, v_cache, lengths, **config)


def ours_mgpu_attention(**config):
    from jax_vattention.attention.kernels.mosaic_decode_attention import mosaic_decode_attention

    return lambda q, k_cache, v_cache, lengths: mosaic_decode_attention(q, k_cache, v_cache, lengths, **config)


def mgpu_sweep_configs(batch, kv_heads, context, head_dim):
    """Tile, pipeline and split configurations for the Mosaic GPU kernel, around its defaults."""
    from jax_vattention.attention.kernels import mosaic_decode_attention as mgpu

    splits = mgpu.default_num_splits(batch, kv_heads, context, mgpu.default_block_k(head_dim))
    for block_k, stages in itertools.product((64, 128), (2, 3, 4)):
        if 2 * stages * block_k * head_dim * 2 <= 160 * 1024:  # K and V tiles that fit shared memory
            yield dict(block_k=block_k, stages=stages)
    for factor in (0.25, 0.5, 2, 4):
        yield dict(num_splits=max(1, round(splits * factor)))


def chunk_kernels():
    """Our two chunk kernels under one signature: {name: attend(q, k, v, slots, positions, lengths)}."""
    from jax_vattention.attention.kernels.chunk_attention import chunk_attention
    from jax_vattention.attention.kernels.mosaic_chunk_attention import mosaic_chunk_attention

    return {CHUNK_TRITON: lambda *args: chunk_attention(*args, interpret=jax.default_backend() != "gpu"),
            CHUNK_MGPU: mosaic_chunk_attention}


def mgpu_available() -> bool:
    """Whether the Mosaic GPU kernels can run here: a Hopper GPU."""
    device = jax.devices()[0]
    return device.platform == "gpu" and str(getattr(device, "compute_capability", "")).startswith("9")


def sweep_configs(batch, kv_heads, context, head_dim):
    """Tile, launch and split configurations for our kernel, around the defaults."""
    splits = default_num_splits(batch, kv_heads, context, default_block_k(head_dim))
    for block_k, num_warps, num_stages in itertools.product((64, 128, 256), (4, 8), (2, 3, 4)):
        yield dict(block_k=block_k, num_warps=num_warps, num_stages=num_stages)
    for factor in (0.25, 0.5, 2, 4):
        yield dict(num_splits=max(1, round(splits * factor)))
