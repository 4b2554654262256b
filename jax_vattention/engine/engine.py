"""Stall-free continuous batching over a virtual KV cache.

Slots are the cache's batch rows. Each :meth:`Engine.step` is one compiled
program of a fixed shape (Sarathi-Serve's batching, vLLM v1's split):

* the :class:`~jax_vattention.engine.scheduler.Scheduler` plans it: one decode token
  for every running request, then prompt chunks of requests still prefilling and of
  newly admitted ones, up to ``token_budget`` tokens; a long prompt is cut into chunks
  over several steps, so decodes never wait behind a whole prefill;
* the host maps the plan's growth, each slot by its own count
  (:meth:`CacheManager.grow_slots`), before dispatch; when the budget cannot cover it
  the youngest request is preempted (requeued, recomputed later) and the step planned
  again;
* the :class:`~jax_vattention.engine.runner.StepRunner` dispatches it, and the engine
  streams the sampled tokens and retires finished requests.

Every decision about pages (admission, growth, mapping ahead, release, prefix sharing) is
:class:`~jax_vattention.engine.memory.CacheMemory`'s, over the cache host; the paper's memory
policies are switches of :class:`EngineConfig` that it follows. The engine is the loop: plan,
map, dispatch, read, stream.

No request is lost, and tokens already streamed are not streamed again.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import time
from typing import Callable, Iterator

import jax
import numpy as np

from jax_vattention._core import DriverError, OutOfPagesError
from jax_vattention.attention import resolve_backend
from jax_vattention.cache.host import CacheHost
from jax_vattention.decode.mesh import place
from jax_vattention.decode.model import check_model_fits
from jax_vattention.engine.config import EngineConfig
from jax_vattention.engine.memory import CacheMemory
from jax_vattention.engine.failures import ADMISSION_ATTEMPTS, FailedRequests, grow_each
from jax_vattention.engine.groups import SampleGroups, sample_requests
from jax_vattention.engine.logprobs import on_host, record_prompt_logprobs, sampled_logprob, take_prompt_logprobs
from jax_vattention.engine.request_rows import request_row
from jax_vattention.engine.requests import Request, RequestState, TokenEvent, TokenLogprob
from jax_vattention.engine.runner import StepRunner
from jax_vattention.engine.scheduler import Scheduler, StepPlan
from jax_vattention.engine.speculation import speculator_for
from jax_vattention.engine.stats import EngineStats, StepRecord
from jax_vattention.engine.validation import checked_request


log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class _InFlight:
    """A dispatched step: its plan, its tokens on the device (int32 [output_rows]) and the
    ``(request, row)`` pairs of the rows that carry a token."""

    plan: StepPlan
    tokens: jax.Array
    rows: tuple
    dispatched: float        # time.perf_counter() when it was dispatched
    dispatch_seconds: float  # the host's time in the dispatch call
    mapped_pages: int        # mapped for it before dispatch
    blocked: bool            # admission stopped at the page budget
    written: tuple = ()      # with prefix sharing: what it writes, per request (PrefixSharer.dispatched)
    outputs: dict = dataclasses.field(default_factory=dict)   # its log-probabilities on the device, if any
    verifies: tuple = ()     # the requests whose proposals it verifies (their tokens: outputs["verify_tokens"])
    synchronous: bool = False   # read at once, not pipelined (a request in it speculates)


class Engine:
    """Serves requests over a cache host's cache: one device's :class:`~jax_vattention.CacheManager`,
    or a :class:`~jax_vattention.ShardedCacheManager`'s over its mesh (tensor parallelism: the model is
    split over the same mesh, by :func:`~jax_vattention.decode.mesh.shard_model` if it is not yet).

    Example::

        engine = Engine(model, manager, EngineConfig(token_budget=128, chunk_tokens=32))
        request_id = engine.submit(Request(prompt=[1, 2, 3], max_new_tokens=16))
        for event in engine.stream():
            print(event.request_id, event.token, event.finished)
    """

    def __init__(self, model, manager: CacheHost, config: EngineConfig = EngineConfig(), *, draft=None):
        cache_config = manager.config
        check_model_fits(model, cache_config)
        self.backend = resolve_backend(config.backend, manager.cache)
        model, tp = place(model, manager)  # a ShardedCacheManager: the model split over its mesh
        self.model = model
        self.manager = manager
        self.config = config
        self.stats = EngineStats()
        self.failed: dict[int, Exception] = FailedRequests()   # requests ended by an error, by id (the last ones)
        self.scheduler = Scheduler(max_batch=cache_config.max_batch, token_budget=config.token_budget,
                                   chunk_tokens=config.chunk_tokens, chunk_rows=config.chunk_rows)
        if config.speculate is not None and cache_config.window is not None:
            raise ValueError("speculative decoding needs a cache without a sliding window (rejected tokens are "
                             "undone by lowering the length, and pages behind the window may be gone): "
                             "leave out speculate, or give the cache window=None (the model still attends "
                             "within its window; the pages behind it stay mapped)")
        # draft: with speculate="draft", its proposer (a jax_vattention.engine.draft.DraftProposer)
        self.speculator = speculator_for(config.speculate, config.num_speculative_tokens, cache_config.max_len,
                                         draft)
        if draft is not None:
            draft.check_target(model, cache_config)
        self.runner = StepRunner(model, max_batch=cache_config.max_batch, chunk_rows=config.chunk_rows,
                                 chunk_tokens=config.chunk_tokens, backend=self.backend, tp=tp,
                                 bias_width=config.max_logit_bias, stop_width=config.max_stop_tokens,
                                 top_logprobs=min(config.max_logprobs, model.config.vocab_size),
                                 verify_width=config.num_speculative_tokens + 1 if self.speculator else 0)
        self.memory = CacheMemory(manager, config.memory_policy, self.stats)
        self.prefixes = self.memory.prefixes
        self.groups = SampleGroups(self.memory, self.scheduler)
        self._next_id = 0
        device = next(iter(manager.cache.k[0].devices()))
        self._sampler = self.runner.first_state(config.seed, device)   # each step returns the next one's
        self._in_flight: _InFlight | None = None     # the step dispatched and not yet read
        self._no_tokens = self.runner.no_tokens(device)
        self._last_read = 0.0                         # when the host last finished reading a step
        self._undelivered: list[TokenEvent] = []      # failures the next step streams

    def compile(self, *, sampling: bool = True, adjust: bool = False, logprobs: bool = False) -> None:
        """Compiles the engine's step programs at once, before serving: decode-only and mixed, greedy
        and (with ``sampling``, for requests with a temperature) sampling, and with ``adjust``
        (penalties, ``logit_bias``, ``min_tokens``) and ``logprobs`` the variants that compute those
        (:class:`~jax_vattention.engine.runner.StepVariant`). The first steps then run at once instead
        of compiling one after the other; a program left out compiles when first needed."""
        self.runner.compile(self.manager.cache, self._no_tokens, self._sampler, sampling=sampling, adjust=adjust,
                            logprobs=logprobs)

    def reset_stats(self) -> None:
        """Starts :attr:`stats` afresh (after a warm-up, say)."""
        self.stats = self.memory.stats = EngineStats()

    # ----------------------------------------------------------------- requests
    def submit(self, request: Request) -> int:
        """Queues a request; returns its id.

        Raises ``ValueError``, with nothing queued, for a request that can never be served: a wrong
        type or range of any field, a token id outside the vocabulary, a length past ``max_len`` or
        more pages than the whole budget. The engine keeps its own checked copy.
        """
        request = self._checked(request)
        self.memory.check_fits(request)
        return self._queue(request).request_id

    def submit_samples(self, request: Request, samples: int) -> list[int]:
        """Queues ``samples`` samples of one request (``n`` / ``best_of``); returns their ids.

        The prompt is prefilled once and forked into a slot per sample
        (:mod:`~jax_vattention.engine.groups`); with a ``seed``, sample ``i`` draws with ``seed + i``.
        Each sample streams its own events. Where the samples cannot fork (a host without aliased
        pages, a prompt longer than the sliding window) they are independent requests, counted in
        ``stats.unforked_samples``. Raises ``ValueError`` as :meth:`submit` does, and (where
        the samples fork) for more samples than slots or than the whole page budget holds, with
        nothing queued.
        """
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise ValueError(f"samples must be a positive integer, got {samples!r}")
        if samples == 1:
            return [self.submit(request)]
        request = self._checked(request)
        requests = sample_requests(request, samples)
        if not self.groups.forks_for(request):   # each sample is a request of its own
            self.memory.check_fits(request)
            self.stats.unforked_samples += samples
            return [self._queue(one).request_id for one in requests]
        self.memory.check_fits(request, samples)
        prefill = self._queue(request)
        members = []
        for one in requests:
            members.append(RequestState(self._next_id, one, prefill.arrival))
            self._next_id += 1
        self.groups.add(prefill, members)
        return [member.request_id for member in members]

    def _checked(self, request: Request) -> Request:
        return checked_request(request, vocab=self.model.config.vocab_size, max_len=self.manager.config.max_len,
                               max_stop_tokens=self.config.max_stop_tokens, max_logit_bias=self.config.max_logit_bias,
                               max_logprobs=self.runner.top_logprobs)

    def _queue(self, request: Request) -> RequestState:
        state = RequestState(self._next_id, request, time.perf_counter())
        self._next_id += 1
        self.scheduler.add(state)
        return state

    def cancel(self, request_id: int) -> bool:
        """Drops a submitted request that has not finished; returns whether there was one.

        A waiting request leaves the queue; a running one gives back its slot and pages through
        the same path a finished request takes. Its tokens already streamed stay streamed; it
        yields no more. For a client that went away.
        """
        if self.groups.is_prefill(request_id):
            return False                 # not a request of the caller's (Engine.submit_samples)
        waiting_sample, prefill = self.groups.cancel(request_id)
        if prefill is not None:          # its group has no sample left
            self._drop(prefill)
        return waiting_sample or self._drop(request_id)

    def _drop(self, target: int | RequestState) -> bool:
        """Takes a request (by id, or its state) out of the queue or off its slot; whether it was there."""
        for state in self.scheduler.waiting:
            if state is target or state.request_id == target:
                self.scheduler.waiting.remove(state)
                state.done = True
                self.prefixes.leave(state, publish=False, done=True)
                return True
        for state in list(self.scheduler.running.values()):
            if state is target or state.request_id == target:
                self._retire(state, publish=True)   # what it wrote is valid: other prompts may share it
                return True
        return False

    @property
    def idle(self) -> bool:
        """Nothing waits, runs or is in flight, and every event was streamed."""
        return (not self.scheduler.waiting and not self.scheduler.running and self._in_flight is None
                and not self._undelivered)

    @property
    def waiting(self) -> int:
        """Requests submitted and not yet admitted (or preempted and requeued)."""
        return len(self.scheduler.waiting)

    @property
    def running(self) -> int:
        """Requests holding a slot."""
        return len(self.scheduler.running)

    @property
    def _waiting(self):
        return self.scheduler.waiting

    @property
    def _by_slot(self):
        return self.scheduler.running

    # ------------------------------------------------------------------- steps
    def step(self) -> list[TokenEvent]:
        """Plans, maps and dispatches one step; streams the tokens of a step and retires finished
        requests.

        Pipelined (the default), the tokens streamed are the previous step's: they are read while
        the device already runs this one, so the host's planning and reading never leave the
        device idle. Otherwise they are this step's own.

        A driver failure fails only the requests it touched (:mod:`~jax_vattention.engine.failures`).
        If the step raises, those requests have been failed already, and every event the step
        gathered is streamed by the next one.
        """
        events, self._undelivered = self._undelivered, []
        try:
            return self._step(events)
        except BaseException:
            self._undelivered = events + self._undelivered
            raise

    def _step(self, events: list[TokenEvent]) -> list[TokenEvent]:
        mapped_before = self.manager.counters()["pages_mapped_total"]
        plan = self._plan(events)
        reads = [self._in_flight] if self._in_flight is not None else []
        if not plan.empty:
            dispatched = self._dispatch(plan, events, mapped_before)
            if dispatched is not None:
                self._in_flight = dispatched
                if not self.config.pipeline or dispatched.synchronous:
                    reads.append(dispatched)
        for previous in reads:
            if previous is self._in_flight:
                self._in_flight = None
            events += self._read(previous)
        self.stats.steps += 1
        self.stats.sample_memory(time.perf_counter(), self.manager.counters()["mapped_bytes"])
        if self.memory.sharing_grew:   # only a shared admission or a fork maps a page twice
            self.memory.sharing_grew = False
            self.stats.peak_bytes_saved = max(self.stats.peak_bytes_saved, self.manager.stats()["bytes_saved"])
        return events

    def stream(self) -> Iterator[TokenEvent]:
        """Runs until every submitted request is done, yielding tokens as they come."""
        while not self.idle:
            yield from self.step()

    def run(self, callback: Callable[[TokenEvent], None] | None = None) -> dict[int, list[int]]:
        """Runs until idle; returns every request's tokens by id (and calls ``callback`` per event).

        A request that failed has the tokens it streamed before; its error is in :attr:`failed`."""
        outputs: dict[int, list[int]] = collections.defaultdict(list)
        for event in self.stream():
            tokens = outputs[event.request_id]  # a failed request keeps what it streamed
            if event.error is None:
                tokens.append(event.token)
            if callback is not None:
                callback(event)
        return dict(outputs)

    def _plan(self, events: list[TokenEvent]) -> StepPlan:
        """The next step's plan with its growth mapped; preempts (or fails a lone request) when the
        budget cannot cover it. Failure events go to ``events``."""
        admit = self._admit
        for prefill, error in self.groups.fork_ready():
            log.warning("forking the samples of request %d failed in the driver (%s): they fail",
                        prefill.request_id, error)
            events.extend(self._fail(prefill, error))
        while True:
            self.memory.blocked = False
            plan = self.scheduler.schedule(admit)
            if self.speculator is not None:
                plan = self.speculator.without_unverified(plan)
            if plan.empty and self.scheduler.waiting and not self.scheduler.running and self.memory.blocked:
                # Nothing runs that could free pages for the first waiting request: fail it alone.
                state = self.scheduler.waiting.popleft()
                events.extend(self._fail(state, self.memory.admit_error))
                continue
            waiting = self.scheduler.waiting
            if waiting and waiting[0].admission_failures >= ADMISSION_ATTEMPTS:
                events.extend(self._fail(waiting.popleft(), self.memory.admit_error))   # tried enough
                continue
            if plan.empty:
                return plan
            try:
                return self._grow(plan)
            except DriverError:
                return self._grow_each(plan, events)
            except OutOfPagesError as error:
                victim = self.scheduler.youngest()
                if len(self.scheduler.running) <= 1:
                    events.extend(self._fail(victim, error))
                else:
                    self._preempt(victim)
                admit = lambda state: None  # noqa: E731  (no admission into a step that preempted)

    def _grow(self, plan: StepPlan) -> StepPlan:
        """Maps the plan's growth, with proposals for the requests that speculate; where the budget
        cannot cover the proposals, the plan runs without them (raises as :meth:`CacheMemory.grow`)."""
        if self.speculator is None:
            self.memory.grow(plan)
            return plan
        proposed = self.speculator.propose(plan)
        try:
            self.memory.grow(proposed)
            return proposed
        except OutOfPagesError:
            if not proposed.proposals:
                raise
        self.memory.grow(plan)
        return plan

    def _admit(self, state: RequestState) -> int | None:
        """The scheduler's admission callback: :meth:`CacheMemory.admit`, recording the batch an
        ideal allocator would run when the budget stops it."""
        slot = self.groups.admit(state, lambda forks: self.memory.admit(state, self.scheduler.waiting, forks))
        if slot is None and self.memory.blocked:
            self.memory.record_memory_bound(list(self.scheduler.running.values()), self.scheduler.waiting)
        return slot

    def _grow_each(self, plan: StepPlan, events: list[TokenEvent]) -> StepPlan:
        """After the driver failed to map a step's growth (which changed nothing): each slot's growth
        on its own; a request whose growth fails again fails alone, and the plan runs without it."""
        self.stats.step_failures += 1
        failed = grow_each(self.manager, plan.growth(self.manager.config.max_batch))
        for slot, error in failed.items():
            log.warning("mapping slot %d's growth failed in the driver (%s): its request fails", slot, error)
            events.extend(self._fail(self.scheduler.running[slot], error))
        if not failed:
            return plan
        return dataclasses.replace(plan, decodes=tuple(s for s in plan.decodes if not s.done),
                                   chunks=tuple(c for c in plan.chunks if not c.state.done),
                                   admitted=tuple(s for s in plan.admitted if not s.done))

    def _dispatch(self, plan: StepPlan, events: list[TokenEvent], mapped_before: int) -> _InFlight | None:
        """Dispatches a planned (and mapped) step; a request whose row cannot be built fails alone.

        Returns the step in flight (None when no request was left to run). The requests' cache
        lengths advance at once: the next step is planned on top of this one.
        """
        knobs = {}
        for state in {id(s): s for s in (*plan.decodes, *(c.state for c in plan.chunks))}.values():
            try:
                if state.row is None:
                    state.row = request_row(state.request, bias_width=self.config.max_logit_bias,
                                            stop_width=self.config.max_stop_tokens)
                knobs[state.request_id] = state.row
            except (TypeError, ValueError, OverflowError) as error:
                events.extend(self._fail(state, error))
        if not knobs:
            return None
        if len(knobs) < len({*(s.request_id for s in plan.decodes), *(c.state.request_id for c in plan.chunks)}):
            # Failed requests left their slots: their growth stays mapped, unused, with the slot.
            plan = dataclasses.replace(plan, decodes=tuple(s for s in plan.decodes if s.request_id in knobs),
                                       chunks=tuple(c for c in plan.chunks if c.state.request_id in knobs))
        try:
            return self._run_plan(plan, knobs, mapped_before)
        except Exception as error:
            if self._can_free():   # else nothing can be served: the engine's caller sees the manager
                for state in {id(s): s for s in (*plan.decodes, *(c.state for c in plan.chunks))}.values():
                    if not state.done:
                        self._undelivered.extend(self._fail(state, error))
            raise

    def _run_plan(self, plan: StepPlan, knobs: dict, mapped_before: int) -> _InFlight:
        """Dispatches ``plan`` (its rows built from ``knobs``); raises with nothing dispatched."""
        self.memory.check_plan(plan)
        inputs = self.runner.inputs(plan, knobs)
        previous = self._in_flight.tokens if self._in_flight is not None else self._no_tokens
        cache = self.manager.cache
        calling = time.perf_counter()
        # The step maps nothing itself (its growth is mapped above, on the host): no mapping op can fail in it.
        tokens, outputs, self._sampler, self.manager.cache = self.runner.run(cache, inputs, previous,
                                                                             self._sampler)
        dispatched = time.perf_counter()
        # The rows of the step's outputs that carry a token: each decode row's and each last chunk's;
        # a request that verifies proposals has its tokens in its verification row.
        verifies = tuple((state, state.slot) for state in plan.decodes if state.request_id in plan.proposals)
        rows = [(state, state.slot) for state in plan.decodes if state.request_id not in plan.proposals]
        rows += [(chunk.state, self.runner.max_batch + row) for row, chunk in enumerate(plan.chunks) if chunk.last]
        for state, row in rows:
            state.pending_row = row
            state.in_flight += 1
        for state, _ in verifies:
            state.in_flight += 1
        written = self.prefixes.dispatched(plan)
        self.scheduler.completed(plan)
        self.stats.prefill_tokens += sum(chunk.count for chunk in plan.chunks)
        return _InFlight(plan, tokens, tuple(rows), dispatched, dispatched - calling,
                         self.manager.counters()["pages_mapped_total"] - mapped_before, self.memory.blocked, written,
                         outputs, verifies, self.speculator is not None and self.speculator.synchronous(plan))

    def _read(self, step: _InFlight) -> list[TokenEvent]:
        """Waits for a dispatched step's tokens (mapping ahead meanwhile, with overlap) and streams
        them; a request that finished or failed since drops its token."""
        events: list[TokenEvent] = []
        begin = max(step.dispatched, self._last_read)
        try:
            self.memory.map_ahead(step.tokens, begin, self.stats.recent_seconds(4))
            tokens = np.asarray(step.tokens)
            outputs = on_host(step.outputs)
        except Exception as error:
            # The step's requests end with the error, delivered by the next step; the error goes up.
            for state, _ in (*step.rows, *step.verifies):
                state.in_flight -= 1
                if not state.done and self._can_free():
                    self._undelivered.extend(self._fail(state, error))
            raise
        self._last_read = time.perf_counter()
        self.stats.record(StepRecord(
            len(step.plan.decodes), step.plan.tokens - len(step.plan.decodes), len(step.plan.admitted),
            self._last_read - begin, step.mapped_pages, step.blocked, step.dispatch_seconds))
        self.prefixes.read(step.written)   # it ran: the pages it completed can be shared
        for row, chunk in enumerate(step.plan.chunks):
            if not chunk.state.done:
                record_prompt_logprobs(outputs, row, chunk)
        for state, row in step.rows:
            state.in_flight -= 1
            if state.in_flight == 0:
                state.pending_row = None
            if not state.done:
                if row >= self.runner.max_batch:
                    self.stats.prefills += 1
                token = int(tokens[row])
                events.append(self._emit(state, token, sampled_logprob(outputs, state, row, token)))
        if self.speculator is not None:
            events += self._read_verified(step, outputs)
        return events

    def _read_verified(self, step: _InFlight, outputs: dict) -> list[TokenEvent]:
        """Streams each verification's accepted proposals and the target's own token after them
        (up to a stop token), lowers the slot's length past the rejected ones and publishes what
        the accepted ones completed; tells the speculator what each request gained."""
        events: list[TokenEvent] = []
        streamed, accepted = {}, {}
        for state, slot in step.verifies:
            state.in_flight -= 1
            if state.done:
                continue
            proposed = len(step.plan.proposals[state.request_id])
            kept = int(outputs["accepted"][slot])
            accepted[state.request_id] = kept
            self.stats.verified(proposed, kept)
            streamed[state.request_id] = 0
            for token in outputs["verify_tokens"][slot, :kept + 1].tolist():
                events.append(self._emit(state, token))
                streamed[state.request_id] += 1
                if state.done:    # a stop token, or its last token: the rest of the run is dropped
                    break
            if not state.done:
                state.computed += kept      # its last token and the accepted proposals are in the cache
                if kept < proposed:
                    self.manager.rewind(slot, state.computed)
                self.prefixes.read(((state, slot, state.preemptions, state.computed),))
        self.speculator.observe(step.plan, streamed, accepted)
        return events

    def _can_free(self) -> bool:
        """Whether failed requests can still give their slots back (the cache is neither lost nor
        its manager poisoned)."""
        return not self.manager.lost and not self.manager.counters()["poisoned"]

    def _fail(self, state: RequestState, error: Exception) -> list[TokenEvent]:
        """Ends one request with ``error`` (a sample group's prefill: its samples): it leaves its slot,
        and its stream's last event carries the error."""
        if state.slot is not None:
            self._retire(state, publish=False)
        else:
            state.done = True
            self.prefixes.leave(state, publish=False, done=True)
        events = []
        for ended in self.groups.ended(state):
            ended.done = True
            self.failed[ended.request_id] = error
            events.append(TokenEvent(ended.request_id, -1, True, error=f"{type(error).__name__}: {error}"))
        return events

    def _emit(self, state: RequestState, token: int, logprob: TokenLogprob | None = None) -> TokenEvent:
        """Records a generated token; on the request's last one, retires it from its slot (or from
        the queue, where a preemption put it while the token was in flight)."""
        state.generated.append(token)
        stopped = token in state.row.stops and len(state.generated) > state.request.min_tokens
        finished = stopped or state.remaining + state.in_flight <= 0
        if finished:
            if state.slot is None and state in self.scheduler.waiting:
                self.scheduler.waiting.remove(state)
            self._retire(state, publish=True)
        self.stats.tokens += 1
        prompt_logprobs = take_prompt_logprobs(state) if len(state.generated) == 1 else None
        if logprob is not None:
            state.cumulative_logprob += logprob.logprob
        return TokenEvent(state.request_id, token, finished, logprobs=logprob,
                          cumulative_logprob=state.cumulative_logprob if logprob is not None else None,
                          prompt_logprobs=prompt_logprobs)

    def _preempt(self, state: RequestState) -> None:
        slot = state.slot
        # Its pages go to the prefix cache: evicted first if memory stays short, else shared when it
        # comes back.
        self.prefixes.leave(state, publish=True, done=False)
        self.scheduler.preempt(state)
        self.memory.release(slot)
        self.memory.release_held(state)
        self.stats.preemptions += 1

    def _retire(self, state: RequestState, *, publish: bool) -> None:
        """Takes ``state`` off its slot for good; with ``publish`` its written pages stay in the prefix
        cache (not for a failed request: its last step may not have run)."""
        state.done = True
        slot = state.slot
        if self.speculator is not None:
            self.speculator.forget(state)
        self.prefixes.leave(state, publish=publish, done=True)
        self.scheduler.finish(state)
        if slot is not None:
            self.memory.release(slot)
        self.memory.release_held(state)
