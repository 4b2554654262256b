"""Choosing the next token: greedy, or temperature / top-k / top-p sampling per row.

Every knob is a traced ``[batch]`` array, so rows of one batch may sample
differently and changing a knob never recompiles. A row with temperature 0 is
greedy. The sort that sampling needs is skipped when every row is greedy: by the
caller's static ``sampling`` flag where the host knows the knobs (the engine's
step), else by a conditional on the device. On a GPU that conditional costs more
than its branch: XLA reads its predicate on the host, so the host's dispatch waits
for the whole forward pass before it can go on.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def sample_tokens(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_k: jax.Array,
                  top_p: jax.Array, *, sampling: bool | None = None) -> jax.Array:
    """Pick one token per row.

    Parameters
    ----------
    logits : float32 [batch, vocab]
    key : a PRNG key
    temperature : float32 [batch]; 0 means greedy (argmax)
    top_k : int32 [batch]; keep the ``top_k`` most likely tokens (0: all)
    top_p : float32 [batch]; then keep the smallest set of most likely tokens whose
        probability reaches ``top_p`` (1: all)
    sampling : static: False if every row is greedy (no sort is compiled), True if rows may
        sample (the sort always runs), None to decide on the device (see the module docstring)

    Returns
    -------
    int32 [batch]

    Example::

        tokens = sample_tokens(logits, jax.random.key(0), temperature=jnp.full(4, 0.8),
                               top_k=jnp.full(4, 50), top_p=jnp.full(4, 0.95))
    """
    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [B]

    def draw(_):
        vocab = logits.shape[-1]
        scaled = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]  # [B, V]
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

    if sampling is False:
        return greedy
    rows_sampling = temperature > 0  # [B]
    if sampling:
        sampled = draw(None)  # [B]
    else:
        sampled = lax.cond(jnp.any(rows_sampling), draw, lambda _: greedy, None)  # [B]
    return jnp.where(rows_sampling, sampled, greedy)
