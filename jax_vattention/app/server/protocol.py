"""The OpenAI request bodies the server accepts, and the JSON it answers with.

Every field of a request is either honoured as OpenAI (and vLLM, for its extra fields) defines
it, accepted where it changes no answer at OpenAI either (hints for OpenAI's own services), or
refused with a 400 that names it:

* the fields of :class:`CompletionRequest` and :class:`ChatCompletionRequest` are honoured:
  ``model``, ``prompt`` (text or token ids, one or a list) / ``messages`` (content as a string or
  text parts), ``max_tokens`` (and chat's ``max_completion_tokens``), ``n``, completions'
  ``best_of`` and ``echo``, ``temperature``, ``top_p``, ``stop``, ``seed``, ``presence_penalty``,
  ``frequency_penalty``, ``logit_bias``, ``logprobs`` (and chat's ``top_logprobs``), ``stream``,
  ``stream_options.include_usage``, ``user`` (an end-user id, which the request's log line
  carries), and vLLM's ``top_k``, ``min_p``, ``repetition_penalty``, ``stop_token_ids``,
  ``include_stop_str_in_output``, ``ignore_eos``, ``min_tokens``, ``prompt_logprobs`` and
  ``stream_options.continuous_usage_stats``; chat's hints for OpenAI's prompt cache, abuse
  detection and dashboard (``prompt_cache_key``, ``prompt_cache_retention``,
  ``prompt_cache_options``, ``safety_identifier``, ``metadata``) are accepted and change nothing,
  as they change no answer there;
* the fields of :data:`REFUSED` are accepted only with a value that asks for nothing
  (``suffix=""``, ``tools=[]``...); any other value is a 400 naming the field and saying why.
  The table is the one place to switch a field on: delete its row and declare it in the request
  model once the engine honours it;
* any other field is a 400 naming it (OpenAI's own "unrecognized request argument").
"""

from __future__ import annotations

import dataclasses
import re
import uuid
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from jax_vattention.app.server.errors import ApiError

COMPLETIONS, CHAT = "completions", "chat"
_TOKEN_ID = re.compile(r"-?[0-9]+")          # a logit_bias key: ASCII digits (str.isdigit takes "٣")
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


# field -> why it is refused (with the values that are accepted because they ask for nothing)
REFUSED: dict[str, Refused] = {
    "suffix": Refused((None, ""), "no text after the completion (suffix)", frozenset({COMPLETIONS})),
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
    "verbosity": Refused((None,), "no verbosity control (the model's own length, bounded by max_tokens)",
                         frozenset({CHAT})),
    "moderation": Refused((None,), "no moderation model runs here", frozenset({CHAT})),
    "web_search_options": Refused((None,), "no web search", frozenset({CHAT})),
    "store": Refused((None, False), "completions are not stored", frozenset({CHAT})),
    "service_tier": Refused((None, "auto", "default"), "one service tier"),
}


class _Strict(BaseModel):
    """JSON types as OpenAI takes them: no string for a number, no number for a string."""

    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    """``stream_options``: ``include_usage`` adds a last chunk with the usage (and ``"usage": null``
    in the others); with vLLM's ``continuous_usage_stats`` too, every chunk carries the usage so
    far. OpenAI's ``include_obfuscation`` (random padding against size side channels) is refused
    unless false."""

    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False
    include_obfuscation: Literal[False] | None = None


class SamplingFields(_Strict):
    """The fields completions and chat share; any other field goes to :meth:`check_fields`."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    n: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)   # None: 1, as OpenAI's default
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1)                     # vLLM's: -1 or 0 for every token
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0)
    logit_bias: dict[str, float] | None = None
    seed: int | None = Field(default=None, ge=-(1 << 63), lt=1 << 64)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool | None = False
    ignore_eos: bool | None = False
    min_tokens: int | None = Field(default=None, ge=0)
    prompt_logprobs: int | None = Field(default=None, ge=0)
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
        if self.prompt_logprobs is not None and self.stream:
            raise ApiError(400, "prompt_logprobs are not available when stream is true (as in vLLM)",
                           "prompt_logprobs")
        if any(not stop for stop in self.stops):
            raise ApiError(400, "stop cannot contain an empty string (it would end every answer at once)", "stop")

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        """Every chunk carries the usage so far (vLLM: with ``include_usage`` only)."""
        return self.include_usage and bool(self.stream_options.continuous_usage_stats)

    @property
    def end_user(self) -> str | None:
        """The end user the request's log line names (``user``, or chat's ``safety_identifier``)."""
        return self.user

    @property
    def samples(self) -> int:
        """Answers per prompt (``n``)."""
        return self.n or 1

    @property
    def stops(self) -> tuple[str, ...]:
        """The stop strings (``stop``: one string or a list)."""
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def sampling(self) -> dict:
        """The engine's sampling fields (:class:`~jax_vattention.engine.Request`'s), vLLM's defaults
        for those not given; ``logit_bias``'s keys as token ids (a 400 for a key that is not one)."""
        bias = {}
        for key, value in (self.logit_bias or {}).items():
            if not _TOKEN_ID.fullmatch(key):
                raise ApiError(400, f"logit_bias keys must be token ids (integers as strings), got {key!r}",
                               "logit_bias")
            bias[int(key)] = value
        return dict(temperature=1.0 if self.temperature is None else self.temperature,
                    top_p=1.0 if self.top_p is None else self.top_p,
                    top_k=max(self.top_k or 0, 0), min_p=self.min_p or 0.0,
                    presence_penalty=self.presence_penalty or 0.0, frequency_penalty=self.frequency_penalty or 0.0,
                    repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
                    logit_bias=bias, seed=self.seed, stop_token_ids=tuple(self.stop_token_ids or ()),
                    ignore_eos=bool(self.ignore_eos), min_tokens=self.min_tokens or 0)


class CompletionRequest(SamplingFields):
    """``POST /v1/completions``: ``prompt`` is a string or token ids, or a list of either (a batch:
    ``n`` choices each, indexed prompt by prompt). ``logprobs=N``: the sampled tokens' and the ``N``
    most likely; ``echo``: the prompt comes first in each choice's text (and its tokens'
    log-probabilities, with ``logprobs``), alone with ``max_tokens=0``; ``best_of``: that many
    samples of each prompt, the ``n`` most likely returned (not with ``stream``)."""

    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(default=None, ge=0)      # 0: with echo, the prompt alone (scoring)
    logprobs: int | None = Field(default=None, ge=0)
    echo: bool | None = False
    best_of: int | None = Field(default=None, ge=1)
    add_special_tokens: bool = True          # vLLM's: the tokenizer's special tokens (a BOS) on a text prompt

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_kind(cls, prompt):
        """A list of prompts is of one kind: a 400 saying so, rather than each shape's complaint."""
        def token_ids(value):
            return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)

        if isinstance(prompt, str) or token_ids(prompt):
            return prompt
        if isinstance(prompt, list) and (all(isinstance(p, str) for p in prompt) or all(map(token_ids, prompt))):
            return prompt
        raise ValueError("the prompt must be a string, a list of token ids (integers), or a list of either, all of "
                         "one kind")

    def check_fields(self) -> None:
        super().check_fields()
        if self.max_tokens == 0 and not self.echo:
            raise ApiError(400, "max_tokens=0 asks for no answer: it needs echo=true (the prompt alone, with its "
                                "log-probabilities where logprobs is given)", "max_tokens")
        if self.best_of is not None and self.best_of < self.samples:
            raise ApiError(400, f"best_of={self.best_of} must be at least n={self.samples}", "best_of")
        if self.best_of is not None and self.best_of > self.samples and self.stream:
            raise ApiError(400, f"best_of={self.best_of} with n={self.samples} cannot stream: the best answers "
                                f"are known only at the end", "best_of")

    @property
    def echo_only(self) -> bool:
        """``echo`` with ``max_tokens=0``: the prompt is scored, nothing generated (as OpenAI's legacy
        API and vLLM, which generate one token to prefill the prompt and drop it)."""
        return bool(self.echo) and self.max_tokens == 0

    @property
    def candidates(self) -> int:
        """Samples per prompt (``best_of``, else ``n``)."""
        return self.best_of or self.samples

    def prompt_inputs(self) -> list[str | list[int]]:
        """The prompts: texts or token-id lists; a 400 for an empty list."""
        prompt = self.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            return [prompt]
        if not prompt:
            raise ApiError(400, "the prompt is empty", "prompt")
        return list(prompt)

class CacheBreakpoint(_Strict):
    """OpenAI's ``prompt_cache_breakpoint`` of a text part: a hint for its prompt cache, which
    changes no answer; this server's prefix cache finds shared prefixes by itself."""

    mode: Literal["explicit"]
    ttl: Literal["30m", "12h"] | None = None


class TextPart(_Strict):
    """A part of a message's content: text (the model reads nothing else)."""

    type: Literal["text"]
    text: str
    prompt_cache_breakpoint: CacheBreakpoint | None = None


class RefusalPart(_Strict):
    """An assistant message's earlier refusal, given as a content part: read as its text (as vLLM)."""

    type: Literal["refusal"]
    refusal: str


class ChatMessage(_Strict):
    """A message: its role, its content (a string or text parts) and an optional participant name.

    An assistant message as OpenAI answers it (and its client sends back) may carry ``refusal``
    (its text stands for the content when there is none), ``refusal`` parts, and ``tool_calls``,
    ``function_call`` and ``audio`` that ask for nothing (``null``, or ``[]`` for ``tool_calls``);
    tool and function messages, tool calls and audio are refused by name.
    """

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[Annotated[TextPart | RefusalPart, Field(discriminator="type")]] | None = None
    name: str | None = None
    refusal: str | None = None
    tool_calls: list | None = None
    function_call: dict | None = None
    audio: dict | None = None

    @field_validator("role")
    @classmethod
    def _no_tools(cls, role: str) -> str:
        if role in ("tool", "function"):
            raise ValueError(f"{role} messages are not supported: tools and function calling are not supported")
        return role

    @field_validator("content")
    @classmethod
    def _content(cls, content, info: ValidationInfo):
        role = info.data.get("role")
        if isinstance(content, list) and role != "assistant":
            if any(isinstance(part, RefusalPart) for part in content):
                raise ValueError("refusal parts are only for assistant messages")
        return content

    @field_validator("refusal", "tool_calls", "function_call", "audio")
    @classmethod
    def _assistant_only(cls, value, info: ValidationInfo):
        if info.data.get("role") != "assistant":
            raise ValueError(f"{info.field_name} is only for assistant messages")
        if not value:
            return value
        if info.field_name in ("tool_calls", "function_call"):
            raise ValueError(f"{info.field_name} is not supported: tools and function calling are not supported")
        if info.field_name == "audio":
            raise ValueError("audio is not supported: text only")
        return value

    @model_validator(mode="after")
    def _something_said(self):
        if self.content is None and self.refusal is None:
            raise ValueError(f"the {self.role} message has no content" +
                             (" (nor a refusal)" if self.role == "assistant" else ""))
        return self

    def for_template(self) -> dict:
        """``{"role", "content"[, "name"]}`` with the content as one string."""
        if self.content is None:
            content = self.refusal
        elif isinstance(self.content, str):
            content = self.content
        else:
            content = "".join(part.text if isinstance(part, TextPart) else part.refusal for part in self.content)
        message = {"role": self.role, "content": content}
        if self.name is not None:
            message["name"] = self.name
        return message


class PromptCacheOptions(_Strict):
    """OpenAI's ``prompt_cache_options``: how long its prompt cache keeps a prefix; no answer changes."""

    mode: Literal["implicit", "explicit"] | None = None
    ttl: Literal["30m"] | None = None


class ChatRendering(BaseModel):
    """vLLM's fields for how chat messages become a prompt (chat completions and ``/tokenize``).

    add_generation_prompt : the prompt ends by opening the assistant's answer (the default)
    continue_final_message : the prompt ends inside the last message, for the model to continue it
        (an answer's beginning given by the client); not with ``add_generation_prompt``
    add_special_tokens : the tokenizer's special tokens (a BOS) on top of the template's; default:
        only where no chat template marks the text up
    """

    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool | None = None

    def check_rendering(self) -> None:
        if self.continue_final_message and self.add_generation_prompt:
            raise ApiError(400, "continue_final_message needs add_generation_prompt=false: the prompt either opens "
                                "a new answer or continues the last message", "continue_final_message")


class ChatCompletionRequest(SamplingFields, ChatRendering):
    """``POST /v1/chat/completions``: ``max_completion_tokens`` is the current name of ``max_tokens``
    (taken first when both are given); ``logprobs=true`` returns the sampled tokens'
    log-probabilities, with the ``top_logprobs`` most likely tokens each."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(default=None, ge=0)
    # Hints for OpenAI's prompt cache and abuse detection, and tags for its dashboard (OpenAI's
    # limits: 16 pairs, keys of 64 characters, values of 512): no answer changes (accepted, not used).
    metadata: dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]] | None = \
        Field(default=None, max_length=16)
    prompt_cache_key: str | None = None
    prompt_cache_retention: Literal["in_memory", "24h"] | None = None
    prompt_cache_options: PromptCacheOptions | None = None
    safety_identifier: str | None = None

    endpoint: ClassVar[str] = CHAT

    @property
    def end_user(self) -> str | None:
        return self.user if self.user is not None else self.safety_identifier

    def check_fields(self) -> None:
        super().check_fields()
        self.check_rendering()
        if self.top_logprobs and not self.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs=true", "top_logprobs")

    @property
    def answer_limit(self) -> tuple[int | None, str]:
        """The most tokens asked for, and the field that asked."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"


class TokenizeRequest(_Strict, ChatRendering):
    """vLLM's ``POST /tokenize``: a ``prompt`` (with the tokenizer's special tokens unless
    ``add_special_tokens`` is false) or chat ``messages`` (rendered as for a chat completion, with
    the same fields)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None

    def check_fields(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise ApiError(400, "give either prompt or messages", "prompt")
        self.check_rendering()


class DetokenizeRequest(_Strict):
    """vLLM's ``POST /detokenize``: the text of ``tokens``."""

    model: str | None = None
    tokens: list[int]

    def check_fields(self) -> None:
        pass


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


def completion_object(request_id: str, model: str, created: int, choices: list[dict],
                      usage_: dict | None = None) -> dict:
    """One ``text_completion`` object (a whole answer, with its usage, or one server-sent event of a
    stream). ``created`` (Unix seconds) is the request's: every chunk of a stream carries the same."""
    body = {"id": request_id, "object": "text_completion", "created": created, "model": model, "choices": choices}
    if usage_ is not None:
        body["usage"] = usage_
    return body


def chat_completion(request_id: str, model: str, created: int, choices: list[dict], usage_: dict,
                    prompt_logprobs: list | None = None) -> dict:
    """A whole ``chat.completion``; vLLM's ``prompt_logprobs`` where asked."""
    body = {"id": request_id, "object": "chat.completion", "created": created, "model": model,
            "choices": choices, "usage": usage_}
    if prompt_logprobs is not None:
        body["prompt_logprobs"] = prompt_logprobs
    return body


def chat_chunk(request_id: str, model: str, created: int, choices: list[dict]) -> dict:
    """One ``chat.completion.chunk`` server-sent event."""
    return {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": choices}


def usage_chunk(request_id: str, model: str, created: int, chat: bool, usage_: dict) -> dict:
    """The last chunk of a stream with ``stream_options.include_usage``: no choices, the usage."""
    kind = "chat.completion.chunk" if chat else "text_completion"
    return {"id": request_id, "object": kind, "created": created, "model": model, "choices": [], "usage": usage_}


def model_card(name: str, created: int) -> dict[str, Any]:
    """A ``model`` object of ``/v1/models``."""
    return {"id": name, "object": "model", "created": created, "owned_by": "jax_vattention"}
