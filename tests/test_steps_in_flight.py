"""Host-side calls that unmap pages wait for the steps in flight first, also on the CPU backend.

XLA runs the CPU backend's steps asynchronously, and its drivers cannot wait for them; the page
manager waits through ``CacheManager.wait_for_steps``. The fake driver fills an unmapped address
with NaN (``poison_unmapped``), so a step still running when a call unmapped a page it reads
sums NaN. Each test dispatches a step that reads a slot after a long computation and, while it
runs, makes the host call under test unmap the pages it reads: the step must read what the slot
held.
"""

import jax
import jax.numpy as jnp

import jax_vattention as jv
from jax_vattention import _core

CPU = jax.devices("cpu")[0]
PAGE = 4096
TOKENS_PER_PAGE = PAGE // (2 * 16 * 4)      # 2 KV heads x 16 x float32
BUSY_SIZE = 2048                            # a product of 17 GFLOP: a step of a good fraction of a second


def manager_for(*, budget_pages, max_batch=2, window=None):
    config = jv.CacheConfig(num_layers=1, max_batch=max_batch, max_len=8 * TOKENS_PER_PAGE, kv_heads=2,
                            head_dim=16, dtype=jnp.float32, page_bytes=PAGE, budget_bytes=budget_pages * PAGE,
                            window=window, window_layers=None if window is None else (0,))
    driver = _core.FakeDriver(PAGE, host_pages=True, poison_unmapped=True)
    return jv.CacheManager(config, CPU, driver=driver), driver


def fill(manager, slot, tokens, value):
    """Writes ``value`` into the first ``tokens`` positions of ``slot`` (a donated, in-place step)."""
    def write(cache):
        k = cache.k[0].at[slot, :tokens].set(value)
        v = cache.v[0].at[slot, :tokens].set(value)
        return cache.replace(k=(k,), v=(v,))
    manager.cache = jax.jit(write, donate_argnums=0)(manager.cache)
    jax.block_until_ready(manager.cache)


def read_in_flight(manager, slot, first, end):
    """Dispatches a step that first multiplies two large matrices (a step still running when the
    host goes on), then sums positions ``first..end-1`` of ``slot``; returns the sum, not ready
    yet. (A host callback would not do: XLA runs a CPU program that has one synchronously.)"""
    def step(cache, matrix):
        busy = (matrix @ matrix).sum() * 0.0   # []: zero, after a long product (not folded: NaN * 0)
        # The read comes after it. The cache goes back untouched: a step that also wrote it would
        # have XLA copy the cache first, at the start.
        return cache, (cache.k[0][slot, first:end] + busy).sum()
    matrix = jnp.ones((BUSY_SIZE, BUSY_SIZE), jnp.float32)
    jax.block_until_ready(matrix)
    manager.cache, total = jax.jit(step, donate_argnums=0)(manager.cache, matrix)
    assert not total.is_ready(), "the step ended before the host call: make BUSY_SIZE larger"
    return total


def test_reclaiming_a_freed_slot_waits_for_the_step_that_still_reads_it():
    """A request finished while its last step was in flight (the engine frees its slot at once)."""
    manager, driver = manager_for(budget_pages=16)
    with manager:
        slot = manager.alloc(2 * TOKENS_PER_PAGE)
        fill(manager, slot, 2 * TOKENS_PER_PAGE, 1.0)
        total = read_in_flight(manager, slot, 0, 2 * TOKENS_PER_PAGE)
        manager.free(slot)
        assert manager.reclaim() > 0
        assert float(total) == 2 * TOKENS_PER_PAGE * 2 * 16


def test_a_growth_that_takes_a_preempted_requests_pages_waits_for_the_step_that_still_reads_them():
    """The engine preempts a request whose row is in the step in flight, and another slot's
    growth takes its pages at once (deferred reclamation had kept them with the freed slot)."""
    manager, driver = manager_for(budget_pages=6)
    with manager:
        victim = manager.alloc(2 * TOKENS_PER_PAGE)
        manager.alloc(TOKENS_PER_PAGE)
        fill(manager, victim, 2 * TOKENS_PER_PAGE, 1.0)
        total = read_in_flight(manager, victim, 0, 2 * TOKENS_PER_PAGE)
        manager.free(victim)
        unmapped = driver.calls("unmap")
        manager.grow_slots([0, 2 * TOKENS_PER_PAGE])   # needs the victim's pages
        assert driver.calls("unmap") > unmapped
        assert float(total) == 2 * TOKENS_PER_PAGE * 2 * 16


def test_a_growth_that_unmaps_behind_a_window_waits_for_the_step_that_still_reads_there():
    """The step in flight holds the query at position 2 * TOKENS_PER_PAGE - 2, whose window still
    starts in page 0; the next growth's queries no longer see page 0, so it unmaps it."""
    window, length = TOKENS_PER_PAGE, 2 * TOKENS_PER_PAGE - 1
    manager, _ = manager_for(budget_pages=16, window=window)
    with manager:
        slot = manager.alloc(length)
        fill(manager, slot, length, 1.0)
        total = read_in_flight(manager, slot, length - window - 1, length - 1)
        assert manager.page_manager.window_pages_due() > 0
        manager.grow_slots([1, 0])
        assert manager.stats()["window_pages_unmapped_total"] > 0
        assert float(total) == window * 2 * 16
