"""The FastAPI application: ``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``, ``/health``.

Each request is checked (model name, prompt, ``max_tokens`` against the cache's ``max_len``,
sampling fields) before it reaches the engine; a refusal is a 4xx with OpenAI's error JSON.
Tokens are turned into text as they arrive and sent as server-sent events when ``stream`` is
set. A client that goes away mid-answer has its request cancelled in the engine, which frees
its slot and pages.
"""

from __future__ import annotations

import json
import time
from typing import AsyncIterator

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from jax_vattention.engine import Request
from jax_vattention.app.server import protocol
from jax_vattention.app.server.chat import ChatFormat
from jax_vattention.app.server.engine_loop import EngineLoop
from jax_vattention.app.server.text import TextStream


class ApiError(Exception):
    """A request the server refuses: an HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


class Service:
    """What the handlers share: the engine loop, the model's name and text functions, the limits."""

    def __init__(self, engine_loop: EngineLoop, loaded, chat_format: ChatFormat):
        self.engine_loop = engine_loop
        self.loaded = loaded
        self.chat_format = chat_format
        self.max_len = engine_loop.engine.manager.config.max_len

    def check(self, body: protocol.SamplingFields) -> None:
        if body.model != self.loaded.name:
            raise ApiError(404, f"the model {body.model!r} does not exist; this server serves "
                                f"{self.loaded.name!r}", "model", "model_not_found")
        reason = body.unsupported()
        if reason:
            raise ApiError(400, reason)

    def encode(self, text: str, param: str, add_special_tokens: bool = True) -> list[int]:
        if not text:
            raise ApiError(400, f"the {param} is empty", param)
        try:
            ids = self.loaded.encode(text, add_special_tokens=add_special_tokens)
        except ValueError as error:
            raise ApiError(400, str(error), param) from None
        if not ids:
            raise ApiError(400, f"the {param} has no tokens", param)
        return ids

    def max_tokens(self, body: protocol.SamplingFields, prompt: list[int], default: int | None) -> int:
        room = self.max_len - len(prompt) + 1      # the last generated token is not written back
        if room < 1:
            raise ApiError(400, f"the prompt has {len(prompt)} tokens; this server's cache holds "
                                f"max_len={self.max_len} tokens per request", "messages")
        wanted = body.max_tokens or (default or room)
        if wanted > room:
            raise ApiError(400, f"max_tokens={wanted} with a prompt of {len(prompt)} tokens needs "
                                f"{len(prompt) + wanted - 1} positions; this server's cache holds "
                                f"max_len={self.max_len} tokens per request (at most max_tokens={room} here)",
                           "max_tokens")
        return wanted

    async def submit(self, body: protocol.SamplingFields, prompt: list[int], max_tokens: int):
        request = Request(prompt=prompt, max_new_tokens=max_tokens, stop_tokens=self.loaded.stop_tokens,
                          temperature=body.temperature, top_p=body.top_p)
        try:
            return await self.engine_loop.submit(request)
        except ValueError as error:
            raise ApiError(400, str(error)) from None
        except RuntimeError as error:
            raise ApiError(503, str(error), code="engine_stopped") from None

    async def pieces(self, stream) -> AsyncIterator[tuple[str, str | None, int]]:
        """``(text, None, tokens so far)`` as tokens arrive, then ``("", finish_reason, tokens)``;
        cancels the request in the engine if the consumer stops early (the client went away)."""
        text = TextStream(self.loaded, self.loaded.stop_tokens)
        finished = False
        try:
            while True:
                event = await stream.tokens.get()
                if isinstance(event, BaseException):
                    raise event
                piece = text.push(event.token, final=event.finished)
                if event.finished:
                    finished = True
                    if piece:
                        yield piece, None, text.count
                    stop = event.token in self.loaded.stop_tokens
                    yield "", "stop" if stop else "length", text.count
                    return
                if piece:
                    yield piece, None, text.count
        finally:
            if not finished:
                self.engine_loop.cancel(stream.request_id)


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def create_app(service: Service) -> FastAPI:
    """The application over ``service`` (whose engine loop is already running)."""
    app = FastAPI(title="jax_vattention", description="OpenAI-compatible completions over a virtual KV cache")

    @app.exception_handler(ApiError)
    async def api_error(_, error: ApiError):
        kind = "invalid_request_error" if error.status < 500 else "server_error"
        return JSONResponse(protocol.error_body(error.message, kind, error.param, error.code), error.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_, error: RequestValidationError):
        first = error.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ())[1:]) or "body"
        return JSONResponse(protocol.error_body(f"{where}: {first.get('msg')}", param=where), 400)

    @app.get("/health")
    async def health():
        alive = service.engine_loop.alive
        body = {"status": "ok" if alive else "engine stopped", **service.engine_loop.stats()}
        return JSONResponse(body, 200 if alive else 503)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": service.loaded.name, "object": "model",
                                            "created": int(time.time()), "owned_by": "jax_vattention"}]}

    @app.post("/v1/completions")
    async def completions(body: protocol.CompletionRequest):
        service.check(body)
        try:
            text = body.prompt_text()
        except ValueError as error:
            raise ApiError(400, str(error), "prompt") from None
        prompt = service.encode(text, "prompt")
        max_tokens = service.max_tokens(body, prompt, default=16)
        stream = await service.submit(body, prompt, max_tokens)
        request_id = protocol.new_id("cmpl")
        name = service.loaded.name
        if body.stream:
            async def events():
                async for piece, finish, _ in service.pieces(stream):
                    yield _sse(protocol.completion_chunk(request_id, name, piece, finish))
                yield _sse("[DONE]")
            return StreamingResponse(events(), media_type="text/event-stream")
        return await _whole(service, stream, lambda text, finish, use: {
            **protocol.completion_chunk(request_id, name, text, finish), "usage": use}, len(prompt))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: protocol.ChatCompletionRequest):
        service.check(body)
        messages = [message.model_dump() for message in body.messages]
        try:
            text = service.chat_format.render(messages)
        except ValueError as error:
            raise ApiError(400, str(error), "messages") from None
        templated = service.chat_format.description.startswith("the checkpoint's")
        prompt = service.encode(text, "messages", add_special_tokens=not templated)
        max_tokens = service.max_tokens(body, prompt, default=None)
        stream = await service.submit(body, prompt, max_tokens)
        request_id = protocol.new_id("chatcmpl")
        name = service.loaded.name
        if body.stream:
            async def events():
                yield _sse(protocol.chat_chunk(request_id, name, {"role": "assistant", "content": ""}, None))
                async for piece, finish, _ in service.pieces(stream):
                    delta = {"content": piece} if finish is None else {}
                    yield _sse(protocol.chat_chunk(request_id, name, delta, finish))
                yield _sse("[DONE]")
            return StreamingResponse(events(), media_type="text/event-stream")
        return await _whole(service, stream, lambda text, finish, use: protocol.chat_completion(
            request_id, name, text, finish, use), len(prompt))

    return app


async def _whole(service: Service, stream, build, prompt_tokens: int) -> dict:
    """Collects a whole answer (non-streaming) and builds its JSON with ``build(text, finish, usage)``."""
    parts, finish, count = [], "length", 0
    async for piece, reason, count in service.pieces(stream):
        if reason is None:
            parts.append(piece)
        else:
            finish = reason
    return build("".join(parts), finish, protocol.usage(prompt_tokens, count))
