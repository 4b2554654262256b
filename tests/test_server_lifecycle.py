"""The server's start and end: the port taken before the model is built, the names it answers to, a
clear line without the ``serve`` extra, a graceful shutdown (one Ctrl-C: requests get a grace time,
then end with an error; two: at once), and the cache manager closed only after the engine thread
stopped."""

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import types

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

from server_harness import start_server  # noqa: E402

import jax_vattention  # noqa: E402
from jax_vattention.app.cli import build_parser, main  # noqa: E402
from jax_vattention.app.commands import serve  # noqa: E402
from jax_vattention.app.server.lifecycle import close_engine  # noqa: E402



def slow_steps(server, seconds):
    """Each engine step takes ``seconds`` more (a long answer takes a while)."""
    step = server.engine.step

    def slow():
        time.sleep(seconds)
        return step()

    server.engine.step = slow


def stream_in_thread(server, max_tokens=240):
    """Starts a streamed completion in a thread; returns (thread, what it saw: chunks and the error)."""
    seen = {"chunks": 0, "error": None}
    client = openai.OpenAI(base_url=server.url, api_key="x", max_retries=0, timeout=60)

    def consume():
        try:
            for _ in client.completions.create(model="tiny", prompt="Go", max_tokens=max_tokens, temperature=0,
                                               stream=True):
                seen["chunks"] += 1
        except Exception as error:   # noqa: BLE001  (what the client saw is the result)
            seen["error"] = error

    thread = threading.Thread(target=consume)
    thread.start()
    deadline = time.monotonic() + 30
    while seen["chunks"] < 2:
        assert time.monotonic() < deadline and thread.is_alive(), seen
        time.sleep(0.01)
    return thread, seen


@pytest.fixture
def graceful():
    servers = []

    def make(grace):
        servers.append(start_server(sampling=False, grace_seconds=grace))
        return servers[-1]

    yield make
    for server in servers:
        server.thread.join(10)
        server.service.replicas.stop(10)
        server.manager.close()


def test_a_shutdown_gives_requests_their_grace_time_then_ends_them(graceful):
    server = graceful(grace=1.0)
    slow_steps(server, 0.02)                                  # 240 tokens: 4.8 s or more
    thread, seen = stream_in_thread(server)
    start = time.monotonic()
    server.uvicorn_server.handle_exit(signal.SIGINT, None)   # Ctrl-C
    thread.join(20)
    ended = time.monotonic() - start
    assert not thread.is_alive() and 0.9 < ended < 3.0, ended
    assert isinstance(seen["error"], openai.APIError) and "shutting down" in str(seen["error"])
    server.thread.join(10)
    assert not server.thread.is_alive()
    with pytest.raises(httpx.ConnectError):                  # it accepts no more connections
        httpx.get(server.base + "/health", timeout=5)
    assert close_engine(server.service) and server.manager._closed
    assert server.manager.stats()["active_slots"] == 0


def test_a_second_ctrl_c_ends_everything_at_once(graceful):
    server = graceful(grace=60.0)
    slow_steps(server, 0.02)
    thread, seen = stream_in_thread(server)
    server.uvicorn_server.handle_exit(signal.SIGINT, None)
    time.sleep(0.3)
    start = time.monotonic()
    server.uvicorn_server.handle_exit(signal.SIGINT, None)   # the second Ctrl-C
    server.thread.join(10)
    thread.join(10)
    assert not server.thread.is_alive() and time.monotonic() - start < 2.0
    assert seen["error"] is not None and seen["chunks"] < 240


def test_the_manager_is_closed_only_after_the_engine_thread_stopped():
    server = start_server(sampling=False)
    release = threading.Event()
    step = server.engine.step
    stuck = threading.Event()

    def stuck_step():
        stuck.set()
        release.wait(30)
        return step()

    server.engine.step = stuck_step
    request = threading.Thread(target=lambda: httpx.post(server.url + "/completions", timeout=30, json={
        "model": "tiny", "prompt": "a", "max_tokens": 2}))
    request.start()
    assert stuck.wait(10)                                     # the engine thread is inside a step
    assert not close_engine(server.service, timeout=0.2)
    assert not server.manager._closed                         # a step may still use its cache
    release.set()
    request.join(10)
    server.stop()                                             # the thread stopped: now it closes
    assert server.manager._closed


def test_the_port_is_taken_before_the_model_is_built(monkeypatch, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        built = []
        monkeypatch.setattr(serve, "build_service", lambda args: built.append(args))
        args = build_parser().parse_args(["serve", "--port", str(port)])
        assert serve.run(args) == 2
    assert built == []
    error = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in error and "--port" in error
    assert error.count("\n") == 1


def test_without_the_serve_extra_one_line_says_what_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "uvicorn", None)          # import uvicorn raises ImportError
    assert main(["serve", "--port", "0"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("vattention serve: error: the server needs FastAPI and uvicorn (uvicorn is missing): "
                            "pip install 'jax_vattention[serve]'")
    assert "Traceback" not in error and error.count("\n") == 1


@pytest.mark.parametrize("argv, own, names", [
    (["--model", "smollm2-135m"], "SmolLM2-135M-Instruct.Q4_1", ["smollm2-135m", "SmolLM2-135M-Instruct.Q4_1"]),
    (["--model", "/models/SmolLM2.gguf"], "SmolLM2", ["SmolLM2"]),
    (["--config", "tiny"], "tiny", ["tiny"]),
    (["--model", "smollm2-135m", "--served-model-name", "chat", "chat-2"], "SmolLM2", ["chat", "chat-2"]),
])
def test_served_names(argv, own, names):
    args = build_parser().parse_args(["serve", *argv])
    assert serve.served_names(args, types.SimpleNamespace(name=own)) == names


@pytest.mark.slow   # two servers start in their own processes (compiling the tiny model's programs)
def test_ctrl_c_in_a_real_process_ends_quietly(tmp_path):
    # The child imports the package this process imported (installed or built in place), from a
    # directory where no source tree shadows it.
    package_parent = os.path.dirname(os.path.dirname(os.path.realpath(jax_vattention.__file__)))
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax-cache"),
           "PYTHONPATH": os.pathsep.join(filter(None, [package_parent, os.environ.get("PYTHONPATH")]))}

    def start():
        process = subprocess.Popen([sys.executable, "-m", "jax_vattention.app.cli", "serve", "--port", "0",
                                    "--max-len", "512", "--max-batch", "2", "--shutdown-timeout", "1"],
                                   cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = process.stdout.readline()
        match = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line)
        assert match, (line, process.stderr.read() if process.poll() is not None else "")
        return process, f"http://127.0.0.1:{match.group(1)}"

    for presses in (1, 2):
        process, base = start()
        client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=60)
        stream = client.completions.create(model="tiny", prompt="Go", max_tokens=500, stream=True)
        next(iter(stream))
        process.send_signal(signal.SIGINT)
        if presses == 2:
            time.sleep(0.2)
            process.send_signal(signal.SIGINT)
        try:
            code = process.wait(10 if presses == 1 else 3)
        finally:
            process.kill()
        stderr = process.stderr.read()
        assert code == 130 and "Traceback" not in stderr, stderr
