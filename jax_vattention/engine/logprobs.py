"""A step's log-probabilities, read on the host into what the engine's events carry.

A step that computes them (:class:`~jax_vattention.engine.runner.StepVariant` ``logprobs``)
returns every row's :class:`~jax_vattention.decode.sampling.Logprobs` (the sampled token's and
the top ``N`` of the model's log-softmax), and with ``prompt_logprobs`` those of every chunk
token, scored against the context token after it. Each request takes what it asked for: its
own number of top tokens, and the prompt positions its chunks scored (position ``p`` is scored
by the logits at ``p - 1``: a chunk from ``start`` of ``count`` tokens scores positions
``start + 1 .. start + count``; positions past the prompt are generated tokens, scored when
they are sampled).
"""

from __future__ import annotations

import jax
import numpy as np

from jax_vattention.engine.requests import RequestState, TokenLogprob
from jax_vattention.engine.scheduler import Chunk


def on_host(outputs: dict) -> dict:
    """The step's other outputs (:meth:`~jax_vattention.engine.runner.StepRunner.run`) as numpy arrays
    (waits for the step)."""
    return jax.tree_util.tree_map(np.asarray, outputs)


def _entry(logprobs, index, token: int, count: int) -> TokenLogprob:
    top = tuple(zip(logprobs.top_tokens[index][:count].tolist(), logprobs.top[index][:count].tolist()))
    return TokenLogprob(token, float(logprobs.chosen[index]), top)


def sampled_logprob(outputs: dict, state: RequestState, row: int, token: int) -> TokenLogprob | None:
    """The :class:`TokenLogprob` of the token of output ``row``, if ``state``'s request asked for it."""
    count = state.request.logprobs
    if count is None or "logprobs" not in outputs:
        return None
    return _entry(outputs["logprobs"], row, token, count)


def record_prompt_logprobs(outputs: dict, row: int, chunk: Chunk) -> None:
    """Keeps in ``chunk.state`` the prompt positions chunk ``row`` scored, if its request asked for
    them and its first token is not streamed yet."""
    state = chunk.state
    count = state.request.prompt_logprobs
    if count is None or state.generated or "prompt_logprobs" not in outputs:
        return
    scored = outputs["prompt_logprobs"]
    prompt = state.request.prompt
    for column in range(chunk.count):
        position = chunk.start + column + 1
        if position < len(prompt):
            state.prompt_logprobs[position] = _entry(scored, (row, column), prompt[position], count)


def take_prompt_logprobs(state: RequestState) -> tuple[TokenLogprob | None, ...] | None:
    """The request's prompt log-probabilities (None for the first position, and for any position no
    chunk scored), once: for its first event. None if it did not ask."""
    if state.request.prompt_logprobs is None:
        return None
    recorded, state.prompt_logprobs = state.prompt_logprobs, {}
    return (None,) + tuple(recorded.get(position) for position in range(1, len(state.request.prompt)))
