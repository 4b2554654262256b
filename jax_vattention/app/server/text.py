"""Tokens to text, one token at a time.

Why not decode each token alone: a character can span tokens (a UTF-8 byte per token with the
byte tokenizer, or a multi-byte piece of a BPE vocabulary), and decoding a lone part gives the
replacement character. :class:`TextStream` decodes everything generated so far and hands out
only the new text, holding back a trailing replacement character until the next token (or the
last) settles it. End-of-sequence tokens count as generated but are not part of the text.
"""

from __future__ import annotations


class TextStream:
    """The text of a growing list of tokens, as increments.

    Example::

        text = TextStream(loaded_model, stop_tokens=(2,))
        pieces = [text.push(token, final=i == len(tokens) - 1) for i, token in enumerate(tokens)]
    """

    def __init__(self, decoder, stop_tokens=()):
        self._decoder = decoder
        self._stop = set(stop_tokens)
        self._ids: list[int] = []
        self._sent = 0
        self.count = 0

    def push(self, token: int, final: bool = False) -> str:
        """Adds ``token``; returns the text it completes (maybe empty)."""
        self.count += 1
        if token not in self._stop:
            self._ids.append(token)
        text = self._decoder.decode(self._ids)
        if not final and text.endswith("\ufffd"):
            return ""
        piece, self._sent = text[self._sent:], len(text)
        return piece
