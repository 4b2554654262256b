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

The failure policy: the thread never dies of an exception. A step that raises has already
failed the requests the failure touched (the engine ends them with an error event); the loop
logs it and goes on. Only a cache manager that can no longer serve (poisoned by a driver
failure it could not undo, its cache lost or closed) stops the serving: every request still
open ends with the reason, later ones are refused, and :attr:`EngineLoop.unusable` says why
(``/health`` answers 503 with it). Steps that fail many times in a row without one that
succeeds end every open request, so a persistent error cannot hold clients forever.

Over several processes (``jax.distributed``), the loop runs on process 0 with a
:class:`~jax_vattention.engine.lockstep.LockstepLeader`: every ``submit`` and ``cancel`` it makes
is journaled, and each step (or, while idle, a keep-alive) publishes them to the other processes,
which replay them (:func:`~jax_vattention.engine.lockstep.follow`). A process that stalls or
diverges makes the engine unusable with an error naming it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import queue
import threading

from jax_vattention.engine import Engine, Request, TokenEvent
from jax_vattention.engine.lockstep import LockstepLeader, ProcessGroupError

log = logging.getLogger(__name__)

# After this many failed steps in a row, every open request is ended with the last error.
FAILED_STEPS_LIMIT = 8


class QueueFull(Exception):
    """Admission refused: ``max_waiting`` requests already wait for a slot."""


class EngineUnusable(RuntimeError):
    """The engine cannot serve (its cache manager is poisoned, lost or closed, or the loop stopped)."""


@dataclasses.dataclass
class Stream:
    """A submitted request as a handler sees it: its engine id and where its tokens arrive.

    Each item on ``tokens`` is a :class:`TokenEvent` (the last one ``finished``, with ``error``
    set when the request failed), or an exception that ended it outside the engine.
    """

    request_id: int
    tokens: asyncio.Queue


class EngineLoop:
    """Runs ``engine`` in a background thread until :meth:`stop`.

    Parameters
    ----------
    engine : the engine, owned by the thread from :meth:`start` on
    max_waiting : requests that may wait for a slot (submitted, not yet admitted); :meth:`submit`
        raises :class:`QueueFull` beyond it. None: no bound
    lockstep : over several processes, process 0's journal of the engine's calls; None: one process

    Example::

        loop = EngineLoop(engine)
        loop.start()
        stream = await loop.submit(Request(prompt=[1, 2, 3], max_new_tokens=8))
        while not (event := await stream.tokens.get()).finished:
            ...
        loop.stop()
    """

    def __init__(self, engine: Engine, *, max_waiting: int | None = None, lockstep: LockstepLeader | None = None):
        if max_waiting is not None and max_waiting < 1:
            raise ValueError(f"max_waiting must be at least 1 (or None), got {max_waiting}")
        self.engine = engine
        self.lockstep = lockstep
        self.max_waiting = max_waiting
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._stopping = threading.Event()
        self._queued = 0                       # submit commands not yet taken by the thread
        self._queued_lock = threading.Lock()
        self.unusable: str | None = None       # why the engine cannot serve, once it cannot
        self.failed_steps = 0                  # steps that raised, over the loop's life
        self.failed_in_a_row = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> bool:
        """Asks the thread to finish and waits up to ``timeout`` seconds for it; the requests still
        open end with an error. Returns whether the thread stopped (only then may the cache
        manager be closed: a step may still be running otherwise)."""
        self._stopping.set()
        self._commands.put(("wake", None, None))
        if self._thread.is_alive():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def alive(self) -> bool:
        """The thread runs and the engine can serve."""
        return self._thread.is_alive() and self.unusable is None

    @property
    def health(self) -> str | None:
        """None while the engine can serve, else why not."""
        if self.unusable is not None:
            return self.unusable
        if not self._thread.is_alive():
            return "the engine thread is not running"
        return None

    @property
    def waiting(self) -> int:
        """Requests submitted and not yet admitted, those still on their way to the thread included."""
        return self.engine.waiting + self._queued

    async def submit(self, request: Request) -> Stream:
        """Queues ``request`` in the engine; raises ``ValueError`` for one it refuses,
        :class:`QueueFull` when ``max_waiting`` requests wait, :class:`EngineUnusable` when the
        engine cannot serve."""
        return (await self.submit_samples(request, 1))[0]

    async def submit_samples(self, request: Request, samples: int) -> list[Stream]:
        """Queues ``samples`` samples of ``request`` (:meth:`Engine.submit_samples`), a stream each;
        raises as :meth:`submit` does."""
        reason = self.health
        if reason is not None:
            raise EngineUnusable(reason)
        with self._queued_lock:
            if self.max_waiting is not None and self.engine.waiting + self._queued >= self.max_waiting:
                raise QueueFull(f"{self.max_waiting} requests already wait for a slot")
            self._queued += 1
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put(("submit", (request, samples, asyncio.get_running_loop()), future))
        return await asyncio.wrap_future(future)

    def cancel(self, request_id: int) -> None:
        """Drops a request whose client went away; its slot and pages are freed in the engine thread."""
        self._commands.put(("cancel", request_id, None))

    def cancel_all(self, reason: str) -> None:
        """Ends every open request with ``reason`` as its error (a shutdown past its grace time)."""
        self._commands.put(("cancel_all", reason, None))

    def stats(self) -> dict:
        """The cache manager's counters (the manager is thread-safe) and the engine's queue sizes."""
        stats = dict(self.engine.manager.stats())
        stats.update(running=self.engine.running, waiting=self.waiting)
        return stats

    # ------------------------------------------------------------ engine thread
    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self._turn()
            except Exception as error:   # noqa: BLE001  (the loop outlives any one error)
                log.exception("the engine loop's turn failed")
                self._after_failure(error)
        self._end_all("the server is shutting down")
        self._fail_commands("the server is shutting down")
        if self.lockstep is not None and self.unusable is None:
            try:
                self.lockstep.stop(self.engine)
            except ProcessGroupError as error:
                log.error("the other processes could not be told to stop: %s", error)

    def _turn(self) -> None:
        """Runs the queued commands, then one engine step (waiting for a command when there is none
        to run)."""
        serving = self.unusable is None and not self.engine.idle
        self._handle_commands(wait=None if serving else 0.5)
        if self._stopping.is_set() or self.unusable is not None:
            return
        if self.engine.idle:
            if self.lockstep is not None:
                self._in_lockstep(self.lockstep.keep_alive)
            return
        if self.lockstep is not None and not self._in_lockstep(self.lockstep.before_step):
            return
        try:
            events = self.engine.step()
        except Exception as error:      # noqa: BLE001  (the engine failed what it touched)
            self.failed_steps += 1
            log.warning("an engine step failed (%s: %s); the requests it touched were failed",
                        type(error).__name__, error)
            self._after_failure(error)
            return
        self.failed_in_a_row = 0
        self._deliver(events)
        if not events and not self.engine.running:
            # Nothing ran (an admission waits to be retried): do not spin.
            self._handle_commands(wait=0.005)

    def _in_lockstep(self, publish) -> bool:
        """Publishes the journal (:meth:`LockstepLeader.before_step` or ``keep_alive``); a process
        that stalled makes the engine unusable. Returns whether the group can go on."""
        try:
            publish(self.engine)
            return True
        except ProcessGroupError as error:
            self.unusable = str(error)
            log.error("the engine cannot serve any more: %s", error)
            self._end_all(f"the engine cannot serve: {error}")
            return False

    def _after_failure(self, error: Exception) -> None:
        """After a step or a turn raised: stop serving if the manager cannot serve, end every open
        request after too many failures in a row, and back off a little before the next try."""
        self.failed_in_a_row += 1
        reason = self._manager_unusable()
        if reason is not None:
            self.unusable = f"{reason} (after {type(error).__name__}: {error})"
            log.error("the engine cannot serve any more: %s", self.unusable)
            self._end_all(f"the engine cannot serve: {self.unusable}")
            return
        if self.failed_in_a_row >= FAILED_STEPS_LIMIT:
            self._end_all(f"the engine failed {self.failed_in_a_row} steps in a row; the last: "
                          f"{type(error).__name__}: {error}")
            self.failed_in_a_row = 0
        self._handle_commands(wait=min(0.001 * 2 ** self.failed_in_a_row, 0.5))

    def _manager_unusable(self) -> str | None:
        manager = self.engine.manager
        try:
            counters = manager.counters()
        except Exception as error:      # noqa: BLE001
            return f"the cache manager cannot report its state ({type(error).__name__}: {error})"
        if counters.get("poisoned"):
            return "the cache manager is poisoned: a driver failure could not be undone"
        if getattr(manager, "lost", False):
            return "the cache was lost in a failed step"
        if getattr(manager, "_closed", False):
            return "the cache manager is closed"
        return None

    def _handle_commands(self, wait: float | None) -> None:
        """Runs every queued command; with ``wait``, waits up to that long for the first one."""
        try:
            command = self._commands.get(timeout=wait) if wait else self._commands.get_nowait()
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
            request, samples, loop = payload
            try:
                if self.unusable is not None:
                    raise EngineUnusable(self.unusable)
                request_ids = self.engine.submit_samples(request, samples)
                if self.lockstep is not None:
                    self.lockstep.record_submit(request, samples, request_ids)
            except Exception as error:    # noqa: BLE001  (ValueError: refused; the handler says why)
                future.set_exception(error)
                return
            finally:
                with self._queued_lock:
                    self._queued -= 1
            streams = [Stream(request_id, asyncio.Queue()) for request_id in request_ids]
            for stream in streams:
                self._streams[stream.request_id] = (loop, stream.tokens)
            future.set_result(streams)
        elif kind == "cancel":
            if self._streams.pop(payload, None) is not None:
                self._cancel_in_engine(payload)
        elif kind == "cancel_all":
            self._end_all(payload)

    def _cancel_in_engine(self, request_id: int) -> None:
        if self.unusable is not None:
            return
        try:
            self.engine.cancel(request_id)
            if self.lockstep is not None:
                self.lockstep.record_cancel(request_id)
        except Exception:                 # noqa: BLE001  (freeing its slot failed: the manager says more)
            log.exception("cancelling request %d failed", request_id)

    def _deliver(self, events: list[TokenEvent]) -> None:
        for event in events:
            target = self._streams.get(event.request_id)
            if target is None:
                continue
            loop, tokens = target
            loop.call_soon_threadsafe(tokens.put_nowait, event)
            if event.finished:
                del self._streams[event.request_id]

    def _end_all(self, reason: str) -> None:
        """Every open request ends with ``reason`` (and leaves the engine, where it still can)."""
        for request_id, (loop, tokens) in list(self._streams.items()):
            self._cancel_in_engine(request_id)
            try:
                loop.call_soon_threadsafe(tokens.put_nowait, EngineUnusable(reason))
            except RuntimeError:          # its event loop is closed: nobody listens any more
                pass
        self._streams.clear()

    def _fail_commands(self, reason: str) -> None:
        while True:
            try:
                kind, _, future = self._commands.get_nowait()
            except queue.Empty:
                return
            if kind == "submit":
                with self._queued_lock:
                    self._queued -= 1
            if future is not None and not future.done():
                future.set_exception(EngineUnusable(reason))
