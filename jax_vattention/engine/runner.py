"""The device side of the engine: the compiled step and the arrays it takes.

One step runs the decode rows of every slot and ``chunk_rows`` prefill rows of
``chunk_tokens`` tokens (:class:`~jax_vattention.step_batch.StepBatch`) through the
model once and samples a token per row. Its shapes depend only on the engine's
configuration: a step with no chunk compiles once with ``R = 0`` rows, a mixed step
once with all of them, whatever the prompts' lengths (:attr:`StepRunner.traces`
counts the compilations).

Both programs return their sampled tokens padded to one shape, ``[max_batch +
chunk_rows]``, and take the previous step's as an input: a decode row whose last
token is still on the device (the pipelined engine dispatches a step before it
reads the previous one's tokens) names that token's row in ``token_rows``, so
the host never waits for a token to feed it back.

Over a mesh (tensor parallelism) the same step runs inside ``shard_map``: every device
runs it on its shards of the weights and of the cache, and samples the same tokens
(see :mod:`jax_vattention.tensor_parallel`).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

from jax_vattention.donation import cache_jit
from jax_vattention.engine.scheduler import StepPlan
from jax_vattention.step_batch import StepBatch, model_step
from jax_vattention.tensor_parallel import CACHE


class StepRunner:
    """Owns the model's state and the compiled step; turns a :class:`StepPlan` into one dispatch.

    Parameters
    ----------
    model : the model (its ``run_step`` runs a :class:`StepBatch`)
    max_batch : decode rows (row ``s`` is slot ``s``)
    chunk_rows, chunk_tokens : the prefill rows of a mixed step and their width
    backend : the attention backend
    tp : the :class:`~jax_vattention.tensor_parallel.TPSpecs` of a model split over a mesh and
        its cache (:func:`~jax_vattention.tensor_parallel.for_manager`), or None for one device
    """

    def __init__(self, model, *, max_batch: int, chunk_rows: int, chunk_tokens: int, backend: str, tp=None):
        self.graphdef, self.state = nnx.split(model)
        self.max_batch = max_batch
        self.chunk_rows = chunk_rows
        self.chunk_tokens = chunk_tokens
        self.backend = backend
        self.traces = 0
        self.tp = tp
        body = functools.partial(self._traced, self.graphdef, backend)
        # batch, token_rows, previous, temperature, top_k, top_p, key: whole on every device; the
        # tokens come back whole
        self._step = cache_jit(body) if tp is None else tp.shard_jit(body, 7, (None, CACHE))

    @property
    def output_rows(self) -> int:
        """The rows of every step's tokens: a decode row per slot, then the mixed step's chunk rows."""
        return self.max_batch + self.chunk_rows

    def no_tokens(self, device) -> jax.Array:
        """int32 [output_rows] zeros: the previous tokens of a step that follows none.

        Placed as every step's tokens are (on ``device``, or whole on every device of the mesh), so
        that a step compiled after none is the one every later step reuses."""
        zeros = jnp.zeros(self.output_rows, jnp.int32)
        if self.tp is not None:
            return jax.device_put(zeros, NamedSharding(self.tp.mesh, PartitionSpec()))
        return jax.device_put(zeros, SingleDeviceSharding(device))

    def _traced(self, graphdef, backend, state, cache, batch, token_rows, previous, temperature, top_k,
                top_p, key):
        self.traces += 1  # runs once per compilation
        model = nnx.merge(graphdef, state)
        # token_rows int32 [D]: the row of ``previous`` [output_rows] holding each decode row's input
        # token, or -1 where the host gave it in ``batch.decode_tokens``.
        fed = jnp.where(token_rows >= 0, previous[jnp.maximum(token_rows, 0)], batch.decode_tokens)  # [D]
        batch = dataclasses.replace(batch, decode_tokens=fed)
        tokens, _, cache = model_step(model, cache, batch, temperature, top_k, top_p, key, backend=backend)
        padding = self.output_rows - tokens.shape[0]
        return jnp.pad(tokens, (0, padding)), cache  # [output_rows]

    def compile(self, cache, previous: jax.Array, key) -> None:
        """Compiles the decode-only and the mixed step at once, before the first request.

        XLA compiles with the GIL released, so in two threads the pair takes about as long as the
        longer one; the steps dispatched later find both compiled. ``cache``, ``previous`` and
        ``key`` are what the engine's first step will pass (nothing runs, nothing is donated).
        """
        def compile_with(rows: int) -> None:
            batch, token_rows, knobs = self._inputs(StepPlan((), (), ()), {}, rows)
            self._step.lower(*self._arguments(cache, batch, token_rows, previous, knobs, key)).compile()

        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            list(pool.map(compile_with, (0, self.chunk_rows)))

    def arrays(self, plan: StepPlan, knobs: dict) -> tuple[StepBatch, np.ndarray, tuple[np.ndarray, ...]]:
        """The step's inputs: the :class:`StepBatch`, the decode rows' ``token_rows`` ``[D]`` (see
        the module docstring) and the sampling knobs ``[D + R]``.

        ``knobs[request_id]`` is ``(temperature, top_k, top_p)`` of each request in the plan.
        """
        return self._inputs(plan, knobs, self.chunk_rows if plan.chunks else 0)

    def _inputs(self, plan: StepPlan, knobs: dict, rows: int):
        slots, width = self.max_batch, self.chunk_tokens
        decode_tokens = np.zeros(slots, np.int32)
        decode_positions = np.zeros(slots, np.int32)
        decode_count = np.zeros(slots, np.int32)
        token_rows = np.full(slots, -1, np.int32)
        chunk_tokens = np.zeros((rows, width), np.int32)
        chunk_slots = np.full(rows, slots, np.int32)        # padding rows: an out-of-range slot, dropped
        chunk_start = np.zeros(rows, np.int32)
        chunk_count = np.zeros(rows, np.int32)
        temperature = np.zeros(slots + rows, np.float32)
        top_k = np.zeros(slots + rows, np.int32)
        top_p = np.ones(slots + rows, np.float32)
        for state in plan.decodes:
            slot = state.slot
            if state.pending_row is None:
                decode_tokens[slot] = state.generated[-1]
            else:
                token_rows[slot] = state.pending_row
            decode_positions[slot] = state.computed
            decode_count[slot] = 1
            temperature[slot], top_k[slot], top_p[slot] = knobs[state.request_id]
        for row, chunk in enumerate(plan.chunks):
            chunk_tokens[row, :chunk.count] = chunk.tokens()
            chunk_slots[row], chunk_start[row], chunk_count[row] = chunk.slot, chunk.start, chunk.count
            temperature[slots + row], top_k[slots + row], top_p[slots + row] = knobs[chunk.state.request_id]
        batch = StepBatch(*(jnp.asarray(a) for a in (
            decode_tokens, np.arange(slots, dtype=np.int32), decode_positions, decode_count,
            chunk_tokens, chunk_slots, chunk_start, chunk_count)))
        return batch, token_rows, (temperature, top_k, top_p)

    def run(self, cache, batch: StepBatch, token_rows: np.ndarray, previous: jax.Array,
            knobs: tuple[np.ndarray, ...], key):
        """Dispatches the step after ``previous`` (the tokens the last step returned, or
        :meth:`no_tokens`); returns the sampled tokens (a device array int32 [output_rows]: row
        ``s`` for slot ``s``'s decode, ``max_batch + r`` for chunk row ``r``) and the cache."""
        return self._step(*self._arguments(cache, batch, token_rows, previous, knobs, key))

    def _arguments(self, cache, batch, token_rows, previous, knobs, key) -> tuple:
        """The compiled step's arguments, in its order."""
        return (self.state, cache, batch, jnp.asarray(token_rows), previous, *(jnp.asarray(k) for k in knobs), key)
