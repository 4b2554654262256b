"""What the HTTP handlers share: the engine loop, the model's names and text functions, the limits.

Every request is accounted for. It is checked (its fields, model name, sizes, and whether it
could ever fit the cache) before it reaches the engine; its text is tokenized in a thread pool,
off the event loop (a 10 MB prompt would otherwise hold every other client); it waits for a
slot only while fewer than ``max_waiting`` requests do (else 429 with ``Retry-After``); and it
ends with its tokens, with a clear error, or cancelled in the engine when its client goes
away, streaming or not. Each one leaves a JSON log line and its figures in ``/metrics``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import time
from typing import AsyncIterator, Iterable

from pydantic import ValidationError
from starlette.requests import Request as HttpRequest

from jax_vattention.app.server import protocol
from jax_vattention.app.server.body import read_json_object
from jax_vattention.app.server.chat import ChatFormat
from jax_vattention.app.server.choices import ChoiceFailed, ChoiceSpec, ChoiceText, Delta, deltas
from jax_vattention.app.server.engine_loop import EngineLoop, EngineUnusable, QueueFull
from jax_vattention.app.server.errors import ApiError, validation_error
from jax_vattention.app.server.limits import ServerLimits
from jax_vattention.app.server.metrics import RequestRecord, ServerMetrics
from jax_vattention.app.server.replicas import Replicas
from jax_vattention.engine import Request

# The request fields the engine's checks name (engine.validation), as the server's clients call them.
_ENGINE_FIELDS = ("logit_bias", "stop_token_ids", "stop tokens", "min_tokens", "seed", "prompt_logprobs", "logprobs",
                  "top_k", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty")


def _samples_field(body: protocol.SamplingFields) -> str:
    """The field that asked for a request's samples: completions' ``best_of`` where it exceeds ``n``."""
    best_of = getattr(body, "best_of", None)
    return "best_of" if best_of is not None and best_of > body.samples else "n"


class RequestFailed(Exception):
    """A request the engine ended with an error (status 500), or could not finish (503)."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class Service:
    """The state the handlers share.

    Parameters
    ----------
    replicas : the running :class:`~jax_vattention.app.server.replicas.Replicas` of ``serve --dp``, or
        one running engine loop (one replica); ``max_waiting`` is set from ``limits``, per replica
    loaded : the model with its tokenizer (:class:`~jax_vattention.app.commands.model_source.LoadedModel`)
    chat_format : how chat messages become a prompt
    names : the model names clients may use, the one reported first; default the model's own name
    limits : :class:`ServerLimits`
    """

    def __init__(self, replicas: Replicas | EngineLoop, loaded, chat_format: ChatFormat,
                 names: Iterable[str] | None = None, limits: ServerLimits = ServerLimits()):
        self.replicas = replicas if isinstance(replicas, Replicas) else Replicas([replicas])
        self.loaded = loaded
        self.chat_format = chat_format
        self.names = list(dict.fromkeys(names or [loaded.name]))
        self.limits = limits
        self.max_len = self.replicas.engine.manager.config.max_len
        self.metrics = ServerMetrics()
        self.started = int(time.time())
        self.shutting_down = False
        self._pool = concurrent.futures.ThreadPoolExecutor(limits.tokenizer_threads, thread_name_prefix="tokenizer")

    @property
    def name(self) -> str:
        """The model's name in answers and first in ``/v1/models``."""
        return self.names[0]

    @property
    def limits(self) -> ServerLimits:
        return self._limits

    @limits.setter
    def limits(self, limits: ServerLimits) -> None:
        """New limits take effect with the next request (the engine loop's queue bound too)."""
        self._limits = limits
        self.replicas.max_waiting = limits.max_waiting

    @property
    def max_prompt_tokens(self) -> int:
        return min(self.limits.max_prompt_tokens or self.max_len, self.max_len)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------- checks
    async def parse(self, request: HttpRequest, model: type[protocol.SamplingFields]) -> protocol.SamplingFields:
        """The request's body as ``model``, every field checked; :class:`ApiError` otherwise."""
        self.check_serving()
        data = await read_json_object(request, self.limits.max_body_bytes)
        try:
            body = model.model_validate(data)
        except ValidationError as error:
            raise validation_error(error.errors()) from None
        body.check_fields()
        if body.model not in self.names:
            raise ApiError(404, f"the model {body.model!r} does not exist; this server serves "
                                f"{' or '.join(map(repr, self.names))}", "model", "model_not_found")
        return body

    async def parse_plain(self, request: HttpRequest, model: type) -> object:
        """The body of a request that does not generate (``/tokenize``, ``/detokenize``) as ``model``;
        its ``model`` field, when given, must name the served model."""
        data = await read_json_object(request, self.limits.max_body_bytes)
        try:
            body = model.model_validate(data)
        except ValidationError as error:
            raise validation_error(error.errors()) from None
        body.check_fields()
        if body.model is not None and body.model not in self.names:
            raise ApiError(404, f"the model {body.model!r} does not exist; this server serves "
                                f"{' or '.join(map(repr, self.names))}", "model", "model_not_found")
        return body

    def check_serving(self) -> None:
        if self.shutting_down:
            raise ApiError(503, "the server is shutting down", None, "shutting_down")
        reason = self.replicas.health
        if reason is not None:
            raise ApiError(503, f"the engine cannot serve: {reason}", None, "engine_unavailable")

    async def off_loop(self, function, *args):
        """``function(*args)`` in the tokenizer threads: the event loop keeps answering meanwhile."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, function, *args)

    async def completion_prompts(self, body: protocol.CompletionRequest) -> list[list[int]]:
        """The prompts' token ids (given, or their text tokenized off the event loop)."""
        prompts = []
        for prompt in body.prompt_inputs():
            if isinstance(prompt, list):
                prompts.append(self._checked_prompt(prompt, "prompt"))
                continue
            if not prompt:
                raise ApiError(400, "the prompt is empty", "prompt")
            encoded = await self.off_loop(self._encode, prompt, body.add_special_tokens, "prompt")
            prompts.append(self._checked_prompt(encoded, "prompt"))
        return prompts

    async def chat_prompt(self, body: protocol.ChatCompletionRequest | protocol.TokenizeRequest) -> list[int]:
        """The messages rendered (as ``body``'s :class:`~.protocol.ChatRendering` fields say) and
        tokenized, off the event loop."""
        messages = [message.for_template() for message in body.messages]
        templated = self.chat_format.description.startswith("the checkpoint's")
        special = body.add_special_tokens if body.add_special_tokens is not None else not templated

        def render_and_encode():
            try:
                text = self.chat_format.render(messages, body.add_generation_prompt, body.continue_final_message)
            except ValueError as error:
                raise ApiError(400, str(error), "messages") from None
            return self._encode(text, special, "messages")

        return self._checked_prompt(await self.off_loop(render_and_encode), "messages")

    def _encode(self, text: str, add_special_tokens: bool, param: str) -> list[int]:
        try:
            return self.loaded.encode(text, add_special_tokens=add_special_tokens)
        except ValueError as error:
            raise ApiError(400, str(error), param) from None

    def _checked_prompt(self, prompt: list[int], param: str) -> list[int]:
        if not prompt:
            raise ApiError(400, f"the {param} has no tokens", param)
        if len(prompt) > self.max_prompt_tokens:
            raise ApiError(400, f"the {param} has {len(prompt)} tokens; this server takes at most "
                                f"{self.max_prompt_tokens} prompt tokens (max_len={self.max_len})", param,
                           "context_length_exceeded")
        vocab = self.loaded.model.config.vocab_size
        bad = next((token for token in prompt if not 0 <= token < vocab), None)
        if bad is not None:
            raise ApiError(400, f"the {param} holds the token id {bad}, outside the vocabulary [0, {vocab})", param)
        return prompt

    def max_tokens(self, wanted: int | None, field: str, prompt: list[int], param: str, default: int | None) -> int:
        """The answer's token limit: ``wanted`` (from ``field``), else ``default``, else all the room
        the cache leaves; a 400 naming ``field`` when it cannot fit."""
        room = self.max_len - len(prompt) + 1      # the last generated token is not written back
        if room < 1:
            raise ApiError(400, f"the {param} has {len(prompt)} tokens; this server's cache holds max_len="
                                f"{self.max_len} tokens per request", param, "context_length_exceeded")
        wanted = wanted or min(default or room, room)
        if wanted > room:
            raise ApiError(400, f"{field}={wanted} with a prompt of {len(prompt)} tokens needs "
                                f"{len(prompt) + wanted - 1} positions; this server's cache holds "
                                f"max_len={self.max_len} tokens per request (at most {field}={room} here)",
                           field, "context_length_exceeded")
        return wanted

    # ------------------------------------------------------------- the engine
    async def submit(self, body: protocol.SamplingFields, prompts: list[list[int]], limits: list[int], field: str,
                     record: RequestRecord, *, samples: int = 1, logprobs: int | None = None,
                     prompt_logprobs: int | None = None) -> list:
        """Hands ``samples`` samples of each prompt (at most ``limits[i]`` tokens for prompt ``i``) to
        the engine, one stream each, in order; all or none (a refusal cancels those submitted).
        Raises a 400 for a request the engine refuses (naming the field) or one that can never fit
        (the whole page budget), a 429 when too many wait, a 503 when the engine cannot serve."""
        answers = len(prompts) * samples
        if answers > self.limits.max_waiting:       # one request must not fill the admission queue alone
            param = _samples_field(body) if samples > 1 else "prompt"
            raise ApiError(400, f"this request asks for {answers} answers ({len(prompts)} prompt(s), {samples} "
                                f"sample(s) each); this server queues at most {self.limits.max_waiting} "
                                f"(--max-waiting)", param, "request_too_large")
        streams = []
        try:
            for prompt, limit in zip(prompts, limits):
                streams += await self._submit_one(body, prompt, limit, field, record, samples, logprobs,
                                                  prompt_logprobs)
        except ApiError:
            for stream in streams:
                self.replicas.cancel(stream.request_id)
            raise
        return streams

    async def _submit_one(self, body, prompt, max_tokens, field, record, samples, logprobs, prompt_logprobs) -> list:
        request = Request(prompt=prompt, max_new_tokens=max_tokens, stop_tokens=self.loaded.stop_tokens,
                          logprobs=logprobs, prompt_logprobs=prompt_logprobs, **body.sampling())
        try:
            streams = await self.replicas.submit_samples(request, samples)
        except ValueError as error:
            message = str(error)
            named = next((name for name in _ENGINE_FIELDS if name in message), None)
            if named is None:
                if "samples" in message:     # more samples than slots, or than the budget holds
                    field = _samples_field(body)
                raise ApiError(400, f"this request can never be served here: {message}", field,
                               "request_too_large") from None
            asked_prompt_logprobs = body.prompt_logprobs is not None
            param = {"stop tokens": "stop_token_ids",
                     "prompt_logprobs": "prompt_logprobs" if asked_prompt_logprobs else "logprobs"}.get(named, named)
            if param == "logprobs" and body.endpoint == protocol.CHAT:
                param = "top_logprobs"
            raise ApiError(400, message, param) from None
        except QueueFull as error:
            raise ApiError(429, f"the server is busy: {error}; retry later", None, "queue_full",
                           {"Retry-After": "1"}) from None
        except EngineUnusable as error:
            raise ApiError(503, f"the engine cannot serve: {error}", None, "engine_unavailable") from None
        if record.engine_id is None:
            record.engine_id = streams[0].request_id
        record.prompt_tokens += len(prompt)
        return streams

    def choice_texts(self, body: protocol.SamplingFields, count: int, first: int = 0) -> list[ChoiceText]:
        """How each of ``count`` choices (indexed from ``first``) turns its tokens into text."""
        spec = ChoiceSpec(eos=self.loaded.stop_tokens, ignore_eos=bool(body.ignore_eos),
                          stop_token_ids=tuple(body.stop_token_ids or ()), stops=body.stops,
                          include_stop=bool(body.include_stop_str_in_output))
        return [ChoiceText(first + i, self.loaded, spec) for i in range(count)]

    async def deltas(self, streams, texts: list[ChoiceText], record: RequestRecord) -> AsyncIterator[Delta]:
        """The choices' :class:`~.choices.Delta`\\ s as tokens arrive; raises :class:`RequestFailed`
        when the engine ends one with an error. Choices not finished when the consumer stops (the
        client went away) are cancelled in the engine."""
        finished = False

        def counted():
            gap = record.token(time.perf_counter())
            if gap is not None:
                self.metrics.token_gap(gap)

        reasons = []
        try:
            async with contextlib.aclosing(deltas(streams, texts, self.replicas.cancel, counted)) as merged:
                async for delta in merged:
                    if delta.finish_reason is not None:
                        reasons.append(delta.finish_reason)
                    yield delta
            finished = True
            record.finish_reason = "stop" if "stop" in reasons else "length"
        except ChoiceFailed as failure:
            finished, record.finish_reason, record.error = True, "error", str(failure)
            if isinstance(failure.error, BaseException):
                status = 503 if isinstance(failure.error, EngineUnusable) else 500
                raise RequestFailed(str(failure), status) from None
            raise RequestFailed(f"the request failed in the engine: {failure}", 500) from None
        finally:
            if not finished:
                record.finish_reason = "cancelled"
            self.metrics.finished(record)

    def tokenize(self, text: str, add_special_tokens: bool, param: str) -> list[int]:
        """Token ids of ``text`` (a 400 naming ``param`` where the model has no tokenizer)."""
        return self._encode(text, add_special_tokens, param)

    def detokenize(self, tokens: list[int]) -> str:
        """The text of ``tokens``; a 400 for an id outside the vocabulary."""
        vocab = self.loaded.model.config.vocab_size
        bad = next((token for token in tokens if not 0 <= token < vocab), None)
        if bad is not None:
            raise ApiError(400, f"the token id {bad} is outside the vocabulary [0, {vocab})", "tokens")
        return self.loaded.decode(tokens)

    def token_text(self, token: int) -> str:
        """One token's own text (log-probabilities name tokens by it)."""
        return self.loaded.decode([token])

    def refused(self, record: RequestRecord, error: ApiError) -> None:
        """A request refused before it reached the engine: its figures and log line."""
        record.finish_reason, record.error = "rejected", f"{error.status} {error.message}"
        self.metrics.rejected(error.code or str(error.status))
        self.metrics.finished(record)
