"""The OpenAI request bodies the server accepts, and the JSON it answers with.

Only what the engine can honour is accepted: one choice (``n`` = 1), no stop strings, no log
probabilities. Fields the OpenAI client sends that change nothing here (``user``, ``seed``...)
are allowed and ignored; anything the engine would get wrong is refused with a 400 that names it.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class SamplingFields(BaseModel):
    """The fields completions and chat share."""

    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=1)
    stream: bool = False
    stop: str | list[str] | None = None
    logprobs: bool | int | None = None

    def unsupported(self) -> str | None:
        """Why this request cannot be served as asked, or None."""
        if self.stop:
            return "'stop' sequences are not supported; generation ends at the model's end-of-sequence tokens"
        if self.logprobs:
            return "'logprobs' is not supported"
        return None


class CompletionRequest(SamplingFields):
    """``POST /v1/completions``: ``prompt`` is a string, or a list holding one string."""

    prompt: str | list[str]

    def prompt_text(self) -> str:
        if isinstance(self.prompt, list):
            if len(self.prompt) != 1:
                raise ValueError(f"'prompt' must be one string; got a list of {len(self.prompt)}")
            return self.prompt[0]
        return self.prompt


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str


class ChatCompletionRequest(SamplingFields):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """OpenAI's error JSON."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


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
