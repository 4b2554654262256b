"""Choosing the next token, per row, with vLLM's sampling parameters; and the log-probabilities.

Every parameter is a traced per-row array (:class:`SamplingParams`), so rows of one batch
sample differently and no value ever recompiles. What a program computes is chosen by the
caller's static flags, where the host knows the rows' parameters (the engine's step):
``sampling`` (the sort; else every row is greedy), ``adjust`` (penalties, ``logit_bias``,
``min_tokens``; else the logits are used as they come) and a number of top log-probabilities.

The order is vLLM's (its v1 ``Sampler``), on float32 logits ``[batch, vocab]``:

1. ``min_tokens``: the row's stop tokens get -inf while it has generated fewer tokens;
2. ``logit_bias``: added to the logits of its tokens;
3. penalties (OpenAI's definitions, as vLLM applies them): ``repetition_penalty`` ``r`` on
   every token seen in the prompt or the output (a positive logit divided by ``r``, a negative
   one multiplied), then ``frequency_penalty`` times the token's count in the output and
   ``presence_penalty`` once for a token present in the output, both subtracted;
4. a row with a temperature below :data:`GREEDY_BELOW` takes the most likely token of these
   logits; the others divide them by the temperature, keep the tokens whose probability is at
   least ``min_p`` times the most likely one's, then the ``top_k`` most likely, then the smallest
   set of most likely tokens whose probability reaches ``top_p``, and draw from what is left.

The draw's key is the row's own: with a ``seed``, from the seed and the position of the token
drawn, so a request's tokens depend on nothing else (not the batch, the step, the slot, nor a
preemption that recomputes it); without, from the caller's stream and the row.

Log-probabilities (:func:`token_logprobs`) are vLLM's default (``logprobs_mode="raw_logprobs"``):
the log-softmax of the model's own logits, before any of the steps above.

The sort that sampling needs is skipped when every row is greedy: by the static ``sampling``
flag, else by a conditional on the device. On a GPU that conditional costs more than its branch:
XLA reads its predicate on the host, so the host's dispatch waits for the whole forward pass.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# A temperature below this is greedy (vLLM's _SAMPLING_EPS).
GREEDY_BELOW = 1e-5

# The packed row (see :func:`sampling_row`): these columns, then the bias tokens and the stop
# tokens (ints) or the bias values (floats).
INT_COLUMNS = ("top_k", "prompt_len", "min_tokens", "seeded", "seed_low", "seed_high")
FLOAT_COLUMNS = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Each row's sampling parameters, as device arrays (unpacked from :func:`sampling_row` rows).

    temperature, top_p, min_p, presence_penalty, frequency_penalty, repetition_penalty : float32 [B]
    top_k : int32 [B] (0: all); prompt_len, min_tokens : int32 [B]
    seeded : bool [B]; seed_low, seed_high : int32 [B], the seed's two 32-bit halves
    bias_tokens : int32 [B, W] (-1: none), bias_values : float32 [B, W]
    stop_tokens : int32 [B, S] (-1: none), masked while fewer than ``min_tokens`` are generated
    """

    temperature: jax.Array
    top_p: jax.Array
    min_p: jax.Array
    presence_penalty: jax.Array
    frequency_penalty: jax.Array
    repetition_penalty: jax.Array
    top_k: jax.Array
    prompt_len: jax.Array
    min_tokens: jax.Array
    seeded: jax.Array
    seed_low: jax.Array
    seed_high: jax.Array
    bias_tokens: jax.Array
    bias_values: jax.Array
    stop_tokens: jax.Array

    @staticmethod
    def unpack(ints: jax.Array, floats: jax.Array) -> "SamplingParams":
        """From packed rows: ``ints`` int32 [B, len(INT_COLUMNS) + W + S], ``floats`` float32
        [B, len(FLOAT_COLUMNS) + W] (:func:`sampling_row`, stacked)."""
        first_int, first_float = len(INT_COLUMNS), len(FLOAT_COLUMNS)
        bias_width = floats.shape[1] - first_float
        columns = {name: ints[:, i] for i, name in enumerate(INT_COLUMNS)}
        columns.update({name: floats[:, i] for i, name in enumerate(FLOAT_COLUMNS)})
        columns["seeded"] = columns["seeded"] > 0
        return SamplingParams(**columns, bias_tokens=ints[:, first_int:first_int + bias_width],
                              bias_values=floats[:, first_float:],
                              stop_tokens=ints[:, first_int + bias_width:])

    @staticmethod
    def simple(temperature: jax.Array, top_k: jax.Array, top_p: jax.Array) -> "SamplingParams":
        """Rows with a temperature, top_k and top_p ([B] each, traced or not) and every other
        parameter at its default (no seed, no penalty, no bias, no stop tokens)."""
        batch = temperature.shape[0]
        zero, none = jnp.zeros(batch, jnp.float32), jnp.zeros(batch, jnp.int32)
        no_tokens = jnp.full((batch, 0), -1, jnp.int32)
        return SamplingParams(temperature, top_p, zero, zero, zero, jnp.ones(batch, jnp.float32), top_k, none, none,
                              jnp.zeros(batch, jnp.bool_), none, none, no_tokens, jnp.zeros((batch, 0), jnp.float32),
                              no_tokens)


def row_width(bias_width: int, stop_width: int) -> tuple[int, int]:
    """The lengths of a packed row's ints and floats."""
    return len(INT_COLUMNS) + bias_width + stop_width, len(FLOAT_COLUMNS) + bias_width


def sampling_row(*, bias_width: int, stop_width: int, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, min_p: float = 0.0, presence_penalty: float = 0.0,
                 frequency_penalty: float = 0.0, repetition_penalty: float = 1.0, seed: int | None = None,
                 prompt_len: int = 0, min_tokens: int = 0, logit_bias: Mapping[int, float] | None = None,
                 stop_tokens: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray]:
    """One row's parameters packed on the host: ``(int32 [Ki], float32 [Kf])`` (:func:`row_width`).

    Values are taken as given (the engine's validation checks them first). ``seed`` is any integer
    of 64 bits (taken modulo 2**64), None for the caller's stream; ``logit_bias`` maps at most
    ``bias_width`` token ids to what is added to their logits; ``stop_tokens`` (at most
    ``stop_width``) are masked while the row has generated fewer than ``min_tokens`` tokens after
    its ``prompt_len`` prompt tokens.

    Example::

        ints, floats = sampling_row(bias_width=4, stop_width=2, temperature=0.7, seed=1234,
                                    logit_bias={13: -100.0}, stop_tokens=[2], min_tokens=5, prompt_len=9)
    """
    logit_bias = dict(logit_bias or {})
    if len(logit_bias) > bias_width or len(stop_tokens) > stop_width:
        raise ValueError(f"{len(logit_bias)} biased tokens and {len(stop_tokens)} stop tokens do not fit "
                         f"rows of {bias_width} and {stop_width}")
    int_width, float_width = row_width(bias_width, stop_width)
    ints = np.full(int_width, -1, np.int32)
    floats = np.zeros(float_width, np.float32)
    word = 0 if seed is None else int(seed) % (1 << 64)
    halves = np.array([word & 0xFFFFFFFF, word >> 32], np.uint32).view(np.int32)
    ints[:len(INT_COLUMNS)] = (top_k, prompt_len, min_tokens, seed is not None, halves[0], halves[1])
    floats[:len(FLOAT_COLUMNS)] = (temperature, top_p, min_p, presence_penalty, frequency_penalty,
                                   repetition_penalty)
    first = len(INT_COLUMNS)
    ints[first:first + len(logit_bias)] = list(logit_bias)
    floats[len(FLOAT_COLUMNS):len(FLOAT_COLUMNS) + len(logit_bias)] = list(logit_bias.values())
    ints[first + bias_width:first + bias_width + len(stop_tokens)] = list(stop_tokens)
    return ints, floats


def row_keys(stream_key: jax.Array, params: SamplingParams, positions: jax.Array) -> jax.Array:
    """Each row's key for its draw, a key array [B]: a seeded row's from its seed and ``positions``
    (int32 [B], the position in its sequence of the token drawn), the others' from ``stream_key``
    and the row's index."""
    rows = jnp.arange(positions.shape[0], dtype=jnp.int32)  # [B]
    stream = jax.vmap(lambda row: jax.random.fold_in(stream_key, row))(rows)  # [B]
    own = jax.vmap(lambda low, high, position: jax.random.fold_in(
        jax.random.fold_in(jax.random.key(low), high), position))(params.seed_low, params.seed_high, positions)
    return jnp.where(params.seeded, own, stream)  # [B]


def adjust_logits(logits: jax.Array, params: SamplingParams, output_counts: jax.Array, in_prompt: jax.Array,
                  generated: jax.Array) -> jax.Array:
    """Steps 1-3 of the module docstring: ``min_tokens``, ``logit_bias``, then the penalties.

    logits float32 [B, V]; output_counts int32 [B, V] (each token's count in the row's output so
    far); in_prompt bool [B, V]; generated int32 [B] (tokens the row generated before this one).
    Rows at their parameters' defaults keep their logits bit for bit.
    """
    vocab = logits.shape[-1]
    rows = jnp.arange(logits.shape[0], dtype=jnp.int32)[:, None]  # [B, 1]

    def columns(tokens):  # -1 (none) -> out of range, dropped by the scatter
        return jnp.where(tokens >= 0, tokens, vocab)

    masking = (generated < params.min_tokens)[:, None]  # [B, 1]
    stops = jnp.broadcast_to(jnp.where(masking, -jnp.inf, 0.0), params.stop_tokens.shape)  # [B, S]
    logits = logits.at[rows, columns(params.stop_tokens)].add(stops, mode="drop")  # [B, V]
    logits = logits.at[rows, columns(params.bias_tokens)].add(params.bias_values, mode="drop")  # [B, V]
    present = output_counts > 0  # [B, V]
    penalty = jnp.where(in_prompt | present, params.repetition_penalty[:, None], 1.0)  # [B, V]
    logits = jnp.where(logits > 0, logits / penalty, logits * penalty)  # [B, V]
    logits = logits - params.frequency_penalty[:, None] * output_counts.astype(jnp.float32)  # [B, V]
    return logits - params.presence_penalty[:, None] * present.astype(jnp.float32)  # [B, V]


def sample_tokens(logits: jax.Array, keys: jax.Array, params: SamplingParams, *,
                  sampling: bool | None = None) -> jax.Array:
    """Step 4 of the module docstring: one token per row.

    Parameters
    ----------
    logits : float32 [batch, vocab] (after :func:`adjust_logits` where that applies)
    keys : a key array [batch], each row's (:func:`row_keys`)
    params : the rows' :class:`SamplingParams` (temperature, min_p, top_k, top_p)
    sampling : static: False if every row is greedy (no sort is compiled), True if rows may
        sample (the sort always runs), None to decide on the device (see the module docstring)

    Returns
    -------
    int32 [batch]

    Example::

        ints, floats = zip(*[sampling_row(bias_width=0, stop_width=0, temperature=0.8, top_p=0.95)] * 4)
        params = SamplingParams.unpack(jnp.asarray(np.stack(ints)), jnp.asarray(np.stack(floats)))
        tokens = sample_tokens(logits, jax.random.split(jax.random.key(0), 4), params)
    """
    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [B]
    rows_sampling = params.temperature >= GREEDY_BELOW  # [B]

    def draw(_):
        order, ranked = _ranked_logits(logits, params)  # [B, V] each
        choice = jax.vmap(jax.random.categorical)(keys, ranked)  # [B]
        return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0]  # [B]

    if sampling is False:
        return greedy
    if sampling:
        sampled = draw(None)  # [B]
    else:
        sampled = lax.cond(jnp.any(rows_sampling), draw, lambda _: greedy, None)  # [B]
    return jnp.where(rows_sampling, sampled, greedy)


def _ranked_logits(logits: jax.Array, params: SamplingParams) -> tuple[jax.Array, jax.Array]:
    """Step 4's filters: ``(order, ranked)``, int32 and float32 [B, V]: the tokens most likely first
    and their logits divided by the temperature (greedy rows: by 1), -inf where min_p, top_k or top_p
    drop them. Drawing from ``ranked`` draws from the distribution a row samples."""
    vocab = logits.shape[-1]
    rows_sampling = params.temperature >= GREEDY_BELOW  # [B]
    scaled = logits / jnp.where(rows_sampling, params.temperature, 1.0)[:, None]  # [B, V]
    order = jnp.argsort(-scaled, axis=-1).astype(jnp.int32)  # [B, V], most likely first
    ranked = jnp.take_along_axis(scaled, order, axis=-1)  # [B, V]
    rank = jnp.arange(vocab, dtype=jnp.int32)[None, :]  # [1, V]
    # min_p: p_i / p_max = exp(s_i - s_max); the most likely token always stays.
    relative = jnp.exp(ranked - ranked[:, :1])  # [B, V]
    ranked = jnp.where((relative >= params.min_p[:, None]) | (rank == 0), ranked, -jnp.inf)  # [B, V]
    in_top_k = (params.top_k[:, None] <= 0) | (rank < params.top_k[:, None])  # [B, V]
    ranked = jnp.where(in_top_k, ranked, -jnp.inf)  # [B, V]
    probs = jax.nn.softmax(ranked, axis=-1)  # [B, V]
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # [B, V], probability of more likely tokens
    in_top_p = (mass_before < params.top_p[:, None]) | (rank == 0)  # [B, V]
    return order, jnp.where(in_top_p, ranked, -jnp.inf)  # [B, V] each


def sampled_distribution(logits: jax.Array, params: SamplingParams) -> jax.Array:
    """The distribution a sampling row draws from (step 4 of the module docstring): float32 [B, V]
    probabilities in vocabulary order, 0 where min_p, top_k or top_p drop a token. ``logits``
    float32 [B, V] (after :func:`adjust_logits` where that applies); a greedy row's is meaningless."""
    order, ranked = _ranked_logits(logits.astype(jnp.float32), params)  # [B, V] each
    rows = jnp.arange(logits.shape[0], dtype=jnp.int32)[:, None]  # [B, 1]
    filtered = jnp.full(logits.shape, -jnp.inf, jnp.float32).at[rows, order].set(ranked)  # [B, V]
    return jax.nn.softmax(filtered, axis=-1)  # [B, V]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Logprobs:
    """Log-probabilities of chosen tokens and the most likely ones, per row.

    chosen : float32 [B], the chosen token's; top_tokens : int32 [B, N], most likely first;
    top : float32 [B, N], theirs
    """

    chosen: jax.Array
    top_tokens: jax.Array
    top: jax.Array


def token_logprobs(logits: jax.Array, tokens: jax.Array, top_n: int) -> Logprobs:
    """The log-softmax of ``logits`` (float32 [B, V], the model's own) at ``tokens`` (int32 [B]; an
    id outside the vocabulary gives -inf) and at the ``top_n`` most likely tokens of each row."""
    logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [B, V]
    vocab = logits.shape[-1]
    inside = (tokens >= 0) & (tokens < vocab)  # [B]
    chosen = jnp.take_along_axis(logprobs, jnp.clip(tokens, 0, vocab - 1)[:, None], axis=-1)[:, 0]  # [B]
    top, top_tokens = lax.top_k(logprobs, min(top_n, vocab))  # [B, N]
    return Logprobs(jnp.where(inside, chosen, -jnp.inf), top_tokens.astype(jnp.int32), top)


def choose_tokens(logits: jax.Array, params: SamplingParams, stream_key: jax.Array, positions: jax.Array,
                  counts: tuple[jax.Array, jax.Array] | None = None, *, sampling: bool | None,
                  top_logprobs: int | None = None) -> tuple[jax.Array, Logprobs | None]:
    """Everything of the module docstring for one batch of rows: the tokens and, with
    ``top_logprobs``, their :class:`Logprobs` (of the model's own logits).

    logits float32 [B, V]; positions int32 [B], the position of the token each row draws (its
    ``generated`` count is ``positions - prompt_len``); counts: with penalties, ``(output_counts
    int32 [B, V], in_prompt bool [B, V])`` (:class:`~jax_vattention.decode.token_counts.TokenCounts`),
    None where no row has penalties, ``logit_bias`` or ``min_tokens`` to apply (the logits are
    used as they are).
    """
    adjusted = logits
    if counts is not None:
        adjusted = adjust_logits(logits, params, *counts, positions - params.prompt_len)
    keys = row_keys(stream_key, params, positions) if sampling is not False else None
    tokens = sample_tokens(adjusted, keys, params, sampling=sampling)  # [B]
    if top_logprobs is None:
        return tokens, None
    return tokens, token_logprobs(logits, tokens, top_logprobs)
