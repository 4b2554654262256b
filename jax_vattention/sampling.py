"""Choosing the next token: greedy, or temperature / top-k / top-p sampling per row.

Every knob is a traced ``[batch]`` array, so rows of one batch may sample
differently and changing a knob never recompiles. A row with temperature 0 is
greedy; the sort that sampling needs is skipped when every row is greedy.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def sample_tokens(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_k: jax.Array,
                  top_p: jax.Array) -> jax.Array:
    """Pick one token per row.

    Parameters
    ----------
    logits : float32 [batch, vocab]
    key : a PRNG key
    temperature : float32 [batch]; 0 means greedy (argmax)
    top_k : int32 [batch]; keep the ``top_k`` most likely tokens (0: all)
    top_p : float32 [batch]; then keep the smallest set of most likely tokens whose
        probability reaches ``top_p`` (1: all)

    Returns
    -------
    int32 [batch]

    Example::

        tokens = sample_tokens(logits, jax.random.key(0), temperature=jnp.full(4, 0.8),
                               top_k=jnp.full(4, 50), top_p=jnp.full(4, 0.95))
    """
    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [B]
    sampling = temperature > 0  # [B]

    def draw(_):
        vocab = logits.shape[-1]
        scaled = logits / jnp.where(sampling, temperature, 1.0)[:, None]  # [B, V]
        order = jnp.argsort(-scaled, axis=-1).astype(jnp.int32)  # [B, V], most likely first
        ranked = jnp.take_along_axis(scaled, order, axis=-1)  # [B, V]
        rank = jnp.arange(vocab, dtype=jnp.int32)[None, :]  # [1, V]
        in_top_k = (top_k[:, None] <= 0) | (rank < top_k[:, None])  # [B, V]
        ranked = jnp.where(in_top_k, ranked, -jnp.inf)  # [B, V]
        probs = jax.nn.softmax(ranked, axis=-1)  # [B, V]
        mass_before = jnp.cumsum(probs, axis=-1) - probs  # [B, V], probability of more likely tokens
        in_top_p = (mass_before < top_p[:, None]) | (rank == 0)  # [B, V]; the most likely token always stays
        ranked = jnp.where(in_top_p, ranked, -jnp.inf)  # [B, V]
        choice = jax.random.categorical(key, ranked, axis=-1)  # [B]
        return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0]  # [B]

    sampled = lax.cond(jnp.any(sampling), draw, lambda _: greedy, None)  # [B]
    return jnp.where(sampling, sampled, greedy)
