"""One job over two processes (``jax.distributed`` on localhost, gloo collectives, one CPU device each)
against one process over two devices: the same tokens through ``generate``, the engine (prefix
sharing, preemption, sampling) and ``vattention serve``; a process that dies or stalls stops the
other within the timeout. Every process runs with a timeout, so a failure cannot hang the suite."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path


from own_process import environment
from server_harness import free_port

HERE = Path(__file__).resolve().parent
CASES = HERE / "multiprocess_cases.py"


def start(*args: str, forced_devices: int | None = None) -> subprocess.Popen:
    """``python *args`` with the package under test (from the tests' folder: ``python -m`` must not
    find the source tree first)."""
    env = environment()
    env.pop("XLA_FLAGS", None)
    if forced_devices is not None:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={forced_devices}"
    return subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=HERE)


def finish(process: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
    return process.returncode, out, err


def result(out: str, err: str) -> dict:
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    assert lines, f"no result; stdout:\n{out[-3000:]}\nstderr:\n{err[-3000:]}"
    return json.loads(lines[-1][len("RESULT "):])


def test_two_processes_give_the_tokens_of_one_process_over_two_devices():
    cases = "generate,engine_prefixes_and_preemption"
    port = free_port()
    pair = [start(str(CASES), cases, str(i), str(port)) for i in (0, 1)]
    reference = result(*finish(start(str(CASES), cases, "reference"))[1:])
    outcomes = [result(*finish(process)[1:]) for process in pair]
    for outcome in outcomes:
        generated = outcome["generate"]
        for layout in ("per_layer",):
            assert generated[layout] == reference["generate"][layout]
            assert generated[f"{layout} devices here"] == 1            # each process holds its own device
            assert 2 * generated[f"{layout} pages here"] == reference["generate"][f"{layout} pages here"]
        engine = outcome["engine_prefixes_and_preemption"]
        assert engine == reference["engine_prefixes_and_preemption"]
        assert engine["preemptions"] >= 1 and engine["shared_admissions"] >= 2 and not engine["failed"]


def test_a_process_that_dies_stops_the_other_within_the_timeout():
    port = free_port()
    pair = [start(str(CASES), "a_process_dies", str(i), str(port)) for i in (0, 1)]
    code_1, out_1, _ = finish(pair[1])
    died = float(next(line.split()[1] for line in out_1.splitlines() if line.startswith("DYING")))
    code_0, out_0, err_0 = finish(pair[0], timeout=120)
    stopped = time.time()
    assert code_1 == 3
    assert code_0 != 0 and "RESULT" not in out_0
    assert "Task 1 heartbeat timeout" in err_0 or "unhealthy" in err_0, err_0[-2000:]
    assert stopped - died < 10 + 20     # the heartbeat timeout (10 s) and the process's exit


def serve(port: int, http: int, process_id: int | None) -> subprocess.Popen:
    args = ["-m", "jax_vattention.app.cli", "serve", "--config", "tiny", "--tp", "2", "--port", str(http),
            "--max-batch", "4", "--max-len", "256", "--process-timeout", "10"]
    if process_id is not None:
        args += ["--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id", str(process_id)]
        return start(*args)
    return start(*args, forced_devices=2)


def answers(http: int, process: subprocess.Popen) -> list[str]:
    import concurrent.futures

    import httpx
    import openai

    deadline = time.monotonic() + 240
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{http}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert process.poll() is None and time.monotonic() < deadline, finish(process, 5)
        time.sleep(0.5)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{http}/v1", api_key="none", max_retries=0, timeout=60)

    def ask(prompt: str) -> str:
        return client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0).choices[0].text

    with concurrent.futures.ThreadPoolExecutor(4) as pool:   # concurrent: they share steps
        return list(pool.map(ask, ["hello", "the cat sat", "a b c d e f", "0123456789" * 3]))


def test_serve_over_two_processes_answers_as_one_process_and_a_stalled_follower_stops_it():
    port, http, reference_http = free_port(), free_port(), free_port()
    reference = serve(port, reference_http, None)
    pair = [serve(port, http, i) for i in (0, 1)]
    try:
        want = answers(reference_http, reference)
        got = answers(http, pair[0])
        assert got == want
        pair[1].send_signal(signal.SIGSTOP)       # process 1 stalls: no acks, no heartbeats
        stalled = time.monotonic()
        code, out, err = finish(pair[0], timeout=90)
        assert time.monotonic() - stalled < 10 + 20
        assert code != 0
        assert "process 1 did not finish" in err or "Task 1 heartbeat timeout" in err or "unhealthy" in err, err[-2000:]
    finally:
        for process in (reference, *pair):
            if process.poll() is None:
                process.send_signal(signal.SIGCONT)
                process.kill()
            process.communicate()
