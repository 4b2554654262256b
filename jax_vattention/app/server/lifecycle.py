"""The server's start and end: the port taken before the model is built, and a graceful shutdown.

Start: :func:`bind` takes the listening address at once, so that a port in use is reported in
a second, not after the model was built (20-90 s); uvicorn then serves on that socket.

End (:class:`GracefulServer`, uvicorn's server with the service's shutdown):

1. the first Ctrl-C (or SIGTERM) stops accepting connections and new requests (503 on a
   connection still open);
2. requests in flight finish, for up to ``grace_seconds``; past that, every one still open is
   ended with an error (a stream gets an ``error`` event), so that their connections close;
3. the server returns; the caller stops the engine thread, and closes the cache manager only
   once that thread has stopped (:func:`close_engine`).

A second Ctrl-C ends every request at once and returns within about a second, without a
traceback: uvicorn would otherwise cancel the handlers mid-flight (each cancellation logged
with its traceback) and raise the signal again after it returns.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import socket

import uvicorn

log = logging.getLogger(__name__)

# After the second Ctrl-C, the longest the handlers get to end their answers.
FORCED_EXIT_SECONDS = 1.0


def bind(host: str, port: int) -> socket.socket:
    """A socket listening on ``host:port`` (port 0: any free one); ``ValueError`` when it cannot."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as error:
        raise ValueError(f"--host {host}: not an address this machine can listen on ({error.strerror})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as error:
        sock.close()
        hint = "; choose another with --port (0: any free one)" if error.errno == 98 else ""
        raise ValueError(f"cannot listen on {host}:{port}: {error.strerror}{hint}") from None
    sock.listen(2048)      # connections made while the model is built wait for the server
    return sock


class GracefulServer(uvicorn.Server):
    """uvicorn's server, ending the service's requests as the module docstring says.

    Parameters
    ----------
    config : uvicorn's configuration (its app is the service's)
    service : the :class:`~jax_vattention.app.server.service.Service`
    grace_seconds : how long requests in flight may take to finish once a shutdown begins
    """

    def __init__(self, config: uvicorn.Config, service, grace_seconds: float):
        config.timeout_graceful_shutdown = grace_seconds + 10   # uvicorn's own backstop
        super().__init__(config)
        self.service = service
        self.grace_seconds = grace_seconds
        self.signals: list[int] = []

    def handle_exit(self, sig: int, frame) -> None:
        super().handle_exit(sig, frame)
        self.signals.append(sig)
        captured = getattr(self, "_captured_signals", None)
        if captured is not None:
            captured.clear()       # not raised again when the server returns: the caller ends quietly
        if self.force_exit:
            self.service.replicas.cancel_all("the server was stopped")

    async def shutdown(self, sockets=None) -> None:
        self.service.shutting_down = True
        loop = asyncio.get_running_loop()
        timer = loop.call_later(self.grace_seconds, self._end_requests)
        try:
            await super().shutdown(sockets)
        finally:
            timer.cancel()
        if self.force_exit and self.server_state.tasks:
            # The requests were ended: let their handlers send that before the loop closes.
            await asyncio.wait(list(self.server_state.tasks), timeout=FORCED_EXIT_SECONDS)

    def _end_requests(self) -> None:
        log.warning("requests still open after %.0f s of shutdown: ending them", self.grace_seconds)
        self.service.replicas.cancel_all(f"the server is shutting down (requests still open after "
                                            f"{self.grace_seconds:g} s were ended)")


def close_engine(service, timeout: float = 10.0) -> bool:
    """Stops the engine threads (every replica's), then closes each replica's cache manager, only
    where its thread stopped (a step may still be using the cache otherwise; the manager is then
    left to the process's exit, and its exit-time close is withdrawn). Returns whether every
    manager was closed."""
    service.close()
    replicas = service.replicas
    replicas.stop(timeout)
    closed = True
    for loop, manager in zip(replicas.loops, replicas.hosts()):
        if loop.stop(0):
            manager.close()
            continue
        closed = False
        log.error("the engine thread did not stop within %.0f s: the cache manager is left open", timeout)
        for host in {id(m): m for m in (manager, *manager.shards)}.values():
            atexit.unregister(host.close)
    return closed
