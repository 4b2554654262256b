"""Jitted generation over a KV cache: one prefill, then a ``lax.while_loop`` of decode steps.

The cache is donated and returned, so a virtual cache is updated in place; the
mapping op :func:`jax_vattention.cache.mapping_op.grow` runs at the top of every decode step,
before that step's writes. Prompts of a call are padded to a *batch bucket*
and a *prompt bucket* (powers of two), and everything else that varies between
calls (prompt lengths, slots, ``max_new_tokens``, stop tokens, sampling knobs,
the seed) is a traced argument, so the loop compiles once per bucket pair (and
per width of the stop and ``logit_bias`` tables, and whether any row has
penalties or asks for log-probabilities). Sampling is the engine's
(:mod:`~jax_vattention.decode.sampling`), token for token: a prompt with its own
seed draws the same tokens here as a request with that seed in the engine.

::

    rows of one call            cache slots (max_batch of them)
    row 0: prompt A  ──slot 2──▶ [A A A A a a . . . . . . ]   capacity positions
    row 1: prompt B  ──slot 0──▶ [B B b b b . . . . . . . ]
    row 2: padding   ──slot M──▶ (dropped: nothing is written, attention gives zeros)

Padding tokens are never written: each row writes ``count[b]`` tokens, the
prompt length at prefill and 1 (0 once finished) per decode step.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from jax_vattention.cache.mapping_op import grow
from jax_vattention.attention import resolve_backend
from jax_vattention.cache.kv_cache import KVCache
from jax_vattention.cache.donation import cache_jit
from jax_vattention.cache.host import host_for
from jax_vattention.cache.guards import check_slots, mapping_failures
from jax_vattention.cache.prefix import page_keys
from jax_vattention.decode.mesh import CACHE, place
from jax_vattention.decode.model import check_windows
from jax_vattention.decode.prompt_sampling import adjusts, prompt_sampling
from jax_vattention.decode.sampling import Logprobs, SamplingParams, choose_tokens
from jax_vattention.decode.step_batch import StepBatch, decode_batch, model_step
from jax_vattention.decode.token_counts import TokenCounts

MIN_PROMPT_BUCKET = 16
MIN_STOP_WIDTH = 4


def batch_bucket(batch: int, max_batch: int) -> int:
    """The padded batch: the next power of two, at most ``max(batch, max_batch)``."""
    return min(1 << (batch - 1).bit_length(), max(batch, max_batch))


def prompt_bucket(length: int, capacity: int) -> int:
    """The padded prompt length: the next power of two (at least 16), at most ``capacity``."""
    return min(max(MIN_PROMPT_BUCKET, 1 << (length - 1).bit_length()), capacity)


def _generate(graphdef, backend: str, return_logits: bool, adjust: bool, top_logprobs: int | None, state,
              cache: KVCache, prompts, prompt_lengths, slots, max_new_tokens, stop_tokens, sampling_ints,
              sampling_floats, key, prompt_starts=None):
    """The traced generation of ``B`` padded rows (a batch bucket) with prompts of width ``P``.

    With ``prompt_starts`` (int32 [B]: tokens of each row already in its slot, a shared prefix),
    row ``b`` of ``prompts`` holds the prompt from ``prompt_starts[b]`` on, and the prefill runs
    as prompt chunks at those offsets (the engine's chunk rows, which read the prefix in place).

    prompts int32 [B, P]; prompt_lengths, slots, max_new_tokens int32 [B] (padding rows:
    length 0, a slot >= max_batch, 0 new tokens); stop_tokens int32 [B, W] (padded with -1);
    sampling_ints, sampling_floats: the rows' packed
    :class:`~jax_vattention.decode.sampling.SamplingParams`. ``adjust`` (static): some row has
    penalties, ``logit_bias`` or ``min_tokens`` (the rows' token counts are kept in the loop);
    ``top_logprobs`` (static): how many top log-probabilities to return, None for none.
    Returns the tokens int32 [B, capacity], the logits float32 [B, capacity, vocab] (or an empty
    [B, 0, 0] without ``return_logits``), the tokens' :class:`Logprobs` ([B, capacity] and
    [B, capacity, N]; None without ``top_logprobs``), the tokens generated per row int32 [B],
    and the cache.
    """
    model = nnx.merge(graphdef, state)
    batch, prompt_len = prompts.shape
    capacity = cache.capacity
    rows = jnp.arange(batch, dtype=jnp.int32)  # [B]
    params = SamplingParams.unpack(sampling_ints, sampling_floats)

    def stopped(tokens, generated):  # [B], [B] -> [B]: a stop token, once min_tokens are out
        return jnp.any(tokens[:, None] == stop_tokens, axis=-1) & (generated > params.min_tokens)

    counts = None
    if adjust:  # each row's prompt tokens, counted where the engine counts its chunks'
        offsets = jnp.arange(prompt_len, dtype=jnp.int32)  # [P]
        counts = TokenCounts.zeros(batch, model.config.vocab_size).add(
            jnp.repeat(rows, prompt_len), prompts.reshape(-1), jnp.tile(offsets, batch),
            jnp.repeat(params.prompt_len, prompt_len), (offsets[None, :] < prompt_lengths[:, None]).reshape(-1))

    if prompt_starts is None:
        positions = jnp.broadcast_to(jnp.arange(prompt_len, dtype=jnp.int32), (batch, prompt_len))  # [B, P]
        logits, cache = model(prompts, positions, cache, start=jnp.zeros_like(prompt_lengths),
                              count=prompt_lengths, slots=slots, backend=backend,
                              logit_index=jnp.maximum(prompt_lengths - 1, 0))  # [B, V]
    else:
        idle = jnp.zeros_like(slots)  # [B]: decode rows that write and read nothing
        chunks = StepBatch(idle, idle, idle, idle, prompts, slots, prompt_starts, prompt_lengths - prompt_starts)
        logits, cache = model.run_step(chunks, cache, backend=backend)  # [B + B, V]
        logits = logits[batch:]  # [B, V]: each chunk row's last token
    key, step_key = jax.random.split(key)
    first, first_logprobs = choose_tokens(
        logits, params, step_key, prompt_lengths, None if counts is None else (counts.output, counts.prompt),
        sampling=None, top_logprobs=top_logprobs)  # [B]
    out_tokens = jnp.zeros((batch, capacity), jnp.int32).at[:, 0].set(first)  # [B, L]
    out_logits = (jnp.zeros((batch, capacity, logits.shape[-1]), jnp.float32).at[:, 0].set(logits)
                  if return_logits else jnp.zeros((batch, 0, 0), jnp.float32))  # [B, L, V]
    out_logprobs = None
    if top_logprobs is not None:  # [B, L], [B, L, N], [B, L, N]
        out_logprobs = jax.tree_util.tree_map(
            lambda x: jnp.zeros((batch, capacity, *x.shape[1:]), x.dtype).at[:, 0].set(x), first_logprobs)
    generated = jnp.ones((batch,), jnp.int32)  # [B]
    done = (prompt_lengths == 0) | stopped(first, generated) | (generated >= max_new_tokens)  # [B]
    max_steps = jnp.max(jnp.where(prompt_lengths > 0, max_new_tokens, 1)) - 1  # []

    def cond(carry):
        step, _, _, _, done, *_ = carry
        return ((step < max_steps)  # stop 1: the decode steps the host reserved pages for are spent
                & ~jnp.all(done))  # stop 2: every row hit a stop token or its own max_new_tokens

    def body(carry):
        step, cache, last, lengths, done, generated, out_tokens, out_logits, out_logprobs, counts, key = carry
        cache = grow(cache, tokens=1)
        active = ~done  # [B]
        count = active.astype(jnp.int32)  # [B]; a finished row writes nothing
        # ... and reads nothing: its host length goes on growing, and a window's pages behind it go.
        reading = jnp.where(active, slots, cache.max_batch)  # [B]
        key, step_key = jax.random.split(key)
        row_counts = None
        if counts is not None:  # the token this step feeds, as the engine's step counts it
            counts = counts.add(rows, last, lengths, params.prompt_len, active)
            row_counts = (counts.output, counts.prompt)
        token, logprobs, logits, cache = model_step(
            model, cache, decode_batch(last, reading, lengths, count), params, step_key, backend=backend,
            counts=row_counts, top_logprobs=top_logprobs)  # [B], [B, V]
        column = jnp.where(active, generated, capacity)  # [B]; out of bounds for finished rows
        out_tokens = out_tokens.at[rows, column].set(token, mode="drop")  # [B, L]
        if return_logits:
            out_logits = out_logits.at[rows, column].set(logits, mode="drop")  # [B, L, V]
        if out_logprobs is not None:
            out_logprobs = jax.tree_util.tree_map(lambda out, new: out.at[rows, column].set(new, mode="drop"),
                                                  out_logprobs, logprobs)
        generated = generated + count  # [B]
        done = done | stopped(token, generated) | (generated >= max_new_tokens)  # [B]
        last = jnp.where(active, token, last)  # [B]
        return (step + 1, cache, last, lengths + count, done, generated, out_tokens, out_logits, out_logprobs,
                counts, key)

    carry = (jnp.int32(0), cache, first, prompt_lengths, done, generated, out_tokens, out_logits, out_logprobs,
             counts, key)
    _, cache, _, _, _, generated, out_tokens, out_logits, out_logprobs, _, _ = lax.while_loop(cond, body, carry)
    return out_tokens, out_logits, out_logprobs, generated, cache


def generate_fn(graphdef, backend: str, return_logits: bool, specs=None, *, adjust: bool = False,
                top_logprobs: int | None = None):
    """The jitted generation loop of one model structure and backend, on one device or, with
    ``specs`` (:class:`~jax_vattention.decode.mesh.MeshSpecs`), inside ``shard_map`` over a mesh;
    ``adjust`` and ``top_logprobs``: see :func:`_generate`.

    It donates the cache (and checks that XLA aliases it to the output, see
    :func:`~jax_vattention.cache.donation.cache_jit`); it compiles once per (batch bucket,
    prompt bucket) for a given cache shape.
    """
    return _generate_fn(graphdef, backend, return_logits, adjust, top_logprobs, specs)


@functools.lru_cache(maxsize=32)
def _generate_fn(graphdef, backend: str, return_logits: bool, adjust: bool, top_logprobs, specs):
    body = functools.partial(_generate, graphdef, backend, return_logits, adjust, top_logprobs)
    if specs is None:
        return cache_jit(body)
    # prompts, lengths, slots, max_new_tokens, stops, 2 packed sampling tables, key, prompt starts
    return specs.shard_jit(body, 9, (None, None, None, None, CACHE))


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    """What :func:`generate` produced for each prompt, in order.

    ``tokens[i]`` are the new tokens of prompt ``i`` (ending with its stop token if one was
    hit); ``logits[i]`` is float32 ``[len(tokens[i]), vocab]``, the logits each was drawn from,
    when asked for; ``logprobs[i]``, with ``logprobs=N``, the tokens'
    :class:`~jax_vattention.decode.sampling.Logprobs` as numpy arrays (``chosen [n]``,
    ``top_tokens`` and ``top`` ``[n, N]``).
    """

    tokens: list[list[int]]
    logits: list[np.ndarray] | None = None
    logprobs: list[Logprobs] | None = None


def _per_prompt(value, count: int, name: str, dtype) -> np.ndarray:
    array = np.asarray(value, dtype=dtype)
    if array.ndim == 0:
        return np.full((count,), array, dtype)
    if array.shape != (count,):
        raise ValueError(f"{name} must be one value or one per prompt ({count}); got shape {array.shape}")
    return array


def _stop_table(stop_tokens, count: int) -> np.ndarray:
    """int32 [count, width], padded with -1: each prompt's stop tokens; the width a power of two, at
    least :data:`MIN_STOP_WIDTH` (it is part of the loop's signature: calls with a few stop tokens
    more or less share a program)."""
    if stop_tokens is None:
        stop_tokens = ()
    stop_tokens = list(stop_tokens)
    if not stop_tokens or all(np.ndim(s) == 0 for s in stop_tokens):
        per_prompt = [[int(s) for s in stop_tokens]] * count
    elif len(stop_tokens) == count:
        per_prompt = [[int(s) for s in row] for row in stop_tokens]
    else:
        raise ValueError(f"stop_tokens must be one list for all prompts or one list per prompt "
                         f"({count}); got {len(stop_tokens)} lists")
    width = max(MIN_STOP_WIDTH, 1 << (max(len(row) for row in per_prompt) - 1).bit_length())
    table = np.full((count, width), -1, np.int32)
    for i, row in enumerate(per_prompt):
        table[i, :len(row)] = row
    return table


def check_prompts(prompts: Sequence[Sequence[int]], *, max_batch: int, max_len: int, vocab_size: int,
                  max_new_tokens) -> tuple[np.ndarray, np.ndarray]:
    """Validate a request; returns int32 ``[count]`` prompt lengths and max_new_tokens.

    Raises ``ValueError`` for no prompts, more prompts than ``max_batch`` slots, an empty prompt,
    a token id outside the vocabulary, ``max_new_tokens < 1``, or a prompt that cannot grow by
    ``max_new_tokens - 1`` within ``max_len``.
    """
    count = len(prompts)
    if count == 0:
        raise ValueError("prompts is empty: give at least one prompt")
    if count > max_batch:
        raise ValueError(f"{count} prompts but the cache has only {max_batch} slots (max_batch)")
    lengths = np.array([len(p) for p in prompts], np.int32)
    new_tokens = _per_prompt(max_new_tokens, count, "max_new_tokens", np.int32)
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {i} is empty")
        if lengths[i] > max_len:
            raise ValueError(f"prompt {i} has {lengths[i]} tokens, more than max_len={max_len}")
        if new_tokens[i] < 1:
            raise ValueError(f"max_new_tokens must be at least 1; got {new_tokens[i]} for prompt {i}")
        if lengths[i] + new_tokens[i] - 1 > max_len:
            raise ValueError(f"prompt {i} has {lengths[i]} tokens; with max_new_tokens="
                             f"{new_tokens[i]} it needs {lengths[i] + new_tokens[i] - 1} positions, "
                             f"more than max_len={max_len}")
        if min(prompt) < 0 or max(prompt) >= vocab_size:
            raise ValueError(f"prompt {i} has a token id outside [0, {vocab_size})")
    return lengths, new_tokens


@dataclasses.dataclass(frozen=True)
class PreparedRequest:
    """The host side of one :func:`generate` call: the checked request and the loop's padded inputs.

    ``slots``, ``lengths``, ``new_tokens`` are int32 ``[count]``; ``arrays`` are the traced arguments
    of the generation loop after the model state and the cache (prompts ``[B, P]``, then the per-row
    lengths, slots, max_new_tokens, stop table, packed sampling rows, and the key); ``adjust`` and
    ``top_logprobs`` choose its program (:func:`generate_fn`).
    """

    slots: np.ndarray
    lengths: np.ndarray
    new_tokens: np.ndarray
    arrays: tuple
    starts: jax.Array | None = None   # int32 [B] with ``starts``: the loop's ``prompt_starts``
    adjust: bool = False
    top_logprobs: int | None = None


def prepare_request(model, cache: KVCache, prompts, *, slots, max_len, max_new_tokens, stop_tokens, seed,
                    starts=None, logprobs=None, **knobs) -> PreparedRequest:
    """Checks a request against the model and the cache and pads it to its batch and prompt buckets.

    ``starts`` (one per prompt, ``0 <= start < len(prompt)``): tokens already in the slots; the
    padded prompts then hold each prompt from its start on. ``knobs``: the sampling knobs of
    :func:`~jax_vattention.decode.prompt_sampling.prompt_sampling`.
    Raises ``ValueError`` for a cache that does not fit the model, a bad prompt (see
    :func:`check_prompts`), bad slots, bad starts or a bad knob.
    """
    max_batch, capacity = cache.max_batch, cache.capacity
    max_len = capacity if max_len is None else min(max_len, capacity)
    config = model.config
    expected = (config.num_layers, config.num_kv_heads, config.head_dim)
    have = (cache.num_layers, *cache.k[0].shape[-2:])
    if have != expected:
        raise ValueError(f"the cache has (layers, kv_heads, head_dim) = {have}; the model needs {expected}")
    lengths, new_tokens = check_prompts(prompts, max_batch=max_batch, max_len=max_len,
                                        vocab_size=model.config.vocab_size,
                                        max_new_tokens=max_new_tokens)
    count = len(prompts)
    slot_ids = np.arange(count, dtype=np.int32) if slots is None else np.asarray(slots, np.int32)
    if slot_ids.shape != (count,) or len(set(slot_ids.tolist())) != count:
        raise ValueError(f"slots must be {count} distinct slot ids; got {list(slot_ids)}")
    if slot_ids.min() < 0 or slot_ids.max() >= max_batch:
        raise ValueError(f"slots must lie in [0, {max_batch}); got {list(slot_ids)}")

    offsets = np.zeros(count, np.int32) if starts is None else np.asarray(starts, np.int32)
    if offsets.shape != (count,) or (offsets < 0).any() or (offsets >= lengths).any():
        raise ValueError(f"starts must be one count per prompt, each below its prompt's length; got {starts}")
    rows = batch_bucket(count, max_batch)
    stop_table = _stop_table(stop_tokens, count)
    sampling = prompt_sampling(count, rows, vocab=config.vocab_size, lengths=lengths, new_tokens=new_tokens,
                               stop_table=stop_table, logprobs=logprobs, **knobs)
    if sampling.adjust and starts is not None:
        raise ValueError("penalties, logit_bias and min_tokens need the whole prompt prefilled (the "
                         "prompt's tokens are counted as they are fed): give no starts")
    width = prompt_bucket(int((lengths - offsets).max()), capacity)
    padded = np.zeros((rows, width), np.int32)
    for i, prompt in enumerate(prompts):
        padded[i, :len(prompt) - offsets[i]] = prompt[offsets[i]:]

    def pad(values, fill):
        return np.concatenate([values, np.full((rows - count, *values.shape[1:]), fill, values.dtype)])

    arrays = (jnp.asarray(padded), jnp.asarray(pad(lengths, 0)), jnp.asarray(pad(slot_ids, max_batch)),
              jnp.asarray(pad(new_tokens, 0)), jnp.asarray(pad(stop_table, -1)), jnp.asarray(sampling.ints),
              jnp.asarray(sampling.floats), jax.random.key(seed))
    return PreparedRequest(slots=slot_ids, lengths=lengths, new_tokens=new_tokens, arrays=arrays,
                           starts=None if starts is None else jnp.asarray(pad(offsets, 0)), adjust=sampling.adjust,
                           top_logprobs=sampling.top_logprobs)


def unpack_results(outputs, count: int, return_logits: bool) -> tuple["GenerationResult", KVCache]:
    """The :class:`GenerationResult` of the first ``count`` rows of the loop's outputs, and the cache."""
    out_tokens, out_logits, out_logprobs, generated, cache = outputs
    out_tokens, generated = np.asarray(out_tokens), np.asarray(generated)
    tokens = [out_tokens[i, :generated[i]].tolist() for i in range(count)]
    logits = logprobs = None
    if return_logits:
        out_logits = np.asarray(out_logits)
        logits = [out_logits[i, :generated[i]] for i in range(count)]
    if out_logprobs is not None:
        out_logprobs = jax.tree_util.tree_map(np.asarray, out_logprobs)
        logprobs = [jax.tree_util.tree_map(lambda x: x[i, :generated[i]], out_logprobs) for i in range(count)]
    return GenerationResult(tokens=tokens, logits=logits, logprobs=logprobs), cache


def generate(model, cache: KVCache, prompts: Sequence[Sequence[int]], *,
             slots: Sequence[int] | None = None, max_len: int | None = None,
             max_new_tokens: int | Sequence[int] = 32, stop_tokens=None,
             temperature: float | Sequence[float] = 0.0, top_k: int | Sequence[int] = 0,
             top_p: float | Sequence[float] = 1.0, seed: int = 0, backend: str | None = None,
             return_logits: bool = False, starts: Sequence[int] | None = None,
             min_p: float | Sequence[float] = 0.0, presence_penalty: float | Sequence[float] = 0.0,
             frequency_penalty: float | Sequence[float] = 0.0, repetition_penalty: float | Sequence[float] = 1.0,
             logit_bias=None, min_tokens: int | Sequence[int] = 0, prompt_seeds: Sequence[int | None] | None = None,
             logprobs: int | None = None) -> tuple[GenerationResult, KVCache]:
    """Generate new tokens for each prompt; the cache is donated and the updated one returned.

    Parameters
    ----------
    model : a :class:`~jax_vattention.decode.model.DecoderModel` (e.g. ``jax_vattention.models.Llama``)
    cache : the KV cache (dense, a :class:`~jax_vattention.CacheManager`'s or a
        :class:`~jax_vattention.ShardedCacheManager`'s); every array ``[max_batch, capacity,
        (layers,) kv_heads, head_dim]``. It is donated: use the returned cache afterwards. Over a
        mesh the model runs split over it (:func:`~jax_vattention.decode.mesh.shard_model`, done
        here for a model that is not split yet), each device on its own shards.
    prompts : token ids, one non-empty list per prompt (at most ``max_batch`` prompts)
    slots : the cache slot of each prompt (default ``0, 1, ...``); a manager's slots must
        already be allocated with at least the prompt's length (checked on the host: ``ValueError``);
        the decode steps' growth is reserved here (``OutOfPagesError``, nothing changed, if short)
    max_len : the longest sequence a slot may hold (default: the cache's capacity); each
        prompt needs ``len(prompt) + max_new_tokens - 1 <= max_len``
    max_new_tokens : at least 1; one for all prompts or one per prompt
    stop_tokens : token ids that end a sequence (kept in its output), one list for all prompts
        or one list per prompt; default: none
    temperature, top_k, top_p, min_p, presence_penalty, frequency_penalty, repetition_penalty,
    min_tokens : sampling knobs, one or one per prompt, as the engine's
        :class:`~jax_vattention.engine.Request` documents them (vLLM's); temperature 0 is greedy;
        ``min_tokens`` masks the prompt's ``stop_tokens``
    logit_bias : token id -> value added to its logit, one dict or one per prompt; default: none
    seed : the seed of the call's sampling stream
    prompt_seeds : each prompt's own seed (None: the call's stream): its tokens then depend only on
        it and the prompt, not on the call's other prompts nor on ``seed``
    logprobs : with a number N, each token's log-probability and the N most likely tokens' (the
        model's log-softmax) in ``result.logprobs``
    backend : the attention backend (``blocked``, ``xla``, ``cudnn``, ``pallas``); None: the
        device's and layout's default (:func:`~jax_vattention.attention.resolve_backend`, which
        also refuses a backend that would read unmapped pages)
    return_logits : also return the logits of every new token (float32 ``[capacity, vocab]`` per
        row on the device: for tests and small vocabularies)
    starts : tokens of each prompt its slot holds already (a shared prefix that
        ``CacheManager.alloc_prefix`` mapped; the slot's host length must be the whole prompt's):
        the prefill computes from there, as prompt chunks (a second compiled program). Default: none.
        Not with penalties, ``logit_bias`` or ``min_tokens`` (``ValueError``)

    Returns
    -------
    (result, cache) : the :class:`GenerationResult` and the updated cache. Each slot's
    device-side length ends at ``len(prompt) + len(tokens) - 1``.

    Example::

        cache = KVCache.dense(num_layers=2, max_batch=4, capacity=128, kv_heads=2, head_dim=16,
                              dtype=jnp.float32)
        result, cache = generate(model, cache, [[5, 6, 7], [8, 9]], max_new_tokens=10)
    """
    backend = resolve_backend(backend, cache)
    request = prepare_request(model, cache, prompts, slots=slots, max_len=max_len,
                              max_new_tokens=max_new_tokens, stop_tokens=stop_tokens, seed=seed, starts=starts,
                              logprobs=logprobs, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                              presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                              repetition_penalty=repetition_penalty, logit_bias=logit_bias,
                              min_tokens=min_tokens, prompt_seeds=prompt_seeds)
    manager = host_for(cache)
    model, specs = place(model, manager)
    if manager is not None:
        manager.check_cache(cache)
        check_windows(model, manager.config)
        check_slots(manager, request.slots, request.lengths)
        if starts is not None:
            for slot, start in zip(request.slots.tolist(), starts):
                manager.check_write(slot, int(start))   # ValueError: the prefill would write shared pages
        manager.reserve_growth(int(request.new_tokens.max()) - 1)  # the loop's growth; OutOfPagesError if short

    graphdef, state = nnx.split(model)
    with mapping_failures(manager, cache, "generate"):
        loop = generate_fn(graphdef, backend, return_logits, specs, adjust=request.adjust,
                           top_logprobs=request.top_logprobs)
        outputs = loop(state, cache, *request.arrays, request.starts)
        result, cache = unpack_results(outputs, len(prompts), return_logits)
    return result, cache


def generate_in_manager(model, manager, prompts: Sequence[Sequence[int]], *,
                        max_new_tokens: int | Sequence[int] = 32, prefix_sharing: bool = False,
                        **options) -> GenerationResult:
    """:func:`generate` in slots of a cache host (a :class:`~jax_vattention.CacheManager` or a
    :class:`~jax_vattention.ShardedCacheManager`), freed afterwards.

    Allocates one slot per prompt (mapping its pages), runs the loop (which reserves the pages
    of the decode steps first) on ``manager.cache`` and stores the returned cache back into
    ``manager.cache``. Every slot allocated here is freed, also on any error. ``options``
    are :func:`generate`'s keyword arguments.

    With ``prefix_sharing``, each prompt maps the longest run of its pages that the manager's
    prefix cache holds (``CacheManager.alloc_prefix``) and the prefill computes only the rest;
    afterwards the prompts' full pages are published, so a later call whose prompts start the
    same way (a system prompt, a conversation's earlier turns) shares them. Prompts of one call
    share only what earlier calls published. Nothing is shared where
    ``manager.tokens_per_page`` is 0 (the CPU backend), nor with penalties, ``logit_bias`` or
    ``min_tokens`` (their prefill must feed every prompt token).

    Raises
    ------
    ValueError
        A bad request (see :func:`check_prompts`); nothing is allocated then.
    NoFreeSlotError, OutOfPagesError
        The manager cannot hold the request now (back-pressure); nothing stays allocated. An
        ``OutOfPagesError`` from inside the compiled loop (only if pages were taken from under
        its reservation) says whether the manager's cache was kept or lost.

    Example::

        manager = CacheManager(CacheConfig(num_layers=2, max_batch=4, max_len=256, kv_heads=2,
                                           head_dim=16, dtype=jnp.float32))
        result = generate_in_manager(model, manager, [[5, 6, 7]], max_new_tokens=20)
    """
    config = manager.config
    _, new_tokens = check_prompts(prompts, max_batch=config.max_batch, max_len=config.max_len,
                                  vocab_size=model.config.vocab_size, max_new_tokens=max_new_tokens)
    slots: list[int] = []
    # Penalties count the prompt's tokens as the prefill feeds them: a shared prefix is never fed.
    sharing = prefix_sharing and manager.tokens_per_page > 0 and not adjusts(len(prompts), options)
    try:
        if not sharing:
            for prompt in prompts:
                slots.append(manager.alloc(len(prompt)))
            result, manager.cache = generate(model, manager.cache, prompts, slots=slots,
                                             max_len=config.max_len, max_new_tokens=new_tokens, **options)
            return result
        starts = []
        for prompt in prompts:
            keys = page_keys(list(prompt)[:-1], manager.tokens_per_page)
            placed = manager.alloc_prefix(keys, len(prompt))
            slots.append(placed.slot)
            starts.append(placed.shared_tokens)
        growth = [0] * config.max_batch
        for slot, prompt, start in zip(slots, prompts, starts):
            growth[slot] = len(prompt) - start      # the host length becomes the prompt's: the loop's start
        manager.grow_slots(growth)
        result, manager.cache = generate(model, manager.cache, prompts, slots=slots, max_len=config.max_len,
                                         max_new_tokens=new_tokens, starts=starts, **options)
        for slot, prompt in zip(slots, prompts):
            manager.publish(slot, list(prompt))     # the prompt's full pages: what the prefill wrote
    finally:
        if not manager.lost:  # a lost cache's slots went with it
            for slot in slots:
                manager.free(slot)
    return result
