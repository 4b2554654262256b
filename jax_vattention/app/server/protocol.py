"""The OpenAI request bodies the server accepts, and the JSON it answers with.

Every field of a request is either honoured as OpenAI (and vLLM, for its extra sampling fields)
defines it, or refused with a 400 that names it; none is accepted and ignored:

* the fields of :class:`CompletionRequest` and :class:`ChatCompletionRequest` are honoured:
  ``model``, ``prompt`` / ``messages``, ``max_tokens`` (and chat's ``max_completion_tokens``),
  ``temperature``, ``top_p``, vLLM's ``top_k``, ``stream``, ``stream_options.include_usage``,
  and ``user`` (an end-user id, which the request's log line carries);
* the fields of :data:`REFUSED` are accepted only with a value that asks for nothing
  (``n=1``, ``presence_penalty=0``, ``logit_bias={}``...); any other value is a 400 naming the
  field and saying why. The table is the one place to switch a field on: delete its row and
  declare it in the request model once the engine honours it;
* any other field is a 400 naming it (OpenAI's own "unrecognized request argument").
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from jax_vattention.app.server.errors import ApiError

COMPLETIONS, CHAT = "completions", "chat"
BOTH = frozenset({COMPLETIONS, CHAT})


@dataclasses.dataclass(frozen=True)
class Refused:
    """A request field the engine does not honour yet.

    neutral : values that ask for nothing (the field's default): accepted
    why : the refusal's message (what the engine does instead)
    endpoints : where the field exists (OpenAI's completions, chat, or both)
    """

    neutral: tuple
    why: str
    endpoints: frozenset = BOTH


_SAMPLING = "the engine samples with temperature, top_p and top_k only"

# field -> why it is refused (with the values that are accepted because they ask for nothing)
REFUSED: dict[str, Refused] = {
    "n": Refused((1, None), "one choice per request (n=1)"),
    "best_of": Refused((1, None), "one candidate per request (best_of=1)", frozenset({COMPLETIONS})),
    "logprobs": Refused((None, False), "log probabilities are not returned"),
    "top_logprobs": Refused((None, 0), "log probabilities are not returned", frozenset({CHAT})),
    "echo": Refused((None, False), "the prompt is not echoed", frozenset({COMPLETIONS})),
    "suffix": Refused((None, ""), "no text after the completion (suffix)", frozenset({COMPLETIONS})),
    "stop": Refused((None, [], ""), "stop sequences are not supported; generation ends at the model's "
                                    "end-of-sequence tokens or max_tokens"),
    "stop_token_ids": Refused((None, []), "generation stops at the model's own end-of-sequence tokens only"),
    "seed": Refused((None,), "per-request seeds are not supported (the server samples from its own seed)"),
    "presence_penalty": Refused((None, 0), _SAMPLING),
    "frequency_penalty": Refused((None, 0), _SAMPLING),
    "repetition_penalty": Refused((None, 1), _SAMPLING),
    "min_p": Refused((None, 0), _SAMPLING),
    "logit_bias": Refused((None, {}), _SAMPLING),
    "min_tokens": Refused((None, 0), "generation may stop at an end-of-sequence token at any length"),
    "ignore_eos": Refused((None, False), "generation always stops at an end-of-sequence token"),
    "response_format": Refused((None, {"type": "text"}), "only free text (no JSON mode or schema)"),
    "tools": Refused((None, []), "tools and function calling are not supported", frozenset({CHAT})),
    "tool_choice": Refused((None, "none"), "tools and function calling are not supported", frozenset({CHAT})),
    "functions": Refused((None, []), "tools and function calling are not supported", frozenset({CHAT})),
    "function_call": Refused((None, "none"), "tools and function calling are not supported", frozenset({CHAT})),
    "parallel_tool_calls": Refused((None, True, False), "tools are not supported", frozenset({CHAT})),
    "audio": Refused((None,), "text only", frozenset({CHAT})),
    "modalities": Refused((None, ["text"]), "text only", frozenset({CHAT})),
    "prediction": Refused((None,), "predicted outputs are not supported", frozenset({CHAT})),
    "reasoning_effort": Refused((None,), "not a reasoning model", frozenset({CHAT})),
    "web_search_options": Refused((None,), "no web search", frozenset({CHAT})),
    "store": Refused((None, False), "completions are not stored", frozenset({CHAT})),
    "metadata": Refused((None, {}), "completions are not stored (metadata goes with store)", frozenset({CHAT})),
    "service_tier": Refused((None, "auto", "default"), "one service tier"),
}


class _Strict(BaseModel):
    """JSON types as OpenAI takes them: no string for a number, no number for a string."""

    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    """``stream_options``: ``include_usage`` adds a last chunk with the usage (and ``"usage": null``
    in the others). vLLM's ``continuous_usage_stats`` is refused unless false."""

    include_usage: bool | None = False
    continuous_usage_stats: Literal[False] | None = None


class SamplingFields(_Strict):
    """The fields completions and chat share; any other field goes to :meth:`check_fields`."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)   # None: 1, as OpenAI's default
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1)                     # vLLM's: -1 or 0 for every token
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    endpoint: ClassVar[str] = COMPLETIONS

    def check_fields(self) -> None:
        """Raises a 400 naming the first field that is not honoured (see the module docstring)."""
        for name, value in (self.model_extra or {}).items():
            refused = REFUSED.get(name)
            if refused is None or self.endpoint not in refused.endpoints:
                raise ApiError(400, f"unrecognized request argument supplied: {name}", name, "unknown_parameter")
            if not any(_same(value, neutral) for neutral in refused.neutral):
                raise ApiError(400, f"{name}={value!r} is not supported: {refused.why}", name,
                               "unsupported_parameter")
        if self.stream_options is not None and not self.stream:
            raise ApiError(400, "stream_options is only allowed when stream is true", "stream_options")

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling(self) -> dict:
        """The engine's sampling fields: ``temperature``, ``top_p``, ``top_k`` (0: every token)."""
        return dict(temperature=1.0 if self.temperature is None else self.temperature,
                    top_p=1.0 if self.top_p is None else self.top_p,
                    top_k=max(self.top_k or 0, 0))


class CompletionRequest(SamplingFields):
    """``POST /v1/completions``: ``prompt`` is a string or token ids (or a list holding one of them)."""

    prompt: str | list[int] | list[str] | list[list[int]]

    def prompt_input(self) -> str | list[int]:
        """The one prompt: its text, or its token ids; a 400 for several prompts."""
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise ApiError(400, f"one prompt per request; got a list of {len(prompt)}", "prompt")
            prompt = prompt[0]
        return prompt


class TextPart(_Strict):
    """A part of a message's content: only text (the model reads nothing else)."""

    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    """A message: its role, its content (a string or text parts) and an optional participant name."""

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def for_template(self) -> dict:
        """``{"role", "content"[, "name"]}`` with the content as one string."""
        content = self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)
        message = {"role": self.role, "content": content}
        if self.name is not None:
            message["name"] = self.name
        return message


class ChatCompletionRequest(SamplingFields):
    """``POST /v1/chat/completions``: ``max_completion_tokens`` is the current name of ``max_tokens``
    (taken first when both are given)."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    endpoint: ClassVar[str] = CHAT

    @property
    def answer_limit(self) -> tuple[int | None, str]:
        """The most tokens asked for, and the field that asked."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"


def _same(value, neutral) -> bool:
    """JSON equality: ``0`` is ``0.0``, but ``false`` is not ``0`` and ``null`` is only ``null``."""
    if value is None or neutral is None:
        return value is neutral
    if isinstance(value, bool) or isinstance(neutral, bool):
        return isinstance(value, bool) and isinstance(neutral, bool) and value == neutral
    if isinstance(value, (int, float)) and isinstance(neutral, (int, float)):
        return value == neutral
    return type(value) is type(neutral) and value == neutral


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_chunk(request_id: str, model: str, text: str, finish_reason: str | None) -> dict:
    """One ``text_completion`` object (a whole answer, or one server-sent event of a stream)."""
    return {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}]}


def chat_completion(request_id: str, model: str, text: str, finish_reason: str, usage_: dict) -> dict:
    return {"id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": None, "finish_reason": finish_reason}],
            "usage": usage_}


def chat_chunk(request_id: str, model: str, delta: dict, finish_reason: str | None) -> dict:
    """One ``chat.completion.chunk`` server-sent event."""
    return {"id": request_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}


def usage_chunk(request_id: str, model: str, chat: bool, usage_: dict) -> dict:
    """The last chunk of a stream with ``stream_options.include_usage``: no choices, the usage."""
    kind = "chat.completion.chunk" if chat else "text_completion"
    return {"id": request_id, "object": kind, "created": int(time.time()), "model": model, "choices": [],
            "usage": usage_}


def model_card(name: str, created: int) -> dict[str, Any]:
    """A ``model`` object of ``/v1/models``."""
    return {"id": name, "object": "model", "created": created, "owned_by": "jax_vattention"}
