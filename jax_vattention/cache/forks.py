"""Forks: a second slot that holds the same tokens as an active one, its full pages shared.

``n`` samples of one prompt, beam search and parallel sampling all continue one sequence in several
slots. A fork maps the parent's full pages at the same positions of a free slot's range (the same
physical pages: what prefix sharing does with a cached prefix) and copies the parent's partly
filled last page into a page of the new slot's own, once, at the fork, since the next token of
either slot goes there::

    parent:  | A B C # _ _ |      A, B, C: full pages, one physical page each, mapped in both slots
    child:   | A B C % _ _ |      #: the parent's last page   %: the child's copy of it

From then on the shared pages are read-only in both slots (``check_write``), each slot writes its
own tokens from the shared length on, and a shared page goes back to the pool when the last slot
that maps it lets it go (its request freed and its pages reclaimed, or the slot reused).
``publish`` may offer forked pages to the prefix cache like any other full page. The attention
kernels see two ordinary contiguous sequences.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from jax_vattention.cache.config import count as _count


class Forks:
    """The forking half of :class:`jax_vattention.CacheManager` (which mixes it in)."""

    _core: Any

    if TYPE_CHECKING:
        def _check_usable(self) -> None: ...

        def _discard_unmapped(self) -> None: ...

    def fork(self, slot: int, lookahead: int = 0) -> int:
        """Places a copy of the request in ``slot`` in a free slot; returns the new slot.

        The new slot's length is ``slot``'s. Its full pages are ``slot``'s own physical pages, and
        its last, partly filled page is a private copy made after the work in flight wrote it (the
        host waits for it). The pages of ``lookahead`` more tokens are mapped too, as :meth:`alloc`
        maps them. Both slots write only from the end of the shared pages on
        (:meth:`writable_from`): their next tokens go to pages of their own. A free slot that
        already maps the most of the parent's pages (a freed fork of it) is preferred.

        Raises ``ValueError`` for a free or unknown ``slot``, or where the driver cannot map one
        page at two addresses (the CPU backend's own); ``NoFreeSlotError`` when every slot is in
        use; ``OutOfPagesError`` when the budget cannot hold the copy and the lookahead. Nothing
        changes then.

        Example::

            slot = manager.alloc(len(prompt))
            ...                                      # prefill the prompt into `slot`
            samples = [slot] + [manager.fork(slot) for _ in range(n - 1)]
            ...                                      # decode the n slots: each samples its own tokens
        """
        self._check_usable()
        slot = _count("slot", slot)
        lookahead = _count("lookahead", lookahead)
        child = self._core.fork(slot, lookahead)
        self._discard_unmapped()
        return child
