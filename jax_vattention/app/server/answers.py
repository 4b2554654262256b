"""The choices of an answer, as OpenAI's JSON: whole (collected) or chunk by chunk (streamed).

The engine's samples come in as :class:`~.choices.Delta`\\ s, by position: prompt ``p``'s sample
``s`` is position ``p * candidates + s``. A whole completions answer with ``best_of`` keeps, for
each prompt, the ``n`` samples of highest cumulative log-probability
(:func:`~jax_vattention.engine.groups.best_samples`), best first; otherwise choice ``i`` is
position ``i``. ``echo`` puts each prompt's text (and, with ``logprobs``, its tokens'
log-probabilities) before its choices' own.

A streamed choice's log-probabilities go out with its next text: a token whose text is held
back (an incomplete character, the start of a stop string) has its entry sent with the text
that follows, or with the choice's last chunk.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from jax_vattention.app.server.choices import Delta
from jax_vattention.app.server.logprob_json import (chat_logprobs, completion_logprobs, merge_completion_logprobs,
                                                    prompt_logprobs)
from jax_vattention.engine.groups import best_samples


@dataclasses.dataclass
class _Choice:
    """What a choice gathered: its text, its tokens' log-probabilities and how it ended."""

    text: str = ""
    logprobs: list = dataclasses.field(default_factory=list)     # TokenLogprob, in order
    pending: list = dataclasses.field(default_factory=list)      # streamed: not yet sent
    prompt_logprobs: tuple | None = None
    tokens: int = 0
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    started: bool = False


class Answer:
    """The choices of one request: ``positions`` samples in all, ``candidates`` per prompt, ``n``
    returned per prompt.

    prompts : each prompt's token ids (for ``echo``)
    token_text : a token's own text
    chat : OpenAI's chat shapes, else completions'
    logprobs : how many top log-probabilities the client asked for (None: none)
    echo : completions' ``echo``
    with_prompt_logprobs : vLLM's ``prompt_logprobs`` was asked: each completions choice (the chat
        answer, :meth:`prompt_logprobs`) carries its prompt's
    generated : False for ``echo`` with ``max_tokens=0``: the one token generated to prefill the
        prompt is dropped, and each choice is its prompt alone, ended by ``length``
    """

    def __init__(self, prompts: list[list[int]], candidates: int, n: int, token_text: Callable[[int], str], *,
                 chat: bool, logprobs: int | None, echo: bool = False, decode: Callable | None = None,
                 with_prompt_logprobs: bool = False, generated: bool = True):
        self.prompts = prompts
        self.candidates = candidates
        self.n = n
        self.token_text = token_text
        self.chat = chat
        self.top = logprobs
        self.echo = echo
        self.decode = decode
        self.with_prompt_logprobs = with_prompt_logprobs
        self.generated = generated
        self.choices = [_Choice() for _ in range(len(prompts) * candidates)]

    # ------------------------------------------------------------ whole answers
    def _kept(self, delta: Delta) -> Delta:
        """``delta`` as the answer shows it (without its generated part, where nothing is asked)."""
        if self.generated:
            return delta
        return dataclasses.replace(delta, text="", logprobs=[], tokens=0, stop_reason=None,
                                   finish_reason=None if delta.finish_reason is None else "length")

    def add(self, delta: Delta) -> None:
        """Gathers a delta of a whole answer."""
        delta = self._kept(delta)
        choice = self.choices[delta.index]
        choice.text += delta.text
        choice.logprobs += delta.logprobs
        choice.tokens += delta.tokens
        if delta.prompt_logprobs is not None:
            choice.prompt_logprobs = delta.prompt_logprobs
        if delta.cumulative_logprob is not None:
            choice.cumulative_logprob = delta.cumulative_logprob
        if delta.finish_reason is not None:
            choice.finish_reason, choice.stop_reason = delta.finish_reason, delta.stop_reason

    def returned(self) -> list[tuple[int, int]]:
        """``(choice index, position)`` of the choices returned: per prompt the ``n`` best of its
        ``candidates`` (best first) where they are more, else every one in order."""
        out = []
        for prompt in range(len(self.prompts)):
            first = prompt * self.candidates
            if self.candidates > self.n:
                ranked = best_samples([c.cumulative_logprob for c in
                                       self.choices[first:first + self.candidates]], self.n)
            else:
                ranked = range(self.n)
            out += [(prompt * self.n + rank, first + sample) for rank, sample in enumerate(ranked)]
        return out

    def completion_tokens(self) -> int:
        return sum(self.choices[position].tokens for _, position in self.returned())

    def whole_choices(self) -> list[dict]:
        """The answer's ``choices``."""
        out = []
        for index, position in self.returned():
            choice = self.choices[position]
            if self.chat:
                logprobs = None if self.top is None else {
                    "content": chat_logprobs(choice.logprobs, self.token_text, self.top)}
                out.append({"index": index, "message": {"role": "assistant", "content": choice.text},
                            "logprobs": logprobs, "finish_reason": choice.finish_reason or "length",
                            "stop_reason": choice.stop_reason})
                continue
            head, parts = self._echo(position, choice.prompt_logprobs)
            if self.top is not None:
                offset = len(head[0]) if head else 0
                parts.append(completion_logprobs([(e.token, e) for e in choice.logprobs], self.token_text, offset))
            out.append({"index": index, "text": "".join(head) + choice.text,
                        "logprobs": merge_completion_logprobs(parts) if self.top is not None else None,
                        "finish_reason": choice.finish_reason or "length", "stop_reason": choice.stop_reason})
            if self.with_prompt_logprobs:
                out[-1]["prompt_logprobs"] = self.prompt_logprobs(position)
        return out

    def prompt_logprobs(self, position: int = 0) -> list | None:
        """vLLM's ``prompt_logprobs`` of the prompt of the sample at ``position``, when asked."""
        if not self.with_prompt_logprobs:
            return None
        prompt = self.prompts[position // self.candidates]
        entries = self.choices[position].prompt_logprobs or (None,) * len(prompt)
        return prompt_logprobs(prompt, entries, self.token_text)

    def _echo(self, position: int, prompt_logprobs) -> tuple[list[str], list[dict]]:
        """With ``echo``: the prompt's text and (with ``logprobs``) its tokens' entries."""
        if not self.echo:
            return [], []
        prompt = self.prompts[position // self.candidates]
        parts = []
        if self.top is not None:
            entries = prompt_logprobs or (None,) * len(prompt)
            parts.append(completion_logprobs(list(zip(prompt, entries)), self.token_text))
        return [self.decode(prompt)], parts

    # ---------------------------------------------------------------- streams
    def first_chunks(self) -> list[dict]:
        """Chat streams open each choice with the assistant's role."""
        if not self.chat:
            return []
        return [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                for i in range(len(self.choices))]

    def stream_choice(self, delta: Delta) -> dict | None:
        """The choice of one streamed chunk for ``delta``, or None when it has nothing to send yet."""
        delta = self._kept(delta)
        choice = self.choices[delta.index]
        choice.tokens += delta.tokens
        choice.pending += delta.logprobs
        head, parts = ([], [])
        if not choice.started and not self.chat:
            head, parts = self._echo(delta.index, delta.prompt_logprobs)
        if not delta.text and delta.finish_reason is None and not head:
            return None
        head_text, before = "".join(head), len(choice.text)
        choice.text += head_text + delta.text
        choice.started = True
        entries, choice.pending = choice.pending, []
        if self.chat:
            logprobs = None if self.top is None else {"content": chat_logprobs(entries, self.token_text, self.top)}
            content = {"content": delta.text} if delta.text or delta.finish_reason is None else {}
            return {"index": delta.index, "delta": content, "logprobs": logprobs,
                    "finish_reason": delta.finish_reason, "stop_reason": delta.stop_reason}
        if self.top is not None:
            parts.append(completion_logprobs([(e.token, e) for e in entries], self.token_text,
                                             before + len(head_text)))
        return {"index": delta.index, "text": head_text + delta.text,
                "logprobs": merge_completion_logprobs(parts) if self.top is not None else None,
                "finish_reason": delta.finish_reason, "stop_reason": delta.stop_reason}
