"""The engine's memory policy over a :class:`~jax_vattention.cache.host.CacheHost`.

Everything the engine decides about pages lives here, as vLLM keeps it in its KV-cache manager
beside the scheduler: whether a request can ever fit, admission (a slot with the request's
context mapped, its cached prefix shared, its first decode pages mapped ahead), a step's growth,
the host's last checks before dispatch, mapping ahead while the device computes, and giving a
slot back. The paper's policies are switches (:class:`MemoryPolicy`):

* ``overlap``: while the device computes a step, the host maps ahead the pages the next steps
  will need (:meth:`CacheMemory.map_ahead`);
* ``deferred_reclamation``: a finished request's pages stay with its slot for the next request
  there, unmapped only under memory pressure. Off: unmapped at once;
* ``eager_allocation``: a request's first decode pages are mapped with its prompt;
* ``prefix_sharing``: a request maps the cached pages of its prompt's start and prefills only the
  rest (:mod:`~jax_vattention.engine.prefixes`); off, or where the host cannot share pages
  (``tokens_per_page`` 0), a :class:`~jax_vattention.engine.prefixes.NoPrefixSharing` stands in,
  so no caller asks which.

Running out of pages is back-pressure: :meth:`CacheMemory.admit` answers None and
:meth:`CacheMemory.grow` raises ``OutOfPagesError`` with nothing changed; the engine's loop
decides whom to preempt.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import jax

from jax_vattention._core import DriverError, OutOfPagesError
from jax_vattention.cache.guards import check_slots
from jax_vattention.cache.host import CacheHost
from jax_vattention.engine.failures import ADMISSION_ATTEMPTS, admission_retry_at
from jax_vattention.engine.prefixes import NoPrefixSharing, PrefixSharer
from jax_vattention.engine.request_rows import shares_prefix
from jax_vattention.engine.requests import Request, RequestState
from jax_vattention.engine.scheduler import StepPlan
from jax_vattention.engine.stats import EngineStats

log = logging.getLogger(__name__)

# Mapping a page takes ~50 µs of host time per buffer (2.9 ms for a slot of a 32-layer
# per-layer cache), and a step leaves the host only a few milliseconds while the device
# computes: mapping that far ahead spreads a crossing over enough steps to hide it.
MIN_PREFETCH_TOKENS = 16


@dataclasses.dataclass(frozen=True)
class MemoryPolicy:
    """The paper's memory policies (module docstring) and how far ahead to map.

    prefetch_tokens : with overlap, how far ahead of every running slot the host maps while a step
        runs, and with eager allocation what is mapped with a prompt (default ``MIN_PREFETCH_TOKENS``)
    """

    overlap: bool = True
    deferred_reclamation: bool = True
    eager_allocation: bool = True
    prefix_sharing: bool = True
    prefetch_tokens: int | None = None

    @property
    def prefetch_horizon(self) -> int:
        """Tokens mapped ahead of every running slot when memory allows."""
        return self.prefetch_tokens or MIN_PREFETCH_TOKENS


def expected_end(start: float, recent_seconds) -> float | None:
    """When device work dispatched at ``start`` should end, going by the fastest of the last
    few like it (``recent_seconds``, oldest first): a slow one may have been slowed by mapping
    that overran it, and must not let the next mapping overrun further. None without a record."""
    recent = list(recent_seconds)[-4:]
    return start + min(recent) if recent else None


class CacheMemory:
    """The engine's pages: admission, growth, checks, mapping ahead and release over ``host``.

    Attributes
    ----------
    prefixes : the :class:`PrefixSharer` (prefix sharing on and possible) or a
        :class:`NoPrefixSharing`
    blocked : the last admission stopped at the page budget (admission waits; map-ahead shrinks
        to one token so the budget goes to requests, not early pages)
    admit_error : the error of the last admission that failed (``OutOfPagesError``, or the
        ``DriverError`` of one the driver failed: it is tried again later, see
        :mod:`~jax_vattention.engine.failures`)
    """

    def __init__(self, host: CacheHost, policy: MemoryPolicy, stats: EngineStats):
        self.host = host
        self.policy = policy
        self.stats = stats
        sharer = PrefixSharer(host) if policy.prefix_sharing else None
        self.prefixes = sharer if sharer is not None and sharer.active else NoPrefixSharing(host)
        self.unshared = NoPrefixSharing(host)   # for requests that must prefill their whole prompt
        self.blocked = False
        self.admit_error: Exception | None = None
        self.sharing_grew = False   # since the engine last read bytes_saved: a shared admission or a fork

    def check_fits(self, request: Request, samples: int = 1) -> None:
        """``ValueError`` for a request whose pages at its longest exceed the whole budget; with
        ``samples`` forked after its prompt (:mod:`~jax_vattention.engine.groups`), also for more
        samples than slots, or samples whose admission cannot fit: the prompt's pages once and
        each other sample's own (its copy of the last page and its first decode pages). After the
        fork each sample is a request of its own, preempted under pressure as any other."""
        needed = self.host.pages_for(len(request.prompt) + request.max_new_tokens + self.policy.prefetch_horizon)
        budget = self.host.counters()["budget_pages"]
        if needed > budget:
            raise ValueError(f"the request needs {needed} pages at most but the whole budget is {budget} pages")
        if samples == 1:
            return
        slots = self.host.config.max_batch
        if samples > slots:
            raise ValueError(f"{samples} samples of one prompt need {samples} slots but the cache has {slots} "
                             f"(max_batch)")
        eager = min(self.policy.prefetch_horizon, request.max_new_tokens) if self.policy.eager_allocation else 0
        tail = (len(request.prompt) - 1) % self.host.tokens_per_page
        start = self.host.pages_for(len(request.prompt) + eager) + (samples - 1) * self.host.pages_for(tail + eager)
        if start > budget:
            raise ValueError(f"{samples} samples of the request need {start} pages to start (the prompt's once, "
                             f"and each sample's own last page and first decode pages) but the whole budget is "
                             f"{budget} pages")

    def admit(self, state: RequestState, waiting, forks: int = 0) -> int | None:
        """A slot with ``state``'s whole context mapped (and its first decode pages, with eager
        allocation); with prefix sharing its cached prefix is shared and ``state.computed`` set to
        its end. None on back-pressure (``waiting``, the queue, sizes the ideal batch recorded
        then), or while a running request computes the request's next prefix page, or while an
        admission the driver failed waits to be tried again.

        With ``forks`` (a sample group's prefill), that many more slots are held too, each with the
        pages a fork of the prompt will need (its partly filled last page and the first decode
        pages), in ``state.held_slots``: all or nothing (:meth:`fork` uses them)."""
        if state.retry_at > time.perf_counter():
            return None
        # Penalties count, and prompt_logprobs score, every prompt token the prefill feeds: a shared
        # prefix is never fed (engine.request_rows.shares_prefix).
        prefixes = self.prefixes if shares_prefix(state.request) else self.unshared
        if prefixes.waits(state):
            self.stats.prefix_waits += 1
            return None
        eager = min(self.policy.prefetch_horizon, state.remaining) if self.policy.eager_allocation else 0
        try:
            placed = prefixes.admit(state, eager)
            if forks:
                state.held_slots = self._hold(state, prefixes, placed.slot, forks, eager)
        except OutOfPagesError as error:
            self.blocked = True
            self.admit_error = error
            return None
        except DriverError as error:
            # Nothing was mapped for it (the page manager undid the call): it waits, to be tried again.
            state.admission_failures += 1
            state.retry_at = admission_retry_at(time.perf_counter(), state.admission_failures)
            self.admit_error = error
            self.stats.step_failures += 1
            log.warning("admitting request %d failed in the driver (%s); try %d of %d", state.request_id, error,
                        state.admission_failures, ADMISSION_ATTEMPTS)
            return None
        state.computed = placed.shared_tokens
        context = len(state.context)
        self.stats.shared_tokens += placed.shared_tokens
        self.stats.shared_admissions += placed.shared_tokens > 0
        self.sharing_grew |= placed.shared_tokens > 0
        if self.prefixes.tokens_per_page:
            self.stats.shared_pages += (placed.shared_tokens // self.prefixes.tokens_per_page
                                        * self.host.config.num_buffers)
        self.stats.admissions += 1
        self.stats.prompt_tokens += context
        return placed.slot

    def _hold(self, state: RequestState, prefixes, slot: int, forks: int, eager: int) -> list[int]:
        """``forks`` free slots, each mapping what a fork of ``state`` after its prefill maps: the
        tokens of its partly filled last page and ``eager`` more. On any error, the held slots and
        ``state``'s own ``slot`` are given back and the error raised."""
        tail = (len(state.context) - state.holds_back) % self.host.tokens_per_page
        held: list[int] = []
        try:
            for _ in range(forks):
                held.append(self.host.alloc(0, tail + eager))
        except BaseException:
            prefixes.leave(state, publish=False, done=False)
            for taken in (*held, slot):
                self.release(taken)
            raise
        return held

    def fork(self, state: RequestState, count: int) -> list[int]:
        """``count`` forks of ``state``'s slot (:meth:`CacheHost.fork`), each with its first decode
        pages mapped, in the slots and pages held for them at admission (given back first). On an
        error the forks made are given back and the error raised."""
        self.release_held(state)
        eager = min(self.policy.prefetch_horizon, state.remaining) if self.policy.eager_allocation else 0
        forks: list[int] = []
        try:
            for _ in range(count):
                forks.append(self.host.fork(state.slot, eager))
        except BaseException:
            for slot in forks:
                self.release(slot)
            raise
        self.sharing_grew = True
        return forks

    def release_held(self, state: RequestState) -> None:
        """Gives back the slots held for ``state``'s forks (it leaves its slot, or forks now)."""
        held, state.held_slots = state.held_slots, []
        for slot in held:
            self.release(slot)

    def record_memory_bound(self, holding: list[RequestState], waiting) -> None:
        """Records, when admission stopped at the budget, the requests running and those an ideal
        allocator would run (:meth:`ideal_batch`)."""
        self.stats.memory_bound(len(holding), self.ideal_batch(holding, waiting))

    def ideal_batch(self, holding: list[RequestState], waiting) -> int:
        """The requests an ideal allocator would run now.

        It holds exact tokens, with no page rounding and nothing mapped ahead: each request's
        context plus the token the coming step writes. Besides the ``holding`` requests, it
        admits the ``waiting`` requests in order while they fit in the rest of the budget and
        slots are free.
        """
        config, stats = self.host.config, self.host.counters()
        budget_tokens = stats["budget_pages"] * stats["page_bytes"] // (config.token_bytes * config.num_buffers)
        free_tokens = budget_tokens - sum(len(s.context) + 1 for s in holding)
        ideal = len(holding)
        for state in waiting:
            needed = len(state.context) + 1
            if ideal >= config.max_batch or needed > free_tokens:
                break
            free_tokens -= needed
            ideal += 1
        return ideal

    def grow(self, plan: StepPlan) -> None:
        """Maps the plan's growth, each slot by its own count; ``OutOfPagesError`` (nothing changed)
        when the budget cannot cover it."""
        self.host.grow_slots(plan.growth(self.host.config.max_batch))

    def check_plan(self, plan: StepPlan) -> None:
        """The last line of defence before dispatch: every slot the plan writes holds its tokens
        mapped, and no chunk starts inside a shared page. ``RuntimeError`` otherwise (a bug)."""
        ends = [(s.slot, s.computed + 1 + len(plan.proposals.get(s.request_id, ()))) for s in plan.decodes]
        ends += [(c.slot, c.start + c.count) for c in plan.chunks]
        check_slots(self.host, [slot for slot, _ in ends], [end for _, end in ends], error=RuntimeError)
        if self.prefixes.tokens_per_page:
            for chunk in plan.chunks:
                try:
                    self.host.check_write(chunk.slot, chunk.start)
                except ValueError as error:
                    raise RuntimeError(f"the engine planned a write into shared pages: {error}") from None

    def map_ahead(self, pending: jax.Array, begin: float, recent_seconds) -> None:
        """With overlap: maps pages the next steps need until ``pending`` (the step in flight's
        output) is ready or its expected end (:func:`expected_end` from ``begin``) would pass.

        Best effort: a driver failure here fails no request (nothing the step needs depends on it,
        and the page manager rolled the page back); it is counted in ``stats.map_ahead_failures``.
        A poisoned manager still raises."""
        if not self.policy.overlap:
            return
        tokens = 1 if self.blocked else self.policy.prefetch_horizon
        before = self.host.counters()["map_seconds"]
        try:
            self.host.prefetch_while_busy(pending, tokens, expected_end(begin, recent_seconds))
        except DriverError:
            self.stats.map_ahead_failures += 1
        self.stats.prefetch_seconds += self.host.counters()["map_seconds"] - before

    def release(self, slot: int) -> None:
        """Gives ``slot`` back; without deferred reclamation its pages are unmapped at once."""
        self.host.free(slot)
        if not self.policy.deferred_reclamation:
            try:
                self.host.reclaim()
            except DriverError as error:   # the pages stay mapped to free slots; the next reclaim retries
                self.stats.step_failures += 1
                log.warning("reclaiming freed pages failed (%s); retried later", error)
