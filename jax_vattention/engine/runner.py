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
and one float32, and the sampling key stays on the device (each step returns the next),
so a dispatch moves two small arrays to the device: on a GPU every argument costs host
time that the device may wait for.
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

from jax_vattention.cache.donation import cache_jit
from jax_vattention.engine.scheduler import StepPlan
from jax_vattention.decode.step_batch import StepBatch, model_step
from jax_vattention.decode.mesh import CACHE


@dataclasses.dataclass(frozen=True)
class StepInputs:
    """One step's host inputs, packed: ``ints`` int32 and ``floats`` float32 vectors.

    With ``S`` slots, ``R`` chunk rows of ``C`` tokens::

        ints   | decode_tokens S | decode_positions S | decode_count S | token_rows S |
               | top_k S+R | chunk_slots R | chunk_start R | chunk_count R | chunk_tokens R*C |
        floats | temperature S+R | top_p S+R |

    ``token_rows[s]`` is the row of the previous step's tokens that holds slot ``s``'s input
    token, or -1 where the host gives it in ``decode_tokens`` (see the module docstring).
    """

    ints: np.ndarray
    floats: np.ndarray

    @property
    def sampling(self) -> bool:
        """Whether a row samples (a temperature above 0): the step's sampling version runs."""
        return bool(np.any(self.floats[:self.floats.size // 2] > 0))

    @staticmethod
    def unpack(ints: jax.Array, floats: jax.Array, slots: int, width: int):
        """In the traced step: ``(StepBatch, token_rows [S], temperature, top_k, top_p [S+R])``."""
        rows = (ints.shape[0] - 5 * slots) // (4 + width)
        sizes = (slots, slots, slots, slots, slots + rows, rows, rows, rows, rows * width)
        offsets = np.cumsum((0,) + sizes)
        parts = [ints[begin:end] for begin, end in zip(offsets[:-1], offsets[1:])]
        decode_tokens, positions, count, token_rows, top_k, chunk_slots, chunk_start, chunk_count, chunk = parts
        batch = StepBatch(decode_tokens, jnp.arange(slots, dtype=jnp.int32), positions, count,
                          chunk.reshape(rows, width), chunk_slots, chunk_start, chunk_count)
        return batch, token_rows, floats[:slots + rows], top_k, floats[slots + rows:]


class StepRunner:
    """Owns the model's state and the compiled step; turns a :class:`StepPlan` into one dispatch.

    Parameters
    ----------
    model : the model (its ``run_step`` runs a :class:`StepBatch`)
    max_batch : decode rows (row ``s`` is slot ``s``)
    chunk_rows, chunk_tokens : the prefill rows of a mixed step and their width
    backend : the attention backend
    tp : the :class:`~jax_vattention.decode.mesh.MeshSpecs` of a model split over a mesh and
        its cache (:func:`~jax_vattention.decode.mesh.place`), or None for one device
    """

    def __init__(self, model, *, max_batch: int, chunk_rows: int, chunk_tokens: int, backend: str, tp=None):
        self.graphdef, state = nnx.split(model)
        # The state's arrays as one flat tuple: jit flattens a tuple of arrays in C++, an nnx State
        # through Python callbacks, ~600 of them a step for a 32-layer model.
        self.leaves, self.state_def = jax.tree_util.tree_flatten(state)
        self.leaves = tuple(self.leaves)
        self.max_batch = max_batch
        self.chunk_rows = chunk_rows
        self.chunk_tokens = chunk_tokens
        self.backend = backend
        self.traces = 0
        self.tp = tp
        self._checked: set = set()    # (sampling, the packed inputs' shape) of programs whose donation is checked
        self._steps = {}   # by whether a row samples: the compiled step
        for sampling in (False, True):
            body = functools.partial(self._traced, self.graphdef, backend, sampling)
            # ints, floats, previous, key: whole on every device; the tokens and the next key come back whole
            self._steps[sampling] = (cache_jit(body) if tp is None else
                                     tp.shard_jit(body, 4, (None, None, CACHE), flat_state=True))

    @property
    def output_rows(self) -> int:
        """The rows of every step's tokens: a decode row per slot, then the mixed step's chunk rows."""
        return self.max_batch + self.chunk_rows

    def no_tokens(self, device) -> jax.Array:
        """int32 [output_rows] zeros: the previous tokens of a step that follows none.

        Placed as every step's tokens are (on ``device``, or whole on every device of the mesh), so
        that a step compiled after none is the one every later step reuses."""
        return jax.device_put(jnp.zeros(self.output_rows, jnp.int32), self._placement(device))

    def first_key(self, seed: int, device) -> jax.Array:
        """The first step's sampling key, placed as every later step's (see :meth:`no_tokens`)."""
        return jax.device_put(jax.random.key(seed), self._placement(device))

    def _placement(self, device):
        if self.tp is not None:
            return NamedSharding(self.tp.mesh, PartitionSpec())
        return SingleDeviceSharding(device)

    def _traced(self, graphdef, backend, sampling, leaves, cache, ints, floats, previous, key):
        self.traces += 1  # runs once per compilation
        model = nnx.merge(graphdef, jax.tree_util.tree_unflatten(self.state_def, leaves))
        batch, token_rows, temperature, top_k, top_p = StepInputs.unpack(ints, floats, self.max_batch,
                                                                          self.chunk_tokens)
        fed = jnp.where(token_rows >= 0, previous[jnp.maximum(token_rows, 0)], batch.decode_tokens)  # [S]
        batch = dataclasses.replace(batch, decode_tokens=fed)
        key, step_key = jax.random.split(key)
        tokens, _, cache = model_step(model, cache, batch, temperature, top_k, top_p, step_key, backend=backend,
                                      sampling=sampling)
        padding = self.output_rows - tokens.shape[0]
        return jnp.pad(tokens, (0, padding)), key, cache  # [output_rows], the next step's key

    def compile(self, cache, previous: jax.Array, key, *, sampling: bool = True) -> None:
        """Compiles the decode-only and the mixed step at once, before the first request: greedy,
        and with ``sampling`` the sampling versions too.

        XLA compiles with the GIL released, so in threads the programs take about as long as the
        longest one; the steps dispatched later find them compiled. ``cache``, ``previous`` and
        ``key`` are what the engine's first step will pass (nothing runs, nothing is donated).
        """
        def compile_with(version: tuple[int, bool]) -> None:
            rows, sampling = version
            inputs = self._inputs(StepPlan((), (), ()), {}, rows)
            self._steps[sampling].lower(*self._arguments(cache, inputs, previous, key)).compile()

        versions = [(rows, flag) for flag in ((False, True) if sampling else (False,))
                    for rows in (0, self.chunk_rows)]
        with concurrent.futures.ThreadPoolExecutor(len(versions)) as pool:
            list(pool.map(compile_with, versions))

    def inputs(self, plan: StepPlan, knobs: dict) -> StepInputs:
        """The step's packed inputs (:class:`StepInputs`).

        ``knobs[request_id]`` is ``(temperature, top_k, top_p)`` of each request in the plan.
        """
        return self._inputs(plan, knobs, self.chunk_rows if plan.chunks else 0)

    def _inputs(self, plan: StepPlan, knobs: dict, rows: int) -> StepInputs:
        slots, width = self.max_batch, self.chunk_tokens
        ints = np.zeros(5 * slots + rows * (4 + width), np.int32)
        floats = np.zeros(2 * (slots + rows), np.float32)
        decode_tokens, positions, count, token_rows = (ints[i * slots:(i + 1) * slots] for i in range(4))
        top_k = ints[4 * slots:5 * slots + rows]
        chunk_slots, chunk_start, chunk_count = (ints[5 * slots + rows * i:5 * slots + rows * (i + 1)]
                                                 for i in range(1, 4))
        chunk_tokens = ints[5 * slots + 4 * rows:].reshape(rows, width)
        temperature, top_p = floats[:slots + rows], floats[slots + rows:]
        token_rows[:] = -1
        chunk_slots[:] = slots           # padding rows: an out-of-range slot, dropped
        top_p[:] = 1.0
        for state in plan.decodes:
            slot = state.slot
            if state.pending_row is None:
                decode_tokens[slot] = state.generated[-1]
            else:
                token_rows[slot] = state.pending_row
            positions[slot] = state.computed
            count[slot] = 1
            temperature[slot], top_k[slot], top_p[slot] = knobs[state.request_id]
        for row, chunk in enumerate(plan.chunks):
            chunk_tokens[row, :chunk.count] = chunk.tokens()
            chunk_slots[row], chunk_start[row], chunk_count[row] = chunk.slot, chunk.start, chunk.count
            temperature[slots + row], top_k[slots + row], top_p[slots + row] = knobs[chunk.state.request_id]
        return StepInputs(ints, floats)

    def run(self, cache, inputs: StepInputs, previous: jax.Array, key):
        """Dispatches the step after ``previous`` (the tokens the last step returned, or
        :meth:`no_tokens`); returns the sampled tokens (a device array int32 [output_rows]: row
        ``s`` for slot ``s``'s decode, ``max_batch + r`` for chunk row ``r``), the next step's key
        and the cache."""
        arguments = self._arguments(cache, inputs, previous, key)
        sampling = inputs.sampling
        step = self._steps[sampling]
        # The step's other arguments keep their shapes for good (the runner's weights, the engine's
        # cache, the previous step's tokens and key): the packed inputs' shape names the program.
        if (sampling, inputs.ints.shape) not in self._checked:
            step.check(*arguments)
            self._checked.add((sampling, inputs.ints.shape))
        return step.jitted(*arguments)

    def _arguments(self, cache, inputs: StepInputs, previous, key) -> tuple:
        """The compiled step's arguments, in its order."""
        return (self.leaves, cache, inputs.ints, inputs.floats, previous, key)
