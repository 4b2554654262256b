"""A request's sampling parameters as the engine's step takes them, and what its rows ask of a step.

The step takes every row's parameters packed (:func:`~jax_vattention.decode.sampling.sampling_row`);
a request's never change, so they are packed once, at its first step, and kept with it
(:attr:`RequestState.row <jax_vattention.engine.requests.RequestState>`). What a step must compute
besides the forward pass (:class:`~jax_vattention.engine.runner.StepVariant`) depends on its rows:
:func:`step_needs` reads it off them.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jax_vattention.decode.sampling import GREEDY_BELOW, sampling_row
from jax_vattention.engine.requests import Request, RequestState


@dataclasses.dataclass(frozen=True)
class RequestRow:
    """One request's packed parameters (``ints``, ``floats``) and what its rows need of a step.

    samples : a temperature that samples (else greedy)
    penalized : a presence, frequency or repetition penalty (the step counts tokens)
    biased : a ``logit_bias``
    min_tokens : tokens before which its stop tokens are masked (0: none, or no stop token)
    logprobs, prompt_logprobs : it asks for them
    stops : the tokens that end it (:func:`stop_set`)
    """

    ints: np.ndarray
    floats: np.ndarray
    samples: bool
    penalized: bool
    biased: bool
    min_tokens: int
    logprobs: bool
    prompt_logprobs: bool
    stops: frozenset = frozenset()

    def adjusts(self, generated: int) -> bool:
        """Whether its logits must be adjusted (penalties, bias, or stop tokens still masked) when
        ``generated`` tokens are generated before the one its row samples."""
        return self.penalized or self.biased or generated < self.min_tokens


def stop_set(request: Request) -> tuple[int, ...]:
    """The tokens that end ``request``: its ``stop_token_ids`` and, unless ``ignore_eos``, its
    end-of-sequence tokens (``stop_tokens``), each once."""
    eos = () if request.ignore_eos else tuple(request.stop_tokens)
    return tuple(dict.fromkeys((*request.stop_token_ids, *eos)))


def penalized(request: Request) -> bool:
    """Whether ``request`` has a presence, frequency or repetition penalty."""
    return request.presence_penalty != 0 or request.frequency_penalty != 0 or request.repetition_penalty != 1


def shares_prefix(request: Request) -> bool:
    """Whether ``request`` may start from shared prefix pages: not with penalties (the step must
    count every prompt token it feeds, :mod:`~jax_vattention.decode.token_counts`) nor with
    ``prompt_logprobs`` (every prompt token's logits are needed; vLLM skips its prefix cache for
    them too)."""
    return not penalized(request) and request.prompt_logprobs is None


def request_row(request: Request, *, bias_width: int, stop_width: int) -> RequestRow:
    """``request``'s :class:`RequestRow` (a checked request's; ``ValueError`` or ``TypeError``
    from a value that cannot be packed)."""
    stops = stop_set(request)
    ints, floats = sampling_row(
        bias_width=bias_width, stop_width=stop_width, temperature=request.temperature, top_k=request.top_k,
        top_p=request.top_p, min_p=request.min_p, presence_penalty=request.presence_penalty,
        frequency_penalty=request.frequency_penalty, repetition_penalty=request.repetition_penalty,
        seed=request.seed, prompt_len=len(request.prompt), min_tokens=request.min_tokens,
        logit_bias=request.logit_bias, stop_tokens=stops)
    return RequestRow(ints, floats, samples=request.temperature >= GREEDY_BELOW,
                      penalized=penalized(request),
                      biased=bool(request.logit_bias), min_tokens=request.min_tokens if stops else 0,
                      logprobs=request.logprobs is not None, prompt_logprobs=request.prompt_logprobs is not None,
                      stops=frozenset(stops))


def generated_before(state: RequestState) -> int:
    """Tokens ``state`` generated before the one its next row samples (those in flight included)."""
    return len(state.generated) + state.in_flight
