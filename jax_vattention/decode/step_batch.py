"""One engine step's tokens in a fixed shape: a decode token per slot row plus prefill chunk rows.

A step of stall-free serving (Sarathi-Serve) mixes the running requests' decode
tokens with chunks of admitted requests' prompts. Its shapes must not depend on
prompt lengths, or every new length compiles a new program, so the step is laid
out in two fixed parts, flattened into one token axis for the model's matmuls::

    flat tokens [1, D + R*C + V*W]:
        | d0 d1 ... d(D-1) | chunk 0 (C) | chunk 1 (C) | ... | verify 0 (W) | ... |
          decode rows        prefill rows, padded to C       verification rows, padded to W

* decode rows ``[D]``: one token each, row ``i`` in slot ``decode_slots[i]`` at
  position ``decode_positions[i]``; ``decode_count[i]`` is 1 for a running row, 0 for
  padding (written nowhere, attending to nothing);
* prefill rows ``[R, C]``: ``chunk_count[r]`` real tokens of slot ``chunk_slots[r]``
  starting at ``chunk_start[r]`` (a prompt may start at an offset, e.g. after a
  cached prefix); rows of one slot may follow each other in the same step;
* verification rows ``[V, W]`` (speculative decoding, optional): a slot's last token and
  the tokens proposed after it, ``verify_count[v]`` of them, at ``verify_start[v]`` (the
  slot's length). They are chunk rows of another width, attended the same way; the model
  returns the logits of every one of their tokens, which the target's token at each
  position is chosen from (:mod:`~jax_vattention.decode.verification`).

Per layer, both parts' keys and values are written first, then each part attends:
the decode rows through the chosen backend's decode kernel, the chunk rows through
:func:`~jax_vattention.attention.chunk_attention` (bottom-right causal, in place).
A program is compiled per ``(D, R, C, V, W)``: the engine uses decode-only (``R = 0``) and
mixed, each with and without verification rows. The model returns the logits of each decode
and chunk row's last token, then of every verification token (:meth:`StepBatch.logit_index`);
with ``every_token`` (static) those of every token of the flat axis: the chunks' tokens then
get their log-probabilities too (``prompt_logprobs``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jax_vattention.attention import attend, check_backend, chunk_attention, xla_attention
from jax_vattention.attention.reference import fold_kv_scales, scale_values
from jax_vattention.cache.kv_cache import KVCache
from jax_vattention.decode.sampling import SamplingParams, choose_tokens
from jax_vattention.cache.writes import write_kv


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepBatch:
    """The device arrays of one step (see the module docstring for the layout).

    decode_tokens, decode_slots, decode_positions, decode_count : int32 [D]
    chunk_tokens : int32 [R, C]; chunk_slots, chunk_start, chunk_count : int32 [R]
    every_token : static; the model's logits are every flat token's (:meth:`logit_index`)
    verify_tokens : int32 [V, W] or None (no verification rows); verify_slots, verify_start,
        verify_count : int32 [V] (a padding row: slot out of range, count 0)
    """

    decode_tokens: jax.Array
    decode_slots: jax.Array
    decode_positions: jax.Array
    decode_count: jax.Array
    chunk_tokens: jax.Array
    chunk_slots: jax.Array
    chunk_start: jax.Array
    chunk_count: jax.Array
    every_token: bool = dataclasses.field(default=False, metadata=dict(static=True))
    verify_tokens: jax.Array | None = None
    verify_slots: jax.Array | None = None
    verify_start: jax.Array | None = None
    verify_count: jax.Array | None = None

    @property
    def decode_rows(self) -> int:
        return self.decode_tokens.shape[0]

    @property
    def verify_rows(self) -> int:
        return 0 if self.verify_tokens is None else self.verify_tokens.shape[0]

    @property
    def verify_width(self) -> int:
        return 0 if self.verify_tokens is None else self.verify_tokens.shape[1]

    @property
    def sampled_rows(self) -> int:
        """The rows that sample one token each: the decode rows and the chunk rows (``D + R``)."""
        return self.decode_rows + self.chunk_rows

    def _verify_parts(self) -> list[jax.Array]:
        return [] if self.verify_tokens is None else [self.verify_tokens.reshape(-1)]

    @property
    def chunk_rows(self) -> int:
        return self.chunk_tokens.shape[0]

    @property
    def chunk_width(self) -> int:
        return self.chunk_tokens.shape[1]

    def tokens(self) -> jax.Array:
        """int32 [1, D + R*C + V*W], the flat token axis."""
        return jnp.concatenate([self.decode_tokens, self.chunk_tokens.reshape(-1), *self._verify_parts()])[None]

    def _row_positions(self, start: jax.Array, width: int) -> jax.Array:
        return start[:, None] + jnp.arange(width, dtype=jnp.int32)[None, :]  # [rows, width]

    def verify_positions(self) -> jax.Array:
        """int32 [V, W], each verification token's position in its sequence."""
        return self._row_positions(self.verify_start, self.verify_width)

    def positions(self) -> jax.Array:
        """int32 [1, D + R*C + V*W], each token's position in its sequence."""
        chunk = self._row_positions(self.chunk_start, self.chunk_width)  # [R, C]
        verify = [] if self.verify_tokens is None else [self.verify_positions().reshape(-1)]  # [V*W]
        return jnp.concatenate([self.decode_positions, chunk.reshape(-1), *verify])[None]

    def sequence_lengths(self) -> jax.Array:
        """int32 [1, D + R*C + V*W], the sequence length each token is embedded at (what a rotary
        embedding that depends on the sequence's length reads): a chunk row's tokens the length its
        row reaches in this pass, as a prefill's; a decode or verification token one past its own
        position, as decoding it alone would (a verified token is then embedded as plain decoding
        embeds it)."""
        chunk = jnp.repeat(self.chunk_start + self.chunk_count, self.chunk_width)  # [R*C]
        verify = [] if self.verify_tokens is None else [self.verify_positions().reshape(-1) + 1]  # [V*W]
        return jnp.concatenate([self.decode_positions + 1, chunk, *verify])[None]

    def last_index(self) -> jax.Array:
        """int32 [D + R], the flat index of each row's last real token (its logits sample the next)."""
        last = jnp.maximum(self.chunk_count - 1, 0)  # [R]
        chunk = self.decode_rows + jnp.arange(self.chunk_rows, dtype=jnp.int32) * self.chunk_width + last
        return jnp.concatenate([jnp.arange(self.decode_rows, dtype=jnp.int32), chunk])

    def verify_index(self) -> jax.Array:
        """int32 [V*W], the flat index of every verification token."""
        first = self.decode_rows + self.chunk_rows * self.chunk_width
        return first + jnp.arange(self.verify_rows * self.verify_width, dtype=jnp.int32)

    def logit_index(self) -> jax.Array:
        """The flat tokens whose logits the model returns: each decode and chunk row's last
        (:meth:`last_index`), then every verification token (int32 [D + R + V*W]); with
        ``every_token`` all of them (int32 [D + R*C + V*W]). The verification rows' logits are the
        last ``V*W`` either way."""
        if self.every_token:
            total = self.decode_rows + self.chunk_rows * self.chunk_width + self.verify_rows * self.verify_width
            return jnp.arange(total, dtype=jnp.int32)
        return jnp.concatenate([self.last_index(), self.verify_index()])

    def sample_positions(self) -> jax.Array:
        """int32 [D + R], the position of the token each row samples (one past its last token)."""
        return self.positions()[0, self.last_index()] + 1

    def split_rows(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``[1, D + R*C + V*W, ...]`` -> the decode part ``[D, 1, ...]`` and the chunk part ``[R, C, ...]``
        (:meth:`verify_part`: the verification rows)."""
        rows, end = self.decode_rows, self.decode_rows + self.chunk_rows * self.chunk_width
        return x[0, :rows, None], x[0, rows:end].reshape(self.chunk_rows, self.chunk_width, *x.shape[2:])

    def verify_part(self, x: jax.Array) -> jax.Array:
        """``[1, D + R*C + V*W, ...]`` -> the verification rows ``[V, W, ...]``."""
        first = self.decode_rows + self.chunk_rows * self.chunk_width
        return x[0, first:].reshape(self.verify_rows, self.verify_width, *x.shape[2:])

    def write_and_attend(self, cache: KVCache, layer: int, q: jax.Array, k: jax.Array, v: jax.Array,
                         backend: str, *, scale: float | None = None, window: int | None = None,
                         softcap: float | None = None) -> tuple[jax.Array, KVCache]:
        """Writes one layer's new keys and values, then attends each part over the cache.

        q [1, T, N, H]; k, v [1, T, K, H] in the cache's dtype (``T = D + R*C + V*W``; for an FP8 cache
        the model's: :func:`~jax_vattention.cache.writes.write_kv` quantizes them); ``scale``, ``window``
        and ``softcap`` as :func:`~jax_vattention.attention.attend` takes them.
        Returns the attention output [1, T, N, H] and the cache.
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
        rows, chunks, verifies = self.decode_rows, self.chunk_rows, self.verify_rows
        (q_d, q_c), (k_d, k_c), (v_d, v_c) = self.split_rows(q), self.split_rows(k), self.split_rows(v)
        cache = write_kv(cache, layer, k_d, v_d, self.decode_positions, self.decode_count, self.decode_slots)
        if chunks:
            cache = write_kv(cache, layer, k_c, v_c, self.chunk_start, self.chunk_count, self.chunk_slots)
        if verifies:
            cache = write_kv(cache, layer, self.verify_part(k), self.verify_part(v), self.verify_start,
                             self.verify_count, self.verify_slots)
        k_cache, v_cache, index = cache.layer(layer)
        mask.update(cache.kv_scales)  # an FP8 cache's scales (1.0 otherwise)
        out = [attend(q_d, k_cache, v_cache, q_positions=self.decode_positions[:, None],
                      kv_lengths=self.decode_positions + self.decode_count, backend=backend,
                      slots=self.decode_slots, layer=index, **mask).reshape(rows, *q.shape[2:])]  # [D, N, H]
        if chunks:
            positions = self._row_positions(self.chunk_start, self.chunk_width)  # [R, C]
            chunk_out = _attend_rows(q_c, k_cache, v_cache, self.chunk_slots, positions,
                                     self.chunk_start + self.chunk_count, index, backend, mask)  # [R, C, N, H]
            out.append(chunk_out.reshape(chunks * self.chunk_width, *q.shape[2:]))  # [R*C, N, H]
        if verifies:
            verify_out = _attend_rows(self.verify_part(q), k_cache, v_cache, self.verify_slots,
                                      self.verify_positions(), self.verify_start + self.verify_count, index,
                                      backend, mask)  # [V, W, N, H]
            out.append(verify_out.reshape(verifies * self.verify_width, *q.shape[2:]))  # [V*W, N, H]
        return jnp.concatenate(out)[None], cache  # [1, T, N, H]


def _attend_rows(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, slots: jax.Array, positions: jax.Array,
                 lengths: jax.Array, layer, backend: str, mask: dict) -> jax.Array:
    """Rows of several new tokens of a slot each (q [rows, width, N, H], at ``positions`` [rows, width]),
    attended in place over their slots' first ``lengths`` [rows] tokens: [rows, width, N, H]. ``mask``:
    ``scale``, ``window``, ``softcap`` and the cache's ``k_scale`` and ``v_scale``."""
    if backend == "xla":  # the reference reads whole rows: dense caches and tests only
        gathered = (k_cache[jnp.minimum(slots, k_cache.shape[0] - 1)], v_cache[jnp.minimum(slots, v_cache.shape[0] - 1)])
        # An FP8 cache's scales: the keys' folds into the logit scale, the values' scales the output.
        return scale_values(xla_attention(
            q, *gathered, positions, jnp.where(slots < k_cache.shape[0], lengths, 0), layer=layer,
            scale=fold_kv_scales(mask["scale"], q.shape[-1], mask["k_scale"]), window=mask["window"],
            softcap=mask["softcap"]), mask["v_scale"])
    return chunk_attention(q, k_cache, v_cache, slots=slots, q_positions=positions, kv_lengths=lengths, layer=layer,
                           backend=backend, **mask)


def model_step(model, cache, batch: StepBatch, params: SamplingParams, key, *, backend: str,
               sampling: bool | None = None, counts=None, top_logprobs: int | None = None):
    """One forward pass of ``batch`` and a token per row: the step that
    :func:`~jax_vattention.decode.generate.generate`'s loop and the engine share.

    ``params``: the rows' :class:`~jax_vattention.decode.sampling.SamplingParams` ([D + R]);
    ``key``: the stream key of rows without a seed; ``sampling``, ``counts`` and
    ``top_logprobs``: see :func:`~jax_vattention.decode.sampling.choose_tokens`.
    Returns (tokens int32 [D + R], their :class:`~jax_vattention.decode.sampling.Logprobs` or None,
    the logits float32 [D + R + V*W, vocab] (with ``every_token``: [D + R*C + V*W, vocab]; the last
    ``V*W`` are the verification rows' tokens'), the cache).
    """
    logits, cache = model.run_step(batch, cache, backend=backend)  # [D + R (*C) + V*W, V]
    rows = logits[batch.last_index()] if batch.every_token else logits[:batch.sampled_rows]  # [D + R, V]
    tokens, logprobs = choose_tokens(rows, params, key, batch.sample_positions(), counts, sampling=sampling,
                                     top_logprobs=top_logprobs)
    return tokens, logprobs, logits, cache


def decode_batch(tokens, slots, positions, count) -> StepBatch:
    """A decode-only :class:`StepBatch`: int32 [D] each, no chunk rows."""
    no_chunk = jnp.zeros((0,), jnp.int32)
    return StepBatch(tokens, slots, positions, count, jnp.zeros((0, 1), jnp.int32), no_chunk, no_chunk,
                     no_chunk)
