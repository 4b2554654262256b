"""One engine over processes (``jax.distributed``): process 0 leads, every other process follows its calls.

A mesh that spans processes runs one compiled step on every process at once, and every process's
cache manager must map the same slots to the same lengths (each holds its own devices' pages). The
engine's plan (which request runs in which slot, how many tokens, which pages) is a deterministic
function of the calls made on it — ``submit_samples``, ``cancel``, ``step`` — as long as nothing
in it depends on time (map-ahead does: run with ``EngineConfig(overlap=False)``). So process 0,
which serves HTTP and admits requests, keeps a journal of its calls, and each other process
replays them on an identical engine:

    process 0 (leader)                          process i (follower)
    submit / cancel  ──▶ journal                 ┌─▶ entry n: calls, step?, fingerprint
    step n: wait acks of n-1, publish entry n ───┘   replay calls, compare fingerprint, step
            engine.step()  ◀── collectives ──▶       engine.step(), ack n

Entries travel through JAX's own distributed key-value store (the coordination service that
``jax.distributed.initialize`` started), never through a socket of ours. Each entry carries the
leader's plan fingerprint (:func:`plan_fingerprint`) before its step; a follower whose own differs
stops with :class:`ProcessGroupError`, since its pages no longer match.

Failure: every wait is bounded by ``timeout`` seconds. A follower hears from the leader at least
every ``timeout / 4`` seconds (an idle leader sends keep-alive entries); a leader hears each
follower's ack of every entry. A process that stalls is named in the error of the others; one
that dies is reported by JAX's coordination service itself (its heartbeat, set to the same
timeout by :func:`~jax_vattention.app.processes.initialize`), which ends the survivors.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import threading
import time
from typing import Callable, Protocol

import numpy as np

from jax_vattention.engine.requests import Request

log = logging.getLogger(__name__)

# Key prefix of the journal in the key-value store.
PREFIX = "jax_vattention/lockstep"


class ProcessGroupError(RuntimeError):
    """A process of the group died, stalled or diverged: the group cannot go on."""


class Channel(Protocol):
    """A key-value store every process of the group reaches: JAX's (:class:`KeyValueChannel`)."""

    def set(self, key: str, value: bytes) -> None: ...

    def get(self, key: str, timeout: float) -> bytes | None:
        """The value of ``key`` once set, or None after ``timeout`` seconds."""

    def delete(self, key: str) -> None: ...


class KeyValueChannel:
    """:class:`Channel` over the key-value store of ``jax.distributed`` (after ``initialize``)."""

    def __init__(self):
        from jax._src import distributed
        self._client = distributed.global_state.client
        if self._client is None:
            raise RuntimeError("jax.distributed is not initialized: call jax.distributed.initialize (or "
                               "pass --coordinator, --num-processes and --process-id) first")

    def set(self, key: str, value: bytes) -> None:
        self._client.key_value_set_bytes(key, value)

    def get(self, key: str, timeout: float) -> bytes | None:
        try:
            return self._client.blocking_key_value_get_bytes(key, max(1, int(timeout * 1000)))
        except Exception as error:   # noqa: BLE001  (the client raises XlaRuntimeError on a deadline)
            if "DEADLINE_EXCEEDED" in str(error) or "Deadline" in str(error):
                return None
            raise

    def delete(self, key: str) -> None:
        self._client.key_value_delete(key)


def plan_fingerprint(engine) -> str:
    """A digest of the engine's plan state: its step count, every slot's length and occupant, and
    the waiting requests. Two engines given the same calls have the same one."""
    digest = hashlib.blake2b(digest_size=12)
    digest.update(str(engine.stats.steps).encode())
    digest.update(np.asarray(engine.manager.lengths(), np.int64).tobytes())
    running = sorted((slot, state.request_id) for slot, state in engine.scheduler.running.items())
    waiting = [state.request_id for state in engine.scheduler.waiting]
    digest.update(json.dumps([running, waiting]).encode())
    return digest.hexdigest()


def encode_request(request: Request) -> dict:
    """``request`` as JSON-ready fields."""
    fields = dataclasses.asdict(request)
    fields["logit_bias"] = [[int(token), float(bias)] for token, bias in request.logit_bias.items()]
    return fields


def decode_request(fields: dict) -> Request:
    """The :class:`Request` :func:`encode_request` gave ``fields`` of."""
    fields = dict(fields)
    fields["logit_bias"] = {int(token): bias for token, bias in fields["logit_bias"]}
    fields["stop_tokens"] = tuple(fields["stop_tokens"])
    fields["stop_token_ids"] = tuple(fields["stop_token_ids"])
    return Request(**fields)


class LockstepLeader:
    """Process 0's side: the journal of its engine's calls, published entry by entry.

    The engine's owner (:class:`~jax_vattention.app.server.engine_loop.EngineLoop`) records every
    ``submit_samples`` and ``cancel`` it makes, and calls :meth:`before_step` before each
    ``engine.step()`` and :meth:`keep_alive` while idle.

    Parameters
    ----------
    channel : the key-value store
    followers : the process ids that follow (1 .. N-1)
    timeout : seconds a follower may take to ack an entry before it counts as stalled
    on_stall : called (once, from a watchdog thread) with the :class:`ProcessGroupError` when a
        follower has not acked an entry within ``timeout`` while the leader's own thread is
        blocked (in a step whose collectives wait for that follower); None: only
        :meth:`before_step` raises it, when the leader's thread gets there
    """

    def __init__(self, channel: Channel, followers: list[int], timeout: float = 60.0, *,
                 on_stall: Callable[[ProcessGroupError], None] | None = None):
        if timeout <= 0:
            raise ValueError(f"the lockstep timeout must be positive, got {timeout}")
        self.channel = channel
        self.followers = list(followers)
        self.timeout = timeout
        self._calls: list = []
        self._next = 0                     # the next entry's number
        self._published_at = time.monotonic()
        self._acked = True                 # every follower acked the last entry
        self._error: ProcessGroupError | None = None
        self._lock = threading.Lock()
        self._on_stall = on_stall
        self._stopped = threading.Event()
        if on_stall is not None:
            threading.Thread(target=self._watch, name="lockstep-watchdog", daemon=True).start()

    def record_submit(self, request: Request, samples: int, request_ids: list[int]) -> None:
        """Journals an ``engine.submit_samples(request, samples)`` that returned ``request_ids``."""
        self._calls.append(["submit", encode_request(request), samples, list(request_ids)])

    def record_cancel(self, request_id: int) -> None:
        """Journals an ``engine.cancel(request_id)``."""
        self._calls.append(["cancel", request_id])

    def before_step(self, engine) -> None:
        """Publishes the calls since the last entry and the plan they lead to, for a step; raises
        :class:`ProcessGroupError` if a follower did not ack the last entry within the timeout."""
        self._publish(engine, step=True)

    def keep_alive(self, engine) -> None:
        """While idle: publishes the calls made (if any) or, every ``timeout / 4`` seconds, an empty
        entry, so that the followers know the leader lives."""
        if self._calls or time.monotonic() - self._published_at >= self.timeout / 4:
            self._publish(engine, step=False)

    def stop(self, engine) -> None:
        """Tells the followers to stop (after the calls recorded so far)."""
        if self._error is None and not self._stopped.is_set():
            try:
                self._publish(engine, step=False, stop=True)
            finally:
                self._stopped.set()

    def _publish(self, engine, *, step: bool, stop: bool = False) -> None:
        if self._error is not None:
            raise self._error
        self._wait_for_acks()
        entry = {"calls": self._calls, "step": step, "stop": stop, "fingerprint": plan_fingerprint(engine)}
        self._calls = []
        with self._lock:
            self.channel.set(f"{PREFIX}/entry/{self._next}", json.dumps(entry).encode())
            self._next += 1
            self._published_at = time.monotonic()
            self._acked = False

    def _wait_for_acks(self) -> None:
        """Waits for every follower's ack of the last entry, then deletes the entry and its acks."""
        if self._acked:
            return
        number = self._next - 1
        deadline = self._published_at + self.timeout
        keys = [f"{PREFIX}/ack/{process}/{number}" for process in self.followers]
        for process, key in zip(self.followers, keys):
            if self.channel.get(key, max(0.0, deadline - time.monotonic())) is None:
                self._error = _stalled(process, number, self.timeout)
                raise self._error
        with self._lock:
            self._acked = True
        for key in (*keys, f"{PREFIX}/entry/{number}"):
            self.channel.delete(key)

    def _watch(self) -> None:
        """The watchdog of a leader whose thread may be blocked in a step: polls the acks of the
        last entry once it is older than the timeout."""
        while not self._stopped.wait(self.timeout / 4):
            with self._lock:
                if self._acked or time.monotonic() - self._published_at < self.timeout:
                    continue
                number = self._next - 1
            for process in self.followers:
                if self.channel.get(f"{PREFIX}/ack/{process}/{number}", 0.001) is None:
                    with self._lock:
                        if self._acked:     # acked meanwhile: the leader's thread took them
                            break
                    self._error = _stalled(process, number, self.timeout)
                    self._stopped.set()
                    self._on_stall(self._error)
                    return


def _stalled(process: int, number: int, timeout: float) -> ProcessGroupError:
    return ProcessGroupError(f"process {process} did not finish entry {number} of the lockstep within "
                             f"{timeout:g} s: it died or stalled, and the processes cannot go on without it")


def follow(engine, channel: Channel, process_id: int, timeout: float = 60.0,
           on_step: Callable[[list], None] | None = None) -> int:
    """A follower's loop: replays process 0's journal on ``engine`` until process 0 says stop.

    Returns the steps run. Raises :class:`ProcessGroupError` when process 0 sends nothing for
    ``timeout`` seconds, or when this engine's plan differs from process 0's (a divergence: the
    processes' pages no longer match). ``on_step`` gets each step's events.
    """
    steps = 0
    number = 0
    while True:
        raw = channel.get(f"{PREFIX}/entry/{number}", timeout)
        if raw is None:
            raise ProcessGroupError(f"process 0 sent nothing for {timeout:g} s (entry {number} of the lockstep): "
                                    f"it died or stalled; process {process_id} stops")
        entry = json.loads(raw)
        for call in entry["calls"]:
            _replay(engine, call, process_id)
        mine = plan_fingerprint(engine)
        if mine != entry["fingerprint"]:
            raise ProcessGroupError(f"process {process_id}'s plan differs from process 0's before entry {number} "
                                    f"of the lockstep: its pages no longer match; it stops")
        if entry["stop"]:
            channel.set(f"{PREFIX}/ack/{process_id}/{number}", b"stop")
            return steps
        if entry["step"]:
            try:
                events = engine.step()
            except Exception as error:   # noqa: BLE001  (process 0's loop goes on after a failed step: so do we)
                log.warning("step %d failed on process %d (%s: %s); the next entry tells whether the plans "
                            "still agree", steps, process_id, type(error).__name__, error)
                events = []
            steps += 1
            if on_step is not None:
                on_step(events)
        channel.set(f"{PREFIX}/ack/{process_id}/{number}", mine.encode())
        number += 1


def _replay(engine, call: list, process_id: int) -> None:
    if call[0] == "submit":
        _, request, samples, leader_ids = call
        ids = engine.submit_samples(decode_request(request), samples)
        if list(ids) != leader_ids:
            raise ProcessGroupError(f"process {process_id} numbered a request {ids}, process 0 {leader_ids}: "
                                    "the engines differ")
    elif call[0] == "cancel":
        engine.cancel(call[1])
    else:
        raise ProcessGroupError(f"unknown call {call[0]!r} in the lockstep journal")
