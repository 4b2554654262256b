"""The choices of one HTTP request: the engine streams of its samples and prompts, as text deltas.

A request asks for ``n`` answers (``best_of`` candidates) to each of its prompts; each is an
engine request of its own (the samples of one prompt are forked from one prefill,
:meth:`Engine.submit_samples <jax_vattention.engine.Engine.submit_samples>`), streaming
:class:`~jax_vattention.engine.TokenEvent`\\ s on its own queue. :func:`deltas` reads them all as
they come and yields :class:`Delta`\\ s: each choice's new text (:class:`~.text.TextStream`, with
its stop strings held back and cut, :class:`~.stop_strings.StopStrings`), the log-probabilities of
its new tokens, and its finish. A choice a stop string ends is cancelled in the engine at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import AsyncIterator, Callable

from jax_vattention.app.server.stop_strings import StopStrings
from jax_vattention.app.server.text import TextStream
from jax_vattention.engine import TokenEvent, TokenLogprob


@dataclasses.dataclass
class Delta:
    """What one choice added: ``text``, its new tokens' ``logprobs`` (when asked), how many tokens
    came (``tokens``), and on its last delta ``finish_reason`` (``stop`` or ``length``) and vLLM's
    ``stop_reason`` (the stop string or stop token id that ended it, else None). The first delta of
    a choice carries its prompt's log-probabilities when asked (``prompt_logprobs``)."""

    index: int
    text: str = ""
    logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)
    tokens: int = 0
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    prompt_logprobs: tuple | None = None
    cumulative_logprob: float | None = None


@dataclasses.dataclass
class ChoiceSpec:
    """How a choice's tokens become text: the model's end-of-sequence ids (never text; they end
    the answer unless ``ignore_eos``), the request's ``stop_token_ids`` (text only with
    ``include_stop``) and ``stop`` strings."""

    eos: tuple[int, ...] = ()
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()
    stops: tuple[str, ...] = ()
    include_stop: bool = False


class ChoiceText:
    """One choice's tokens to :class:`Delta`\\ s."""

    def __init__(self, index: int, decoder, spec: ChoiceSpec):
        self.index = index
        self.spec = spec
        hidden = spec.eos if spec.include_stop else (*spec.eos, *spec.stop_token_ids)
        self.text = TextStream(decoder, hidden)
        self.stops = StopStrings(list(spec.stops), spec.include_stop)
        self.finished = False

    def push(self, event: TokenEvent) -> Delta:
        """The delta of one (successful) event; ``finished`` once a stop string or the engine ends it."""
        delta = Delta(self.index, tokens=1, prompt_logprobs=event.prompt_logprobs,
                      cumulative_logprob=event.cumulative_logprob)
        if event.logprobs is not None:
            delta.logprobs.append(event.logprobs)
        delta.text = self.stops.push(self.text.push(event.token, final=event.finished))
        if self.stops.stopped is not None:
            delta.finish_reason, delta.stop_reason = "stop", self.stops.stopped
        elif event.finished:
            delta.text += self.stops.flush()
            if event.token in self.spec.stop_token_ids:
                delta.finish_reason, delta.stop_reason = "stop", event.token
            else:
                ended = event.token in self.spec.eos and not self.spec.ignore_eos
                delta.finish_reason = "stop" if ended else "length"
        self.finished = delta.finish_reason is not None
        return delta


class ChoiceFailed(Exception):
    """A choice the engine ended with an error, or an exception that ended it outside the engine."""

    def __init__(self, error: BaseException | str):
        super().__init__(str(error))
        self.error = error


async def deltas(streams, texts: list[ChoiceText], cancel: Callable[[int], None],
                 on_token: Callable[[], None] = lambda: None) -> AsyncIterator[Delta]:
    """The deltas of every choice as their events come (``streams[i]`` feeds ``texts[i]``).

    Raises :class:`ChoiceFailed` at the first choice that fails. Every choice that has not
    finished when the iteration ends (a stop string, a failure, or the consumer going away) is
    cancelled in the engine through ``cancel(request_id)``; ``on_token`` is called per token.
    """
    merged: asyncio.Queue = asyncio.Queue()

    async def forward(position: int, stream) -> None:
        while True:
            event = await stream.tokens.get()
            merged.put_nowait((position, event))
            if isinstance(event, BaseException) or event.finished:
                return

    tasks = [asyncio.ensure_future(forward(position, stream)) for position, stream in enumerate(streams)]
    open_choices = len(streams)
    try:
        while open_choices:
            position, event = await merged.get()
            text = texts[position]
            if text.finished:
                continue                  # a stop string ended it: later tokens are dropped
            if isinstance(event, BaseException):
                raise ChoiceFailed(event)
            if event.error is not None:
                raise ChoiceFailed(event.error)
            on_token()
            delta = text.push(event)
            if text.finished:
                open_choices -= 1
                if not event.finished:
                    cancel(streams[position].request_id)
                    tasks[position].cancel()
            yield delta
    finally:
        for position, task in enumerate(tasks):
            if not task.done():
                task.cancel()
                if not texts[position].finished:
                    cancel(streams[position].request_id)
