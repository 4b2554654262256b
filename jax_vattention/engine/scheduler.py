"""What each engine step runs: the decode set, the prefill chunks, admissions and preemptions.

Pure Python over :class:`~jax_vattention.engine.requests.RequestState`s, no device
and no page manager: memory enters only through the ``admit`` callback (can this
request get a slot and pages now?), so the decisions are testable on the CPU with
exact slot ids and chunk boundaries.

A step (Sarathi-Serve's stall-free batching) holds at most ``token_budget`` tokens:
first one decode token for every running request whose prompt is done, then chunks
of prompts still prefilling (oldest admission first), then chunks of newly
admitted requests, each cut into rows of at most ``chunk_tokens`` and at most
``chunk_rows`` rows in all. A prompt may start at an offset (``RequestState.computed``
at admission: tokens already in the slot's cache, e.g. a shared prefix), and end short of
its context (``RequestState.holds_back``: a sample group's prefill leaves the last prompt
token to its samples, :mod:`~jax_vattention.engine.groups`).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Callable

from jax_vattention.engine.requests import RequestState


@dataclasses.dataclass(frozen=True)
class Chunk:
    """``count`` prompt tokens of ``state``'s context from position ``start``, in its slot.

    ``last`` when the chunk ends the context: its logits sample the request's next token.
    """

    state: RequestState
    start: int
    count: int
    last: bool

    @property
    def slot(self) -> int:
        return self.state.slot

    def tokens(self) -> list[int]:
        return self.state.context[self.start:self.start + self.count]


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """One step: the requests that decode (one token each) and the prefill chunks, in row order.

    ``proposals``: request id -> the tokens proposed after a decoding request's last token
    (speculative decoding, :mod:`~jax_vattention.engine.speculation`); the step feeds them after
    it and verifies them.
    """

    decodes: tuple[RequestState, ...]
    chunks: tuple[Chunk, ...]
    admitted: tuple[RequestState, ...]
    proposals: dict = dataclasses.field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not self.decodes and not self.chunks

    @property
    def tokens(self) -> int:
        return len(self.decodes) + sum(chunk.count for chunk in self.chunks)

    def growth(self, slots: int) -> list[int]:
        """Tokens each slot gains in the step (``[slots]``): the host maps them before dispatch."""
        counts = [0] * slots
        for state in self.decodes:
            counts[state.slot] += 1 + len(self.proposals.get(state.request_id, ()))
        for chunk in self.chunks:
            counts[chunk.slot] += chunk.count
        return counts


class Scheduler:
    """Decides every step's plan; owns the waiting queue and the running requests by slot.

    Parameters
    ----------
    max_batch : slots
    token_budget : tokens per step at most (decodes plus chunk tokens)
    chunk_tokens : the width of a prefill row
    chunk_rows : prefill rows per step at most

    Example::

        scheduler = Scheduler(max_batch=4, token_budget=16, chunk_tokens=8, chunk_rows=2)
        scheduler.add(state)
        plan = scheduler.schedule(admit=lambda state: free_slots.pop())
    """

    def __init__(self, *, max_batch: int, token_budget: int, chunk_tokens: int, chunk_rows: int):
        if min(max_batch, token_budget, chunk_tokens, chunk_rows) < 1:
            raise ValueError("max_batch, token_budget, chunk_tokens and chunk_rows must be at least 1")
        self.max_batch = max_batch
        self.token_budget = token_budget
        self.chunk_tokens = chunk_tokens
        self.chunk_rows = chunk_rows
        self.waiting: collections.deque[RequestState] = collections.deque()
        self.running: dict[int, RequestState] = {}   # by slot, in admission order
        self.steps = 0

    def add(self, state: RequestState) -> None:
        """Queues a request at the back."""
        self.waiting.append(state)

    def schedule(self, admit: Callable[[RequestState], int | None]) -> StepPlan:
        """The next step's plan; admits waiting requests that fit.

        ``admit(state)`` gives the request a slot (and its pages) and returns the slot, or None
        when memory is short or the request must wait (back-pressure, or a prefix a running request
        is computing: admission stops there). It may set ``state.computed`` (a shared prefix): the
        request's chunks start there. It is asked only while a slot is free and the step has room
        for a chunk.
        """
        # A request whose last token is in flight (``remaining`` 0) waits for it, holding its slot.
        decodes = tuple(s for s in self.running.values() if s.prefilled and s.remaining > 0)
        room = self.token_budget - len(decodes)
        rows = self.chunk_rows
        chunks: list[Chunk] = []
        admitted: list[RequestState] = []

        def take(state: RequestState) -> None:
            nonlocal room, rows
            start = state.computed + sum(c.count for c in chunks if c.state is state)
            end, context = state.prefill_end, len(state.context)
            while room > 0 and rows > 0 and start < end:
                count = min(self.chunk_tokens, room, end - start)
                chunks.append(Chunk(state, start, count, start + count == context))
                start, room, rows = start + count, room - count, rows - 1

        for state in self.running.values():
            if not state.prefilled:
                take(state)
        while self.waiting and room > 0 and rows > 0 and len(self.running) < self.max_batch:
            if self.waiting[0].in_flight:
                break  # preempted with a token in flight: its context is complete once that is read
            slot = admit(self.waiting[0])
            if slot is None:
                break
            state = self.waiting.popleft()
            state.slot = slot
            state.admitted_at = self.steps
            self.running[slot] = state
            admitted.append(state)
            take(state)
        return StepPlan(decodes, tuple(chunks), tuple(admitted))

    def youngest(self) -> RequestState | None:
        """The request to preempt first: the latest admitted."""
        if not self.running:
            return None
        return max(self.running.values(), key=lambda s: (s.admitted_at, s.request_id))

    def preempt(self, state: RequestState) -> None:
        """Takes ``state`` off its slot and requeues it first; its context is recomputed."""
        self.running.pop(state.slot)
        state.slot = None
        state.computed = 0
        state.prefilled = False
        state.enters_from = None
        state.preemptions += 1
        self.waiting.appendleft(state)

    def finish(self, state: RequestState) -> None:
        """Takes a finished (or failed, or cancelled) request off its slot."""
        if state.slot is not None:
            self.running.pop(state.slot, None)
        state.slot = None

    def completed(self, plan: StepPlan) -> None:
        """Advances the requests' cache lengths by what ``plan`` wrote."""
        for state in plan.decodes:
            state.computed += 1
            state.enters_from = None   # its slot's counts were started by the step (StepInputs.fresh)
        for chunk in plan.chunks:
            chunk.state.computed = chunk.start + chunk.count
            chunk.state.prefilled = chunk.state.prefilled or chunk.last
        self.steps += 1
