"""Which data-parallel replica serves a request: the longest cached prefix, else the most room.

A replica that already holds the first pages of a prompt in its prefix cache maps them instead of
computing them (:mod:`jax_vattention.engine.prefixes`), so a request should go where its prefix
is, within a bound on its load: a replica that queues requests (some wait for a slot or for
memory) and whose requests (waiting and running) reach :data:`LOAD_BOUND` times the mean over the
replicas (counting the new one) gets no credit for its cached prefix. One hot prompt (a system
prompt every request shares) then spreads over more replicas instead of queueing on the one that
cached it first; the replica it goes to computes the prefix once and caches it too. This is
consistent hashing's "bounded loads" (Mirrokni, Thorup and Zadimoghaddam, 2018) applied to prefix
affinity; a replica with nothing waiting starts the request at once, so it always keeps its credit.

Where no replica holds any of the prompt, or several hold the same amount, the request goes where it
waits least for memory and for a slot: a replica with free pages (its page budget less its mapped
pages) for the whole request before one without, then the fewest requests waiting, then the fewest
running, then the most free pages. Free pages beyond what the request needs do not make it start
sooner, so they only break ties: budgets differ by a few pages where each replica took a share of
its device's free memory, and counting them first would send every request to the largest budget.

The rule is a pure function of what each replica reports, so the server
(:class:`~jax_vattention.app.server.replicas.Replicas`) and the router simulation
(:mod:`jax_vattention.bench.router_sim`) run the very same one.

Example::

    >>> choose_replica([ReplicaView(cached_pages=0, free_pages=90, waiting=0),
    ...                 ReplicaView(cached_pages=3, free_pages=10, waiting=1)])
    1
    >>> choose_replica([ReplicaView(cached_pages=0, free_pages=90, waiting=0),
    ...                 ReplicaView(cached_pages=3, free_pages=10, waiting=4)])   # over the load bound
    0
    >>> choose_replica([ReplicaView(0, 90, 0), ReplicaView(0, 90, 0, usable=False)])
    0
    >>> choose_replica([ReplicaView(0, 90, 1), ReplicaView(0, 20, 0, needed_pages=8)])
    1
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

# A replica at this many times the mean load loses its prefix affinity (the c of bounded loads).
LOAD_BOUND = 1.25


@dataclasses.dataclass(frozen=True)
class ReplicaView:
    """What the router knows of one replica when a request arrives.

    Attributes
    ----------
    cached_pages : leading pages of the request's prompt the replica's prefix cache holds
    free_pages : the replica's page budget less its mapped pages
    waiting : requests submitted to the replica and not yet admitted
    usable : False where the replica cannot serve (it then gets nothing)
    running : requests holding a slot of the replica
    needed_pages : the pages the whole request maps there (prompt and answer)
    """

    cached_pages: int
    free_pages: int
    waiting: int
    usable: bool = True
    running: int = 0
    needed_pages: int = 1


def preference(views: Sequence[ReplicaView]) -> list[int]:
    """The usable replicas' indices, the one :func:`choose_replica` picks first, then the next best
    (where the first refuses: its queue is full, or it stopped serving meanwhile).

    Order: most cached pages of the prompt, counted only on a replica with nothing waiting or under
    the load bound (:func:`load_bound`); among equals, room for the whole request before no room; then fewest
    waiting, fewest running, most free pages; then the lower index (so equal replicas are taken in a
    fixed order, and a test can name one).
    """
    usable = [index for index, view in enumerate(views) if view.usable]
    bound = load_bound([views[index] for index in usable])

    def key(index: int):
        view = views[index]
        cached = view.cached_pages if view.waiting == 0 or view.waiting + view.running < bound else 0
        return (-cached, view.free_pages < view.needed_pages, view.waiting, view.running, -view.free_pages, index)

    return sorted(usable, key=key)


def load_bound(views: Sequence[ReplicaView]) -> int:
    """The load (requests waiting and running) at which a replica that queues requests loses the
    credit of its cached prefix: :data:`LOAD_BOUND` times the mean load once the new request is
    counted, rounded up (at least 1)."""
    if not views:
        return 1
    total = sum(view.waiting + view.running for view in views) + 1
    return max(1, math.ceil(LOAD_BOUND * total / len(views)))


def choose_replica(views: Sequence[ReplicaView]) -> int | None:
    """The index of the replica to send a request to, or None when none is usable."""
    order = preference(views)
    return order[0] if order else None
