"""Proposing the tokens a request is likely to generate next, for the step to verify: the proposer
protocol, and prompt lookup (a draft model: :mod:`~jax_vattention.engine.draft`).

Prompt lookup (n-gram speculation; Saxena's "prompt lookup decoding", vLLM's ``ngram``): where a
request's output copies its input (repeat, correct, reformat, quote, edit code), the tokens after
the output's last few tokens are often the tokens that followed the same few tokens earlier in the
context. No extra model runs: the proposal is a search of the request's own tokens on the host.

::

    context  | ... a b c d e f ... | ... a b c |
                   ^^^^^ ^^^^^^^           ^^^^^ the last n tokens (the n-gram)
                   match proposals: the k tokens after the latest earlier match
"""

from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from jax_vattention.engine.requests import RequestState


class Proposer(Protocol):
    """What the engine's speculation asks of a proposer: for each ``(state, k)`` of a step, up to
    ``k`` tokens likely to follow the request's context (its prompt and generated tokens, its last
    token last), by request id; then what the target kept of them, and when a request leaves."""

    def propose_many(self, wanted: list[tuple[RequestState, int]]) -> dict[int, tuple[int, ...]]: ...

    def verified(self, state: RequestState) -> None: ...

    def forget(self, state: RequestState) -> None: ...


class NgramProposer:
    """Prompt lookup: the ``k`` tokens that followed the latest earlier occurrence of the context's
    last ``n`` tokens, the longest ``n`` from ``max_n`` down to ``min_n`` that occurs.

    Parameters
    ----------
    min_n, max_n : the n-gram lengths tried, longest first (a longer match is a surer guess)
    lookback : only the context's last ``lookback`` tokens are searched (the cost of a search is
        linear in it; None: the whole context)

    Example::

        NgramProposer().propose([5, 6, 7, 8, 9, 1, 5, 6, 7], k=3)   # (8, 9, 1)
    """

    def __init__(self, min_n: int = 1, max_n: int = 4, lookback: int | None = 4096):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"the n-gram lengths must satisfy 1 <= min_n <= max_n; got {min_n} and {max_n}")
        if lookback is not None and lookback <= max_n:
            raise ValueError(f"lookback must exceed max_n ({max_n}); got {lookback}")
        self.min_n, self.max_n, self.lookback = min_n, max_n, lookback

    def propose(self, context: Sequence[int], k: int) -> tuple[int, ...]:
        """Up to ``k`` proposed tokens (fewer where the match is near the context's end; none where
        no n-gram of the context's end occurs earlier)."""
        if k < 1:
            return ()
        tokens = np.asarray(context[-self.lookback:] if self.lookback else context, np.int64)
        length = len(tokens)
        for n in range(min(self.max_n, length - 1), self.min_n - 1, -1):
            # Windows that end before the last token: each has a token after it, and none is the suffix.
            windows = sliding_window_view(tokens[:length - 1], n)  # [length - n, n]
            matches = np.flatnonzero((windows == tokens[length - n:]).all(axis=1))
            if matches.size:
                start = int(matches[-1]) + n
                return tuple(int(t) for t in tokens[start:start + k])
        return ()

    def propose_many(self, wanted: list[tuple[RequestState, int]]) -> dict[int, tuple[int, ...]]:
        """:meth:`propose` for each ``(state, k)`` over its context, by request id (where it finds one)."""
        proposals = {state.request_id: self.propose(state.context, k) for state, k in wanted}
        return {request_id: tokens for request_id, tokens in proposals.items() if tokens}

    def verified(self, state: RequestState) -> None:
        """Nothing to do: a lookup keeps no state."""

    def forget(self, state: RequestState) -> None:
        """Nothing to do: a lookup keeps no state."""
