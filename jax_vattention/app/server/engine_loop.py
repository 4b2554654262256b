"""One thread that owns the :class:`~jax_vattention.engine.Engine`; the HTTP handlers talk to it.

Why a thread: the engine is not thread-safe, and its ``step`` blocks for a whole decode chunk.
The asyncio event loop must keep answering while the device computes, so the engine lives in
one background thread that alone calls ``submit``, ``step`` and ``cancel``. Handlers hand it
commands through a thread-safe queue and receive each of their request's tokens on their own
``asyncio.Queue``, fed with ``loop.call_soon_threadsafe`` as the engine produces them.

::

    handler ──submit(Request)──▶ commands ──▶ engine thread: submit / cancel / step()
       ▲                                              │ TokenEvent
       └──────────── asyncio.Queue ◀── call_soon_threadsafe
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import queue
import threading

from jax_vattention.engine import Engine, Request, TokenEvent

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Stream:
    """A submitted request as a handler sees it: its engine id and where its tokens arrive.

    Each item on ``tokens`` is a :class:`TokenEvent`, or an exception the engine raised for it.
    """

    request_id: int
    tokens: asyncio.Queue


class EngineLoop:
    """Runs ``engine`` in a background thread until :meth:`stop`.

    Example::

        loop = EngineLoop(engine)
        loop.start()
        stream = await loop.submit(Request(prompt=[1, 2, 3], max_new_tokens=8))
        while not (event := await stream.tokens.get()).finished:
            ...
        loop.stop()
    """

    def __init__(self, engine: Engine):
        self.engine = engine
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._stopping = threading.Event()
        self.error: BaseException | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Asks the thread to finish (requests in flight are dropped) and waits for it."""
        self._stopping.set()
        self._commands.put(("wake", None, None))
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    async def submit(self, request: Request) -> Stream:
        """Queues ``request`` in the engine; raises ``ValueError`` for one it refuses."""
        if not self.alive:
            raise RuntimeError(f"the engine has stopped ({self.error!r})")
        future: concurrent.futures.Future = concurrent.futures.Future()
        tokens: asyncio.Queue = asyncio.Queue()
        self._commands.put(("submit", (request, asyncio.get_running_loop(), tokens), future))
        request_id = await asyncio.wrap_future(future)
        return Stream(request_id, tokens)

    def cancel(self, request_id: int) -> None:
        """Drops a request whose client went away; its slot and pages are freed in the engine thread."""
        self._commands.put(("cancel", request_id, None))

    def stats(self) -> dict:
        """The cache manager's counters (the manager is thread-safe) and the engine's queue sizes."""
        stats = dict(self.engine.manager.stats())
        stats.update(running=self.engine.running, waiting=self.engine.waiting)
        return stats

    # ------------------------------------------------------------ engine thread
    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                self._handle_commands(block=self.engine.idle)
                if not self.engine.idle:
                    self._deliver(self.engine.step())
        except BaseException as error:     # the engine is broken: every waiting handler must hear it
            log.exception("the engine thread stopped")
            self.error = error
            for loop, tokens in self._streams.values():
                loop.call_soon_threadsafe(tokens.put_nowait, RuntimeError(f"the engine stopped: {error}"))
            self._streams.clear()
            self._fail_commands(error)

    def _handle_commands(self, block: bool) -> None:
        """Runs every queued command; waits for one first when the engine has nothing to do."""
        try:
            command = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            self._handle(*command)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _handle(self, kind: str, payload, future: concurrent.futures.Future | None) -> None:
        if kind == "submit":
            request, loop, tokens = payload
            try:
                request_id = self.engine.submit(request)
            except ValueError as error:
                future.set_exception(error)
                return
            self._streams[request_id] = (loop, tokens)
            future.set_result(request_id)
        elif kind == "cancel":
            if self._streams.pop(payload, None) is not None:
                self.engine.cancel(payload)

    def _deliver(self, events: list[TokenEvent]) -> None:
        for event in events:
            target = self._streams.get(event.request_id)
            if target is None:
                continue
            loop, tokens = target
            loop.call_soon_threadsafe(tokens.put_nowait, event)
            if event.finished:
                del self._streams[event.request_id]

    def _fail_commands(self, error: BaseException) -> None:
        while True:
            try:
                _, _, future = self._commands.get_nowait()
            except queue.Empty:
                return
            if future is not None and not future.done():
                future.set_exception(RuntimeError(f"the engine stopped: {error}"))
