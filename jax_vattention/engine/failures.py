"""The engine's failure policy: a driver error fails only the requests it touched.

Every driver call can fail (another process took the memory, a transient error), and the
cache manager undoes a failed call, so its state is as before. What the engine does then
depends on where the call failed:

* **admission** (mapping a new request's prompt): nothing was given to the request yet, so it
  waits and is tried again a little later (:func:`admission_retry_at`); after
  :data:`ADMISSION_ATTEMPTS` failures it fails with the last error, so a request that can
  never be placed is not retried forever;
* **a step's growth** (mapping the pages a step writes, for every slot at once): the growth is
  tried again slot by slot (:func:`grow_each`); a request whose own growth fails again fails
  alone and the others run, so a transient failure fails nobody;
* **the map-ahead** while the device runs (best effort): nothing fails; the step's tokens
  are read as usual and the next step maps what it needs;
* **the step itself** (dispatch or its result): the requests of that step fail.

A manager that could not undo a failure is poisoned: no request can be served any more, and
the engine's caller (the server's loop) reports it.
"""

from __future__ import annotations

import collections

from jax_vattention._core import DriverError, OutOfPagesError

# Tries of an admission whose mapping the driver refused, before the request fails.
ADMISSION_ATTEMPTS = 4
# The wait before the first retry; it doubles with each failure.
ADMISSION_BACKOFF_SECONDS = 0.02
# Failed requests whose errors Engine.failed keeps (the oldest leave first).
FAILED_KEPT = 1024


def admission_retry_at(now: float, failures: int) -> float:
    """When an admission that failed ``failures`` times may be tried again."""
    return now + ADMISSION_BACKOFF_SECONDS * 2 ** (failures - 1)


def grow_each(manager, counts: list[int]) -> dict[int, Exception]:
    """Grows each slot of ``counts`` (``[max_batch]`` tokens) on its own, after growing them all
    at once failed (which changed nothing); returns the slots whose own growth failed, with the
    error. The others are grown."""
    failed: dict[int, Exception] = {}
    for slot, count in enumerate(counts):
        if count:
            one = [0] * len(counts)
            one[slot] = count
            try:
                manager.grow_slots(one)
            except (OutOfPagesError, DriverError) as error:
                failed[slot] = error
    return failed


class FailedRequests(collections.OrderedDict):
    """Errors of failed requests by id, the last :data:`FAILED_KEPT` of them: a server runs for days."""

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        while len(self) > FAILED_KEPT:
            self.popitem(last=False)
