"""Data parallelism behind one HTTP front: N engine loops, each on its own devices, as one.

``vattention serve --dp N`` runs N engines on disjoint device groups, each with its own cache host
and its own :class:`~jax_vattention.app.server.engine_loop.EngineLoop` (its own thread). The
:class:`~jax_vattention.app.server.service.Service` talks to them through :class:`Replicas`, which
has the loop's interface (``submit``, ``submit_samples``, ``cancel``, ``cancel_all``, ``health``,
``waiting``, ``stats``, ``stop``), so one replica is today's server exactly and N is a parameter.

Each request goes to the replica the routing rule prefers (:mod:`~jax_vattention.app.server.routing`):
the longest cached prefix of its prompt, else room for it in free pages, then the fewest waiting. The
samples of one ``n > 1`` request stay together (they fork one prefill). A replica that cannot serve
gets nothing; where the preferred one refuses (its queue is full, or it failed meanwhile) the next
is tried.

Why the router reads the managers themselves: a replica's prefix cache is the set of page keys its
page manager holds, and :meth:`~jax_vattention.CacheManager.cached_pages` reads it under the
manager's own lock (the C++ core's mutex), changing nothing, while the replica's engine thread runs.
It asks one device's manager of a mesh (every device holds the same keys): asking the group would
compare the devices' answers while the engine thread changes them, and a race there would read as
the devices disagreeing. The reads run in a worker thread, so the event loop never waits for a
manager that is mapping pages.

Request ids: replica ``r`` of ``N`` reports its engine's id ``i`` as ``i * N + r``, unique over
the replicas, so that a cancel reaches the replica that holds the request (with one replica, the
engine's own ids).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Sequence

from jax_vattention.app.server.engine_loop import EngineLoop, EngineUnusable, QueueFull, Stream
from jax_vattention.app.server.routing import ReplicaView, preference
from jax_vattention.cache.host import add_up
from jax_vattention.cache.prefix import page_keys
from jax_vattention.engine import Request

# Stats every replica of one server shares (same model and cache shape): reported once, not summed.
_SHARED_STATS = ("page_bytes", "static_bytes")


class Replicas:
    """N running engine loops behind one front; see the module docstring.

    Parameters
    ----------
    loops : the replicas' engine loops (started or not: :meth:`start` starts them), each over its own
        engine and cache host; at least one

    Example::

        replicas = Replicas([EngineLoop(engine_0), EngineLoop(engine_1)])
        replicas.start()
        stream = await replicas.submit(Request(prompt=[1, 2, 3], max_new_tokens=8))
        replicas.cancel(stream.request_id)
        replicas.stop()
    """

    def __init__(self, loops: Sequence[EngineLoop]):
        if not loops:
            raise ValueError("a server needs at least one replica")
        self.loops = list(loops)
        self.routed = [0] * len(self.loops)       # requests each replica was given, over the server's life

    @property
    def engine(self):
        """The first replica's engine (with one replica, the engine); its model and cache
        configuration are every replica's."""
        return self.loops[0].engine

    @property
    def max_waiting(self) -> int | None:
        """Requests that may wait for a slot on each replica (None: no bound)."""
        return self.loops[0].max_waiting

    @max_waiting.setter
    def max_waiting(self, value: int | None) -> None:
        for loop in self.loops:
            loop.max_waiting = value

    def start(self) -> None:
        for loop in self.loops:
            loop.start()

    # ------------------------------------------------------------ health and figures
    def unusable(self) -> dict[int, str]:
        """The replicas that cannot serve, by index, with why."""
        reasons = {index: loop.health for index, loop in enumerate(self.loops)}
        return {index: reason for index, reason in reasons.items() if reason is not None}

    @property
    def health(self) -> str | None:
        """None while at least one replica can serve, else why none can."""
        unusable = self.unusable()
        if len(unusable) < len(self.loops):
            return None
        if len(self.loops) == 1:
            return unusable[0]
        return "; ".join(f"replica {index}: {reason}" for index, reason in unusable.items())

    @property
    def waiting(self) -> int:
        return sum(loop.waiting for loop in self.loops)

    @property
    def failed_steps(self) -> int:
        return sum(loop.failed_steps for loop in self.loops)

    def stats(self) -> dict:
        """Every replica's :meth:`EngineLoop.stats` added up (what they share, once), and
        ``replicas``: each one's own, with its ``health`` (None while it can serve) and the requests
        routed to it."""
        per_replica = [loop.stats() for loop in self.loops]
        total = add_up(per_replica, _SHARED_STATS)
        if any(stats.get("poisoned") for stats in per_replica):
            total["poisoned"] = next(stats["poisoned"] for stats in per_replica if stats.get("poisoned"))
        total["replicas"] = [dict(stats, replica=index, health=loop.health, routed=self.routed[index])
                             for index, (loop, stats) in enumerate(zip(self.loops, per_replica))]
        return total

    # ------------------------------------------------------------ routing
    def views(self, prompt: Sequence[int], tokens: int | None = None) -> list[ReplicaView]:
        """What the router knows of each replica for ``prompt`` (of ``tokens`` tokens with its answer,
        default the prompt's): its cached prefix of the prompt (in pages), free pages, waiting and
        running requests, and whether it can serve. Safe beside the engine threads (module docstring)."""
        keys_by_page: dict[int, list[int]] = {}
        views = []
        for loop in self.loops:
            if loop.health is not None:
                views.append(ReplicaView(0, 0, 0, usable=False))
                continue
            try:
                host = loop.engine.manager
                shard = host.shards[0]
                per_page = shard.tokens_per_page
                cached = 0
                if per_page and len(prompt) > 1:
                    if per_page not in keys_by_page:
                        # The engine shares at most the pages before the prompt's last token.
                        keys_by_page[per_page] = page_keys(list(prompt[:-1]), per_page)
                    cached = shard.cached_pages(keys_by_page[per_page])
                counters = host.counters()
                free = counters["budget_pages"] - counters["mapped_pages"]
                needed = host.pages_for(min(tokens or len(prompt), host.config.max_len))
            except Exception:            # noqa: BLE001  (closed or failed meanwhile: its health says more)
                views.append(ReplicaView(0, 0, 0, usable=False))
                continue
            views.append(ReplicaView(cached, free, loop.waiting, running=loop.engine.running, needed_pages=needed))
        return views

    async def _order(self, prompt: Sequence[int], tokens: int, samples: int) -> list[int]:
        """The replicas in the order of preference for ``samples`` samples of ``prompt`` (``tokens``
        with an answer; each sample's pages counted whole, an upper bound where they share the
        prompt's). The waiting counts are read again
        on the event loop after the views come back: requests routed meanwhile (a burst, whose views
        were all taken before any was submitted) count, and the order is decided and the request
        queued on its replica without an await between them."""
        if len(self.loops) == 1:
            return [0]
        views = await asyncio.get_running_loop().run_in_executor(None, self.views, prompt, tokens)
        views = [dataclasses.replace(view, waiting=loop.waiting, running=loop.engine.running,
                                     needed_pages=view.needed_pages * samples)
                 for view, loop in zip(views, self.loops)]
        return preference(views)

    # ------------------------------------------------------------ the loop's interface
    async def submit(self, request: Request) -> Stream:
        """:meth:`EngineLoop.submit` on the replica the routing prefers."""
        return (await self.submit_samples(request, 1))[0]

    async def submit_samples(self, request: Request, samples: int) -> list[Stream]:
        """:meth:`EngineLoop.submit_samples` on one replica (all samples there): the preferred one, or
        the next where it refuses for its queue or its health. Raises ``ValueError`` for a request
        the engine refuses, :class:`QueueFull` when every usable replica's queue is full,
        :class:`EngineUnusable` when none can serve."""
        order = await self._order(request.prompt, len(request.prompt) + request.max_new_tokens, samples)
        refusal: Exception | None = None
        for index in order:
            try:
                streams = await self.loops[index].submit_samples(request, samples)
            except (QueueFull, EngineUnusable) as error:
                refusal = error if refusal is None or isinstance(error, QueueFull) else refusal
                continue
            self.routed[index] += 1
            count = len(self.loops)
            return [Stream(stream.request_id * count + index, stream.tokens) for stream in streams]
        if refusal is None:
            raise EngineUnusable(self.health or "no replica can serve")
        if isinstance(refusal, QueueFull) and len(self.loops) > 1:
            raise QueueFull(f"{self.max_waiting} requests already wait for a slot on each replica")
        raise refusal

    def replica_of(self, request_id: int) -> int:
        """The replica that holds the request of this (server-wide) id."""
        return request_id % len(self.loops)

    def cancel(self, request_id: int) -> None:
        """Drops a request whose client went away, in the replica that holds it."""
        count = len(self.loops)
        self.loops[request_id % count].cancel(request_id // count)

    def cancel_all(self, reason: str) -> None:
        for loop in self.loops:
            loop.cancel_all(reason)

    def stop(self, timeout: float = 30.0) -> bool:
        """Asks every replica's thread to finish, then waits for them all, ``timeout`` seconds in all;
        returns whether every thread stopped."""
        for loop in self.loops:
            loop.stop(0)
        deadline = time.monotonic() + timeout
        stopped = [loop.stop(max(deadline - time.monotonic(), 0)) for loop in self.loops]
        return all(stopped)

    def hosts(self) -> list:
        """Each replica's cache host (what a shutdown closes once its thread stopped)."""
        return [loop.engine.manager for loop in self.loops]
