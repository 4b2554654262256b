"""Every request accounted for, against the server in-process (the official ``openai`` client, raw HTTP
where a client must misbehave): an abandoned non-streaming request is cancelled, admission beyond the
queue bound is a 429 with ``Retry-After``, a request that can never fit is a 400, tokenization runs off
the event loop, a failed request's event never reaches the detokenizer, the loop outlives an exception,
``/metrics`` and the per-request log line."""

import contextlib
import dataclasses
import json
import logging
import threading
import time

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

from server_harness import start_server  # noqa: E402

from jax_vattention.app.server.limits import ServerLimits  # noqa: E402
from jax_vattention.app.server.metrics import REQUEST_LOG  # noqa: E402

BUDGET_PAGES = 28


@pytest.fixture(scope="module")
def server():
    running = start_server(max_len=256, budget_pages=BUDGET_PAGES, sampling=False)
    yield running
    running.stop()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=60)


@contextlib.contextmanager
def engine_steps(server, before_step):
    """Runs ``before_step()`` in the engine thread before each engine step, for the block's duration."""
    engine = server.engine
    step = engine.step

    def hooked():
        before_step()
        return step()

    engine.step = hooked
    try:
        yield
    finally:
        del engine.step


def test_an_abandoned_non_streaming_request_is_cancelled(server):
    finished = dict(server.service.metrics.finished_by_reason)
    tokens_before = server.engine.stats.tokens
    with engine_steps(server, lambda: time.sleep(0.005)):     # 200 tokens would take a second or more
        with pytest.raises(httpx.TimeoutException):
            httpx.post(server.url + "/completions", timeout=0.3,
                       json={"model": "tiny", "prompt": "Go on", "max_tokens": 200, "temperature": 0})
        stats = server.wait_idle()
    assert server.engine.stats.tokens - tokens_before < 150, "it ran on after its client left"
    assert stats["used_tokens"] == 0
    assert server.service.metrics.finished_by_reason.get("cancelled", 0) == finished.get("cancelled", 0) + 1


def test_admission_beyond_the_queue_bound_is_429_with_retry_after(server, client):
    release = threading.Event()
    before = server.service.limits
    server.service.limits = ServerLimits(max_waiting=1)
    answers = []
    try:
        with engine_steps(server, lambda: release.wait(30)):
            first = threading.Thread(target=lambda: answers.append(client.completions.create(
                model="tiny", prompt="a", max_tokens=2, temperature=0)))
            first.start()
            deadline = time.monotonic() + 10
            while server.service.replicas.waiting < 1:          # it waits for a slot
                assert time.monotonic() < deadline
                time.sleep(0.01)
            response = httpx.post(server.url + "/completions", timeout=10,
                                  json={"model": "tiny", "prompt": "b", "max_tokens": 2})
            assert response.status_code == 429 and response.headers["retry-after"] == "1"
            error = response.json()["error"]
            assert error["code"] == "queue_full" and "1 requests already wait" in error["message"]
            release.set()
            first.join(30)
    finally:
        release.set()
        server.service.limits = before
    assert answers[0].usage.completion_tokens == 2


def test_a_request_that_can_never_fit_the_page_budget_is_refused_at_submit(server):
    manager = server.manager
    horizon = server.engine.config.prefetch_horizon
    # The request passes max_len (1 + 255 - 1 <= 256) but needs more pages than the whole budget.
    assert manager.pages_for(1 + 255 + horizon) > BUDGET_PAGES >= manager.pages_for(1 + 200 + horizon)
    response = httpx.post(server.url + "/completions", timeout=10,
                          json={"model": "tiny", "prompt": "x", "max_tokens": 255})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "max_tokens" and "whole budget" in error["message"]
    assert server.engine.idle


def test_tokenization_runs_off_the_event_loop(server):
    """A tokenizer that takes a second: the server answers /health meanwhile."""
    loaded = server.service.loaded
    slow = dataclasses.replace(loaded)
    slow.encode = lambda text, add_special_tokens=True: (time.sleep(1.0), loaded.encode(text))[1]
    server.service.loaded = slow
    try:
        request = threading.Thread(target=lambda: httpx.post(
            server.url + "/completions", timeout=30, json={"model": "tiny", "prompt": "hi", "max_tokens": 1}))
        request.start()
        time.sleep(0.2)                                          # it is tokenizing now
        start = time.perf_counter()
        assert httpx.get(server.base + "/health", timeout=10).status_code == 200
        waited = time.perf_counter() - start
        request.join(30)
    finally:
        server.service.loaded = loaded
    assert waited < 0.5, f"/health waited {waited:.2f} s for the tokenizer"


def test_a_failed_requests_event_never_reaches_the_detokenizer(server, client):
    """The engine fails a request (its sampling fields broken after submit): the client gets the
    error (500 whole, an error event streamed), and the text stream never sees the event's -1."""
    engine, loaded = server.engine, server.service.loaded
    submit = engine.submit
    decoded = []

    def submit_then_break(request):
        request_id = submit(request)
        state = engine.scheduler.waiting[-1]
        state.request = dataclasses.replace(state.request, temperature="hot")
        return request_id

    class Recording:
        def decode(self, ids):
            decoded.append(list(ids))
            return loaded.decode(ids)

    watched = dataclasses.replace(loaded, tokenizer=loaded.tokenizer)
    watched.decode = Recording().decode
    engine.submit, server.service.loaded = submit_then_break, watched
    try:
        with pytest.raises(openai.InternalServerError) as whole:
            client.completions.create(model="tiny", prompt="Hi", max_tokens=5, temperature=0)
        assert whole.value.body["code"] == "engine_error" and "hot" in whole.value.message
        with pytest.raises(openai.APIError, match="hot"):
            list(client.completions.create(model="tiny", prompt="Hi", max_tokens=5, temperature=0, stream=True))
    finally:
        del engine.submit
        server.service.loaded = loaded
    assert all(token >= 0 for ids in decoded for token in ids)
    server.wait_idle()


def test_the_loop_outlives_a_step_that_raises(server, client):
    failures = []

    def fail_once():
        if not failures:
            failures.append(1)
            raise RuntimeError("a step failed (test)")

    failed_before = server.service.replicas.failed_steps
    with engine_steps(server, fail_once):
        answer = client.completions.create(model="tiny", prompt="Hi", max_tokens=4, temperature=0)
    assert answer.usage.completion_tokens == 4 and failures == [1]
    assert server.service.replicas.failed_steps == failed_before + 1
    health = httpx.get(server.base + "/health", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ok"


def test_metrics_in_prometheus_text_format(server, client):
    parser = pytest.importorskip("prometheus_client.parser")
    server.wait_idle()
    before = {family.name: family for family in parser.text_string_to_metric_families(
        httpx.get(server.base + "/metrics", timeout=10).text)}
    answers = [client.completions.create(model="tiny", prompt="Hello", max_tokens=6, temperature=0) for _ in range(3)]
    response = httpx.get(server.base + "/metrics", timeout=10)
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    families = {family.name: family for family in parser.text_string_to_metric_families(response.text)}

    def value(family, name=None, labels=None, metrics=families):
        for sample in metrics[family].samples:
            if sample.name == (name or family) and (labels is None or sample.labels == labels):
                return sample.value
        raise KeyError(family)

    assert value("vattention:num_requests_running") == 0 and value("vattention:num_requests_waiting") == 0
    assert 0 <= value("vattention:kv_cache_usage_perc") <= 1
    assert value("vattention:kv_cache_pages_budget") == BUDGET_PAGES
    assert value("vattention:kv_cache_mapped_bytes") == server.manager.stats()["mapped_bytes"]
    generated = sum(answer.usage.completion_tokens for answer in answers)
    assert value("vattention:generation_tokens", "vattention:generation_tokens_total") - value(
        "vattention:generation_tokens", "vattention:generation_tokens_total", metrics=before) == generated
    assert value("vattention:prompt_tokens", "vattention:prompt_tokens_total") - value(
        "vattention:prompt_tokens", "vattention:prompt_tokens_total", metrics=before) == 3 * 5
    ttft = "vattention:time_to_first_token_seconds"
    assert value(ttft, ttft + "_count") - value(ttft, ttft + "_count", metrics=before) == 3
    tpot = "vattention:time_per_output_token_seconds"
    assert value(tpot, tpot + "_count") - value(tpot, tpot + "_count", metrics=before) == 3 * 5
    assert value(ttft, ttft + "_bucket", {"le": "+Inf"}) == value(ttft, ttft + "_count")
    assert value("vattention:engine_healthy") == 1


def test_one_json_log_line_per_request(server, client, caplog):
    caplog.set_level(logging.INFO, logger=REQUEST_LOG.name)
    answer = client.completions.create(model="tiny", prompt="Hi", max_tokens=3, temperature=0, user="u-1")
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="Hi", max_tokens=3, suffix="!")
    lines = [json.loads(record.getMessage()) for record in caplog.records if record.name == REQUEST_LOG.name]
    served, refused = lines[-2], lines[-1]
    assert served["id"] == answer.id and served["user"] == "u-1" and served["finish_reason"] == "length"
    assert (served["prompt_tokens"], served["completion_tokens"]) == (2, 3)
    assert 0 < served["ttft_s"] <= served["duration_s"] and served["error"] is None
    assert refused["finish_reason"] == "rejected" and "suffix" in refused["error"]


def test_a_poisoned_manager_makes_health_503_with_the_reason_and_refuses_requests():
    """A driver failure whose undo fails too poisons the manager: the engine truly cannot serve. The
    request being admitted ends with a 503, /health says why, later requests get a 503 at once."""
    server = start_server(sampling=False)
    try:
        server.driver.fail_on("map", 2)                                  # the prompt's second page...
        server.driver.fail_on("unmap", 1, after_a_failure=True)          # ...and undoing the first
        response = httpx.post(server.url + "/completions", timeout=30,
                              json={"model": "tiny", "prompt": "a", "max_tokens": 3})
        assert response.status_code == 503 and response.json()["error"]["code"] == "engine_unavailable"
        health = httpx.get(server.base + "/health", timeout=10)
        assert health.status_code == 503 and "poisoned" in health.json()["reason"]
        later = httpx.post(server.url + "/completions", timeout=10, json={"model": "tiny", "prompt": "a"})
        assert later.status_code == 503 and "poisoned" in later.json()["error"]["message"]
        metrics = httpx.get(server.base + "/metrics", timeout=10).text
        assert "vattention:engine_healthy 0" in metrics.splitlines()
    finally:
        server.stop()
