"""A draft model as the proposer: a small model that shares the target's tokenizer guesses the next
tokens greedily, from a virtual cache of its own.

The draft keeps one slot per speculating request in its own cache host (a second
:class:`~jax_vattention.CacheManager`, its pages on demand like the target's). Before each verifying
step it catches up on the context tokens it has not seen (the target's own token and the
proposals accepted since its last turn) and decodes ``k`` tokens, all of the step's requests in one
:func:`~jax_vattention.decode.generate.generate` call (a prefill from each slot's length, then ``k``
greedy decode steps)::

    draft slot  | context it has seen | new context | p1 p2 .. p(k-1) |   (pk is not written)
                0                     D             C                 C + k - 1

Once the target has verified them, the draft keeps what is still the context (the accepted
proposals it wrote) and lowers its slot's length past the rest (``rewind``), as the target does.
A request the draft cannot hold (no slot or no pages left in its cache) proposes nothing that step.
"""

from __future__ import annotations

import dataclasses
import time

from jax_vattention._core import NoFreeSlotError, OutOfPagesError
from jax_vattention.cache.host import CacheHost
from jax_vattention.decode.generate import generate
from jax_vattention.engine.requests import RequestState


@dataclasses.dataclass
class _DraftSlot:
    slot: int
    valid: int      # leading context tokens the slot holds (what the draft has seen and is still context)


class DraftProposer:
    """Greedy proposals of a draft model over its own cache host.

    Parameters
    ----------
    model : the draft (a :class:`~jax_vattention.decode.model.DecoderModel` with the target's vocabulary)
    host : its cache host, as many slots as the target's and its ``max_len`` at least the target's
    backend : its attention backend (None: the default of its cache)

    Example::

        draft_host = CacheManager(draft_cache_config, device)
        engine = Engine(model, manager, EngineConfig(speculate="draft"), draft=DraftProposer(draft, draft_host))
    """

    def __init__(self, model, host: CacheHost, *, backend: str | None = None):
        self.model = model
        self.host = host
        self.backend = backend
        self._slots: dict[int, _DraftSlot] = {}
        self.calls = 0          # draft runs (one a verifying step)
        self.seconds = 0.0      # the host's time in them, the draft's forward passes included

    def check_target(self, model, cache_config) -> None:
        """``ValueError`` unless the draft can propose for ``model`` over a cache of ``cache_config``:
        the same vocabulary, as many slots, a slot length at least as long, no sliding window."""
        draft_config = self.host.config
        if self.model.config.vocab_size != model.config.vocab_size:
            raise ValueError(f"the draft model's vocabulary ({self.model.config.vocab_size}) is not the target's "
                             f"({model.config.vocab_size}): a draft must share the target's tokenizer")
        if draft_config.max_batch < cache_config.max_batch or draft_config.max_len < cache_config.max_len:
            raise ValueError(f"the draft's cache ({draft_config.max_batch} slots x {draft_config.max_len} tokens) "
                             f"must hold the target's ({cache_config.max_batch} x {cache_config.max_len})")
        if draft_config.window is not None:
            raise ValueError("the draft's cache has a sliding window: its rejected tokens could not be undone; "
                             "give the draft's cache window=None (a windowed draft still attends within its "
                             "window; the pages behind it stay mapped)")

    def propose_many(self, wanted: list[tuple[RequestState, int]]) -> dict[int, tuple[int, ...]]:
        """Up to ``k`` greedy tokens for each ``(state, k)``, by request id (none for a request whose
        context the draft cannot hold now)."""
        placed: list[tuple[RequestState, int, _DraftSlot]] = []
        growth = [0] * self.host.config.max_batch
        for state, k in wanted:
            context = len(state.context)
            record = self._place(state)
            if record is None:
                continue
            growth[record.slot] = context - record.valid
            placed.append((state, k, record))
        if not placed:
            return {}
        try:
            self.host.grow_slots(growth)   # each slot's host length becomes its context's: the prefill's start
        except OutOfPagesError:
            return {}
        contexts = [state.context for state, _, _ in placed]
        started = time.perf_counter()
        result, self.host.cache = generate(
            self.model, self.host.cache, contexts, slots=[record.slot for _, _, record in placed],
            max_len=self.host.config.max_len, max_new_tokens=[k for _, k, _ in placed],
            starts=[record.valid for _, _, record in placed], backend=self.backend)
        self.calls += 1
        self.seconds += time.perf_counter() - started
        proposals = {}
        for (state, k, record), tokens in zip(placed, result.tokens):
            # Its last context token stays unseen until the target verifies: proposing again without a
            # verification (the plan was made again) starts from it.
            record.valid = len(state.context) - 1
            proposals[state.request_id] = tuple(tokens[:k])
        return proposals

    def _place(self, state: RequestState) -> _DraftSlot | None:
        """The request's draft slot with its length at what is still context (a new slot if it has
        none; None when the draft's cache has no slot or pages for it)."""
        record = self._slots.get(state.request_id)
        if record is None:
            try:
                record = self._slots[state.request_id] = _DraftSlot(self.host.alloc(0), 0)
            except (NoFreeSlotError, OutOfPagesError):
                return None
        if self.host.lengths()[record.slot] > record.valid:
            self.host.rewind(record.slot, record.valid)    # proposals the target did not keep
        return record

    def verified(self, state: RequestState) -> None:
        """The target verified ``state``'s proposals: the draft keeps the tokens it wrote that are
        still context (those below the target's new length, ``state.computed``)."""
        record = self._slots.get(state.request_id)
        if record is None:
            return
        written = int(self.host.lengths()[record.slot])
        record.valid = min(written, state.computed)
        if written > record.valid:
            self.host.rewind(record.slot, record.valid)

    def forget(self, state: RequestState) -> None:
        """``state`` left for good: its draft slot is freed."""
        record = self._slots.pop(state.request_id, None)
        if record is not None:
            self.host.free(record.slot)
