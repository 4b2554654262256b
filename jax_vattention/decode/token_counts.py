"""What the penalties read: each sequence's token counts, kept on the device.

Presence and frequency penalties need how often each token occurs in a sequence's output,
the repetition penalty whether it occurs in its prompt or output. A compiled step cannot take
token lists of varying length, so each sequence (an engine slot, a row of ``generate``) keeps
a row of counts over the vocabulary in the step's carried state::

    output  int32 [sequences, vocab]   times each token was generated
    prompt  bool  [sequences, vocab]   whether each token is in the prompt

and every step adds the tokens it feeds the model: a token at a position below its request's
prompt length is a prompt token, any other was generated. Counting the fed tokens, not the
sampled ones, is what keeps the counts right without the host's help:

* a decode row feeds the token sampled last, so by the time a row draws token ``n`` the counts
  hold every token before it;
* in the pipelined engine the fed token may still be on the device (the previous step's
  output): it is counted there, where the step reads it;
* after a preemption the request's context (prompt and generated tokens) is prefilled again
  into a fresh slot, and the prefill's chunks count it all again, each token as what it is.

A slot's row is reset when a new request enters it (the step that admits it), or copied from
another slot's when a sample forked from it enters (its first step). What no step
feeds cannot be counted: a request whose prompt starts with a shared prefix (pages mapped,
never prefilled) would miss those tokens, so requests with penalties do not take shared
prefixes.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jax_vattention.decode.step_batch import StepBatch


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TokenCounts:
    """output int32 [sequences, vocab]; prompt bool [sequences, vocab] (module docstring).

    Example::

        counts = TokenCounts.zeros(4, vocab=256)
        counts = counts.add(slots=jnp.array([0, 0]), tokens=jnp.array([7, 9]), positions=jnp.array([0, 5]),
                            prompt_len=jnp.array([3, 3]), valid=jnp.array([True, True]))
        output, prompt = counts.rows(jnp.array([0]))   # output[0, 9] == 1, prompt[0, 7]
    """

    output: jax.Array
    prompt: jax.Array

    @staticmethod
    def zeros(sequences: int, vocab: int) -> "TokenCounts":
        return TokenCounts(jnp.zeros((sequences, vocab), jnp.int32), jnp.zeros((sequences, vocab), jnp.bool_))

    @property
    def sequences(self) -> int:
        return self.output.shape[0]

    def reset(self, fresh: jax.Array) -> "TokenCounts":
        """Zeroes the rows where ``fresh`` (bool [sequences]) is set: a new request's."""
        return TokenCounts(jnp.where(fresh[:, None], 0, self.output), self.prompt & ~fresh[:, None])

    def enter(self, fresh: jax.Array) -> "TokenCounts":
        """The rows where requests enter (``fresh`` int32 [sequences]): 0 keeps a row, 1 zeroes it
        (:meth:`reset`), ``2 + s`` copies row ``s`` (a forked sample starts with its parent's
        counts, :mod:`~jax_vattention.engine.groups`)."""
        rows = jnp.arange(self.sequences, dtype=jnp.int32)  # [sequences]
        source = jnp.where(fresh >= 2, fresh - 2, rows)  # [sequences]
        copied = TokenCounts(self.output[source], self.prompt[source])  # [sequences, V] each
        return copied.reset(fresh == 1)

    def add(self, slots: jax.Array, tokens: jax.Array, positions: jax.Array, prompt_len: jax.Array,
            valid: jax.Array) -> "TokenCounts":
        """Counts fed tokens, int32 [N] each (``valid`` bool [N]): a token of row ``slots[i]`` at
        ``positions[i]``, a prompt token below ``prompt_len[i]``. Invalid ones and rows outside
        ``[0, sequences)`` are dropped."""
        is_prompt = positions < prompt_len  # [N]
        nowhere = self.sequences
        output_rows = jnp.where(valid & ~is_prompt, slots, nowhere)  # [N]
        prompt_rows = jnp.where(valid & is_prompt, slots, nowhere)  # [N]
        output = self.output.at[output_rows, tokens].add(1, mode="drop")  # [sequences, V]
        prompt = self.prompt.at[prompt_rows, tokens].set(True, mode="drop")  # [sequences, V]
        return TokenCounts(output, prompt)

    def rows(self, slots: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(output int32 [B, V], prompt bool [B, V])`` of ``slots`` (int32 [B]; one outside the
        range reads the last row: a padding row's values are never used)."""
        index = jnp.clip(slots, 0, self.sequences - 1)  # [B]
        return self.output[index], self.prompt[index]

    def step_rows(self, chunk_slots: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The rows of an engine step whose decode rows are the slots in order: every slot's, then
        those of ``chunk_slots`` (int32 [R]) — ``[sequences + R, V]`` each, gathering only the chunks'."""
        output, prompt = self.rows(chunk_slots)  # [R, V] each
        return (jnp.concatenate([self.output, output]), jnp.concatenate([self.prompt, prompt]))


def count_step(counts: TokenCounts, batch: StepBatch, prompt_len: jax.Array) -> TokenCounts:
    """Adds the tokens a :class:`StepBatch` feeds (its decode rows' and its chunks' real tokens; its
    verification rows' are counted once verified, :func:`~jax_vattention.decode.verification.count_accepted`);
    ``prompt_len`` int32 [D + R] is each row's request's prompt length."""
    width = batch.chunk_width
    slots = jnp.concatenate([batch.decode_slots, jnp.repeat(batch.chunk_slots, width)])  # [D + R*C]
    prompt = jnp.concatenate([prompt_len[:batch.decode_rows],
                              jnp.repeat(prompt_len[batch.decode_rows:], width)])  # [D + R*C]
    in_chunk = jnp.arange(width, dtype=jnp.int32)[None, :] < batch.chunk_count[:, None]  # [R, C]
    valid = jnp.concatenate([batch.decode_count > 0, in_chunk.reshape(-1)])  # [D + R*C]
    fed = batch.decode_rows + batch.chunk_rows * width
    return counts.add(slots, batch.tokens()[0, :fed], batch.positions()[0, :fed], prompt, valid)
