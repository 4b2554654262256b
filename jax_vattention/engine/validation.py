"""The engine's check of a submitted request: a plain, typed copy or a ``ValueError`` naming the field."""

from __future__ import annotations

import numpy as np

from jax_vattention.engine.requests import Request


def checked_request(request: Request, *, vocab: int, max_len: int, max_stop_tokens: int, max_logit_bias: int = 0,
                    max_logprobs: int = 0) -> Request:
    """A copy of ``request`` with plain Python values; ``ValueError`` naming the first bad field.

    The ranges are vLLM's (``SamplingParams``); ``top_k`` -1 and ``seed`` -1 become 0 and None
    as there, and repeated stop token ids count once. The engine's own bounds:
    ``max_stop_tokens`` (``stop_token_ids`` and ``stop_tokens`` together), ``max_logit_bias``,
    ``max_logprobs`` (for ``logprobs`` and ``prompt_logprobs``).
    """
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
    def token_ids(name, label, values):
        if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
            raise ValueError(f"{name} must be a sequence of token ids, got {values!r}")
        return tuple(dict.fromkeys(integer(label, token, 0, vocab) for token in values))

    def flag(name, value):
        if not isinstance(value, (bool, np.bool_)):
            raise ValueError(f"{name} must be True or False, got {value!r}")
        return bool(value)

    def optional_count(name, value):
        if value is None:
            return None
        count = integer(name, value, 0)
        if count > max_logprobs:
            raise ValueError(f"{name} {count} is more than the engine returns: at most {max_logprobs} "
                             f"(EngineConfig.max_logprobs)")
        return count

    stops = token_ids("stop_tokens", "a stop token id", request.stop_tokens)
    stop_ids = token_ids("stop_token_ids", "a stop_token_ids entry", request.stop_token_ids)
    if len(set(stops) | set(stop_ids)) > max_stop_tokens:
        raise ValueError(f"at most {max_stop_tokens} stop tokens, stop_tokens and stop_token_ids together "
                         f"(EngineConfig.max_stop_tokens)")
    min_tokens = integer("min_tokens", request.min_tokens, 0)
    if min_tokens > max_new:
        raise ValueError(f"min_tokens {min_tokens} is more than max_new_tokens {max_new}")
    bias = request.logit_bias if request.logit_bias is not None else {}
    if not isinstance(bias, dict):
        raise ValueError(f"logit_bias must be a dict of token id -> bias, got {type(bias).__name__}")
    if len(bias) > max_logit_bias:
        raise ValueError(f"logit_bias has {len(bias)} entries; at most {max_logit_bias} "
                         f"(EngineConfig.max_logit_bias)")
    logit_bias = {}
    for token, value in bias.items():
        token = integer("a logit_bias token id", token, 0, vocab)
        if token in logit_bias:
            raise ValueError(f"logit_bias gives token {token} twice")
        logit_bias[token] = real(f"logit_bias[{token}]", value, -100.0, 100.0)
    seed = request.seed
    if seed is not None:
        seed = integer("seed", seed, -(1 << 63), 1 << 64)
        seed = None if seed == -1 else seed
    top_k = integer("top_k", request.top_k, -1, np.iinfo(np.int32).max)
    largest = float(np.finfo(np.float32).max)
    return Request(prompt=prompt, max_new_tokens=max_new, stop_tokens=stops,
                   temperature=real("temperature", request.temperature, 0.0, largest),
                   top_k=max(top_k, 0),
                   top_p=real("top_p", request.top_p, 0.0, 1.0, low_open=True),
                   min_p=real("min_p", request.min_p, 0.0, 1.0),
                   presence_penalty=real("presence_penalty", request.presence_penalty, -2.0, 2.0),
                   frequency_penalty=real("frequency_penalty", request.frequency_penalty, -2.0, 2.0),
                   repetition_penalty=real("repetition_penalty", request.repetition_penalty, 0.0, largest,
                                           low_open=True),
                   logit_bias=logit_bias, seed=seed, stop_token_ids=stop_ids,
                   ignore_eos=flag("ignore_eos", request.ignore_eos), min_tokens=min_tokens,
                   logprobs=optional_count("logprobs", request.logprobs),
                   prompt_logprobs=optional_count("prompt_logprobs", request.prompt_logprobs))
