"""The engine's check of a submitted request: a plain, typed copy or a ``ValueError`` naming the field."""

from __future__ import annotations

import numpy as np

from jax_vattention.engine.requests import Request


def checked_request(request: Request, *, vocab: int, max_len: int, max_stop_tokens: int) -> Request:
    """A copy of ``request`` with plain Python values; ``ValueError`` naming the first bad field."""
    if not isinstance(request, Request):
        raise ValueError(f"submit takes a Request, got {type(request).__name__}")

    def integer(name, value, low, high=None):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"{name} must be an integer, got {value!r}")
        if value < low or (high is not None and value >= high):
            bounds = f"outside [{low}, {high})" if high is not None else f"below {low}"
            raise ValueError(f"{name} {value} is {bounds}")
        return int(value)

    def real(name, value, low, high, low_open=False):
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise ValueError(f"{name} must be a number, got {value!r}")
        value = float(value)
        if not (low < value if low_open else low <= value) or not value <= high:
            raise ValueError(f"{name} must be in {'(' if low_open else '['}{low}, {high}], got {value}")
        return value

    if isinstance(request.prompt, (str, bytes)) or not hasattr(request.prompt, "__len__"):
        raise ValueError(f"the prompt must be a list of token ids, got {type(request.prompt).__name__}")
    prompt = [integer("a prompt token id", token, 0, vocab) for token in request.prompt]
    if not prompt:
        raise ValueError("the prompt is empty")
    max_new = integer("max_new_tokens", request.max_new_tokens, 1)
    if len(prompt) + max_new - 1 > max_len:
        raise ValueError(f"a prompt of {len(prompt)} tokens with max_new_tokens={max_new} "
                         f"needs more than max_len={max_len} positions")
    if isinstance(request.stop_tokens, (str, bytes)) or not hasattr(request.stop_tokens, "__len__"):
        raise ValueError(f"stop_tokens must be a sequence of token ids, got {request.stop_tokens!r}")
    stops = tuple(integer("a stop token id", token, 0, vocab) for token in request.stop_tokens)
    if len(stops) > max_stop_tokens:
        raise ValueError(f"at most {max_stop_tokens} stop tokens (EngineConfig.max_stop_tokens)")
    return Request(prompt=prompt, max_new_tokens=max_new, stop_tokens=stops,
                   temperature=real("temperature", request.temperature, 0.0, float(np.finfo(np.float32).max)),
                   top_k=integer("top_k", request.top_k, 0, np.iinfo(np.int32).max),
                   top_p=real("top_p", request.top_p, 0.0, 1.0, low_open=True))
