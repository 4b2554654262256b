"""What goes into the engine and what comes out of it."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass
class Request:
    """One generation request; the sampling fields mean what vLLM's ``SamplingParams`` document.

    Parameters
    ----------
    prompt : token ids
    max_new_tokens : how many tokens to generate at most
    stop_tokens : the model's end-of-sequence tokens: generation ends after any of these (it is
        emitted), unless ``ignore_eos``
    temperature, top_k, top_p : sampling; a temperature below 1e-5 is greedy; top_k 0 (or -1)
        keeps every token
    min_p : keep only tokens at least ``min_p`` times as likely as the most likely one (0: all)
    presence_penalty, frequency_penalty : in [-2, 2], subtracted from the logit of every token
        the output holds, once or once per occurrence
    repetition_penalty : > 0; the logit of every token in the prompt or the output is divided by
        it where positive, multiplied where negative (1: none)
    logit_bias : token id -> a value in [-100, 100] added to its logit (at most
        ``EngineConfig.max_logit_bias`` entries)
    seed : the request's own random seed (any integer of 64 bits; None or -1: the engine's stream):
        its sampled tokens then depend on nothing but the seed and the request
    stop_token_ids : more tokens that end generation (emitted), whatever ``ignore_eos``
    ignore_eos : go on after the end-of-sequence tokens (``stop_tokens``)
    min_tokens : no stop token (``stop_token_ids``, and ``stop_tokens`` unless ``ignore_eos``) can
        be sampled before this many tokens are generated
    logprobs : with a number N (0 to ``EngineConfig.max_logprobs``), every token's event carries
        its log-probability and those of the N most likely tokens (:class:`TokenLogprob`), and the
        cumulative log-probability of the tokens so far
    prompt_logprobs : with a number N, the first token's event carries every prompt token's
        log-probability and its N most likely alternatives (the first prompt token has none)
    """

    prompt: list[int]
    max_new_tokens: int = 32
    stop_tokens: tuple[int, ...] = ()
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = dataclasses.field(default_factory=dict)
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the model (the log-softmax of its logits, before penalties,
    bias and temperature: vLLM's default ``raw_logprobs``) and the ``N`` most likely tokens' at its
    position, most likely first: ``top`` is ``((token, logprob), ...)``."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclasses.dataclass(frozen=True)
class TokenEvent:
    """A token of request ``request_id``; ``finished`` on its last one.

    A request that failed ends with an event whose ``error`` says why (its ``token`` is -1).
    With the request's ``logprobs``: ``logprobs`` (the token's :class:`TokenLogprob`) and
    ``cumulative_logprob`` (the sum over its tokens so far). With its ``prompt_logprobs``, its
    first event's ``prompt_logprobs``: one entry per prompt token, None for the first.
    """

    request_id: int
    token: int
    finished: bool
    error: str | None = None
    logprobs: TokenLogprob | None = None
    cumulative_logprob: float | None = None
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None


@dataclasses.dataclass
class RequestState:
    """The engine's record of a request: what it generated so far and where it lives."""

    request_id: int
    request: Request
    arrival: float
    generated: list[int] = dataclasses.field(default_factory=list)
    slot: int | None = None
    admitted_at: int = 0      # engine step of the (latest) admission; youngest is preempted first
    preemptions: int = 0
    computed: int = 0         # context tokens in the slot's cache (a prefill may start at an offset)
    prefilled: bool = False   # the whole context is in the cache: the request decodes
    # Tokens sampled by dispatched steps that the host has not read yet (the pipelined engine
    # has at most two: the last step's, read while the next one runs), and the row of the
    # latest one in its step's outputs (None when none is in flight): the next step's input.
    in_flight: int = 0
    pending_row: int | None = None
    done: bool = False        # finished, failed or cancelled: any token still in flight is dropped
    admission_failures: int = 0   # admissions the driver failed (engine.failures: retried, then failed)
    retry_at: float = 0.0         # not admitted before this time.perf_counter() (after such a failure)
    row: Any = None           # its packed sampling parameters (engine.request_rows.RequestRow), once built
    cumulative_logprob: float = 0.0
    # With prompt_logprobs, until its first token is streamed: prompt position -> TokenLogprob.
    prompt_logprobs: dict[int, TokenLogprob] = dataclasses.field(default_factory=dict)
    # Samples of one prompt (engine.groups): the group's prefill leaves its last prompt token to the
    # samples (holds_back 1) and holds a slot for each other sample (held_slots); a sample's first
    # step starts its slot's token counts afresh (enters_from -1) or from another slot's (its index).
    holds_back: int = 0
    held_slots: list[int] = dataclasses.field(default_factory=list)
    enters_from: int | None = None

    @property
    def remaining(self) -> int:
        """Tokens still to generate, counting a token in flight as generated."""
        return self.request.max_new_tokens - len(self.generated) - self.in_flight

    @property
    def prefill_end(self) -> int:
        """Where its prefill stops: the end of its context, less what it holds back."""
        return len(self.request.prompt) + len(self.generated) - self.holds_back

    @property
    def context(self) -> list[int]:
        """What prefill must process: the prompt and, after a preemption, what was generated."""
        return list(self.request.prompt) + self.generated
