"""A paged KV cache (PagedAttention's layout): the baseline that ``vattention bench decode`` runs
through the same model code as the virtual cache.

Each layer's keys and values live in a pool of fixed-size blocks, and a block table says which
block holds which tokens of which slot::

    block_table[slot] = [ 7, 2, 9, ...]       pool  [num_blocks, block_size, kv_heads, head_dim]
    token t of slot s  ->  pool[block_table[s, t // block_size], t % block_size]

Every write and every attention kernel must follow the table: that is the cost the vAttention
paper counts (a paged FlashInfer took 600+ lines over 15 files in vLLM), and what a virtually
contiguous cache avoids. The kernels here are JAX's own paged ones:

``"cudnn"``
    ``jax._src.cudnn.fused_attention_stablehlo.paged_attention`` over pools
    ``[num_blocks, block_size, kv_heads, head_dim]`` (GPU, 16-bit dtypes);
``"pallas"``
    ``jax.experimental.pallas.ops.gpu.paged_attention.paged_attention`` (Triton-lowered Pallas)
    over head-major pools ``[kv_heads, num_blocks, block_size, head_dim]`` (``heads_first=True``);
    interpreted off a GPU;
``"xla"``
    the reference: gather each row's blocks into a contiguous ``[batch, capacity, kv_heads,
    head_dim]`` copy and run :func:`~jax_vattention.attention.xla_attention` (masked float32
    softmax). It reads any number of query tokens, so it also serves prefill chunks.

The cache is a benchmark baseline, not part of the engine: no manager serves it (its pools are
allocated whole, the block table is fixed on the host), and it plugs into the model through
:meth:`PagedKVCache.write_and_attend`, which :meth:`~jax_vattention.decode.step_batch.StepBatch.write_and_attend`
hands every cache that is not a :class:`~jax_vattention.cache.KVCache`.

Example::

    cache = PagedKVCache.allocate(num_layers=2, max_batch=4, capacity=256, kv_heads=2, head_dim=16,
                                  block_size=16, dtype=jnp.float32)
    logits, cache = model.run_step(step, cache, backend="xla")
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from jax_vattention.attention import CUDNN_DTYPES, xla_attention
from jax_vattention.cache.kv_cache import KVCache

# The backends a paged cache runs, each JAX's kernel for it (see the module docstring).
PAGED_BACKENDS = ("xla", "cudnn", "pallas")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedKVCache:
    """Per-layer block pools and one block table shared by all layers.

    k, v : per layer, ``[num_blocks, block_size, kv_heads, head_dim]``, or ``[kv_heads, num_blocks,
        block_size, head_dim]`` with ``heads_first`` (the layout Pallas' paged kernel reads)
    block_table : int32 ``[max_batch, max_blocks]``; block ``i`` of slot ``s`` is ``pool[block_table[s, i]]``
    heads_first : static, which of the two pool layouts
    """

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    block_table: jax.Array
    heads_first: bool = dataclasses.field(default=False, metadata=dict(static=True))

    @property
    def num_layers(self) -> int:
        return len(self.k)

    @property
    def num_blocks(self) -> int:
        return self.k[0].shape[1 if self.heads_first else 0]

    @property
    def block_size(self) -> int:
        return self.k[0].shape[2 if self.heads_first else 1]

    @property
    def max_batch(self) -> int:
        return self.block_table.shape[0]

    @property
    def capacity(self) -> int:
        """Tokens a slot can hold: its blocks times the block size."""
        return self.block_table.shape[1] * self.block_size

    @property
    def is_dense(self) -> bool:
        """True: no manager serves this cache, so :func:`~jax_vattention.grow` leaves it as it is."""
        return True

    def replace(self, **changes) -> "PagedKVCache":
        return dataclasses.replace(self, **changes)

    @staticmethod
    def allocate(*, num_layers: int, max_batch: int, capacity: int, kv_heads: int, head_dim: int,
                 block_size: int, dtype=jnp.bfloat16, heads_first: bool = False, seed: int | None = 0,
                 device=None) -> "PagedKVCache":
        """Zero pools of ``max_batch * ceil(capacity / block_size)`` blocks, every slot owning its blocks.

        The block table is a random permutation of the pool (``seed``), as a pool looks after some
        churn, so no kernel gets contiguous blocks for free; ``seed=None`` assigns them in order.
        """
        if block_size <= 0 or capacity <= 0 or max_batch <= 0:
            raise ValueError(f"block_size, capacity and max_batch must be positive; got {block_size}, "
                             f"{capacity}, {max_batch}")
        max_blocks = math.ceil(capacity / block_size)
        blocks = np.arange(max_batch * max_blocks, dtype=np.int32)
        if seed is not None:
            blocks = np.random.default_rng(seed).permutation(blocks).astype(np.int32)
        table = jnp.asarray(blocks.reshape(max_batch, max_blocks))
        shape = ((kv_heads, blocks.size, block_size, head_dim) if heads_first else
                 (blocks.size, block_size, kv_heads, head_dim))

        def zeros():
            array = jnp.zeros(shape, dtype)
            return jax.device_put(array, device) if device is not None else array

        if device is not None:
            table = jax.device_put(table, device)
        return PagedKVCache(k=tuple(zeros() for _ in range(num_layers)), v=tuple(zeros() for _ in range(num_layers)),
                            block_table=table, heads_first=heads_first)

    @staticmethod
    def from_dense(cache: KVCache, *, block_size: int, heads_first: bool = False, seed: int | None = 0
                   ) -> "PagedKVCache":
        """The same tokens as a per-layer dense ``cache``, cut into blocks (for tests and comparisons)."""
        if cache.interleaved:
            raise ValueError("from_dense takes a per-layer cache")
        max_batch, capacity, kv_heads, head_dim = cache.k[0].shape
        paged = PagedKVCache.allocate(num_layers=cache.num_layers, max_batch=max_batch, capacity=capacity,
                                      kv_heads=kv_heads, head_dim=head_dim, block_size=block_size,
                                      dtype=cache.k[0].dtype, heads_first=heads_first, seed=seed)
        table = paged.block_table
        padded = table.shape[1] * block_size

        def cut(buffer, pool):
            buffer = jnp.pad(buffer, ((0, 0), (0, padded - capacity), (0, 0), (0, 0)))
            blocks = buffer.reshape(max_batch * table.shape[1], block_size, kv_heads, head_dim)  # [S*M, T, K, H]
            if heads_first:
                return pool.at[:, table.reshape(-1)].set(jnp.moveaxis(blocks, 2, 0))
            return pool.at[table.reshape(-1)].set(blocks)

        return paged.replace(k=tuple(map(cut, cache.k, paged.k)), v=tuple(map(cut, cache.v, paged.v)))

    def gather(self, layer: int, slots: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Contiguous copies ``[batch, capacity, kv_heads, head_dim]`` of layer ``layer``'s keys and
        values for ``slots`` (clipped into range): what the reference reads."""
        table = self.block_table[jnp.clip(slots, 0, self.max_batch - 1)]  # [B, M]

        def rows(pool):
            if self.heads_first:
                blocks = jnp.moveaxis(pool[:, table], 0, 3)  # [B, M, T, K, H]
            else:
                blocks = pool[table]  # [B, M, T, K, H]
            return blocks.reshape(table.shape[0], self.capacity, *blocks.shape[3:])  # [B, S, K, H]

        return rows(self.k[layer]), rows(self.v[layer])

    def write(self, layer: int, k: jax.Array, v: jax.Array, start: jax.Array, count: jax.Array,
              slots: jax.Array) -> "PagedKVCache":
        """Writes ``k[b, t]``, ``v[b, t]`` (``[batch, tokens, kv_heads, head_dim]``, the pools' dtype) at
        position ``start[b] + t`` of slot ``slots[b]`` for ``t < count[b]``, through the block table.

        Padding tokens, slots past ``max_batch`` and positions past the capacity get an
        out-of-range block index and are dropped by the scatter.
        """
        batch, tokens = k.shape[:2]
        positions = start.astype(jnp.int32)[:, None] + jnp.arange(tokens, dtype=jnp.int32)[None]  # [B, T]
        keep = ((jnp.arange(tokens)[None] < count[:, None]) & (positions >= 0) & (positions < self.capacity)
                & (slots[:, None] < self.max_batch))  # [B, T]
        table = self.block_table[jnp.clip(slots, 0, self.max_batch - 1)]  # [B, M]
        block_index = jnp.clip(positions // self.block_size, 0, table.shape[1] - 1)  # [B, T]
        blocks = jnp.where(keep, jnp.take_along_axis(table, block_index, axis=1), self.num_blocks)  # [B, T]
        offsets = positions % self.block_size  # [B, T]

        def scatter(pool, new):
            if self.heads_first:
                return pool.at[:, blocks, offsets].set(jnp.moveaxis(new, 2, 0), mode="drop")  # new [K, B, T, H]
            return pool.at[blocks, offsets].set(new, mode="drop")

        new_k, new_v = list(self.k), list(self.v)
        new_k[layer] = scatter(self.k[layer], k)
        new_v[layer] = scatter(self.v[layer], v)
        return self.replace(k=tuple(new_k), v=tuple(new_v))

    def attend(self, layer: int, q: jax.Array, *, q_positions: jax.Array, kv_lengths: jax.Array,
               slots: jax.Array, backend: str) -> jax.Array:
        """Attention of ``q`` ``[batch, q_len, q_heads, head_dim]`` over slots ``slots``' first
        ``kv_lengths`` tokens of layer ``layer``, key ``s`` visible to query ``t`` when
        ``s <= q_positions[b, t]``. ``cudnn`` and ``pallas`` take one query token per row
        (decode); ``xla`` any number. Rows with a slot past ``max_batch`` get zeros.

        Returns ``[batch, q_len, q_heads, head_dim]`` in ``q``'s dtype.
        """
        check_paged_backend(backend, self, q_len=q.shape[1])
        lengths = jnp.where(slots < self.max_batch, kv_lengths, 0).astype(jnp.int32)  # [B]
        if backend == "xla":
            k, v = self.gather(layer, slots)
            return xla_attention(q, k, v, q_positions.astype(jnp.int32), lengths)
        # The kernels read every slot's row of the table (cuDNN requires the whole pool to be in it):
        # the queries go to their slots' rows and come back, as in jax_vattention.attention.attend.
        kernel = paged_cudnn_attention if backend == "cudnn" else paged_pallas_attention
        dtype = self.k[layer].dtype
        full_q = jnp.zeros((self.max_batch, *q.shape[2:]), dtype).at[slots].set(
            q[:, 0].astype(dtype), mode="drop")  # [S, N, H]
        full_lengths = jnp.zeros((self.max_batch,), jnp.int32).at[slots].set(lengths, mode="drop")  # [S]
        out = kernel(full_q, self.k[layer], self.v[layer], self.block_table, full_lengths)  # [S, N, H]
        out = jnp.where((full_lengths > 0)[:, None, None], out, 0)  # [S, N, H]; cuDNN's empty rows read a key
        return out.at[slots].get(mode="fill", fill_value=0)[:, None].astype(q.dtype)  # [B, 1, N, H]

    def write_and_attend(self, step, layer: int, q: jax.Array, k: jax.Array, v: jax.Array,
                         backend: str) -> tuple[jax.Array, "PagedKVCache"]:
        """One layer of an engine step (a :class:`~jax_vattention.decode.step_batch.StepBatch`): writes its
        decode tokens and prefill chunks through the block table, then attends each part.

        q [1, D + R*C, N, H]; k, v [1, D + R*C, K, H] in the pools' dtype -> ([1, D + R*C, N, H], cache).
        """
        if step.verify_rows:
            raise ValueError("the paged baseline runs no verification rows (speculative decoding): "
                             "use a KVCache")
        (q_d, q_c), (k_d, k_c), (v_d, v_c) = step.split_rows(q), step.split_rows(k), step.split_rows(v)
        cache = self.write(layer, k_d, v_d, step.decode_positions, step.decode_count, step.decode_slots)
        if step.chunk_rows:
            cache = cache.write(layer, k_c, v_c, step.chunk_start, step.chunk_count, step.chunk_slots)
        out = [cache.attend(layer, q_d, q_positions=step.decode_positions[:, None],
                            kv_lengths=step.decode_positions + step.decode_count, slots=step.decode_slots,
                            backend=backend).reshape(step.decode_rows, *q.shape[2:])]  # [D, N, H]
        if step.chunk_rows:
            positions = step.positions()[0, step.decode_rows:].reshape(step.chunk_rows, step.chunk_width)  # [R, C]
            chunk_out = cache.attend(layer, q_c, q_positions=positions, kv_lengths=step.chunk_start + step.chunk_count,
                                     slots=step.chunk_slots, backend=backend)  # [R, C, N, H]
            out.append(chunk_out.reshape(-1, *q.shape[2:]))  # [R*C, N, H]
        return jnp.concatenate(out)[None], cache  # [1, D + R*C, N, H]


def check_paged_backend(backend: str, cache: PagedKVCache, q_len: int = 1) -> None:
    """``ValueError`` unless ``backend`` can read ``cache`` with ``q_len`` query tokens per row."""
    if backend not in PAGED_BACKENDS:
        raise ValueError(f"a paged cache runs the backends {', '.join(PAGED_BACKENDS)} (JAX's paged kernels "
                         f"and the reference); got {backend!r}")
    if backend != "xla" and q_len != 1:
        raise ValueError(f"the paged {backend!r} kernel here is a decode kernel (one query token per row); "
                         "prefill chunks on a paged cache run with backend 'xla'")
    if backend == "pallas":
        pallas_paged_kernel()
    if backend == "pallas" and not cache.heads_first:
        raise ValueError("Pallas' paged kernel reads pools [kv_heads, num_blocks, block_size, head_dim]: "
                         "allocate the cache with heads_first=True")
    if backend == "cudnn" and cache.heads_first:
        raise ValueError("cuDNN's paged kernel reads pools [num_blocks, block_size, kv_heads, head_dim]: "
                         "allocate the cache with heads_first=False")
    if backend == "cudnn" and jnp.dtype(cache.k[0].dtype) not in CUDNN_DTYPES:
        raise ValueError(f"cuDNN's paged kernel takes bfloat16 or float16 pools, not {cache.k[0].dtype}")


def paged_reference(q, k_pool, v_pool, block_table, lengths, *, heads_first: bool = False):
    """Float32 reference of paged decode attention: ``q`` ``[batch, q_heads, head_dim]``, pools as in
    :class:`PagedKVCache`, ``block_table`` ``[batch, max_blocks]``, ``lengths`` ``[batch]`` ->
    float32 ``[batch, q_heads, head_dim]`` (zeros for a row of length 0)."""
    cache = PagedKVCache(k=(k_pool,), v=(v_pool,), block_table=block_table, heads_first=heads_first)
    batch = q.shape[0]
    k, v = cache.gather(0, jnp.arange(batch, dtype=jnp.int32))  # [B, S, K, H]
    out = xla_attention(q[:, None].astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                        jnp.maximum(lengths - 1, 0)[:, None].astype(jnp.int32), lengths.astype(jnp.int32))
    return out[:, 0]  # [B, N, H]


def paged_cudnn_attention(q, k_pool, v_pool, block_table, lengths):
    """cuDNN's paged decode attention: ``q`` ``[batch, q_heads, head_dim]``, pools ``[num_blocks,
    block_size, kv_heads, head_dim]``, ``block_table`` int32 ``[batch, max_blocks]``, ``lengths``
    int32 ``[batch]`` (a row of length 0 reads one key; callers mask its output) -> ``[batch, q_heads, head_dim]``."""
    from jax._src.cudnn.fused_attention_stablehlo import MaskType, paged_attention

    batch, _, head_dim = q.shape
    page_table = block_table[:, None, :, None]  # [B, 1, M, 1]
    out = paged_attention(q[:, None], k_pool, v_pool, jnp.ones((batch,), jnp.int32), jnp.maximum(lengths, 1),
                          page_table, page_table, scale=head_dim ** -0.5, mask_type=MaskType.PADDING)  # [B, 1, N, H]
    return out[:, 0]


def pallas_paged_config(max_blocks: int, block_size: int) -> dict:
    """How Pallas' paged kernel is called for slots of ``max_blocks`` blocks: ``k_splits`` (16 splits
    of each slot, so that a small batch still fills the GPU), ``pages_per_compute_block`` (compute
    blocks of about 128 tokens) and ``table_blocks``, the block table's width padded to a multiple
    of both, which the kernel requires (the padding is never read: it stops at each length)."""
    pages_per_compute_block = max(1, 128 // block_size)
    multiple = 16 * pages_per_compute_block
    return dict(k_splits=16, pages_per_compute_block=pages_per_compute_block,
                table_blocks=-(-max_blocks // multiple) * multiple)


def pallas_paged_kernel():
    """Pallas' paged decode kernel (``jax.experimental.pallas.ops.gpu.paged_attention``), or a
    ``ValueError`` where the installed JAX no longer ships it."""
    try:
        from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention
    except ModuleNotFoundError:
        raise ValueError(f"Pallas' paged attention kernel is not in jax {jax.__version__}: JAX 0.12 moved its Pallas "
                         "GPU ops out to the tokamax package. The Pallas paged baseline needs jax<0.12; the cuDNN "
                         "paged baseline and the reference ('xla') run on every JAX") from None
    return paged_attention


def pallas_paged_shipped() -> bool:
    """Whether the installed JAX still ships Pallas' paged decode kernel (:func:`pallas_paged_kernel`)."""
    try:
        pallas_paged_kernel()
    except ValueError:
        return False
    return True


def paged_pallas_attention(q, k_pool, v_pool, block_table, lengths):
    """Pallas' paged decode attention (interpreted off a GPU): ``q`` ``[batch, q_heads, head_dim]``,
    pools ``[kv_heads, num_blocks, block_size, head_dim]``, ``block_table`` int32 ``[batch,
    max_blocks]``, ``lengths`` int32 ``[batch]`` -> ``[batch, q_heads, head_dim]``."""
    paged_attention = pallas_paged_kernel()
    head_dim = q.shape[-1]
    config = pallas_paged_config(block_table.shape[1], k_pool.shape[2])
    table = jnp.pad(block_table, ((0, 0), (0, config.pop("table_blocks") - block_table.shape[1])))  # [B, M']
    scaled = (q.astype(jnp.float32) * head_dim ** -0.5).astype(q.dtype)  # the kernel has no scale argument
    return paged_attention(scaled, k_pool, v_pool, table, lengths, interpret=jax.default_backend() != "gpu",
                           **config)
