"""Samples of one prompt (``n`` and ``best_of``): the prompt is prefilled once, then forked.

:meth:`Engine.submit_samples <jax_vattention.engine.Engine.submit_samples>` makes a *group*: one
prefill, which computes the prompt's K and V up to its last token in a slot of its own, and the
samples, which wait without a slot until the prefill is done. Then (when the next step is planned)
the prefill's slot is forked (:meth:`CacheHost.fork <jax_vattention.cache.host.CacheHost.fork>`):
the first sample takes the prefill's slot and each other sample a fork of it, whose full pages are
the prefill's own physical pages and whose partly filled last page is a copy. Every sample then
feeds the last prompt token itself, in a decode row, and draws its first token from those logits
with its own key::

    prompt    p0 p1 ... p(L-2) | p(L-1)
    prefill   ---------------->                     one slot, chunked like any prompt
    sample 0                     p(L-1) -> t0 t1 ... the prefill's slot
    sample 1                     p(L-1) -> u0 u1 ... a fork: full pages shared, last page copied

Why the last prompt token is left to the samples: a step samples one token per row, so feeding it
in every sample's row draws every first token in one step, each with its sample's own key and
parameters; and its K and V go into each sample's own page (a page a fork shares is never written).

Admission takes everything at once: the prefill's slot and pages, and a slot for every other sample
holding the pages its fork will map (the copy of the last page, the first decode pages). A group
is admitted only when all its samples fit, and its fork cannot run out of memory; one that can
never fit (more samples than slots, more pages than the budget) is refused at submit. A sample's
first step starts its token counts (the penalties') as a copy of the prefill's.

With a ``seed``, sample ``i`` uses ``seed + i`` (vLLM's rule): each sample's tokens depend only on
the request and its index. Without one, the rows draw from the engine's stream.

After the fork the samples are ordinary requests: each is preempted, cancelled, finished or failed
on its own. Before it, the group is its prefill: the prefill is preempted and readmitted as any
request; cancelling a sample drops it from the group (the last one drops the prefill); a failure of
the prefill ends every sample with its error.

Where the host cannot fork (``tokens_per_page`` 0: the CPU backend's own memory), or where the prompt
reaches past the cache's sliding window (its prefill may unmap the pages behind the window, and a
fork shares a slot's pages from its first one), the samples are submitted as independent requests,
each prefilling the prompt: the same tokens, without the shared pages
(``EngineStats.unforked_samples`` counts them).

``best_of``: :func:`best_samples` ranks samples by their cumulative log-probability (vLLM's
definition); samples compute it when they ask for ``logprobs`` (0 is enough).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

from jax_vattention._core import DriverError, NoFreeSlotError, OutOfPagesError
from jax_vattention.engine.memory import CacheMemory
from jax_vattention.engine.requests import Request, RequestState
from jax_vattention.engine.scheduler import Scheduler


def sample_requests(request: Request, samples: int) -> list[Request]:
    """The samples' requests: ``request`` itself, with ``seed + i`` for sample ``i`` where it has a seed."""
    if request.seed is None:
        return [request] * samples
    return [dataclasses.replace(request, seed=(request.seed + i) % (1 << 64)) for i in range(samples)]


def best_samples(cumulative_logprobs: Sequence[float], n: int) -> list[int]:
    """The indices of the ``n`` samples with the highest cumulative log-probability, best first (the
    earlier sample first among equals)."""
    order = sorted(range(len(cumulative_logprobs)), key=lambda i: (-cumulative_logprobs[i], i))
    return order[:n]


@dataclasses.dataclass
class SampleGroup:
    """A prefill and the samples that wait for its fork (the first takes the prefill's slot)."""

    prefill: RequestState
    samples: list[RequestState]


class SampleGroups:
    """The engine's groups whose samples wait for their fork.

    Parameters
    ----------
    memory : the engine's :class:`~jax_vattention.engine.memory.CacheMemory` (holds, forks)
    scheduler : the engine's scheduler (the samples take their slots in its running requests)
    """

    def __init__(self, memory: CacheMemory, scheduler: Scheduler):
        self.memory = memory
        self.scheduler = scheduler
        self._groups: dict[int, SampleGroup] = {}     # by the prefill's request id

    @property
    def forks(self) -> bool:
        """Whether the host forks slots (else samples are independent requests)."""
        return self.memory.host.tokens_per_page > 0

    def forks_for(self, request: Request) -> bool:
        """Whether the samples of ``request`` fork: the host forks, and no page of the prompt's prefill
        can be behind the sliding window when the fork comes (the next query, at the last prompt
        token's position, sees position 0)."""
        window = self.memory.host.config.window
        return self.forks and (window is None or len(request.prompt) <= window)

    def add(self, prefill: RequestState, samples: list[RequestState]) -> None:
        """Registers a group; ``prefill`` is queued by the caller, the samples wait here."""
        prefill.holds_back = 1
        self._groups[prefill.request_id] = SampleGroup(prefill, list(samples))

    def is_prefill(self, request_id: int) -> bool:
        return request_id in self._groups

    @property
    def held_slots(self) -> int:
        """Slots held for forks to come."""
        return sum(len(group.prefill.held_slots) for group in self._groups.values())

    def admit(self, state: RequestState, admit: Callable[[int], int | None]) -> int | None:
        """The scheduler's admission of ``state`` through ``admit(forks)`` (:meth:`CacheMemory.admit`
        with that many forks to hold), once enough slots are free for it and its group; else None."""
        group = self._groups.get(state.request_id)
        wanted = 1 if group is None else len(group.samples)
        if len(self.scheduler.running) + self.held_slots + wanted > self.scheduler.max_batch:
            return None
        return admit(wanted - 1)

    def fork_ready(self) -> list[tuple[RequestState, Exception]]:
        """Forks every group whose prefill is dispatched up to its last prompt token, and places its
        samples in the scheduler's running requests. Returns the prefills whose fork failed in the
        driver, with the error (nothing was forked then): the caller fails them and their samples."""
        failures = []
        for group in list(self._groups.values()):
            prefill = group.prefill
            if prefill.slot is None or prefill.computed < prefill.prefill_end:
                continue
            try:
                forks = self.memory.fork(prefill, len(group.samples) - 1)
            except (OutOfPagesError, NoFreeSlotError, DriverError) as error:
                failures.append((prefill, error))
                continue
            del self._groups[prefill.request_id]
            self.memory.stats.prefills += 1   # its last chunk, which streams no token, was the prompt's
            self._place(prefill, group.samples, forks)
        return failures

    def _place(self, prefill: RequestState, samples: list[RequestState], forks: list[int]) -> None:
        """The first sample takes the prefill's slot, the others the ``forks``: each holds the prompt
        but its last token, and decodes from there."""
        slot, computed = prefill.slot, prefill.computed
        for sample, sample_slot in zip(samples, (slot, *forks)):
            sample.slot, sample.computed, sample.prefilled = sample_slot, computed, True
            sample.admitted_at = prefill.admitted_at
            # One dict for all: the prefill's last chunk may still be in flight, and records there.
            sample.prompt_logprobs = prefill.prompt_logprobs
            # Token counts: as the prefill's slot holds them (a fork copies them), or afresh where
            # the prefill fed nothing (a prompt of one token).
            sample.enters_from = -1 if computed == 0 else (None if sample_slot == slot else slot)
        first = samples[0]
        self.memory.prefixes.hand_over(prefill, first)
        for sample in samples[1:]:
            self.memory.prefixes.forked(first, sample)
        running = self.scheduler.running
        running[slot] = first
        for sample in samples[1:]:
            running[sample.slot] = sample
        prefill.slot = None

    def cancel(self, request_id: int) -> tuple[bool, RequestState | None]:
        """Drops a sample that waits for its group's fork. Returns whether ``request_id`` was one, and
        the group's prefill when no sample is left (the caller drops it)."""
        for key, group in self._groups.items():
            for sample in group.samples:
                if sample.request_id == request_id:
                    group.samples.remove(sample)
                    sample.done = True
                    if group.samples:
                        return True, None
                    del self._groups[key]
                    return True, group.prefill
        return False, None

    def ended(self, state: RequestState) -> list[RequestState]:
        """The requests that end with ``state`` (failed): a group's prefill ends its waiting samples,
        any other request itself."""
        group = self._groups.pop(state.request_id, None)
        return [state] if group is None else group.samples
