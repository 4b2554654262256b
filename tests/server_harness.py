"""An OpenAI-compatible server in-process for the service tests: the tiny model (random weights, the
weights ``vattention serve --config tiny`` makes), a cache on the CPU (with a fake driver where a
test injects failures), the engine loop, and uvicorn on a free port of 127.0.0.1.

Building an engine compiles its step programs (about 9 s on two cores, 19 s with the sampling
ones); :func:`compile_cache` keeps them in a persistent compilation cache for the test session,
so that the next server of the same shapes compiles in under a second.
"""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import tempfile
import threading
import time

import jax
from jax.experimental.compilation_cache import compilation_cache
import jax.numpy as jnp
import uvicorn
from flax import nnx

import jax_vattention as jv
from jax_vattention import _core
from jax_vattention.app.commands.model_source import ByteTokenizer, LoadedModel
from jax_vattention.app.server.app import create_app
from jax_vattention.app.server.chat import ChatFormat
from jax_vattention.app.server.engine_loop import EngineLoop
from jax_vattention.app.server.lifecycle import GracefulServer
from jax_vattention.app.server.limits import ServerLimits
from jax_vattention.app.server.service import Service
from jax_vattention.engine import Engine, EngineConfig
from jax_vattention.models.configs import get_config
from jax_vattention.models.llama import Llama

PAGE = 4096          # a fake driver's page: 32 tokens of the tiny model's K or V of one layer
_CACHE_DIR = tempfile.mkdtemp(prefix="jax-compile-cache-")
_MODEL = None


def tiny_model() -> Llama:
    """The tiny model with ``vattention serve --config tiny``'s weights (seed 0), made once."""
    global _MODEL
    if _MODEL is None:
        _MODEL = Llama(get_config("tiny"), rngs=nnx.Rngs(0))
    return _MODEL


@contextlib.contextmanager
def compile_cache():
    """JAX's persistent compilation cache in a folder shared by the session's servers, then the
    settings as they were.

    JAX decides once per process whether the cache is used and keeps writing every later compile to
    it; ``reset_cache`` makes it decide again, on entry and on exit, so the rest of the suite runs
    without it."""
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    before = {name: getattr(jax.config, name) for name in names}
    for name, value in zip(names, (_CACHE_DIR, 0, 0)):
        jax.config.update(name, value)
    compilation_cache.reset_cache()
    try:
        yield
    finally:
        for name, value in before.items():
            jax.config.update(name, value)
        compilation_cache.reset_cache()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclasses.dataclass
class RunningServer:
    """A server running in a thread: its service, fake driver (or None) and addresses."""

    service: Service
    driver: object
    uvicorn_server: uvicorn.Server
    thread: threading.Thread
    base: str          # http://127.0.0.1:PORT

    @property
    def url(self) -> str:
        return self.base + "/v1"

    @property
    def engine(self) -> Engine:
        return self.service.replicas.engine

    @property
    def manager(self):
        return self.engine.manager

    def wait_idle(self, timeout: float = 30.0) -> dict:
        """The engine loop's stats once no request holds a slot or waits (fails after ``timeout``)."""
        deadline = time.monotonic() + timeout
        while True:
            stats = self.service.replicas.stats()
            if stats["running"] == 0 and stats["waiting"] == 0 and stats["active_slots"] == 0:
                return stats
            assert time.monotonic() < deadline, f"requests still hold slots: {stats}"
            time.sleep(0.02)

    def stop(self) -> None:
        self.uvicorn_server.should_exit = True
        self.thread.join(30)
        self.service.close()
        if self.service.replicas.stop(30):
            self.manager.close()


def start_server(*, fake_driver: bool = True, host_pages: bool = False, max_batch: int = 4, max_len: int = 256,
                 budget_pages: int = 4000, token_budget: int = 16, chunk_tokens: int = 4, sampling: bool = True,
                 names=None, limits: ServerLimits = ServerLimits(), stop_tokens=(), grace_seconds: float | None = None,
                 **engine_options) -> RunningServer:
    """A running server over the tiny model; see the module docstring. With ``grace_seconds``, the
    server is ``vattention serve``'s :class:`GracefulServer` with that grace time."""
    model = tiny_model()
    config = model.config
    driver = _core.FakeDriver(PAGE, host_pages=host_pages) if fake_driver else None
    cache_config = jv.CacheConfig(num_layers=config.num_layers, max_batch=max_batch, max_len=max_len,
                                  kv_heads=config.num_kv_heads, head_dim=config.head_dim, dtype=jnp.float32,
                                  page_bytes=PAGE if fake_driver else None,
                                  budget_bytes=budget_pages * PAGE if fake_driver else None)
    manager = jv.CacheManager(cache_config, jax.devices("cpu")[0], driver=driver)
    engine = Engine(model, manager, EngineConfig(token_budget=token_budget, chunk_tokens=chunk_tokens,
                                                 **engine_options))
    with compile_cache():
        engine.compile(sampling=sampling)
    loop = EngineLoop(engine)
    loop.start()
    loaded = LoadedModel(model, ByteTokenizer(), tuple(stop_tokens), "tiny", "config tiny (random weights)")
    service = Service(loop, loaded, ChatFormat(), names=names, limits=limits)
    server, thread, url = serve_in_thread(service, grace_seconds)
    return RunningServer(service, driver, server, thread, url)


def serve_in_thread(service: Service, grace_seconds: float | None = None):
    """``(uvicorn server, thread, base url)``: ``service``'s app on a free port, served by a thread,
    started (a :class:`GracefulServer` with ``grace_seconds``)."""
    port = free_port()
    # log_config=None: uvicorn leaves logging alone (its handlers would hold the test's captured stderr).
    config = uvicorn.Config(create_app(service), host="127.0.0.1", port=port, log_level="warning", log_config=None)
    server = uvicorn.Server(config) if grace_seconds is None else GracefulServer(config, service, grace_seconds)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    return server, thread, f"http://127.0.0.1:{port}"
