"""The page manager's safety promise under driver failures, on the fake driver.

Every scenario runs once to count its driver calls of each kind; then, for
every kind and every k, it runs again with the k-th call of that kind failing.
After each failure the driver's table must equal the manager's view page for
page, the state must be as before the call, the call must work when retried,
and release() must leave nothing on the driver. Then again with a second
failure among the calls that undo the first: the view must stay exact, or the
manager must be poisoned and say so, and release() must still free everything.
"""

import dataclasses
from typing import Callable

import pytest

from fake_checks import BUFFERS, CAPACITY, PAGE, TOKEN, check_released, check_view, make, state
from jax_vattention import _core
from jax_vattention._core import CacheManagerPoisonedError, DriverError, OutOfPagesError

OPERATIONS = ("reserve", "free_reservation", "create", "release", "map", "set_access", "unmap", "copy",
              "synchronize")


@dataclasses.dataclass
class Scenario:
    name: str
    setup: Callable
    action: Callable
    max_batch: int = 3
    budget_pages: int = 1000
    # False where a failure cannot undo what was done before it (released pages stay released):
    # the slots must still be as before, and the pages left must still be exact.
    atomic: bool = True


def alloc_reclaiming_setup(m):
    m.free(m.alloc(CAPACITY))   # slot 0 keeps 4 pages
    m.alloc(10, 22)             # reuses them: 1 page promised, 3 spare
    m.alloc(33)                 # slot 1: 2 pages; the budget of 6 is spent
    m.free(m.alloc(1))          # slot 2: takes a spare page of slot 0, keeps it deferred
    m.free(m.alloc(1))          # slot 3: the same


def grow_reclaiming_setup(m):
    m.free(m.alloc(64))         # slot 0 keeps 2 pages
    m.alloc(32)                 # reuses slot 0
    m.alloc(32)                 # slot 1: 1 page
    m.free(m.alloc(1))          # slot 2: 1 deferred page; the budget of 4 is spent


def reserve_setup(m):
    m.alloc(10)
    m.alloc(10)
    m.free(m.alloc(64))         # 2 deferred pages; 3 of the budget of 7 are left


def reclaim_setup(m):
    first, _, third = m.alloc(100), m.alloc(40), m.alloc(5)
    m.free(first)
    m.free(third)


def trim_setup(m):
    m.free(m.alloc(100))
    m.reclaim()                 # 4 pages in every buffer are pooled


def release_setup(m):
    m.alloc(100)
    m.free(m.alloc(5))
    m.reserve_growth(30)        # pooled pages too


def published(m):
    """Slot 0: 70 tokens, its 2 full pages in the prefix cache under keys 1, 2."""
    slot = m.alloc(70)
    m.publish(slot, [1, 2])
    return slot


def shared_reuse_setup(m):
    published(m)
    m.free(m.alloc_shared(80, 0, [1, 2])[0])   # slot 1: 2 shared pages and 1 private, free
    m.alloc(100)                                # slot 2: the only free slot is now slot 1


def cached_unmapped(m):
    m.free(published(m))
    m.reclaim()                                 # 2 pages in every buffer cached, mapped nowhere


def evicting_grow_setup(m):
    cached_unmapped(m)
    m.alloc(32)
    m.alloc(32)                                 # the budget of 4 is spent


def reclaim_shared_setup(m):
    first = published(m)
    m.free(m.alloc_shared(80, 0, [1, 2])[0])
    m.free(first)


def release_shared_setup(m):
    first = published(m)
    m.alloc_shared(80, 0, [1, 2])
    m.free(first)


def forked(m):
    """Slot 0: 70 tokens; slot 1 its fork, freed: it keeps the 2 shared pages and its copy."""
    parent = m.alloc(70)
    m.free(m.fork(parent))
    return parent


def fork_evicting_setup(m):
    cached_unmapped(m)                          # 2 cached pages mapped nowhere, 1 pooled
    m.alloc(40)                                 # slot 0: 2 pages; 1 of the budget of 5 is left


def reclaim_forked_setup(m):
    m.free(forked(m))                           # both free: the shared pages' last mappings go with them


def release_forked_setup(m):
    parent = m.alloc(70)
    m.fork(parent)
    m.free(parent)


# Sliding windows (window_pages.cc): layer 0's K and V (buffers 0 and 2) keep only a window of 40
# tokens; each growth first unmaps their pages wholly behind every active slot's window.
LAYER_0 = [True, False, True, False]


def windowed(flags=LAYER_0, window=40):
    def setup(m):
        m.set_window(window, flags)
    return setup


def behind_window_setup(m, flags=LAYER_0):
    windowed(flags)(m)
    m.alloc(64)                 # slot 0: 2 pages; nothing behind its window yet
    m.alloc(96)                 # slot 1: 3 pages; page 0 lies wholly behind the window of token 96


def holes_setup(m):
    behind_window_setup(m)
    m.grow(1)                   # slot 1's page 0 is unmapped in buffers 0 and 2
    m.free(1)                   # a free slot with holes, its other pages deferred


def shared_behind_window_setup(m):
    windowed()(m)
    slot = published(m)         # slot 0: its 2 full pages cached under keys 1, 2
    m.free(m.alloc_shared(80, 0, [1, 2])[0])
    m.grow_slots([30, 0, 0])    # slot 0 at 100 tokens: cached page 0 is behind its window


def forked_behind_window_setup(m):
    windowed([True] * BUFFERS)(m)
    m.fork(m.alloc(70))         # slots 0 and 1 share pages 0 and 1 (forked pages)
    m.grow_slots([40, 40, 0])   # both at 110 tokens: the next growth unmaps pages 0 and 1 in both


def rewound_setup(m):
    """Slot 0 took a speculative step of 40 tokens (70 -> 110: 4 pages) and kept 5 of them: 75 tokens
    on 4 pages, the last one spare (beyond its promised 70 and its length); slot 1: 32 tokens."""
    m.alloc(70)
    m.alloc(32)
    m.grow_slots([40, 0, 0])
    m.rewind(0, 75)


def rewound_behind_window_setup(m):
    windowed()(m)
    m.alloc(64)
    m.grow_slots([40, 0, 0])
    m.rewind(0, 80)             # the next growth unmaps page 0, wholly behind token 80's window


SCENARIOS = [
    Scenario("alloc", lambda m: m.alloc(40), lambda m: m.alloc(100)),
    Scenario("alloc_reclaiming", alloc_reclaiming_setup, lambda m: m.alloc(96), max_batch=4, budget_pages=6 * BUFFERS),
    Scenario("alloc_lookahead", lambda m: m.alloc(1), lambda m: m.alloc(10, 80)),
    Scenario("grow", lambda m: (m.alloc(32), m.alloc(64)), lambda m: m.grow(1)),
    Scenario("grow_reclaiming", grow_reclaiming_setup, lambda m: m.grow(1), budget_pages=4 * BUFFERS),
    Scenario("grow_slots", lambda m: (m.alloc(32), m.alloc(64), m.alloc(5)), lambda m: m.grow_slots([70, 1, 0])),
    Scenario("grow_slots_reclaiming", grow_reclaiming_setup, lambda m: m.grow_slots([0, 1, 0]),
             budget_pages=4 * BUFFERS),
    Scenario("reserve_growth", reserve_setup, lambda m: m.reserve_growth(60), budget_pages=7 * BUFFERS),
    Scenario("prefetch", lambda m: (m.alloc(31), m.alloc(33)), lambda m: m.prefetch(64)),
    Scenario("reclaim", reclaim_setup, lambda m: m.reclaim()),
    Scenario("trim", trim_setup, lambda m: m.trim(), atomic=False),
    Scenario("release", release_setup, lambda m: m.release(), atomic=False),
    # Prefix sharing: the aliasing path (publish makes no driver call: see test_prefix_sharing.py).
    Scenario("alloc_shared", published, lambda m: m.alloc_shared(80, 0, [1, 2])),
    Scenario("alloc_over_shared", shared_reuse_setup, lambda m: m.alloc(20)),
    Scenario("alloc_shared_over_private", lambda m: (published(m), m.free(m.alloc(128))),
             lambda m: m.alloc_shared(80, 0, [1, 2]), max_batch=2),
    Scenario("alloc_evicting", cached_unmapped, lambda m: m.alloc(128), budget_pages=4 * BUFFERS),
    Scenario("alloc_shared_evicting", cached_unmapped, lambda m: m.alloc_shared(128, 0, [1, 9]),
             budget_pages=4 * BUFFERS),
    Scenario("grow_evicting", evicting_grow_setup, lambda m: m.grow(1), budget_pages=4 * BUFFERS),
    Scenario("reclaim_shared", reclaim_shared_setup, lambda m: m.reclaim()),
    Scenario("release_shared", release_shared_setup, lambda m: m.release(), atomic=False),
    # Forks: shared pages mapped from the parent, the last page copied.
    Scenario("fork", lambda m: m.alloc(70), lambda m: m.fork(0)),
    Scenario("fork_lookahead", lambda m: m.alloc(40), lambda m: m.fork(0, 60)),
    Scenario("fork_reusing", forked, lambda m: m.fork(0)),
    Scenario("fork_over_private", lambda m: (m.alloc(70), m.free(m.alloc(128))), lambda m: m.fork(0), max_batch=2),
    Scenario("fork_evicting", fork_evicting_setup, lambda m: m.fork(0, 60), budget_pages=5 * BUFFERS),
    Scenario("alloc_over_forked", forked, lambda m: m.alloc(100), max_batch=2),
    Scenario("grow_forked", lambda m: m.fork(m.alloc(64)), lambda m: m.grow(1)),
    Scenario("reclaim_forked", reclaim_forked_setup, lambda m: m.reclaim()),
    Scenario("release_forked", release_forked_setup, lambda m: m.release(), atomic=False),
    Scenario("grow_behind_window", behind_window_setup, lambda m: m.grow(1)),
    Scenario("grow_behind_full_window", lambda m: behind_window_setup(m, [True] * BUFFERS), lambda m: m.grow(1)),
    Scenario("grow_slots_behind_window", behind_window_setup, lambda m: m.grow_slots([30, 1, 0])),
    # The budget is spent: slot 1's next page is the one its window gives back.
    Scenario("grow_slots_behind_full_window_spent", lambda m: behind_window_setup(m, [True] * BUFFERS),
             lambda m: m.grow_slots([0, 1, 0]), budget_pages=5 * BUFFERS),
    Scenario("alloc_over_window_holes", holes_setup, lambda m: m.alloc(20), max_batch=2),
    Scenario("reclaim_window_holes", holes_setup, lambda m: m.reclaim()),
    Scenario("release_window_holes", holes_setup, lambda m: m.release(), atomic=False),
    Scenario("grow_behind_window_shared", shared_behind_window_setup, lambda m: m.grow_slots([40, 0, 0])),
    Scenario("grow_behind_window_forked", forked_behind_window_setup, lambda m: m.grow(1)),
    # Rewound slots (speculative tokens dropped): their pages stay, the next growth reuses them.
    Scenario("grow_slots_after_rewind", rewound_setup, lambda m: m.grow_slots([20, 40, 0])),
    # The budget is spent: slot 1's next page is slot 0's spare last page.
    Scenario("grow_slots_reclaiming_a_rewound_tail", rewound_setup, lambda m: m.grow_slots([0, 1, 0]),
             budget_pages=5 * BUFFERS),
    Scenario("grow_slots_behind_window_after_rewind", rewound_behind_window_setup, lambda m: m.grow_slots([10, 0, 0])),
]


def prepared(scenario):
    manager, driver = make(scenario.max_batch, scenario.budget_pages)
    scenario.setup(manager)
    return manager, driver


def call_counts(scenario):
    manager, driver = prepared(scenario)
    before = {op: driver.calls(op) for op in OPERATIONS}
    scenario.action(manager)
    return {op: driver.calls(op) - before[op] for op in OPERATIONS}


def failures(scenario):
    counts = call_counts(scenario)
    return [(op, k) for op in OPERATIONS for k in range(1, counts[op] + 1)]


def check_failure(scenario, operation, nth):
    manager, driver = prepared(scenario)
    before = state(manager)
    driver.fail_on(operation, nth)
    with pytest.raises(DriverError, match="injected"):
        scenario.action(manager)
    view = check_view(manager, driver)
    assert view["poisoned"] is None, "one failure must never poison the manager"
    after = state(manager)
    if scenario.atomic:
        assert after == before
    elif scenario.name == "trim":
        assert (after["lengths"], after["active"], after["slots"]) == \
            (before["lengths"], before["active"], before["slots"])
    scenario.action(manager)            # the same call works now
    check_view(manager, driver)
    manager.release()
    check_released(driver)
    manager.release()                   # and again: nothing left to do


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.name)
def test_every_driver_call_failing_once_leaves_an_exact_view_and_the_state_unchanged(scenario):
    cases = failures(scenario)
    assert cases, f"{scenario.name} makes no driver call"
    for operation, nth in cases:
        try:
            check_failure(scenario, operation, nth)
        except AssertionError as error:
            raise AssertionError(f"{scenario.name}: {operation} call {nth} failing: {error}") from error


def test_the_sweep_covers_every_kind_of_call():
    covered = {op for scenario in SCENARIOS for op, _ in failures(scenario)}
    assert covered == set(OPERATIONS) - {"reserve"}   # reserve is setup's (reserve_buffers); tested below
    assert sum(len(failures(s)) for s in SCENARIOS) > 250


def test_a_failed_reservation_frees_the_others_and_a_failed_free_is_retried_at_release():
    driver = _core.FakeDriver(PAGE)
    manager = _core.PageManager(BUFFERS, 2, CAPACITY, TOKEN, PAGE, driver, 100 * PAGE)
    driver.fail_on("reserve", 3)
    driver.fail_on("free_reservation", 1)
    with pytest.raises(DriverError, match="injected"):
        manager.reserve_buffers()
    assert len(driver.reservations()) == 1          # the one that failed to be freed
    manager.release()
    check_released(driver)


# Regressions of the failures that used to leave a wrong view (issue 10, items 3 to 6).

def test_a_page_that_fails_to_unmap_in_a_later_buffer_stays_whole():
    manager, driver = make()
    manager.free(manager.alloc(100))
    before = state(manager)
    driver.fail_on("unmap", 2)                      # buffer 1 of the top page; buffer 0 went already
    with pytest.raises(DriverError, match="injected"):
        manager.reclaim()
    check_view(manager, driver)                     # 16 pages listed, 16 mapped
    assert state(manager) == before
    assert manager.reclaim() == 4 * BUFFERS         # and the retry works


def test_a_page_the_undo_cannot_unmap_never_goes_back_to_the_pool():
    manager, driver = make()
    driver.fail_on("map", 6)                        # buffer 1 of a 4-page alloc
    driver.fail_on("unmap", 1)                      # undoing buffer 0's first page fails
    with pytest.raises(DriverError, match="fake map failed"):
        manager.alloc(100)
    view = check_view(manager, driver)
    assert len(view["strays"]) == 1 and view["strays"][0][2] not in view["pooled"]
    assert "fake map failed" in view["poisoned"] and "fake unmap failed" in view["poisoned"]
    for call in (lambda: manager.alloc(1), lambda: manager.grow(1), lambda: manager.trim(),
                 lambda: manager.reclaim(), lambda: manager.lengths(), lambda: manager.reserve_growth(1)):
        with pytest.raises(CacheManagerPoisonedError, match="fake map failed.*close it"):
            call()
    assert manager.stats()["poisoned"]
    manager.release()
    check_released(driver)


def test_an_undo_that_cannot_unmap_keeps_the_page_listed_and_reports_the_first_error():
    manager, driver = make()
    first, second = manager.alloc(32), manager.alloc(32)
    driver.fail_on("map", BUFFERS + 1)              # the second slot's first map, after the first slot's page
    driver.fail_on("unmap", 1)                      # undoing the first slot's new page fails
    with pytest.raises(DriverError, match="fake map failed"):
        manager.grow(1)
    view = check_view(manager, driver)
    assert view["poisoned"] is None                 # the view stayed exact: the page is listed
    assert manager.mapped_pages()[first] == 2 and manager.mapped_pages()[second] == 1
    assert manager.lengths()[first] == 32
    manager.grow(1)                                 # and the slot grows into it
    check_view(manager, driver)
    manager.release()
    check_released(driver)


def test_a_created_page_the_undo_cannot_release_stays_pooled_and_the_first_error_is_reported():
    manager, driver = make()
    driver.fail_on("map", 6)
    driver.fail_on("release", 1)
    with pytest.raises(DriverError, match="fake map failed"):
        manager.alloc(100)
    view = check_view(manager, driver)
    assert view["poisoned"] is None and len(view["pooled"]) == 1
    assert manager.alloc(100) == 0
    manager.release()
    check_released(driver)


def test_release_frees_all_it_can_reports_the_rest_and_can_be_retried():
    manager, driver = make()
    manager.alloc(100)
    manager.free(manager.alloc(5))
    manager.reserve_growth(20)
    driver.fail_on("unmap", 3)
    driver.fail_on("release", 2)
    driver.fail_on("free_reservation", 1)
    with pytest.raises(DriverError, match="1 pages mapped, 2 pages alive, 2 reservations. Call release"):
        manager.release()                           # the reservation holding the stray page cannot go
    check_view(manager, driver)
    assert len(driver.mappings()) == 1 and len(driver.handles()) == 2 and len(driver.reservations()) == 2
    manager.release()
    check_released(driver)
    with pytest.raises(RuntimeError, match="closed"):
        manager.alloc(1)


def test_a_poisoned_manager_still_releases_everything():
    manager, driver = make()
    manager.alloc(50)
    manager.free(manager.alloc(100))
    driver.fail_on("unmap", 2)                      # reclaiming: buffer 1 of the top page fails...
    driver.fail_on("map", 1)                        # ...and mapping buffer 0 back fails too
    with pytest.raises(DriverError, match="fake unmap failed"):
        manager.reclaim()
    view = check_view(manager, driver)
    assert view["poisoned"] and len(view["strays"]) == BUFFERS - 1
    manager.release()
    check_released(driver)


def test_reserved_growth_is_kept_for_the_reserving_slots():
    manager, driver = make(budget_pages=4 * BUFFERS)
    slot = manager.alloc(10)                        # 1 page
    manager.reserve_growth(60)                      # 70 tokens: 2 more pages, earmarked
    assert manager.stats()["reserved_pages"] == 2 * BUFFERS
    with pytest.raises(OutOfPagesError, match="reserved for growth"):
        manager.alloc(40)                           # 2 pages: only 1 is not reserved
    other = manager.alloc(1, 10)                    # the free page
    assert manager.prefetch(120) == 2 * BUFFERS     # the reserving slot's own pages, no more
    assert manager.mapped_pages()[slot] == 3 and manager.mapped_pages()[other] == 1
    manager.free(other)
    creates = driver.calls("create")
    for _ in range(60):
        manager.grow(1)                             # never out of pages, nothing to create
    assert driver.calls("create") == creates
    assert manager.stats()["reserved_pages"] == 0
    check_view(manager, driver)


def test_trim_keeps_the_pages_reserved_for_growth():
    manager, driver = make()
    manager.alloc(10)
    manager.reserve_growth(60)
    assert manager.trim() == 0 and manager.stats()["pooled_pages"] == 2 * BUFFERS


# Two failures: the first as above, the second among the calls that undo it.

UNDOING = ("map", "set_access", "unmap", "release")


def check_double_failure(scenario, operation, nth, second, second_nth):
    manager, driver = prepared(scenario)
    before = state(manager)
    driver.fail_on(operation, nth)
    driver.fail_on(second, second_nth, after_a_failure=True)
    with pytest.raises(DriverError, match=f"fake {operation} failed"):   # the first error, not the undo's
        scenario.action(manager)
    view = check_view(manager, driver)
    if view["poisoned"] is None and scenario.atomic:
        after = state(manager)
        assert (after["lengths"], after["active"]) == (before["lengths"], before["active"])
    elif view["poisoned"] is not None:
        assert f"fake {operation} failed" in view["poisoned"] or f"fake {second} failed" in view["poisoned"]
        with pytest.raises(CacheManagerPoisonedError):
            manager.alloc(0)
    for _ in range(3):                  # a pending failure may still hit release once
        try:
            manager.release()
            break
        except DriverError:
            check_view(manager, driver)
    check_released(driver)
    return view["poisoned"] is not None


def double_failures(scenario, depth):
    return [(op, k, second, m) for op, k in failures(scenario) for second in UNDOING for m in range(1, depth + 1)]


def sweep_double_failures(depth):
    poisoned = 0
    for scenario in SCENARIOS:
        for case in double_failures(scenario, depth):
            try:
                poisoned += check_double_failure(scenario, *case)
            except AssertionError as error:
                raise AssertionError(f"{scenario.name}: {case} failing: {error}") from error
    assert poisoned > 0                 # some undos could not keep the view exact, and said so


def test_a_failure_while_undoing_keeps_the_view_exact_or_poisons_the_manager():
    sweep_double_failures(depth=4)      # 13,744 cases
