"""Content keys of full pages, for prefix sharing: a hash chain over page-aligned token blocks.

A page of the cache holds ``tokens_per_page`` tokens of one slot (in every
layer's K and V). Its key stands for *all* the tokens up to its end, not only
its own: ``key_i = H(key_{i-1}, tokens of block i)``. Two prompts get the same
key for page ``i`` exactly when their first ``(i + 1) * tokens_per_page``
tokens are equal, which is when the page's K and V are equal too (they depend
on every token before them), so the manager may map one physical page in both
slots. Only full pages have keys: a prompt's last, partial page stays private.

The hash is BLAKE2b with 8-byte digests over little-endian int64 tokens: the
same keys in every process, so a cache's keys can be logged and compared.

Why the sharing granularity matters: a page holds 1024 tokens of Llama-3-8B
with per-layer buffers and 32 with the layer-interleaved layout (2 MiB pages),
so only prefixes of at least one page are shared, in whole pages.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import TYPE_CHECKING, Any

import numpy as np

from jax_vattention.cache.config import count as _count

_ROOT = b"jax_vattention prefix v1"


@dataclasses.dataclass(frozen=True)
class SharedAlloc:
    """Where :meth:`CacheManager.alloc_shared` placed a request.

    Attributes
    ----------
    slot : int
    shared_tokens : int
        Tokens ``[0, shared_tokens)`` of the slot map pages of the prefix
        cache: they hold the prompt's K and V already and are read-only. The
        prefill computes (and writes) from ``shared_tokens`` on.
    """

    slot: int
    shared_tokens: int


def page_keys(tokens, tokens_per_page: int, *, salt: bytes = b"") -> list[int]:
    """64-bit keys of the full pages of ``tokens``: one per whole block of ``tokens_per_page``.

    Parameters
    ----------
    tokens : int array-like, [n]
        Token ids from the start of a sequence.
    tokens_per_page : int
        ``CacheManager.tokens_per_page``.
    salt : bytes
        Anything else the K and V depend on (an adapter's name, say): different
        salts never share pages.

    Example::

        >>> keys = page_keys(range(70), 32)
        >>> len(keys), keys == page_keys(list(range(64)) + [9] * 6, 32)
        (2, True)
    """
    if isinstance(tokens_per_page, bool) or not isinstance(tokens_per_page, (int, np.integer)) or tokens_per_page < 1:
        raise ValueError(f"tokens_per_page must be a positive integer, got {tokens_per_page!r}")
    if not isinstance(salt, bytes):
        raise ValueError(f"salt must be bytes, got {type(salt).__name__}")
    array = np.asarray(list(tokens) if not hasattr(tokens, "__array__") else tokens)
    if array.ndim != 1 or (array.size and not np.issubdtype(array.dtype, np.integer)):
        raise ValueError(f"tokens must be a 1-D sequence of integer token ids, got shape {array.shape} "
                         f"and dtype {array.dtype}")
    array = array.astype("<i8")
    key = hashlib.blake2b(_ROOT + salt, digest_size=8).digest()
    keys = []
    for start in range(0, array.size - tokens_per_page + 1, tokens_per_page):
        key = hashlib.blake2b(key + array[start:start + tokens_per_page].tobytes(), digest_size=8).digest()
        keys.append(int.from_bytes(key, "little"))
    return keys


class PrefixSharing:
    """The prefix-sharing half of :class:`jax_vattention.CacheManager` (which mixes it in)."""

    _core: Any
    config: Any

    if TYPE_CHECKING:
        def _check_usable(self) -> None: ...

        def _discard_unmapped(self) -> None: ...

    @property
    def tokens_per_page(self) -> int:
        """Tokens one page holds: the granularity of prefix sharing; 0 where sharing is off.

        Sharing needs a driver that maps one physical page at several addresses
        (CUDA's): on the CPU backend the buffers are XLA's memory, so it is 0
        there, and :meth:`alloc_shared` shares nothing.
        """
        return self._core.tokens_per_page()

    def alloc_shared(self, prompt_len: int, lookahead: int = 0, *, prefix) -> SharedAlloc:
        """:meth:`alloc` that maps the longest cached prefix of ``prefix`` into the slot, read-only.

        ``prefix`` holds the prompt's token ids (all of them, or its start). Pages
        of the prefix cache whose keys (:func:`jax_vattention.cache.prefix.page_keys`)
        match its full pages from the first on are mapped at the same positions
        of the slot: one physical copy serves every request that shares them.
        At most ``(prompt_len - 1) // tokens_per_page`` pages are shared, so
        that the prefill computes at least the prompt's last token (its logits
        give the first output token). The prefill must write from
        ``shared_tokens`` on: :meth:`check_write` refuses an earlier start.

        Returns a :class:`SharedAlloc` ``(slot, shared_tokens)``. Raises as :meth:`alloc` does.

        Example::

            placed = manager.alloc_shared(len(prompt), 16, prefix=prompt)
            manager.check_write(placed.slot, placed.shared_tokens)
            ...                 # prefill prompt[placed.shared_tokens:] at that offset
            manager.publish(placed.slot, prompt)
        """
        self._check_usable()
        prompt_len = _count("prompt_len", prompt_len)
        lookahead = _count("lookahead", lookahead)
        if prompt_len > self.config.max_len:
            raise ValueError(f"a prompt of {prompt_len} tokens is longer than max_len={self.config.max_len}")
        tokens = _tokens(prefix)
        if len(tokens) > prompt_len:
            raise ValueError(f"prefix has {len(tokens)} tokens, more than prompt_len={prompt_len}")
        per_page = self.tokens_per_page
        keys = page_keys(tokens[:max(prompt_len - 1, 0)], per_page) if per_page else []
        slot, pages = self._core.alloc_shared(prompt_len, lookahead, keys)
        self._discard_unmapped()
        return SharedAlloc(slot=slot, shared_tokens=pages * per_page)

    def cached_pages(self, keys) -> int:
        """How many of ``keys`` (:func:`page_keys` of a prompt) the prefix cache holds, from the first
        on: the pages :meth:`alloc_shared` would map now. Changes nothing (no page counts as used)."""
        self._check_usable()
        return self._core.cached_pages(_keys(keys)) if self.tokens_per_page else 0

    def alloc_prefix(self, keys, tokens: int, lookahead: int = 0) -> SharedAlloc:
        """:meth:`alloc_shared` for a prompt that is prefilled in chunks: only its cached prefix is in the slot.

        ``keys`` are :func:`page_keys` of the prompt's first tokens (at most ``(tokens - 1) //
        tokens_per_page`` of them: the prompt's last token is always computed); ``tokens`` the
        prompt's length. The longest cached run of ``keys`` is mapped, read-only, and the slot's
        length is its end, ``shared_tokens``: the prefill writes from there, growing the slot
        chunk by chunk (:meth:`grow_slots`). The pages of ``tokens + lookahead`` tokens are mapped
        (reserved for that growth) as :meth:`alloc` maps ``lookahead`` tokens ahead.

        Returns a :class:`SharedAlloc`. Raises as :meth:`alloc` does, and ``ValueError`` for more
        keys than the prompt's full pages before its last token.

        Example::

            keys = page_keys(prompt[:-1], manager.tokens_per_page)
            placed = manager.alloc_prefix(keys, len(prompt), lookahead=16)
            ...                 # chunks of prompt[placed.shared_tokens:], each grown before it runs
        """
        self._check_usable()
        tokens = _count("tokens", tokens)
        lookahead = _count("lookahead", lookahead)
        keys = _keys(keys)
        if tokens > self.config.max_len:
            raise ValueError(f"a prompt of {tokens} tokens is longer than max_len={self.config.max_len}")
        per_page = self.tokens_per_page
        if not per_page:
            return SharedAlloc(slot=self.alloc(0, tokens + lookahead), shared_tokens=0)
        if tokens == 0 or len(keys) > (tokens - 1) // per_page:
            raise ValueError(f"{len(keys)} page keys stand for more than the full pages before the last token "
                             f"of a prompt of {tokens} tokens ({max(tokens - 1, 0) // per_page} at most)")
        run = self._core.cached_pages(keys)
        shared = run * per_page
        slot, pages = self._core.alloc_shared(shared, tokens - shared + lookahead, keys[:run])
        self._discard_unmapped()
        if pages != run:
            self._core.free(slot)
            raise RuntimeError(f"the prefix cache held {run} pages of the prompt but {pages} were mapped")
        return SharedAlloc(slot=slot, shared_tokens=shared)

    def publish_pages(self, slot: int, keys) -> int:
        """:meth:`publish` with the slot's page keys (:func:`page_keys` of its tokens) instead of its
        tokens: pages ``0 .. len(keys) - 1`` of ``slot``, which must all be written (below its length).
        Raises ``ValueError`` otherwise, with nothing registered. Returns the pages registered."""
        self._check_usable()
        if not self.tokens_per_page:
            return 0
        return self._core.publish(_count("slot", slot), _keys(keys))

    def publish(self, slot: int, tokens) -> int:
        """Offers the full pages of ``slot`` to the prefix cache, keyed by ``tokens``.

        ``tokens`` are the slot's token ids from its first on (the prompt, and
        generated tokens if any), whose K and V the slot holds: only pages that
        are entirely written (below the slot's length) are registered. Call it
        once the prefill wrote them. Pages already cached stay as they are; a
        key another slot published first is not duplicated. From then on the
        pages are read-only in this slot too. Returns the pages registered.
        """
        self._check_usable()
        slot = _count("slot", slot)
        tokens = _tokens(tokens)
        per_page = self.tokens_per_page
        if per_page == 0:
            return 0
        length = int(self._core.lengths()[slot]) if slot < self.config.max_batch else 0
        full = min(len(tokens), length) // per_page * per_page
        return self._core.publish(slot, page_keys(tokens[:full], per_page))

    def writable_from(self, slot: int) -> int:
        """The first token of ``slot`` that may be written: the end of its cached (read-only) pages."""
        self._check_usable()
        return self._core.writable_from(_count("slot", slot))

    def check_write(self, slot: int, start: int) -> None:
        """Raises ``ValueError`` if writing ``slot`` from token ``start`` would touch a shared page.

        Call it before a prefill at an offset (its ``start``): a page of the
        prefix cache is mapped in other slots too, and a write there would
        change their tokens' K and V.
        """
        self._check_usable()
        self._core.check_write(_count("slot", slot), _count("start", start))

    def evict(self) -> int:
        """Returns to the pool every page of the prefix cache that no slot maps; returns the page count.

        Memory pressure does this by itself, least recently used first, before
        a request has to wait and before an active slot's spare pages go.
        """
        self._check_usable()
        return self._core.evict()


def _keys(keys) -> list[int]:
    keys = [int(key) for key in keys]
    if any(not 0 <= key < 2**64 for key in keys):
        raise ValueError("page keys are 64-bit unsigned integers (page_keys gives them)")
    return keys


def _tokens(tokens) -> np.ndarray:
    array = np.asarray(tokens)
    if array.ndim != 1 or (array.size and not np.issubdtype(array.dtype, np.integer)):
        raise ValueError(f"token ids must be a 1-D integer sequence, got shape {array.shape} and dtype {array.dtype}")
    return array
