"""Continuous batching over a virtual KV cache.

Slots are the cache's batch rows. Each :meth:`Engine.step` admits waiting
requests into free slots (one jitted prefill each), runs one jitted chunk of
``chunk_steps`` decode steps over all slots, streams the new tokens and
retires finished requests. The paper's memory policies are switches of
:class:`EngineConfig`, so each can be measured:

* ``overlap``: while the device computes a chunk, the host maps, one slot's
  page at a time and until the chunk is done, the pages the next chunks will
  need (:meth:`CacheManager.prefetch_while_busy`), so the in-graph mapping op
  finds them ready;
* ``deferred_reclamation``: a finished request's pages stay with its slot for
  the next request there; they are unmapped only under memory pressure, after
  the device work that could touch them has completed. Off: unmapped at once;
* ``eager_allocation``: a request's first chunk of pages is mapped with its
  prompt, before it is admitted.

Memory pressure: admission stops at the first request whose pages the budget
cannot cover; when a chunk's growth cannot be covered, the youngest running
request is preempted (its pages freed, the request requeued to be recomputed
from its prompt and what it already generated). No request is lost, and
tokens already streamed are not streamed again.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_vattention._core import OutOfPagesError
from jax_vattention.engine.requests import Request, RequestState, TokenEvent
from jax_vattention.engine.steps import decode_chunk_fn, prefill_fn
from jax_vattention.generate import batch_bucket, prompt_bucket
from jax_vattention.manager import CacheManager


# Mapping a page takes ~50 µs of host time per buffer (2.9 ms for a slot of a 32-layer
# per-layer cache), and a one-step chunk leaves the host only a few milliseconds while the
# device computes: mapping that far ahead spreads a crossing over enough steps to hide it.
MIN_PREFETCH_TOKENS = 16


def expected_end(start: float, recent_seconds) -> float | None:
    """When device work dispatched at ``start`` should end, going by the fastest of the last
    few like it (``recent_seconds``, oldest first): a slow one may have been slowed by mapping
    that overran it, and must not let the next mapping overrun further. None without a record."""
    recent = recent_seconds[-4:]
    return start + min(recent) if len(recent) else None


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """How the engine runs.

    chunk_steps : decode steps per compiled chunk (K)
    max_prefill_batch : requests prefilled together at most (prefill compiles once per power of two
        up to it, times the prompt buckets)
    backend : attention backend (``xla``, ``cudnn``, ``pallas``)
    overlap, deferred_reclamation, eager_allocation : the memory policies (module docstring)
    prefetch_tokens : with overlap, how far ahead of every running slot the host maps while a
        chunk runs (default: two chunks, and at least ``MIN_PREFETCH_TOKENS`` so that short chunks
        leave enough device time to map a page in; at most one chunk while admission is held back
        by memory)
    max_stop_tokens : width of the per-slot stop-token table
    seed : sampling seed
    """

    chunk_steps: int = 8
    max_prefill_batch: int = 8
    backend: str = "xla"
    overlap: bool = True
    deferred_reclamation: bool = True
    eager_allocation: bool = True
    prefetch_tokens: int | None = None
    max_stop_tokens: int = 4
    seed: int = 0

    @property
    def prefetch_horizon(self) -> int:
        """Tokens mapped ahead of every running slot when memory allows."""
        return self.prefetch_tokens or max(2 * self.chunk_steps, MIN_PREFETCH_TOKENS)

    def __post_init__(self):
        if self.prefetch_tokens is not None and self.prefetch_tokens < 1:
            raise ValueError(f"prefetch_tokens must be at least 1 (or None for the default), "
                             f"got {self.prefetch_tokens}")
        if self.chunk_steps < 1:
            raise ValueError(f"chunk_steps must be at least 1, got {self.chunk_steps}")
        if self.max_prefill_batch < 1:
            raise ValueError(f"max_prefill_batch must be at least 1, got {self.max_prefill_batch}")
        if self.max_stop_tokens < 1:
            raise ValueError(f"max_stop_tokens must be at least 1, got {self.max_stop_tokens}")


@dataclasses.dataclass
class EngineStats:
    """What the engine did, for reports."""

    steps: int = 0
    chunks: int = 0
    prefills: int = 0
    preemptions: int = 0
    tokens: int = 0
    prefetch_seconds: float = 0.0     # time spent mapping on the host while the device computed
    chunk_seconds: list = dataclasses.field(default_factory=list)
    chunk_crossed_page: list = dataclasses.field(default_factory=list)
    chunk_mapped_pages: list = dataclasses.field(default_factory=list)   # in the graph or ahead, during the chunk
    chunk_after_prefill: list = dataclasses.field(default_factory=list)   # prefills queued before the chunk
    blocked_by_memory: list = dataclasses.field(default_factory=list)     # admission stopped by the budget
    # At each admission the budget stopped: (requests running, requests an ideal allocator would run).
    memory_bound_batches: list = dataclasses.field(default_factory=list)
    mapped_bytes: list = dataclasses.field(default_factory=list)   # (time, bytes) after each step
    running: list = dataclasses.field(default_factory=list)        # running requests after each admission


class Engine:
    """Serves requests over one :class:`CacheManager`'s cache.

    Example::

        engine = Engine(model, manager, EngineConfig(chunk_steps=8))
        request_id = engine.submit(Request(prompt=[1, 2, 3], max_new_tokens=16))
        for event in engine.stream():
            print(event.request_id, event.token, event.finished)
    """

    def __init__(self, model, manager: CacheManager, config: EngineConfig = EngineConfig()):
        model_config = model.config
        cache_config = manager.config
        if (model_config.num_layers, model_config.num_kv_heads, model_config.head_dim) != (
                cache_config.num_layers, cache_config.kv_heads, cache_config.head_dim):
            raise ValueError("the cache's layers, KV heads and head_dim must match the model's")
        self.model = model
        self.manager = manager
        self.config = config
        self.stats = EngineStats()
        self._graphdef, self._state = nnx.split(model)
        slots = cache_config.max_batch
        self._waiting: collections.deque[RequestState] = collections.deque()
        self._by_slot: dict[int, RequestState] = {}
        self._next_id = 0
        self._blocked = False           # the last admission stopped at the page budget
        self._key = jax.random.key(config.seed)
        self._last = np.zeros(slots, np.int32)
        self._lengths = np.zeros(slots, np.int32)
        self._generated = np.zeros(slots, np.int32)
        self._max_new = np.zeros(slots, np.int32)
        self._stops = np.full((slots, config.max_stop_tokens), -1, np.int32)
        self._temperature = np.zeros(slots, np.float32)
        self._top_k = np.zeros(slots, np.int32)
        self._top_p = np.ones(slots, np.float32)
        self._prefill_step = prefill_fn(self._graphdef, config.backend)
        self._decode = decode_chunk_fn(self._graphdef, config.backend, config.chunk_steps)

    # ----------------------------------------------------------------- requests
    def submit(self, request: Request) -> int:
        """Queues a request; returns its id. Raises ``ValueError`` for one that can never be served."""
        prompt = list(request.prompt)
        vocab = self.model.config.vocab_size
        max_len = self.manager.config.max_len
        if not prompt:
            raise ValueError("the prompt is empty")
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise ValueError(f"the prompt has a token id outside [0, {vocab})")
        if request.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {request.max_new_tokens}")
        if len(prompt) + request.max_new_tokens - 1 > max_len:
            raise ValueError(f"a prompt of {len(prompt)} tokens with max_new_tokens={request.max_new_tokens} "
                             f"needs more than max_len={max_len} positions")
        if len(request.stop_tokens) > self.config.max_stop_tokens:
            raise ValueError(f"at most {self.config.max_stop_tokens} stop tokens (EngineConfig.max_stop_tokens)")
        needed = self._pages_for(len(prompt) + request.max_new_tokens + self.config.chunk_steps)
        budget = self.manager.stats()["budget_pages"]
        if needed > budget:
            raise ValueError(f"the request needs {needed} pages at most but the whole budget is {budget} pages")
        state = RequestState(self._next_id, dataclasses.replace(request, prompt=prompt), time.perf_counter())
        self._next_id += 1
        self._waiting.append(state)
        return state.request_id

    def cancel(self, request_id: int) -> bool:
        """Drops a submitted request that has not finished; returns whether there was one.

        A waiting request leaves the queue; a running one gives back its slot and pages through
        the same path a finished request takes (:meth:`_retire`). Its tokens already streamed
        stay streamed; it yields no more. For a client that went away.
        """
        for state in self._waiting:
            if state.request_id == request_id:
                self._waiting.remove(state)
                return True
        for slot, state in self._by_slot.items():
            if state.request_id == request_id:
                self._retire(slot)
                state.slot = None
                return True
        return False

    @property
    def idle(self) -> bool:
        return not self._waiting and not self._by_slot

    @property
    def waiting(self) -> int:
        """Requests submitted and not yet admitted (or preempted and requeued)."""
        return len(self._waiting)

    @property
    def running(self) -> int:
        """Requests holding a slot."""
        return len(self._by_slot)

    def _pages_for(self, tokens: int) -> int:
        token_bytes = self.manager.config.token_bytes
        return -(-min(tokens, self.manager.capacity) * token_bytes // self.manager.page_bytes) * \
            self.manager.config.num_buffers

    # ------------------------------------------------------------------- steps
    def step(self) -> list[TokenEvent]:
        """Admits what fits, runs one decode chunk and retires finished requests."""
        prefills = self.stats.prefills
        events = self._admit()
        if self._by_slot:
            events += self._decode_chunk()
            self.stats.chunk_after_prefill.append(self.stats.prefills > prefills)
        self.stats.steps += 1
        self.stats.mapped_bytes.append((time.perf_counter(), self.manager.stats()["mapped_bytes"]))
        return events

    def stream(self) -> Iterator[TokenEvent]:
        """Runs until every submitted request is done, yielding tokens as they come."""
        while not self.idle:
            yield from self.step()

    def run(self, callback: Callable[[TokenEvent], None] | None = None) -> dict[int, list[int]]:
        """Runs until idle; returns every request's tokens by id (and calls ``callback`` per token)."""
        outputs: dict[int, list[int]] = collections.defaultdict(list)
        for event in self.stream():
            outputs[event.request_id].append(event.token)
            if callback is not None:
                callback(event)
        return dict(outputs)

    def _admit(self) -> list[TokenEvent]:
        """Places waiting requests in free slots while pages last, then prefills them in one call."""
        admitted: list[RequestState] = []
        blocked = False
        lookahead = self.config.chunk_steps if self.config.eager_allocation else 0
        while (self._waiting and len(self._by_slot) + len(admitted) < self.manager.config.max_batch
               and len(admitted) < self.config.max_prefill_batch):
            state = self._waiting[0]
            try:
                slot = self.manager.alloc(len(state.context), lookahead=min(lookahead, state.remaining))
            except OutOfPagesError:
                if not self._by_slot and not admitted:
                    raise RuntimeError("an idle engine cannot admit a request that passed submit(): "
                                       "the page budget accounting is inconsistent")
                blocked = True
                break  # back-pressure: wait for running requests to finish
            self._waiting.popleft()
            state.slot = slot
            state.admitted_at = self.stats.steps
            admitted.append(state)
        if blocked:
            holding = [*self._by_slot.values(), *admitted]
            self.stats.memory_bound_batches.append((len(holding), self._ideal_batch(holding)))
        events = self._prefill(admitted) if admitted else []
        self.stats.running.append(len(self._by_slot))
        self.stats.blocked_by_memory.append(blocked)
        self._blocked = blocked
        return events

    def _ideal_batch(self, holding: list[RequestState]) -> int:
        """The requests an ideal allocator would run now.

        It holds exact tokens, with no page rounding and nothing mapped ahead:
        each request's context plus what the coming chunk writes (every
        allocator must hold those before the chunk runs). Besides the
        ``holding`` requests (running or just admitted), it admits the waiting
        requests in order while they fit in the rest of the budget and slots
        are free.
        """
        steps = self.config.chunk_steps
        config, stats = self.manager.config, self.manager.stats()
        budget_tokens = stats["budget_pages"] * stats["page_bytes"] // (config.token_bytes * config.num_buffers)
        free_tokens = budget_tokens - stats["used_tokens"] - sum(min(steps, s.remaining) for s in holding)
        ideal = len(holding)
        for state in self._waiting:
            needed = len(state.context) + min(steps, state.remaining)
            if ideal >= config.max_batch or needed > free_tokens:
                break
            free_tokens -= needed
            ideal += 1
        return ideal

    def _prefill(self, states: list[RequestState]) -> list[TokenEvent]:
        """One jitted prefill of the admitted requests, padded to a (batch, prompt) bucket."""
        max_batch = self.manager.config.max_batch
        contexts = [state.context for state in states]
        rows = batch_bucket(len(states), min(max_batch, self.config.max_prefill_batch))
        width = prompt_bucket(max(len(context) for context in contexts), self.manager.capacity)
        tokens = np.zeros((rows, width), np.int32)
        lengths = np.zeros(rows, np.int32)
        slots = np.full(rows, max_batch, np.int32)           # padding rows: an out-of-range slot, dropped
        temperature = np.zeros(rows, np.float32)
        top_k = np.zeros(rows, np.int32)
        top_p = np.ones(rows, np.float32)
        for row, (state, context) in enumerate(zip(states, contexts)):
            tokens[row, :len(context)] = context
            lengths[row] = len(context)
            slots[row] = state.slot
            temperature[row] = state.request.temperature
            top_k[row] = state.request.top_k
            top_p[row] = state.request.top_p
        self._key, key = jax.random.split(self._key)
        first, self.manager.cache = self._prefill_step(
            self._state, self.manager.cache, jnp.asarray(tokens), jnp.asarray(lengths), jnp.asarray(slots),
            jnp.asarray(temperature), jnp.asarray(top_k), jnp.asarray(top_p), key)
        first = np.asarray(first)
        self.stats.prefills += len(states)
        events = []
        for row, (state, context) in enumerate(zip(states, contexts)):
            events.append(self._start(state, len(context), int(first[row])))
        return events

    def _start(self, state: RequestState, context_len: int, token: int) -> TokenEvent:
        """Records a request's first token; it either finishes now or joins the decode batch."""
        request, slot = state.request, state.slot
        event = self._emit(state, token)
        if not event.finished:
            self._by_slot[slot] = state
            self._last[slot] = token
            self._lengths[slot] = context_len
            self._generated[slot] = len(state.generated)
            self._max_new[slot] = request.max_new_tokens
            self._stops[slot] = -1
            self._stops[slot, :len(request.stop_tokens)] = request.stop_tokens
            self._temperature[slot] = request.temperature
            self._top_k[slot] = request.top_k
            self._top_p[slot] = request.top_p
        return event

    def _emit(self, state: RequestState, token: int) -> TokenEvent:
        """Records a generated token; on the request's last one, retires it from its slot."""
        state.generated.append(token)
        finished = token in state.request.stop_tokens or state.remaining <= 0
        if finished:
            self._retire(state.slot)
        self.stats.tokens += 1
        return TokenEvent(state.request_id, token, finished)

    def _reserve_chunk(self) -> None:
        """Makes sure the next chunk's growth is covered, preempting the youngest requests if not."""
        while True:
            try:
                self.manager.reserve_growth(self.config.chunk_steps)
                return
            except OutOfPagesError:
                if len(self._by_slot) <= 1:
                    raise RuntimeError("a single request's growth exceeds the page budget") from None
                youngest = max(self._by_slot.values(), key=lambda s: (s.admitted_at, s.request_id))
                self._preempt(youngest)

    def _preempt(self, state: RequestState) -> None:
        self._retire(state.slot)
        state.slot = None
        state.preemptions += 1
        self.stats.preemptions += 1
        self._waiting.appendleft(state)

    def _decode_chunk(self) -> list[TokenEvent]:
        self._reserve_chunk()
        running = np.zeros(len(self._lengths), bool)
        running[list(self._by_slot)] = True
        lengths_before = self._lengths.copy()
        mapped_before = self.manager.stats()["pages_mapped_total"]
        start = time.perf_counter()
        self._key, key = jax.random.split(self._key)
        outputs = self._decode(
            self._state, self.manager.cache, jnp.asarray(self._last), jnp.asarray(self._lengths), jnp.asarray(running),
            jnp.asarray(self._generated), jnp.asarray(self._max_new), jnp.asarray(self._stops),
            jnp.asarray(self._temperature), jnp.asarray(self._top_k), jnp.asarray(self._top_p), key)
        self.manager.cache = outputs[0]
        if self.config.overlap:
            # The device is busy with this chunk: map the next chunks' pages until it is done (or,
            # going by the last chunk, about to be), so the mapping never delays what follows.
            map_seconds_before = self.manager.stats()["map_seconds"]
            deadline = expected_end(start, self.stats.chunk_seconds)
            self.manager.prefetch_while_busy(outputs[5], self._prefetch_tokens(), deadline)
            self.stats.prefetch_seconds += self.manager.stats()["map_seconds"] - map_seconds_before
        last, lengths, generated, tokens = (np.asarray(outputs[i]) for i in (1, 2, 4, 5))
        self.stats.chunk_seconds.append(time.perf_counter() - start)
        self.stats.chunk_crossed_page.append(self._crossed_page(lengths_before, lengths, running))
        self.stats.chunk_mapped_pages.append(self.manager.stats()["pages_mapped_total"] - mapped_before)
        self.stats.chunks += 1
        self._last[:], self._lengths[:], self._generated[:] = last, lengths, generated
        events = []
        for slot, state in list(self._by_slot.items()):
            for token in tokens[slot]:
                if token < 0:
                    break
                events.append(self._emit(state, int(token)))
                if events[-1].finished:
                    break
        return events

    def _prefetch_tokens(self) -> int:
        """How far ahead to map: the config's horizon, but only the next chunk while admission is
        held back by memory, so the budget goes to requests, not early pages."""
        tokens = self.config.prefetch_horizon
        steps = self.config.chunk_steps
        return min(tokens, steps) if self._blocked else tokens

    def _crossed_page(self, before: np.ndarray, after: np.ndarray, running: np.ndarray) -> bool:
        """Did a running slot write its first token into a new page during the chunk?"""
        tokens_per_page = self.manager.page_bytes / self.manager.config.token_bytes
        pages_before = np.ceil(before / tokens_per_page)
        pages_after = np.ceil(after / tokens_per_page)
        return bool(np.any(running & (pages_after > pages_before)))

    def _retire(self, slot: int) -> None:
        self._by_slot.pop(slot, None)
        self.manager.free(slot)
        self._lengths[slot] = 0
        if not self.config.deferred_reclamation:
            self.manager.reclaim()

