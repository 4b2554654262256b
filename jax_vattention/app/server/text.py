"""Tokens to text, one token at a time.

Why not decode each token alone: a character can span tokens (a UTF-8 byte per token with the
byte tokenizer, or a multi-byte piece of a BPE vocabulary), and decoding a lone part gives the
replacement character. Why not decode everything generated so far at each token: that costs
O(length) a token, O(length²) an answer, on the server's event loop. :class:`TextStream`
decodes a short window instead (the incremental detokenization of vLLM and TGI): the tokens
since the last text it handed out, after the few before them that give them their context
(``prefix``). A trailing replacement character is held back until the next token (or the last)
settles it. End-of-sequence tokens count as generated but are not part of the text.
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
        self._prefix = 0      # start of the context window: tokens already turned into text
        self._read = 0        # tokens whose text was handed out
        self.count = 0

    def push(self, token: int, final: bool = False) -> str:
        """Adds ``token`` (a generated token id, never an error's -1); returns the text it completes
        (maybe empty)."""
        if not isinstance(token, int) or token < 0:
            raise ValueError(f"a generated token id must be a non-negative integer, got {token!r}")
        self.count += 1
        if token not in self._stop:
            self._ids.append(token)
        if len(self._ids) == self._read:
            return ""
        known = self._decoder.decode(self._ids[self._prefix:self._read])
        text = self._decoder.decode(self._ids[self._prefix:])
        if len(text) <= len(known) or (text.endswith("\ufffd") and not final):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(known):]
