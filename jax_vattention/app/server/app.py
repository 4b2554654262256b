"""The FastAPI application: ``/v1/completions``, ``/v1/chat/completions``, ``/v1/models`` (and
``/v1/models/{id}``), vLLM's ``/tokenize``, ``/detokenize`` and ``/version``, ``/health`` and
``/metrics``.

Each request is read and checked by the :class:`~jax_vattention.app.server.service.Service`
before it reaches the engine; a refusal is a 4xx with OpenAI's error JSON (every other error
path too: :mod:`~jax_vattention.app.server.errors`). Tokens are turned into text as they arrive
(:mod:`~jax_vattention.app.server.choices`) and sent as server-sent events when ``stream`` is set,
a chunk per choice (:mod:`~jax_vattention.app.server.answers`); a request that fails mid-stream ends
with an ``error`` event, which OpenAI's client raises. A client that goes away mid-answer,
streaming or not, has its request cancelled in the engine, which frees its slot and pages.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import AsyncIterator, Callable

from fastapi import FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.requests import Request as HttpRequest

from jax_vattention import __version__
from jax_vattention.app.server import protocol
from jax_vattention.app.server.answers import Answer
from jax_vattention.app.server.errors import ApiError, error_body, install_error_handlers
from jax_vattention.app.server.metrics import RequestRecord
from jax_vattention.app.server.service import RequestFailed, Service  # noqa: F401 (Service: re-exported)

# Prometheus' text exposition format.
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def create_app(service: Service) -> FastAPI:
    """The application over ``service`` (whose engine loop is already running)."""
    app = FastAPI(title="jax_vattention", description="OpenAI-compatible completions over a virtual KV cache")
    install_error_handlers(app)

    @app.get("/health")
    async def health():
        reason = "the server is shutting down" if service.shutting_down else service.replicas.health
        body = {"status": "ok" if reason is None else "unavailable", "reason": reason,
                "unusable_replicas": {str(index): why for index, why in service.replicas.unusable().items()},
                **service.replicas.stats()}
        return JSONResponse(body, 200 if reason is None else 503)

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(service.metrics.render(service.replicas), media_type=METRICS_CONTENT_TYPE)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [protocol.model_card(name, service.started) for name in service.names]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id not in service.names:
            raise ApiError(404, f"the model {model_id!r} does not exist; this server serves "
                                f"{' or '.join(map(repr, service.names))}", "model", "model_not_found")
        return protocol.model_card(model_id, service.started)

    @app.post("/v1/completions")
    async def completions(request: HttpRequest):
        record = RequestRecord(protocol.new_id("cmpl"), "completions", time.perf_counter())
        created = int(time.time())
        try:
            body = await service.parse(request, protocol.CompletionRequest)
            record.stream, record.user = bool(body.stream), body.end_user
            prompts = await service.completion_prompts(body)
            wanted = 1 if body.echo_only else body.max_tokens    # one token prefills the prompt, then is dropped
            limits = [service.max_tokens(wanted, "max_tokens", prompt, "prompt", default=16) for prompt in prompts]
            ranked = body.candidates > body.samples
            # best_of ranks by cumulative log-probability: its samples compute them (0 top ones).
            logprobs = body.logprobs if body.logprobs is not None else (0 if ranked else None)
            # vLLM's prompt_logprobs, else echo's with logprobs (vLLM: prompt_logprobs wins where both).
            prompt_logprobs = body.prompt_logprobs if body.prompt_logprobs is not None else \
                body.logprobs if body.echo and body.logprobs is not None else None
            streams = await service.submit(body, prompts, limits, "max_tokens", record, samples=body.candidates,
                                           logprobs=logprobs, prompt_logprobs=prompt_logprobs)
        except ApiError as error:
            service.refused(record, error)
            raise
        answer = Answer(prompts, body.candidates, body.samples, service.token_text, chat=False,
                        logprobs=body.logprobs, echo=bool(body.echo), decode=service.loaded.decode,
                        with_prompt_logprobs=body.prompt_logprobs is not None, generated=not body.echo_only)
        texts = service.choice_texts(body, len(streams))
        name = service.name

        def chunk(choices, use=None):
            return protocol.completion_object(record.request_id, name, created, choices, use)

        if body.stream:
            return _event_stream(service, streams, texts, answer, record, body, created, chunk=chunk)
        return await _whole(request, service, streams, texts, answer, record, chunk)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HttpRequest):
        record = RequestRecord(protocol.new_id("chatcmpl"), "chat", time.perf_counter())
        created = int(time.time())
        try:
            body = await service.parse(request, protocol.ChatCompletionRequest)
            record.stream, record.user = bool(body.stream), body.end_user
            prompt = await service.chat_prompt(body)
            wanted, field = body.answer_limit
            max_tokens = service.max_tokens(wanted, field, prompt, "messages", default=None)
            top = (body.top_logprobs or 0) if body.logprobs else None
            streams = await service.submit(body, [prompt], [max_tokens], field, record, samples=body.samples,
                                           logprobs=top, prompt_logprobs=body.prompt_logprobs)
        except ApiError as error:
            service.refused(record, error)
            raise
        answer = Answer([prompt], body.samples, body.samples, service.token_text, chat=True, logprobs=top,
                        with_prompt_logprobs=body.prompt_logprobs is not None)
        texts = service.choice_texts(body, len(streams))
        name = service.name

        if body.stream:
            return _event_stream(service, streams, texts, answer, record, body, created,
                                 chunk=lambda choices: protocol.chat_chunk(record.request_id, name, created, choices))
        return await _whole(request, service, streams, texts, answer, record,
                            lambda choices, use: protocol.chat_completion(record.request_id, name, created, choices,
                                                                          use, answer.prompt_logprobs()))

    @app.post("/tokenize")
    async def tokenize(request: HttpRequest):
        data = await service.parse_plain(request, protocol.TokenizeRequest)
        if data.messages is not None:
            tokens = await service.chat_prompt(data)
        else:
            tokens = await service.off_loop(service.tokenize, data.prompt, data.add_special_tokens is not False,
                                            "prompt")
        return {"count": len(tokens), "max_model_len": service.max_len, "tokens": tokens}

    @app.post("/detokenize")
    async def detokenize(request: HttpRequest):
        data = await service.parse_plain(request, protocol.DetokenizeRequest)
        return {"prompt": await service.off_loop(service.detokenize, data.tokens)}

    @app.get("/version")
    async def version():
        return {"version": __version__}

    return app


def _event_stream(service: Service, streams, texts, answer: Answer, record: RequestRecord,
                  body: protocol.SamplingFields, created: int, *, chunk: Callable[..., dict]) -> StreamingResponse:
    """The server-sent events of a streamed answer: a chunk per choice's new text; with
    ``include_usage`` every chunk carries ``"usage": null`` (the usage so far, with
    ``continuous_usage_stats``) and a last chunk without choices carries the usage."""
    include_usage = body.include_usage

    def sent(payload: dict) -> str:
        if include_usage:
            so_far = protocol.usage(record.prompt_tokens, answer.completion_tokens()) if body.continuous_usage else None
            payload = {**payload, "usage": so_far}
        return _sse(payload)

    async def events() -> AsyncIterator[str]:
        for choice in answer.first_chunks():
            yield sent(chunk([choice]))
        try:
            async with contextlib.aclosing(service.deltas(streams, texts, record)) as deltas:
                async for delta in deltas:
                    choice = answer.stream_choice(delta)
                    if choice is not None:
                        yield sent(chunk([choice]))
        except RequestFailed as failure:
            yield _sse(error_body(str(failure), "server_error", None, "engine_error"))
        else:
            if include_usage:
                use = protocol.usage(record.prompt_tokens, answer.completion_tokens())
                yield _sse(protocol.usage_chunk(record.request_id, service.name, created, answer.chat, use))
        yield _sse("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream")


async def _whole(request: HttpRequest, service: Service, streams, texts, answer: Answer, record: RequestRecord,
                 build) -> Response:
    """Collects a whole answer (non-streaming) and builds its JSON with ``build(choices, usage)``.

    Waits for the client's disconnection meanwhile: a client that gives up (a timeout) has its
    request cancelled in the engine, as a stream's is, instead of running to the end unread.
    """

    async def collect() -> dict:
        async with contextlib.aclosing(service.deltas(streams, texts, record)) as deltas:
            async for delta in deltas:
                answer.add(delta)
        return build(answer.whole_choices(), protocol.usage(record.prompt_tokens, answer.completion_tokens()))

    answer_task = asyncio.ensure_future(collect())
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({answer_task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not answer_task.done():
            answer_task.cancel()       # the client left (or the handler was cancelled): deltas cancels it
        gone.cancel()
    try:
        return JSONResponse(await answer_task)
    except asyncio.CancelledError:
        return Response(status_code=499)   # nobody reads it: the client closed the connection
    except RequestFailed as failure:
        code = "engine_unavailable" if failure.status == 503 else "engine_error"
        return ApiError(failure.status, str(failure), None, code).response()


async def _disconnected(request: HttpRequest) -> None:
    """Returns when the client closes the connection (the body was read: only that message is left)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
