"""One engine step's tokens in a fixed shape: a decode token per slot row plus prefill chunk rows.

A step of stall-free serving (Sarathi-Serve) mixes the running requests' decode
tokens with chunks of admitted requests' prompts. Its shapes must not depend on
prompt lengths, or every new length compiles a new program, so the step is laid
out in two fixed parts, flattened into one token axis for the model's matmuls::

    flat tokens [1, D + R*C]:  | d0 d1 ... d(D-1) | chunk 0 (C) | chunk 1 (C) | ... |
                                 decode rows        prefill rows, padded to C tokens

* decode rows ``[D]``: one token each, row ``i`` in slot ``decode_slots[i]`` at
  position ``decode_positions[i]``; ``decode_count[i]`` is 1 for a running row, 0 for
  padding (written nowhere, attending to nothing);
* prefill rows ``[R, C]``: ``chunk_count[r]`` real tokens of slot ``chunk_slots[r]``
  starting at ``chunk_start[r]`` (a prompt may start at an offset, e.g. after a
  cached prefix); rows of one slot may follow each other in the same step.

Per layer, both parts' keys and values are written first, then each part attends:
the decode rows through the chosen backend's decode kernel, the chunk rows through
:func:`~jax_vattention.attention.chunk_attention` (bottom-right causal, in place).
A program is compiled per ``(D, R, C)``: the engine uses two, decode-only
(``R = 0``) and mixed.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jax_vattention.attention import attend, check_backend, chunk_attention, xla_attention
from jax_vattention.cache.kv_cache import KVCache
from jax_vattention.decode.sampling import sample_tokens
from jax_vattention.cache.writes import write_kv


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepBatch:
    """The device arrays of one step (see the module docstring for the layout).

    decode_tokens, decode_slots, decode_positions, decode_count : int32 [D]
    chunk_tokens : int32 [R, C]; chunk_slots, chunk_start, chunk_count : int32 [R]
    """

    decode_tokens: jax.Array
    decode_slots: jax.Array
    decode_positions: jax.Array
    decode_count: jax.Array
    chunk_tokens: jax.Array
    chunk_slots: jax.Array
    chunk_start: jax.Array
    chunk_count: jax.Array

    @property
    def decode_rows(self) -> int:
        return self.decode_tokens.shape[0]

    @property
    def chunk_rows(self) -> int:
        return self.chunk_tokens.shape[0]

    @property
    def chunk_width(self) -> int:
        return self.chunk_tokens.shape[1]

    def tokens(self) -> jax.Array:
        """int32 [1, D + R*C], the flat token axis."""
        return jnp.concatenate([self.decode_tokens, self.chunk_tokens.reshape(-1)])[None]

    def positions(self) -> jax.Array:
        """int32 [1, D + R*C], each token's position in its sequence."""
        offsets = jnp.arange(self.chunk_width, dtype=jnp.int32)  # [C]
        chunk = self.chunk_start[:, None] + offsets[None, :]  # [R, C]
        return jnp.concatenate([self.decode_positions, chunk.reshape(-1)])[None]

    def logit_index(self) -> jax.Array:
        """int32 [D + R], the flat index of each row's last real token (its logits sample the next)."""
        last = jnp.maximum(self.chunk_count - 1, 0)  # [R]
        chunk = self.decode_rows + jnp.arange(self.chunk_rows, dtype=jnp.int32) * self.chunk_width + last
        return jnp.concatenate([jnp.arange(self.decode_rows, dtype=jnp.int32), chunk])

    def split_rows(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``[1, D + R*C, ...]`` -> the decode part ``[D, 1, ...]`` and the chunk part ``[R, C, ...]``."""
        rows = self.decode_rows
        return x[0, :rows, None], x[0, rows:].reshape(self.chunk_rows, self.chunk_width, *x.shape[2:])

    def write_and_attend(self, cache: KVCache, layer: int, q: jax.Array, k: jax.Array, v: jax.Array,
                         backend: str, *, scale: float | None = None, window: int | None = None,
                         softcap: float | None = None) -> tuple[jax.Array, KVCache]:
        """Writes one layer's new keys and values, then attends each part over the cache.

        q [1, D + R*C, N, H]; k, v [1, D + R*C, K, H] in the cache's dtype; ``scale``, ``window``
        and ``softcap`` as :func:`~jax_vattention.attention.attend` takes them.
        Returns the attention output [1, D + R*C, N, H] and the cache.
        """
        mask = dict(scale=scale, window=window, softcap=softcap)
        if not isinstance(cache, KVCache):
            # A cache with a layout of its own (the paged baseline, jax_vattention.bench.paged_cache)
            # writes and attends the step through its own kernels, which know none of these knobs.
            if any(value is not None for value in mask.values()):
                raise ValueError(f"the {type(cache).__name__} baseline attends with the default scale, no window "
                                 "and no soft-capping: use a KVCache for this model")
            return cache.write_and_attend(self, layer, q, k, v, backend)
        check_backend(backend)
        rows, chunks = self.decode_rows, self.chunk_rows
        (q_d, q_c), (k_d, k_c), (v_d, v_c) = self.split_rows(q), self.split_rows(k), self.split_rows(v)
        cache = write_kv(cache, layer, k_d, v_d, self.decode_positions, self.decode_count, self.decode_slots)
        if chunks:
            cache = write_kv(cache, layer, k_c, v_c, self.chunk_start, self.chunk_count, self.chunk_slots)
        k_cache, v_cache, index = cache.layer(layer)
        out = [attend(q_d, k_cache, v_cache, q_positions=self.decode_positions[:, None],
                      kv_lengths=self.decode_positions + self.decode_count, backend=backend,
                      slots=self.decode_slots, layer=index, **mask).reshape(rows, *q.shape[2:])]  # [D, N, H]
        if chunks:
            positions = self.positions()[0, rows:].reshape(chunks, self.chunk_width)  # [R, C]
            lengths = self.chunk_start + self.chunk_count  # [R]
            if backend == "xla":  # the reference reads whole rows: dense caches and tests only
                gathered = (k_cache[jnp.minimum(self.chunk_slots, k_cache.shape[0] - 1)],
                            v_cache[jnp.minimum(self.chunk_slots, v_cache.shape[0] - 1)])
                chunk_out = xla_attention(q_c, *gathered, positions, jnp.where(
                    self.chunk_slots < k_cache.shape[0], lengths, 0), layer=index, **mask)
            else:
                chunk_out = chunk_attention(q_c, k_cache, v_cache, slots=self.chunk_slots,
                                            q_positions=positions, kv_lengths=lengths, layer=index,
                                            backend=backend, **mask)
            out.append(chunk_out.reshape(chunks * self.chunk_width, *q.shape[2:]))  # [R*C, N, H]
        return jnp.concatenate(out)[None], cache  # [1, D + R*C, N, H]


def model_step(model, cache, batch: StepBatch, temperature, top_k, top_p, key, *, backend: str,
               sampling: bool | None = None):
    """One forward pass of ``batch`` and a sampled token per row: the decode step that
    :func:`~jax_vattention.decode.generate.generate`'s loop and the engine share.

    temperature, top_p float32 [D + R]; top_k int32 [D + R] -> (tokens int32 [D + R], logits
    float32 [D + R, vocab], cache). ``sampling``: see :func:`~jax_vattention.decode.sampling.sample_tokens`.
    """
    logits, cache = model.run_step(batch, cache, backend=backend)  # [D + R, V]
    return sample_tokens(logits, key, temperature, top_k, top_p, sampling=sampling), logits, cache


def decode_batch(tokens, slots, positions, count) -> StepBatch:
    """A decode-only :class:`StepBatch`: int32 [D] each, no chunk rows."""
    no_chunk = jnp.zeros((0,), jnp.int32)
    return StepBatch(tokens, slots, positions, count, jnp.zeros((0, 1), jnp.int32), no_chunk, no_chunk,
                     no_chunk)
