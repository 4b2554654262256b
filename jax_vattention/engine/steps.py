"""The engine's two compiled steps: prefill of the admitted requests, and a chunk of decode steps for all slots.

Both donate the cache and return it. The decode chunk runs ``steps`` decode
steps over every slot of the cache in a ``fori_loop``; each step first calls
the mapping op (``grow``) and then writes one token per running slot, so the
host's mirror of the lengths, which adds one token per step to every
allocated slot, is never behind the device. Slots that are free or finished
write nothing and attend over nothing.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from jax_vattention import ops
from jax_vattention.cache import KVCache
from jax_vattention.donation import cache_jit
from jax_vattention.sampling import sample_tokens


def _prefill(graphdef, backend: str, state, cache: KVCache, tokens, lengths, slots, temperature, top_k, top_p,
             key):
    """Prefill of a batch of requests from position 0.

    tokens int32 [R, P] (padded), lengths/slots int32 [R] (padding rows: length 0 and a slot
    >= max_batch, whose writes are dropped), knobs [R] -> (first tokens int32 [R], cache).
    """
    model = nnx.merge(graphdef, state)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)  # [R, P]
    logits, cache = model(tokens, positions, cache, start=jnp.zeros_like(lengths), count=lengths, slots=slots,
                          backend=backend, logit_index=jnp.maximum(lengths - 1, 0))  # [R, V]
    return sample_tokens(logits, key, temperature, top_k, top_p), cache


def _decode_chunk(graphdef, backend: str, steps: int, state, cache: KVCache, last, lengths, running,
                  generated, max_new, stops, temperature, top_k, top_p, key):
    """One chunk of ``steps`` decode steps over all ``max_batch`` slots.

    last, lengths, generated, max_new : int32 [S]; running : bool [S]; stops : int32 [S, W]
    (padded with -1); temperature, top_p : float32 [S]; top_k : int32 [S].
    Returns the cache, the updated per-slot arrays and the tokens int32 [S, steps] (-1 where
    a slot produced nothing).
    """
    model = nnx.merge(graphdef, state)
    slots = lengths.shape[0]

    def body(i, carry):
        cache, last, lengths, running, generated, tokens, key = carry
        cache = ops.grow(cache, tokens=1)
        count = running.astype(jnp.int32)  # [S]; free and finished slots write nothing
        logits, cache = model(last[:, None], lengths[:, None], cache, start=lengths * count, count=count,
                              backend=backend, logit_index=jnp.zeros_like(lengths))  # [S, V]
        key, step_key = jax.random.split(key)
        token = sample_tokens(logits, step_key, temperature, top_k, top_p)  # [S]
        token = jnp.where(running, token, -1)  # [S]
        tokens = tokens.at[:, i].set(token)  # [S, steps]
        generated = generated + count  # [S]
        stopped = jnp.any(token[:, None] == stops, axis=-1)  # [S]
        running = running & ~stopped & (generated < max_new)  # [S]
        return cache, jnp.where(count > 0, token, last), lengths + count, running, generated, tokens, key

    tokens = jnp.full((slots, steps), -1, jnp.int32)
    carry = (cache, last, lengths, running, generated, tokens, key)
    cache, last, lengths, running, generated, tokens, key = lax.fori_loop(0, steps, body, carry)
    return cache, last, lengths, running, generated, tokens, key


@functools.lru_cache(maxsize=16)
def prefill_fn(graphdef, backend: str):
    """Jitted prefill; compiles once per (batch bucket, prompt bucket)."""
    return cache_jit(functools.partial(_prefill, graphdef, backend))


@functools.lru_cache(maxsize=16)
def decode_chunk_fn(graphdef, backend: str, steps: int):
    """Jitted decode chunk; compiles once per chunk length."""
    return cache_jit(functools.partial(_decode_chunk, graphdef, backend, steps))
