"""Which data-parallel replica serves a request: the longest cached prefix, else the most room.

A replica that already holds the first pages of a prompt in its prefix cache maps them instead of
computing them (:mod:`jax_vattention.engine.prefixes`), so a request should go where its prefix
is. Where no replica holds any of it, or several hold the same amount, the request goes where it
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
    ...                 ReplicaView(cached_pages=3, free_pages=10, waiting=2)])
    1
    >>> choose_replica([ReplicaView(0, 90, 0), ReplicaView(0, 90, 0, usable=False)])
    0
    >>> choose_replica([ReplicaView(0, 90, 1), ReplicaView(0, 20, 0, needed_pages=8)])
    1
"""

from __future__ import annotations

import dataclasses
from typing import Sequence


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

    Order: most cached pages of the prompt; among equals, room for the whole request before no room;
    then fewest waiting, fewest running, most free pages; then the lower index (so equal replicas are
    taken in a fixed order, and a test can name one).
    """
    def key(index: int):
        view = views[index]
        return (-view.cached_pages, view.free_pages < view.needed_pages, view.waiting, view.running,
                -view.free_pages, index)

    return sorted((index for index, view in enumerate(views) if view.usable), key=key)


def choose_replica(views: Sequence[ReplicaView]) -> int | None:
    """The index of the replica to send a request to, or None when none is usable."""
    order = preference(views)
    return order[0] if order else None
