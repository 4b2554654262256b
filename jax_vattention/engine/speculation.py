"""Speculative decoding in the engine: which requests propose tokens, how many, and when to stop.

A decode step is bound by reading the weights: verifying ``k`` proposed tokens of a request in
the step (``k + 1`` query rows, :mod:`~jax_vattention.decode.verification`) costs about what one
token costs, so every accepted proposal is a token nearly for free. The :class:`Speculator` puts
proposals into a step's plan (:attr:`StepPlan.proposals <jax_vattention.engine.scheduler.StepPlan>`)
and watches what each request gains by them:

* a request proposes only when its last token is on the host (nothing of it in flight): a
  proposer reads the whole context. So a step with a request that speculates is read at once,
  not pipelined (:meth:`Speculator.synchronous`), and the request proposes again in the next;
* ``k`` adapts per request: one more than the proposals its recent verifications accepted on
  average, at most ``num_tokens`` (a proposal that is rejected costs a query row of the step);
* a request whose recent steps gained too little (fewer than :data:`OFF_BELOW` tokens a step
  over :data:`WINDOW` steps, no proposal counting as one token) stops speculating, so its steps
  are pipelined again: on input that nothing copies, speculation costs only those first steps.
  It tries again after :data:`RETRY_AFTER` steps, twice as long after each failure.

Why the engine reads a speculating request's step at once: the next proposal starts after the
target's own token and the accepted run, which only the step's output says.

Proposers (:class:`~jax_vattention.engine.proposers.Proposer`): prompt lookup
(:class:`~jax_vattention.engine.proposers.NgramProposer`, ``speculate="ngram"``) or a draft model
with its own cache (:class:`~jax_vattention.engine.draft.DraftProposer`, ``speculate="draft"``).
"""

from __future__ import annotations

import collections
import dataclasses

from jax_vattention.engine.proposers import NgramProposer, Proposer
from jax_vattention.engine.requests import RequestState
from jax_vattention.engine.scheduler import StepPlan

# Steps a request's gain is judged over, and the tokens a step it must average to go on speculating.
WINDOW = 16
OFF_BELOW = 1.2
# Steps a request that stopped speculating waits before it tries again (doubled after each stop).
RETRY_AFTER = 32
METHODS = ("ngram", "draft")


@dataclasses.dataclass
class _Record:
    """One request's recent speculation: tokens per step while speculating, accepted proposals per
    verification, and how long it waits while switched off."""

    gains: collections.deque = dataclasses.field(default_factory=lambda: collections.deque(maxlen=WINDOW))
    accepted: collections.deque = dataclasses.field(default_factory=lambda: collections.deque(maxlen=4))
    off_for: int = 0      # steps left before it speculates again (0: it speculates)
    stops: int = 0        # times it was switched off


class Speculator:
    """Proposes tokens for a step's decoding requests and adapts each request's speculation.

    Parameters
    ----------
    proposer : a :class:`~jax_vattention.engine.proposers.Proposer`
    num_tokens : the most tokens a request proposes a step (``k``)
    max_len : the cache's slot length (a proposal never writes past it)

    Example::

        speculator = Speculator(NgramProposer(), num_tokens=4, max_len=2048)   # or a DraftProposer
        plan = speculator.propose(plan)        # plan.proposals: request id -> tokens
        ...                                    # the step runs; the engine reads its tokens
        speculator.observe(plan, {request_id: tokens_streamed})
    """

    def __init__(self, proposer: Proposer, *, num_tokens: int, max_len: int):
        if num_tokens < 1:
            raise ValueError(f"num_tokens must be at least 1, got {num_tokens}")
        self.proposer = proposer
        self.num_tokens = num_tokens
        self.max_len = max_len
        self._records: dict[int, _Record] = {}

    def _record(self, state: RequestState) -> _Record:
        return self._records.setdefault(state.request_id, _Record())

    def active(self, state: RequestState) -> bool:
        """Whether ``state`` speculates now (a request with no logprobs to report, not switched off)."""
        return state.request.logprobs is None and self._record(state).off_for == 0

    def tokens_for(self, state: RequestState) -> int:
        """How many tokens ``state`` may propose in its next step: adaptive ``k``, within what it may
        still generate (the target's own token comes with them) and the slot's length."""
        accepted = self._record(state).accepted
        k = self.num_tokens if not accepted else min(self.num_tokens, round(sum(accepted) / len(accepted)) + 1)
        return max(0, min(k, state.remaining - 1, self.max_len - state.computed - 1))

    def propose(self, plan: StepPlan) -> StepPlan:
        """``plan`` with proposals for its decoding requests that speculate, whose last token is on
        the host (none in flight) and that generated a token already.

        Why not before the first token: a forked sample (:mod:`~jax_vattention.engine.groups`) draws
        its first token in a decode row that feeds the prompt's last token, where a request of its
        own draws it in its last prefill chunk, which proposes nothing. A seeded draw's keys depend
        on whether a verification makes it, so a sample that proposed there would stream other
        tokens than the same request submitted alone (``seed + i``)."""
        wanted = [(state, self.tokens_for(state)) for state in plan.decodes
                  if not state.in_flight and state.generated and self.active(state)]
        wanted = [(state, k) for state, k in wanted if k]
        if not wanted:
            return plan
        most = dict((state.request_id, k) for state, k in wanted)
        proposals = {request_id: tuple(tokens[:most[request_id]])
                     for request_id, tokens in self.proposer.propose_many(wanted).items() if tokens}
        return dataclasses.replace(plan, proposals=proposals) if proposals else plan

    @staticmethod
    def without_unverified(plan: StepPlan) -> StepPlan:
        """``plan`` without the decoding requests whose verification is still in flight (its tokens
        say where they go on). A verifying step is read at once, so one is left unread only after
        reading the step before it raised."""
        ready = tuple(state for state in plan.decodes if not (state.in_flight and state.pending_row is None))
        return plan if len(ready) == len(plan.decodes) else dataclasses.replace(plan, decodes=ready)

    def synchronous(self, plan: StepPlan) -> bool:
        """Whether ``plan``'s step must be read at once: a request in it speculates (its next
        proposal needs this step's tokens on the host)."""
        states = (*plan.decodes, *(chunk.state for chunk in plan.chunks if chunk.last))
        return any(self.active(state) for state in states)

    def observe(self, plan: StepPlan, streamed: dict[int, int], accepted: dict[int, int]) -> None:
        """After ``plan``'s step was read: ``streamed[request_id]`` tokens each decoding request
        streamed, ``accepted[request_id]`` proposals each verification accepted."""
        for state in plan.decodes:
            if state.done or (len(state.generated) == 1 and state.request_id not in accepted):
                continue   # its first token (a forked sample's, drawn in a decode row): nothing proposes for it
            record = self._record(state)
            if record.off_for:
                record.off_for -= 1
                continue
            if state.request_id in accepted:
                record.accepted.append(accepted[state.request_id])
                self.proposer.verified(state)
            record.gains.append(streamed.get(state.request_id, 1))
            if len(record.gains) == WINDOW and sum(record.gains) < OFF_BELOW * WINDOW:
                record.off_for = RETRY_AFTER << record.stops
                record.stops += 1
                record.gains.clear()
                record.accepted.clear()

    def forget(self, state: RequestState) -> None:
        """``state`` left for good: its record goes."""
        self._records.pop(state.request_id, None)
        self.proposer.forget(state)


def speculator_for(method: str | None, num_tokens: int, max_len: int, draft: Proposer | None = None) -> Speculator | None:
    """The engine's :class:`Speculator` for ``EngineConfig.speculate`` (None: no speculation);
    ``"draft"`` proposes with ``draft`` (a :class:`~jax_vattention.engine.draft.DraftProposer`)."""
    if method is None:
        if draft is not None:
            raise ValueError("a draft model was given but speculation is off: set speculate='draft'")
        return None
    if method not in METHODS:
        raise ValueError(f"speculate must be one of {METHODS} or None; got {method!r}")
    if (method == "draft") != (draft is not None):
        raise ValueError("speculate='draft' needs a draft model (Engine(..., draft=DraftProposer(...))), "
                         "and only it takes one")
    return Speculator(draft if draft is not None else NgramProposer(), num_tokens=num_tokens, max_len=max_len)
