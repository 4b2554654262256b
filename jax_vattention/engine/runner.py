"""The device side of the engine: the compiled step and the arrays it takes.

One step runs the decode rows of every slot and ``chunk_rows`` prefill rows of
``chunk_tokens`` tokens (:class:`~jax_vattention.decode.step_batch.StepBatch`) through the
model once and samples a token per row. Its shapes depend only on the engine's
configuration: a step with no chunk compiles once with ``R = 0`` rows, a mixed step
once with all of them, whatever the prompts' lengths (:attr:`StepRunner.traces`
counts the compilations). Each comes in a greedy and a sampling version, chosen by
the host from the requests' knobs: a conditional on the device would make the host
wait for every step (:mod:`~jax_vattention.decode.sampling`); the sampling pair compiles
only once a request samples, or in :meth:`StepRunner.compile`.

Both programs return their sampled tokens padded to one shape, ``[max_batch +
chunk_rows]``, and take the previous step's as an input: a decode row whose last
token is still on the device (the pipelined engine dispatches a step before it
reads the previous one's tokens) names that token's row in ``token_rows``, so
the host never waits for a token to feed it back.

Over a mesh (tensor parallelism) the same step runs inside ``shard_map``: every device
runs it on its shards of the weights and of the cache, and samples the same tokens
(see :mod:`jax_vattention.decode.mesh`).

The host hands a step its inputs in two packed vectors (:class:`StepInputs`), one int32
and one float32, and the sampler's state stays on the device (:class:`SamplerState`: the key
of the engine's stream and the per-slot token counts that penalties read; each step returns
the next), so a dispatch moves two small arrays to the device: on a GPU every argument costs
host time that the device may wait for.

Besides greedy or sampling, the host chooses what else a step computes from its requests
(:class:`StepVariant`): penalties, ``logit_bias`` and ``min_tokens`` (``adjust``), the
log-probabilities of the sampled tokens and the most likely ones (``logprobs``), those of the
prompt chunks' tokens (``prompt_logprobs``, mixed steps only), and the verification of proposed
tokens (``verify``: speculative decoding, :mod:`~jax_vattention.decode.verification`). Each variant
is one program per shape, compiled when first needed: at most 8 decode-only and 12 mixed programs,
:data:`MAX_PROGRAMS` in all, whatever the requests; twice as many where the engine speculates (each
with and without verification rows).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec, make_single_device_sharding

from jax_vattention.cache.donation import cache_jit
from jax_vattention.engine.request_rows import RequestRow, generated_before
from jax_vattention.engine.scheduler import StepPlan
from jax_vattention.decode.sampling import Logprobs, SamplingParams, row_width, sampling_row, token_logprobs
from jax_vattention.decode.step_batch import StepBatch, model_step
from jax_vattention.decode.mesh import CACHE
from jax_vattention.decode.token_counts import TokenCounts, count_step
from jax_vattention.decode.verification import count_accepted, verify_tokens

# Programs at most: decode-only (2 x 2 x 2 variants) and mixed (2 x 2 x 3); where the engine
# speculates, each with and without verification rows.
MAX_PROGRAMS = 20


class StepVariant(NamedTuple):
    """What a step computes besides the forward pass, chosen by the host from its rows.

    sampling : a row samples (the sort is compiled); else every row is greedy
    adjust : a row has penalties, ``logit_bias`` or stop tokens it may not yet sample
    logprobs : a row asks for log-probabilities (the sampled token's and the top ``N``)
    prompt_logprobs : a chunk row asks for its prompt tokens' (implies ``logprobs``; mixed steps)
    verify : a request verifies proposed tokens (the step has verification rows)
    """

    sampling: bool = False
    adjust: bool = False
    logprobs: bool = False
    prompt_logprobs: bool = False
    verify: bool = False

    @staticmethod
    def all(rows: int, verify: bool = False) -> list["StepVariant"]:
        """Every variant of a step with ``rows`` chunk rows (with ``verify``: those with verification
        rows too)."""
        prompts = (False, True) if rows else (False,)
        return [StepVariant(sampling, adjust, logprobs or prompt, prompt, verifies)
                for sampling in (False, True) for adjust in (False, True)
                for logprobs in (False, True) for prompt in prompts if logprobs or not prompt
                for verifies in ((False, True) if verify else (False,))]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplerState:
    """What the step carries from one step to the next besides the cache: the key of the engine's
    stream (rows without a seed) and the per-slot :class:`TokenCounts` of the penalties."""

    key: jax.Array
    counts: TokenCounts


@dataclasses.dataclass(frozen=True)
class StepInputs:
    """One step's host inputs, packed: ``ints`` int32 and ``floats`` float32 vectors, and the
    :class:`StepVariant` that runs them.

    With ``S`` slots, ``R`` chunk rows of ``C`` tokens, verification rows of ``W`` tokens (only in
    a ``verify`` variant), packed sampling rows of ``Ki`` ints and ``Kf`` floats
    (:func:`~jax_vattention.decode.sampling.sampling_row`)::

        ints   | decode_tokens S | decode_positions S | decode_count S | token_rows S | fresh S |
               | chunk_slots R | chunk_start R | chunk_count R | chunk_next R | chunk_tokens R*C |
               | verify_count S | verify_tokens S*W |         (verify variants only)
               | sampling rows (S+R) x Ki |
        floats | sampling rows (S+R) x Kf |

    Verification row ``s`` is slot ``s``'s: ``verify_count[s]`` tokens (its last token and the
    proposals after it) from ``decode_positions[s]``, its length; its decode row is then empty
    (``decode_count[s]`` 0) and its sampling row is the slot's.

    ``token_rows[s]`` is the row of the previous step's tokens that holds slot ``s``'s input
    token, or -1 where the host gives it in ``decode_tokens`` (see the module docstring).
    ``fresh[s]`` is 1 where a request enters slot ``s`` (its token counts start again), ``2 + p``
    where a sample forked from slot ``p`` takes its first step (its counts start as ``p``'s).
    ``chunk_next[r]`` is the context token after chunk ``r``'s last, or -1 (the one it samples).
    """

    ints: np.ndarray
    floats: np.ndarray
    variant: StepVariant = StepVariant()

    @property
    def sampling(self) -> bool:
        """Whether a row samples: the step's sampling version runs."""
        return self.variant.sampling

    @staticmethod
    def unpack(ints: jax.Array, floats: jax.Array, slots: int, width: int, int_width: int, verify_width: int = 0):
        """In the traced step: ``(StepBatch, token_rows [S], fresh [S], chunk_next [R],
        SamplingParams [S+R])``; ``verify_width`` (static): ``W`` of a verify variant, else 0."""
        verify = slots * (1 + verify_width) if verify_width else 0
        rows = (ints.shape[0] - (5 + int_width) * slots - verify) // (4 + width + int_width)
        sizes = (slots,) * 5 + (rows,) * 4 + (rows * width, verify, (slots + rows) * int_width)
        offsets = np.cumsum((0,) + sizes)
        parts = [ints[begin:end] for begin, end in zip(offsets[:-1], offsets[1:])]
        (decode_tokens, positions, count, token_rows, fresh, chunk_slots, chunk_start, chunk_count, chunk_next,
         chunk, verify_part, sampling_ints) = parts
        batch = StepBatch(decode_tokens, jnp.arange(slots, dtype=jnp.int32), positions, count,
                          chunk.reshape(rows, width), chunk_slots, chunk_start, chunk_count)
        if verify_width:
            verify_count = verify_part[:slots]  # [S]
            batch = dataclasses.replace(
                batch, verify_tokens=verify_part[slots:].reshape(slots, verify_width),
                verify_slots=jnp.where(verify_count > 0, jnp.arange(slots, dtype=jnp.int32), slots),
                verify_start=positions, verify_count=verify_count)
        params = SamplingParams.unpack(sampling_ints.reshape(slots + rows, int_width),
                                       floats.reshape(slots + rows, -1))
        return batch, token_rows, fresh, chunk_next, params


class StepRunner:
    """Owns the model's state and the compiled steps; turns a :class:`StepPlan` into one dispatch.

    Parameters
    ----------
    model : the model (its ``run_step`` runs a :class:`StepBatch`)
    max_batch : decode rows (row ``s`` is slot ``s``)
    chunk_rows, chunk_tokens : the prefill rows of a mixed step and their width
    backend : the attention backend
    tp : the :class:`~jax_vattention.decode.mesh.MeshSpecs` of a model split over a mesh and
        its cache (:func:`~jax_vattention.decode.mesh.place`), or None for one device
    bias_width, stop_width : the most ``logit_bias`` entries and stop tokens of a request
    top_logprobs : how many of the most likely tokens' log-probabilities a step returns
    verify_width : the width ``W`` of a verification row (1 + the most tokens a request proposes),
        0 where no request speculates
    """

    def __init__(self, model, *, max_batch: int, chunk_rows: int, chunk_tokens: int, backend: str, tp=None,
                 bias_width: int = 0, stop_width: int = 0, top_logprobs: int = 0, verify_width: int = 0):
        self.graphdef, state = nnx.split(model)
        # The state's arrays as one flat tuple: jit flattens a tuple of arrays in C++, an nnx State
        # through Python callbacks, ~600 of them a step for a 32-layer model.
        self.leaves, self.state_def = jax.tree_util.tree_flatten(state)
        self.leaves = tuple(self.leaves)
        self.vocab = model.config.vocab_size
        self.max_batch = max_batch
        self.chunk_rows = chunk_rows
        self.chunk_tokens = chunk_tokens
        self.backend = backend
        self.bias_width, self.stop_width = bias_width, stop_width
        self.int_width, self.float_width = row_width(bias_width, stop_width)
        self._padding_row = sampling_row(bias_width=bias_width, stop_width=stop_width)
        self.top_logprobs = top_logprobs
        self.verify_width = verify_width
        self.traces = 0
        self.tp = tp
        self._checked: set = set()    # (variant, the packed inputs' shape) of programs whose donation is checked
        self._steps = {}   # by StepVariant: the jitted step

    def step_for(self, variant: StepVariant):
        """The jitted step of ``variant`` (made when first asked for; it compiles per shape)."""
        if variant not in self._steps:
            body = functools.partial(self._traced, self.graphdef, self.backend, variant)
            # ints, floats, previous, sampler: whole on every device; tokens, log-probabilities and the
            # sampler's next state come back whole
            self._steps[variant] = (
                cache_jit(body, donate_argnames="sampler") if self.tp is None else
                self.tp.shard_jit(body, 4, (None, None, None, CACHE), flat_state=True, donate=("sampler",)))
        return self._steps[variant]

    @property
    def output_rows(self) -> int:
        """The rows of every step's tokens: a decode row per slot, then the mixed step's chunk rows."""
        return self.max_batch + self.chunk_rows

    def no_tokens(self, device) -> jax.Array:
        """int32 [output_rows] zeros: the previous tokens of a step that follows none.

        Placed as every step's tokens are (on ``device``, or whole on every device of the mesh), so
        that a step compiled after none is the one every later step reuses."""
        return self._created(lambda: jnp.zeros(self.output_rows, jnp.int32), device)

    def first_state(self, seed: int, device) -> SamplerState:
        """The first step's :class:`SamplerState` (the stream's key from ``seed``, no counts), placed
        as every later step's (see :meth:`no_tokens`)."""
        return self._created(lambda: SamplerState(jax.random.key(seed), TokenCounts.zeros(self.max_batch, self.vocab)),
                             device)

    def _created(self, make, device):
        """``make()``'s arrays, placed as every step's. Over a mesh that spans processes, they are
        created in place by a compiled function (whose outputs have the placement): no ``device_put``
        of this process reaches the other processes' devices."""
        placement = self._placement(device)
        if placement.is_fully_addressable:
            return jax.device_put(make(), placement)
        return jax.jit(make, out_shardings=placement)()

    def _placement(self, device):
        if self.tp is not None:
            return NamedSharding(self.tp.mesh, PartitionSpec())
        return make_single_device_sharding(device)

    def _traced(self, graphdef, backend, variant: StepVariant, leaves, cache, ints, floats, previous, sampler):
        self.traces += 1  # runs once per compilation
        model = nnx.merge(graphdef, jax.tree_util.tree_unflatten(self.state_def, leaves))
        batch, token_rows, fresh, chunk_next, params = StepInputs.unpack(
            ints, floats, self.max_batch, self.chunk_tokens, self.int_width, self.verify_width if variant.verify else 0)
        fed = jnp.where(token_rows >= 0, previous[jnp.maximum(token_rows, 0)], batch.decode_tokens)  # [S]
        batch = dataclasses.replace(batch, decode_tokens=fed, every_token=variant.prompt_logprobs)
        key, step_key = jax.random.split(sampler.key)
        counts, row_counts = sampler.counts, None
        if variant.adjust:
            counts = count_step(counts.enter(fresh), batch, params.prompt_len)
            row_counts = counts.step_rows(batch.chunk_slots)  # [S+R, V] each (decode row s is slot s)
        tokens, logprobs, logits, cache = model_step(
            model, cache, batch, params, step_key, backend=backend, sampling=variant.sampling, counts=row_counts,
            top_logprobs=self.top_logprobs if variant.logprobs else None)
        outputs = {} if logprobs is None else {"logprobs": logprobs}
        if variant.prompt_logprobs:
            outputs["prompt_logprobs"] = self._chunk_logprobs(batch, logits, chunk_next)
        if variant.verify:
            counts = self._verify(batch, logits, params, step_key, counts, variant, outputs)
        padding = self.output_rows - tokens.shape[0]
        return jnp.pad(tokens, (0, padding)), outputs, SamplerState(key, counts), cache  # [output_rows], ...

    def _verify(self, batch: StepBatch, logits: jax.Array, params: SamplingParams, step_key: jax.Array,
                counts: TokenCounts, variant: StepVariant, outputs: dict) -> TokenCounts:
        """The verification rows' tokens and accepted proposals (``outputs["verify_tokens"]`` int32
        [S, W], ``outputs["accepted"]`` int32 [S]); returns the counts with the kept fed tokens added."""
        slots = self.max_batch
        row_params = jax.tree_util.tree_map(lambda x: x[:slots], params)  # [S]: verification row s is slot s's
        # A key of its own: the decode and chunk rows draw from step_key folded with their row index.
        verify_key = jax.random.fold_in(step_key, 0x7FFFFFFF)
        row_counts = counts.rows(batch.verify_slots) if variant.adjust else None  # [S, V] each
        tokens, accepted, _ = verify_tokens(logits[-slots * self.verify_width:], batch, row_params, verify_key,
                                            row_counts, sampling=variant.sampling)
        outputs["verify_tokens"], outputs["accepted"] = tokens, accepted
        return count_accepted(counts, batch, accepted, row_params.prompt_len) if variant.adjust else counts

    def _chunk_logprobs(self, batch: StepBatch, logits: jax.Array, chunk_next: jax.Array) -> Logprobs:
        """Each chunk token's logits scored against the token after it: [R, C] (and [R, C, N])."""
        rows, width = batch.chunk_rows, batch.chunk_width
        following = jnp.concatenate([batch.chunk_tokens[:, 1:], chunk_next[:, None]], axis=1)  # [R, C]
        last = jnp.arange(width, dtype=jnp.int32)[None, :] == (batch.chunk_count - 1)[:, None]  # [R, C]
        following = jnp.where(last, chunk_next[:, None], following)  # [R, C]
        scored = token_logprobs(logits[batch.decode_rows:], following.reshape(-1), self.top_logprobs)
        return jax.tree_util.tree_map(lambda x: x.reshape(rows, width, *x.shape[1:]), scored)

    def compile(self, cache, previous: jax.Array, sampler: SamplerState, *, sampling: bool = True,
                adjust: bool = False, logprobs: bool = False) -> None:
        """Compiles the decode-only and the mixed step at once, before the first request: greedy,
        and with ``sampling``, ``adjust``, ``logprobs`` the variants that compute those too (with
        verification rows too where requests speculate: ``verify_width``).

        XLA compiles with the GIL released, so in threads the programs take about as long as the
        longest one; the steps dispatched later find them compiled. ``cache``, ``previous`` and
        ``sampler`` are what the engine's first step will pass (nothing runs, nothing is donated).
        """
        allowed = StepVariant(sampling, adjust, logprobs, logprobs, self.verify_width > 0)

        def compile_with(version: tuple[int, StepVariant]) -> None:
            rows, variant = version
            inputs = self._inputs(StepPlan((), (), ()), {}, rows, variant.verify)
            self.step_for(variant).lower(*self._arguments(cache, inputs, previous, sampler)).compile()

        versions = [(rows, variant) for rows in (0, self.chunk_rows)
                    for variant in StepVariant.all(rows, self.verify_width > 0)
                    if all(allowed[i] or not flag for i, flag in enumerate(variant))]
        for _, variant in versions:
            self.step_for(variant)
        with concurrent.futures.ThreadPoolExecutor(len(versions)) as pool:
            list(pool.map(compile_with, versions))

    def inputs(self, plan: StepPlan, knobs: dict[int, RequestRow]) -> StepInputs:
        """The step's packed inputs (:class:`StepInputs`) and the variant it needs.

        ``knobs[request_id]`` is the :class:`~jax_vattention.engine.request_rows.RequestRow` of each
        request in the plan.
        """
        if plan.proposals and not self.verify_width:
            raise ValueError("a plan proposes tokens but the runner verifies none: give it a verify_width")
        return self._inputs(plan, knobs, self.chunk_rows if plan.chunks else 0, bool(plan.proposals))

    def _inputs(self, plan: StepPlan, knobs: dict, rows: int, verify: bool = False) -> StepInputs:
        slots, width, int_width = self.max_batch, self.chunk_tokens, self.int_width
        verify_width = self.verify_width if verify else 0
        chunks_end = 5 * slots + rows * (4 + width)
        head = chunks_end + (slots * (1 + verify_width) if verify else 0)
        ints = np.zeros(head + (slots + rows) * int_width, np.int32)
        floats = np.zeros((slots + rows) * self.float_width, np.float32)
        decode_tokens, positions, count, token_rows, fresh = (ints[i * slots:(i + 1) * slots] for i in range(5))
        chunk_slots, chunk_start, chunk_count, chunk_next = (ints[5 * slots + rows * i:5 * slots + rows * (i + 1)]
                                                             for i in range(4))
        chunk_tokens = ints[5 * slots + 4 * rows:chunks_end].reshape(rows, width)
        verify_count = ints[chunks_end:chunks_end + slots] if verify else None
        verify_tokens = ints[chunks_end + slots:head].reshape(slots, verify_width) if verify else None
        row_ints = ints[head:].reshape(slots + rows, int_width)
        row_floats = floats.reshape(slots + rows, self.float_width)
        token_rows[:] = -1
        chunk_slots[:] = slots           # padding rows: an out-of-range slot, dropped
        chunk_next[:] = -1
        row_ints[:], row_floats[:] = self._padding_row    # greedy, every parameter at its default
        sampling = adjust = logprobs = prompt_logprobs = False
        for state in plan.decodes:
            slot, row = state.slot, knobs[state.request_id]
            last = state.generated[-1] if state.generated else state.request.prompt[-1]
            proposed = plan.proposals.get(state.request_id)
            if proposed:   # its last token is on the host: a request with one in flight proposes nothing
                fed = (last, *proposed)
                verify_tokens[slot, :len(fed)] = fed
                verify_count[slot] = len(fed)
            elif state.pending_row is None:   # a forked sample's first step feeds the last prompt token
                decode_tokens[slot] = last
                count[slot] = 1
            else:
                token_rows[slot] = state.pending_row
                count[slot] = 1
            positions[slot] = state.computed
            row_ints[slot], row_floats[slot] = row.ints, row.floats
            if state.enters_from is not None:
                fresh[slot] = 1 if state.enters_from < 0 else 2 + state.enters_from
            sampling, logprobs = sampling or row.samples, logprobs or row.logprobs
            adjust = adjust or row.adjusts(generated_before(state))
        for state in plan.admitted:
            fresh[state.slot] = 1
        for index, chunk in enumerate(plan.chunks):
            row, context = knobs[chunk.state.request_id], chunk.state.context
            end = chunk.start + chunk.count
            chunk_tokens[index, :chunk.count] = context[chunk.start:end]
            chunk_slots[index], chunk_start[index], chunk_count[index] = chunk.slot, chunk.start, chunk.count
            chunk_next[index] = context[end] if end < len(context) else -1
            row_ints[slots + index], row_floats[slots + index] = row.ints, row.floats
            if chunk.last:
                sampling, logprobs = sampling or row.samples, logprobs or row.logprobs
                adjust = adjust or row.adjusts(generated_before(chunk.state))
            adjust = adjust or row.penalized      # every token it feeds is counted
            if row.prompt_logprobs and chunk.start + 1 < len(chunk.state.request.prompt):
                prompt_logprobs = logprobs = True
        return StepInputs(ints, floats, StepVariant(sampling, adjust, logprobs, prompt_logprobs, verify))

    def run(self, cache, inputs: StepInputs, previous: jax.Array, sampler: SamplerState):
        """Dispatches the step after ``previous`` (the tokens the last step returned, or
        :meth:`no_tokens`); returns the sampled tokens (a device array int32 [output_rows]: row
        ``s`` for slot ``s``'s decode, ``max_batch + r`` for chunk row ``r``), the step's other
        outputs (a dict, empty unless the variant computes log-probabilities: ``logprobs``, a
        :class:`~jax_vattention.decode.sampling.Logprobs` of [S+R] rows, and ``prompt_logprobs``,
        of [R, C] chunk tokens; a verify variant's ``verify_tokens`` int32 [S, W], the target's token at
        every position of slot ``s``'s verification row, and ``accepted`` int32 [S], the proposals it
        accepted), the next step's :class:`SamplerState` (``sampler`` is donated) and
        the cache."""
        arguments = self._arguments(cache, inputs, previous, sampler)
        step = self.step_for(inputs.variant)
        # The step's other arguments keep their shapes for good (the runner's weights, the engine's
        # cache, the previous step's tokens and the sampler's state): the packed inputs' shape names
        # the program.
        if (inputs.variant, inputs.ints.shape) not in self._checked:
            step.check(*arguments)
            self._checked.add((inputs.variant, inputs.ints.shape))
        return step.jitted(*arguments)

    def _arguments(self, cache, inputs: StepInputs, previous, sampler) -> tuple:
        """The compiled step's arguments, in its order."""
        return (self.leaves, cache, inputs.ints, inputs.floats, previous, sampler)
