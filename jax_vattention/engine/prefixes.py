"""Prefix sharing in the engine: what a request maps from the prefix cache, and what it offers to it.

A request's context is cut into pages of ``tokens_per_page`` tokens; each full
page has a key that stands for every token up to its end
(:func:`~jax_vattention.cache.prefix.page_keys`). The engine

* at admission maps the longest run of cached pages that starts the context
  (never the page of its last token: that token's logits give the next one)
  and starts the chunked prefill at the run's end
  (:meth:`~jax_vattention.CacheManager.alloc_prefix`);
* once a step's tokens are read (the step ran: with the pipelined engine, one
  step after its dispatch), offers the full pages it completed to the cache, so
  that requests admitted later share them while this one still prefills or
  decodes (:meth:`~jax_vattention.CacheManager.publish_pages`);
* when a request finishes, is cancelled or preempted, offers every full page
  that steps already read wrote, generated tokens included (a preempted request
  finds its own pages again when it is readmitted, unless memory pressure
  evicted them first).

Requests that share a prefix nobody has published yet: the first one admitted
computes it, and a waiting request whose next uncached page a running request
is computing right now is not admitted until that request has published it
(admission stops there for the step, as it does at back-pressure). So a burst
of requests with one system prompt computes it once, and the later requests
start when its pages are in the cache, not after the whole burst.

The manager never lets a write start inside a shared page
(:meth:`~jax_vattention.CacheManager.check_write`); the scheduler never asks
for one: a request's chunks start at ``computed``, which begins at the end of
its shared pages, and a page is published only once it lies below ``computed``.
"""

from __future__ import annotations

from jax_vattention.engine.requests import RequestState
from jax_vattention.cache.host import CacheHost
from jax_vattention.cache.prefix import SharedAlloc, page_keys


class PrefixSharer:
    """The engine's record of page keys: per request, and the pages running requests are computing.

    Parameters
    ----------
    manager : the cache manager; sharing is off where its ``tokens_per_page`` is 0 (the CPU
        backend's own driver, or pages that split a token)
    """

    def __init__(self, manager: CacheHost):
        self.manager = manager
        self.tokens_per_page = manager.tokens_per_page
        self._keys: dict[int, list[int]] = {}               # request id -> page keys of its context
        self._published: dict[int, int] = {}                # request id -> pages of its slot published
        self._written: dict[int, int] = {}                  # request id -> tokens of its slot steps read wrote
        self._computing: dict[int, int] = {}                # page key -> the running request computing it

    @property
    def active(self) -> bool:
        return self.tokens_per_page > 0

    def keys(self, state: RequestState, tokens: int) -> list[int]:
        """Keys of the full pages of ``state``'s first ``tokens`` context tokens (kept between calls)."""
        pages = tokens // self.tokens_per_page
        keys = self._keys.get(state.request_id, [])
        if len(keys) < pages:   # the context grew since (generated tokens): hash it again
            keys = self._keys[state.request_id] = page_keys(state.context, self.tokens_per_page)
        return keys[:pages]

    def _admission_keys(self, state: RequestState) -> list[int]:
        return self.keys(state, len(state.context) - 1)

    def waits(self, state: RequestState) -> bool:
        """Whether ``state`` should wait: the next page of its prefix that is not cached is being
        computed by a running request, which publishes it within a few steps."""
        keys = self._admission_keys(state)
        cached = self.manager.cached_pages(keys)
        return cached < len(keys) and keys[cached] in self._computing

    def admit(self, state: RequestState, lookahead: int) -> SharedAlloc:
        """Places ``state`` with its cached prefix mapped; ``lookahead`` tokens are mapped beyond its
        context. Raises as :meth:`CacheManager.alloc` does."""
        placed = self.manager.alloc_prefix(self._admission_keys(state), len(state.context), lookahead)
        shared_pages = placed.shared_tokens // self.tokens_per_page
        self._published[state.request_id] = shared_pages
        self._written[state.request_id] = placed.shared_tokens
        for key in self.keys(state, len(state.context))[shared_pages:]:
            self._computing.setdefault(key, state.request_id)
        return placed

    def dispatched(self, plan) -> tuple:
        """What a step about to be dispatched writes: ``(state, slot, preemptions, end)`` per decode and
        chunk, taken before the plan advances ``computed``; :meth:`read` takes it back."""
        return tuple([(s, s.slot, s.preemptions, s.computed + 1) for s in plan.decodes] +
                     [(c.state, c.slot, c.state.preemptions, c.start + c.count) for c in plan.chunks])

    def read(self, written: tuple) -> None:
        """A step's tokens were read, so it ran: what it wrote (:meth:`dispatched`) counts as written in
        the slots that still hold the same requests, and the full pages it completed are published."""
        states = {}
        for state, slot, preemptions, end in written:
            if state.slot == slot and state.preemptions == preemptions and state.request_id in self._written:
                self._written[state.request_id] = max(self._written[state.request_id], end)
                states[state.request_id] = state
        for state in states.values():
            self.publish(state)

    def publish(self, state: RequestState) -> None:
        """Offers the full pages of ``state``'s slot that steps already read wrote to the cache."""
        pages = self._written.get(state.request_id, 0) // self.tokens_per_page
        if state.slot is None or pages <= self._published.get(state.request_id, 0):
            return
        keys = self.keys(state, pages * self.tokens_per_page)
        self.manager.publish_pages(state.slot, keys)
        self._published[state.request_id] = pages
        for key in keys:
            if self._computing.get(key) == state.request_id:
                del self._computing[key]

    def hand_over(self, old: RequestState, new: RequestState) -> None:
        """``new`` takes over ``old``'s slot and what it wrote there (a sample group's prefill hands
        its slot to the first sample, :mod:`~jax_vattention.engine.groups`)."""
        for table in (self._keys, self._published, self._written):
            if old.request_id in table:
                table[new.request_id] = table.pop(old.request_id)
        self._computing = {key: new.request_id if owner == old.request_id else owner
                           for key, owner in self._computing.items()}

    def forked(self, parent: RequestState, child: RequestState) -> None:
        """``child``'s slot is a fork of ``parent``'s: it holds what ``parent`` wrote, and publishes its
        own pages from there on."""
        if parent.request_id in self._keys:
            self._keys[child.request_id] = list(self._keys[parent.request_id])
        for table in (self._published, self._written):
            if parent.request_id in table:
                table[child.request_id] = table[parent.request_id]

    def leave(self, state: RequestState, *, publish: bool, done: bool) -> None:
        """``state`` leaves its slot, before the slot is freed: with ``publish`` its written pages go
        to the cache first. It computes nothing any more; ``done``: it will not come back (a
        preempted request does), its keys are dropped."""
        if publish:
            self.publish(state)
        self._published.pop(state.request_id, None)
        self._written.pop(state.request_id, None)
        self._computing = {key: owner for key, owner in self._computing.items() if owner != state.request_id}
        if done:
            self._keys.pop(state.request_id, None)


class NoPrefixSharing:
    """The engine's prefix sharer where nothing is shared (sharing off, or a host whose pages cannot
    back several addresses): every request maps its own pages, and nothing is published."""

    tokens_per_page = 0
    active = False

    def __init__(self, host: CacheHost):
        self.host = host

    def waits(self, state: RequestState) -> bool:
        return False

    def admit(self, state: RequestState, lookahead: int) -> SharedAlloc:
        """A slot with ``state``'s whole context (and ``lookahead`` tokens more) mapped, none shared;
        raises as :meth:`CacheHost.alloc` does."""
        return SharedAlloc(self.host.alloc(0, lookahead=len(state.context) + lookahead), 0)

    def dispatched(self, plan) -> tuple:
        return ()

    def read(self, written: tuple) -> None:
        pass

    def hand_over(self, old: RequestState, new: RequestState) -> None:
        pass

    def forked(self, parent: RequestState, child: RequestState) -> None:
        pass

    def leave(self, state: RequestState, *, publish: bool, done: bool) -> None:
        pass
