""":func:`~jax_vattention.decode.generate.generate`'s sampling knobs, checked and packed per prompt.

Each knob is one value for every prompt or one per prompt; the prompts' rows are packed as
the engine packs its requests' (:func:`~jax_vattention.decode.sampling.sampling_row`), so one
sampler serves both. The tables' widths (``logit_bias`` entries, stop tokens) and whether any
row needs its logits adjusted or its log-probabilities are static: they choose the program.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from jax_vattention.decode.sampling import sampling_row

# The ranges of vLLM's SamplingParams: name -> (low, high, low excluded).
RANGES = {"temperature": (0.0, math.inf, False), "top_p": (0.0, 1.0, True), "min_p": (0.0, 1.0, False),
          "presence_penalty": (-2.0, 2.0, False), "frequency_penalty": (-2.0, 2.0, False),
          "repetition_penalty": (0.0, math.inf, True)}


@dataclasses.dataclass(frozen=True)
class PromptSampling:
    """The packed rows of a call's prompts (padding rows greedy) and the program they need.

    ints int32 [rows, Ki], floats float32 [rows, Kf]; adjust: some row has penalties,
    ``logit_bias`` or ``min_tokens``; top_logprobs: the most top log-probabilities a row asks for,
    None if none does.
    """

    ints: np.ndarray
    floats: np.ndarray
    adjust: bool
    top_logprobs: int | None


def _values(value, count: int, name: str) -> list:
    if isinstance(value, (list, tuple, np.ndarray)):
        if len(value) != count:
            raise ValueError(f"{name} must be one value or one per prompt ({count}); got {len(value)} values")
        return list(value)
    return [value] * count


def adjusts(count: int, knobs: dict, stop_table: np.ndarray | None = None) -> bool:
    """Whether any of ``count`` prompts has a penalty, a ``logit_bias``, or ``min_tokens`` (with stop
    tokens to mask, where ``stop_table`` says): its logits are adjusted and its tokens counted."""
    def any_of(name, default):
        return any(value not in (None, default) for value in _values(knobs.get(name, default), count, name))

    penalties = (any_of("presence_penalty", 0) or any_of("frequency_penalty", 0)
                 or any_of("repetition_penalty", 1))
    bias = any(bool(bias) for bias in _values(knobs.get("logit_bias"), count, "logit_bias"))
    stops = stop_table is None or bool((stop_table >= 0).any())
    return penalties or bias or (any_of("min_tokens", 0) and stops)


def prompt_sampling(count: int, rows: int, *, vocab: int, lengths, new_tokens, stop_table: np.ndarray,
                    logprobs: int | None = None, **knobs) -> PromptSampling:
    """Checks and packs ``count`` prompts' knobs into ``rows`` rows (a batch bucket).

    ``knobs``: ``temperature``, ``top_k``, ``top_p``, ``min_p``, the three penalties,
    ``logit_bias`` (a dict, or one per prompt), ``min_tokens`` and ``prompt_seeds`` (an int or
    None per prompt: its own seed, or the call's stream), each one value or one per prompt.
    ``lengths`` and ``new_tokens`` are the prompts' lengths and ``max_new_tokens``; ``stop_table``
    int32 [count, W] their stop tokens (padded with -1), masked until ``min_tokens``; ``logprobs``:
    how many top log-probabilities each token carries (None: none). ``ValueError`` names a bad knob.
    """
    per_prompt = {name: _values(value, count, name) for name, value in knobs.items()}
    if logprobs is not None and not 0 <= logprobs <= vocab:
        raise ValueError(f"logprobs must be in [0, {vocab}], got {logprobs}")
    for name, (low, high, open_low) in RANGES.items():
        for value in per_prompt[name]:
            if not (low < value if open_low else low <= value) or not value <= high or math.isnan(value):
                raise ValueError(f"{name} must be in {'(' if open_low else '['}{low}, {high}], got {value}")
    biases = [dict(bias or {}) for bias in per_prompt["logit_bias"]]
    for bias in biases:
        if any(not 0 <= int(token) < vocab or not -100 <= value <= 100 for token, value in bias.items()):
            raise ValueError(f"logit_bias takes token ids in [0, {vocab}) and values in [-100, 100]; got {bias}")
    for minimum, most in zip(per_prompt["min_tokens"], new_tokens):
        if not 0 <= minimum <= most:
            raise ValueError(f"min_tokens must be in [0, max_new_tokens={most}], got {minimum}")
    bias_width = 1 << (max(len(bias) for bias in biases) - 1).bit_length() if any(biases) else 0
    stop_width = stop_table.shape[1]
    packed = [sampling_row(bias_width=bias_width, stop_width=stop_width)] * rows   # padding rows: greedy
    for i in range(count):
        row = {name: values[i] for name, values in per_prompt.items() if name not in ("logit_bias", "prompt_seeds")}
        stops = [int(t) for t in stop_table[i] if t >= 0]
        packed[i] = sampling_row(bias_width=bias_width, stop_width=stop_width, seed=per_prompt["prompt_seeds"][i],
                                 prompt_len=int(lengths[i]), logit_bias=biases[i], stop_tokens=stops, **row)
    ints, floats = (np.stack(column) for column in zip(*packed))
    return PromptSampling(ints, floats, adjusts(count, knobs, stop_table), logprobs)
