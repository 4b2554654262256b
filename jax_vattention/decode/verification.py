"""Verifying proposed tokens (speculative decoding): the target's token at every position of a
verification row, and how many of the proposals it accepts.

A verification row (:class:`~jax_vattention.decode.step_batch.StepBatch`) feeds a slot's last
token ``t0`` and ``m`` proposed tokens ``p1 .. pm`` at the slot's length ``L`` on; the logits at
position ``L + i`` give the target's distribution ``P_i`` of the token after ``p_i``. For every
position the step chooses a token ``y_i``:

* a greedy row: ``y_i`` is the most likely token of ``P_i``'s logits (after penalties and bias);
* a sampling row, where a proposal follows (``i < m``): ``p_{i+1}`` is accepted with probability
  ``P_i(p_{i+1})`` and then ``y_i = p_{i+1}``; else ``y_i`` is drawn from ``P_i`` without
  ``p_{i+1}`` (renormalized);
* position ``m``, after the last proposal: ``y_m`` is drawn from ``P_m``.

The host accepts the longest run of proposals the target chose, ``y_0 .. y_{a-1} = p_1 .. p_a``, and
streams ``y_0 .. y_a``: ``a`` proposals and the target's own next token. Under greedy these are the
tokens plain decoding gives. Under sampling every streamed token is distributed as plain sampling
draws it: the sampling is Leviathan et al. (2023) / Chen et al. (2023) speculative sampling with a
proposal distribution that is a point mass ``q = δ(p)`` (prompt lookup's proposals, and a draft
model's greedy ones), for which their acceptance ``min(1, P(p) / q(p))`` is ``P(p)`` and their
residual ``max(0, P - q)`` is ``P`` without ``p``: the token is ``p`` with probability ``P(p)``, and
any other ``y`` with ``(1 - P(p)) · P(y) / (1 - P(p)) = P(y)``. A proposal the filters drop
(``P(p) = 0``) is always rejected; a residual never holds the rejected proposal, so ``y_i == p_{i+1}``
means exactly that it was accepted.

Penalties read, at every position, the slot's counts before the step plus the row's tokens fed up
to that position (``t0, p1 .. p_i``): what plain decoding's counts hold when it draws that token.
Only the fed tokens the host keeps (``t0 .. p_a``) are added to the slot's counts afterwards
(:func:`count_accepted`).

Random draws: a seeded row's keys come from its seed and the position drawn, as plain sampling's
(:func:`~jax_vattention.decode.sampling.row_keys`); the acceptance test and the residual draw take
two keys split from it. A position drawn and then rejected is drawn again by the next
verification, with the same seeded keys: its first draw decided nothing that was streamed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jax_vattention.decode.sampling import (GREEDY_BELOW, Logprobs, SamplingParams, adjust_logits, row_keys,
                                            sampled_distribution, token_logprobs)
from jax_vattention.decode.step_batch import StepBatch
from jax_vattention.decode.token_counts import TokenCounts


def proposals_of(batch: StepBatch) -> tuple[jax.Array, jax.Array]:
    """``(proposal, proposed)``, int32 and bool [V, W]: the token proposed after each position of each
    verification row (its next fed token) and whether there is one (``-1`` where not)."""
    rows, width = batch.verify_rows, batch.verify_width
    following = jnp.concatenate([batch.verify_tokens[:, 1:], jnp.full((rows, 1), -1, jnp.int32)], axis=1)  # [V, W]
    proposed = jnp.arange(width, dtype=jnp.int32)[None, :] + 1 < batch.verify_count[:, None]  # [V, W]
    return jnp.where(proposed, following, -1), proposed


def accepted_counts(tokens: jax.Array, proposal: jax.Array, proposed: jax.Array) -> jax.Array:
    """int32 [V]: how many leading proposals of each row the target chose (``tokens``, ``proposal``
    int32 [V, W], ``proposed`` bool [V, W])."""
    matches = ((tokens == proposal) & proposed).astype(jnp.int32)  # [V, W]
    return jnp.cumprod(matches, axis=1).sum(axis=1)  # [V]


def verify_tokens(logits: jax.Array, batch: StepBatch, params: SamplingParams, stream_key: jax.Array,
                  counts: tuple[jax.Array, jax.Array] | None = None, *, sampling: bool,
                  top_logprobs: int | None = None) -> tuple[jax.Array, jax.Array, Logprobs | None]:
    """The target's token at every position of ``batch``'s verification rows (module docstring).

    Parameters
    ----------
    logits : float32 [V*W, vocab], the verification tokens' (in :meth:`StepBatch.verify_index` order)
    batch : the step, with its verification rows
    params : the rows' :class:`SamplingParams`, [V]
    stream_key : the key of rows without a seed
    counts : with penalties, ``bias`` or ``min_tokens``, the rows' slots' ``(output int32 [V, vocab],
        in_prompt bool [V, vocab])`` before the step; None where no row adjusts its logits
    sampling : static: whether a row samples (else all are greedy and nothing is drawn)
    top_logprobs : with a number N, every position's :class:`Logprobs` (of the model's own logits)

    Returns
    -------
    (tokens int32 [V, W], accepted int32 [V], Logprobs of [V*W] rows or None)
    """
    rows, width = batch.verify_rows, batch.verify_width
    vocab = logits.shape[-1]
    proposal, proposed = proposals_of(batch)  # [V, W] each
    params = jax.tree_util.tree_map(lambda x: jnp.repeat(x, width, axis=0), params)  # [V*W]
    positions = (batch.verify_positions() + 1).reshape(-1)  # [V*W], the position each token is drawn for
    adjusted = logits.astype(jnp.float32)
    if counts is not None:
        output, in_prompt = counts
        real = jnp.arange(width, dtype=jnp.int32)[None, :] < batch.verify_count[:, None]  # [V, W]
        fed = jax.nn.one_hot(jnp.where(real, batch.verify_tokens, -1), vocab, dtype=jnp.int32)  # [V, W, vocab]
        seen = output[:, None, :] + jnp.cumsum(fed, axis=1)  # [V, W, vocab]: the counts up to each position
        adjusted = adjust_logits(adjusted, params, seen.reshape(rows * width, vocab),
                                 jnp.repeat(in_prompt, width, axis=0), positions - params.prompt_len)  # [V*W, vocab]
    chosen = jnp.argmax(adjusted, axis=-1).astype(jnp.int32)  # [V*W]
    if sampling:
        flat_proposal, flat_proposed = proposal.reshape(-1), proposed.reshape(-1)  # [V*W] each
        probs = sampled_distribution(adjusted, params)  # [V*W, vocab]
        keys = row_keys(stream_key, params, positions)  # [V*W]
        accept_keys = jax.vmap(lambda key: jax.random.fold_in(key, 0))(keys)  # [V*W]
        draw_keys = jax.vmap(lambda key: jax.random.fold_in(key, 1))(keys)  # [V*W]
        chance = jnp.take_along_axis(probs, jnp.maximum(flat_proposal, 0)[:, None], axis=-1)[:, 0]  # [V*W]
        accept = flat_proposed & (jax.vmap(jax.random.uniform)(accept_keys) < chance)  # [V*W]
        dropped = flat_proposed[:, None] & (jnp.arange(vocab, dtype=jnp.int32)[None, :] == flat_proposal[:, None])
        residual = jnp.log(jnp.where(dropped, 0.0, probs))  # [V*W, vocab]
        drawn = jax.vmap(jax.random.categorical)(draw_keys, residual).astype(jnp.int32)  # [V*W]
        sampled = jnp.where(accept, flat_proposal, drawn)  # [V*W]
        chosen = jnp.where(params.temperature >= GREEDY_BELOW, sampled, chosen)  # [V*W]
    tokens = chosen.reshape(rows, width)  # [V, W]
    logprobs = None if top_logprobs is None else token_logprobs(logits, chosen, top_logprobs)
    return tokens, accepted_counts(tokens, proposal, proposed), logprobs


def count_accepted(counts: TokenCounts, batch: StepBatch, accepted: jax.Array, prompt_len: jax.Array) -> TokenCounts:
    """Adds to the slots' counts the tokens each verification row fed that the host keeps: its last
    token and its ``accepted`` [V] proposals (``prompt_len`` int32 [V], each row's request's)."""
    width = batch.verify_width
    kept = jnp.arange(width, dtype=jnp.int32)[None, :] <= accepted[:, None]  # [V, W]
    kept = kept & (jnp.arange(width, dtype=jnp.int32)[None, :] < batch.verify_count[:, None])  # [V, W]
    return counts.add(jnp.repeat(batch.verify_slots, width), batch.verify_tokens.reshape(-1),
                      batch.verify_positions().reshape(-1), jnp.repeat(prompt_len, width), kept.reshape(-1))
