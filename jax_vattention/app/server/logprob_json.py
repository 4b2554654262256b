"""Log-probabilities in the shapes OpenAI's API answers with (and vLLM's server).

Completions (the legacy shape), for ``logprobs=N``: four parallel lists over the tokens, where
``top_logprobs`` holds the ``N`` most likely tokens and the chosen one (so ``N + 1`` entries where
it is not among them, as vLLM does), and ``text_offset`` is each token's offset in the choice's
text. An echoed prompt's first token has no log-probability (None)::

    {"tokens": ["He", "llo"], "token_logprobs": [-0.2, -1.3],
     "top_logprobs": [{"He": -0.2, "A": -2.0}, {"llo": -1.3}], "text_offset": [0, 2]}

Chat, for ``logprobs=true`` and ``top_logprobs=N``: one entry a token, with its UTF-8 bytes::

    {"content": [{"token": "He", "logprob": -0.2, "bytes": [72, 101],
                  "top_logprobs": [{"token": "He", "logprob": -0.2, "bytes": [72, 101]}, ...]}]}

vLLM's ``prompt_logprobs=N``: per prompt token (None for the first) a dict from token id to its
log-probability, rank (1: the most likely) and text, for the ``N`` most likely tokens and the
prompt's own; the own token's rank is null where it is not among the ``N`` (the engine ranks only
those)::

    [None, {"72": {"logprob": -0.2, "rank": 1, "decoded_token": "H"}}, ...]

A token's text is its own decoding (a byte of a longer character decodes to U+FFFD, as in vLLM).
"""

from __future__ import annotations

from typing import Callable, Sequence

from jax_vattention.engine import TokenLogprob

TokenText = Callable[[int], str]


def completion_logprobs(entries: Sequence[tuple[int, TokenLogprob | None]], token_text: TokenText,
                        offset: int = 0) -> dict:
    """The completions shape of ``(token id, its TokenLogprob or None)`` pairs whose text starts at
    ``offset`` in the choice's text."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token, entry in entries:
        text = token_text(token)
        out["tokens"].append(text)
        out["text_offset"].append(offset)
        offset += len(text)
        if entry is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        out["token_logprobs"].append(entry.logprob)
        top = {token_text(alternative): logprob for alternative, logprob in entry.top}
        top.setdefault(text, entry.logprob)
        out["top_logprobs"].append(top)
    return out


def merge_completion_logprobs(parts: Sequence[dict]) -> dict | None:
    """One completions ``logprobs`` object of several (a whole answer's deltas, in order)."""
    if not parts:
        return None
    return {key: [value for part in parts for value in part[key]] for key in parts[0]}


def _bytes(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def chat_logprobs(entries: Sequence[TokenLogprob], token_text: TokenText, top: int) -> list[dict]:
    """The chat shape's ``content`` entries of the sampled tokens' :class:`TokenLogprob`\\ s, with
    their ``top`` most likely tokens each."""
    content = []
    for entry in entries:
        text = token_text(entry.token)
        content.append({"token": text, "logprob": entry.logprob, "bytes": _bytes(text),
                        "top_logprobs": [{"token": token_text(t), "logprob": logprob, "bytes": _bytes(token_text(t))}
                                         for t, logprob in entry.top[:top]]})
    return content


def prompt_logprobs(prompt: Sequence[int], entries: Sequence[TokenLogprob | None], token_text: TokenText) -> list:
    """vLLM's ``prompt_logprobs`` of a prompt's tokens and their entries (None for the first)."""
    out = []
    for token, entry in zip(prompt, entries):
        if entry is None:
            out.append(None)
            continue
        ranked = {str(alternative): {"logprob": logprob, "rank": rank, "decoded_token": token_text(alternative)}
                  for rank, (alternative, logprob) in enumerate(entry.top, 1)}
        ranked.setdefault(str(token), {"logprob": entry.logprob, "rank": None, "decoded_token": token_text(token)})
        out.append(ranked)
    return out
