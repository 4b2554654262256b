"""Host-side checks before a compiled step runs over a manager's cache, and recovery when one fails.

A compiled step that writes past what the manager has mapped faults on a GPU, and
one whose mapping op runs out of pages fails with a generic runtime error after
XLA has already taken (donated) the cache. The library's entry points
(:func:`~jax_vattention.decode.generate.generate`, ``generate_in_manager``, the engine)
therefore check on the host, before dispatch, that every slot a step writes is
allocated with the tokens it holds mapped (:func:`check_slots`), and reserve the
growth the step can do (``manager.reserve_growth``): a step within its
reservation cannot run out of pages. If a step still fails in the mapping op,
:func:`mapping_failures` turns the error into ``OutOfPagesError`` or
``DriverError`` and leaves the manager's cache usable (GPU) or clearly lost (CPU).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import jax

from jax_vattention.cache import _ffi
from jax_vattention.cache.jax_internals import failed_in, first_line, out_of_memory
from jax_vattention._core import DriverError, OutOfPagesError


def check_slots(manager, slots: Sequence[int], tokens: Sequence[int], *, error: type = ValueError) -> None:
    """Raises ``error`` unless each ``slots[i]`` is allocated in ``manager`` and holds at least
    ``tokens[i]`` tokens on the host, with the pages that hold them mapped.

    ``error`` is ``ValueError`` for slots a caller passed, ``RuntimeError`` where the library
    chose them (an inconsistency there is a bug).
    """
    active, lengths, pages = manager.active(), manager.lengths(), manager.mapped_pages()
    # Pages are per device: a tensor-parallel manager's device holds kv_heads / N of every token.
    token_bytes = manager.shard_config.token_bytes
    for slot, needed in zip(slots, tokens):
        slot, needed = int(slot), int(needed)
        if not 0 <= slot < len(active) or not active[slot]:
            raise error(f"slot {slot} is not allocated in manager {manager.manager_id}: "
                        f"allocate it with manager.alloc(prompt_len) first")
        if lengths[slot] < needed:
            raise error(f"slot {slot} holds {lengths[slot]} tokens on the host but the step writes "
                        f"{needed}: allocate it with at least that prompt length")
        if pages[slot] * manager.page_bytes < lengths[slot] * token_bytes:
            raise RuntimeError(f"slot {slot} holds {lengths[slot]} tokens but only {pages[slot]} pages "
                               "are mapped: the page manager's accounting is inconsistent")


@contextlib.contextmanager
def mapping_failures(manager, cache, what: str) -> Iterator[None]:
    """Runs a compiled step that takes ``cache``, ``manager``'s (dispatch and reading its results).

    A failure of the mapping op inside it becomes ``OutOfPagesError`` (the budget ran out) or
    ``DriverError``, after the manager recovered its cache (see
    ``CacheHost.recover_from_failed_step``); other errors pass unchanged.
    """
    try:
        yield
    except jax.errors.JaxRuntimeError as failure:
        if manager is None or not failed_in(failure, _ffi.GROW_TARGET):
            raise
        state = manager.recover_from_failed_step(cache)
        reason = first_line(failure)
        if out_of_memory(failure):
            raise OutOfPagesError(
                f"{what} ran out of pages inside the compiled step ({reason}); {state}. Reserve the "
                "growth a step can do before dispatching it (manager.reserve_growth), or free slots"
            ) from failure
        raise DriverError(f"{what} failed in the mapping op ({reason}); {state}") from failure
