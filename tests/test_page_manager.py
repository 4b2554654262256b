"""The page manager on the fake driver: exact pages, rollback, budget, reclamation."""

import random
import threading

import pytest

from jax_vattention import _core
from jax_vattention._core import DriverError, NoFreeSlotError, OutOfPagesError

from fake_checks import BUFFERS, CAPACITY, MiB, PAGE, TOKEN, make


def snapshot(manager, driver):
    stats = manager.stats()
    for key in ("map_seconds", "unmap_seconds", "grow_calls"):
        stats.pop(key)
    return stats, manager.lengths(), manager.active(), manager.mapped_pages(), driver.mapped_bytes


def check_consistent(manager, driver):
    stats = manager.stats()
    assert driver.mapped_bytes == stats["mapped_pages"] * PAGE
    assert driver.live_handles == stats["created_pages"]
    assert stats["created_pages"] == stats["mapped_pages"] + stats["pooled_pages"]
    bases = manager.buffer_bases()
    for slot, pages in enumerate(manager.mapped_pages()):
        for base in bases:
            start = base + slot * CAPACITY * TOKEN
            if pages:
                assert driver.is_accessible(start, pages * PAGE)
            if pages < CAPACITY * TOKEN // PAGE:
                assert not driver.is_accessible(start + pages * PAGE, PAGE)


@pytest.mark.parametrize("prompt_len, pages", [(0, 0), (1, 1), (32, 1), (33, 2), (128, 4)])
def test_alloc_maps_exact_pages(prompt_len, pages):
    manager, driver = make()
    slot = manager.alloc(prompt_len)
    assert manager.mapped_pages()[slot] == pages
    stats = manager.stats()
    assert stats["mapped_pages"] == pages * BUFFERS
    assert stats["used_tokens"] == prompt_len
    assert stats["waste_bytes"] == pages * BUFFERS * PAGE - prompt_len * TOKEN * BUFFERS
    assert driver.calls("map") == pages * BUFFERS
    # set_access is batched: one call per buffer covers the slot's new pages.
    assert driver.calls("set_access") == (BUFFERS if pages else 0)
    check_consistent(manager, driver)


def test_growth_crosses_page_boundaries():
    manager, driver = make()
    slot = manager.alloc(30)
    expected = []
    for _ in range(70):
        manager.grow(1)
        expected.append(manager.mapped_pages()[slot])
    assert manager.lengths()[slot] == 100
    # 31, 32 -> 1 page; 33..64 -> 2; 65..96 -> 3; 97..100 -> 4
    assert expected == [1] * 2 + [2] * 32 + [3] * 32 + [4] * 4
    assert driver.calls("map") == 4 * BUFFERS
    check_consistent(manager, driver)


def test_growth_stops_at_capacity():
    manager, _ = make()
    slot = manager.alloc(120)
    manager.grow(50)
    assert manager.lengths()[slot] == CAPACITY
    assert manager.mapped_pages()[slot] == 4


def test_free_keeps_pages_for_the_next_request_in_the_slot():
    manager, driver = make()
    first = manager.alloc(100)        # 4 pages
    other = manager.alloc(1)          # 1 page
    manager.free(first)
    stats = manager.stats()
    assert stats["deferred_pages"] == 4 * BUFFERS and stats["active_slots"] == 1
    maps = driver.calls("map")
    again = manager.alloc(64)         # fits in the freed slot's pages
    assert again == first and driver.calls("map") == maps
    assert manager.stats()["deferred_pages"] == 0
    manager.free(again)
    manager.free(other)
    assert manager.reclaim() == 5 * BUFFERS
    assert driver.calls("synchronize") == 2      # a long wait without the lock, a short one under it
    assert manager.stats()["mapped_pages"] == 0 and driver.mapped_bytes == 0
    assert manager.stats()["pooled_pages"] == 5 * BUFFERS
    assert manager.trim() == 5 * BUFFERS
    assert driver.live_handles == 0


def test_pressure_reclaims_deferred_pages_after_synchronizing():
    manager, driver = make(max_batch=2, budget_pages=3 * BUFFERS)
    first = manager.alloc(64)          # 2 pages per buffer
    second = manager.alloc(1)          # 1 page per buffer: the budget is full
    manager.free(first)
    manager.grow(40)                   # second needs a page more: the freed slot's top one
    assert manager.mapped_pages()[second] == 2 and manager.mapped_pages()[first] == 1
    assert driver.calls("synchronize") == 2      # a long wait without the lock, a short one under it
    check_consistent(manager, driver)


def test_out_of_pages_leaves_everything_unchanged():
    manager, driver = make(budget_pages=2 * BUFFERS)
    manager.alloc(64)
    before = snapshot(manager, driver)
    with pytest.raises(OutOfPagesError, match="budget"):
        manager.alloc(1)
    with pytest.raises(OutOfPagesError):
        manager.grow(1)
    with pytest.raises(OutOfPagesError):
        manager.reserve_growth(1)
    assert snapshot(manager, driver) == before


def test_out_of_pages_is_a_memory_error():
    assert issubclass(OutOfPagesError, MemoryError)


@pytest.mark.parametrize("operation, nth", [("map", 1), ("map", 6), ("set_access", 1), ("set_access", 3),
                                            ("create", 4)])
def test_driver_failure_halfway_rolls_back(operation, nth):
    manager, driver = make()
    manager.alloc(40)
    before = snapshot(manager, driver)
    driver.fail_on(operation, nth)
    with pytest.raises(DriverError, match="injected"):
        manager.alloc(100)
    assert snapshot(manager, driver) == before
    check_consistent(manager, driver)
    slot = manager.alloc(100)          # the next attempt works
    assert manager.mapped_pages()[slot] == 4


def test_failure_while_growing_several_slots_rolls_back_all():
    manager, driver = make()
    manager.alloc(32)
    manager.alloc(32)
    before = snapshot(manager, driver)
    driver.fail_on("map", BUFFERS + 2)  # the second slot's mapping fails
    with pytest.raises(DriverError):
        manager.grow(1)
    assert snapshot(manager, driver) == before


def test_reserve_growth_creates_pages_that_growth_then_uses():
    manager, driver = make()
    manager.alloc(10)
    manager.alloc(10)
    manager.reserve_growth(60)         # both slots: 1 -> 3 pages
    assert manager.stats()["pooled_pages"] == 2 * 2 * BUFFERS
    creates = driver.calls("create")
    for _ in range(60):
        manager.grow(1)
    assert driver.calls("create") == creates
    assert manager.stats()["pooled_pages"] == 0


def test_bad_inputs():
    manager, _ = make(max_batch=2)
    with pytest.raises(ValueError, match="does not fit"):
        manager.alloc(CAPACITY + 1)
    slot = manager.alloc(1)
    manager.alloc(1)
    with pytest.raises(NoFreeSlotError):
        manager.alloc(1)
    with pytest.raises(ValueError, match="does not exist"):
        manager.free(7)
    with pytest.raises(ValueError, match="does not exist"):
        manager.free(-1)
    manager.free(slot)
    with pytest.raises(ValueError, match="not allocated"):
        manager.free(slot)
    with pytest.raises(ValueError, match="whole number"):
        _core.PageManager(BUFFERS, 2, 100, TOKEN, PAGE, _core.FakeDriver(PAGE), 10 * PAGE)
    with pytest.raises(ValueError, match="granularity"):
        _core.PageManager(BUFFERS, 2, CAPACITY, TOKEN, PAGE, _core.FakeDriver(3 * MiB), 10 * PAGE)


def test_release_unmaps_releases_and_frees_reservations():
    manager, driver = make()
    manager.alloc(100)
    slot = manager.alloc(5)
    manager.free(slot)
    manager.release()
    assert driver.mapped_bytes == 0 and driver.live_handles == 0 and driver.live_reservations == 0
    with pytest.raises(RuntimeError, match="closed"):
        manager.alloc(1)


def test_random_cycles_end_with_nothing_mapped():
    rng = random.Random(0)
    manager, driver = make(max_batch=6, budget_pages=12 * BUFFERS)
    live = set()
    for step in range(10_000):
        action = rng.random()
        try:
            if action < 0.35:
                live.add(manager.alloc(rng.randrange(0, CAPACITY + 1)))
            elif action < 0.7 and live:
                slot = rng.choice(sorted(live))
                live.remove(slot)
                manager.free(slot)
            elif action < 0.95:
                manager.grow(rng.randrange(1, 40))
            else:
                manager.reclaim()
        except (OutOfPagesError, NoFreeSlotError):
            pass
        if step % 500 == 0:
            check_consistent(manager, driver)
            assert set(i for i, a in enumerate(manager.active()) if a) == live
    for slot in list(live):
        manager.free(slot)
    manager.reclaim()
    assert manager.stats()["mapped_pages"] == 0 and driver.mapped_bytes == 0
    manager.trim()
    assert driver.live_handles == 0


def test_concurrent_callers_keep_the_books_exact():
    manager, driver = make(max_batch=8, budget_pages=40 * BUFFERS)
    errors = []

    def worker(seed):
        rng = random.Random(seed)
        try:
            for _ in range(300):
                try:
                    slot = manager.alloc(rng.randrange(1, 64))
                except (OutOfPagesError, NoFreeSlotError):
                    continue
                manager.grow(rng.randrange(1, 8))
                manager.free(slot)
        except Exception as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    check_consistent(manager, driver)
    manager.reclaim()
    assert driver.mapped_bytes == 0


def test_alloc_lookahead_and_prefetch_map_ahead_without_growing():
    manager, driver = make()
    slot = manager.alloc(10, 40)                 # 50 tokens' worth: 2 pages
    assert manager.lengths()[slot] == 10 and manager.mapped_pages()[slot] == 2
    manager.prefetch(60)                         # 70 tokens' worth: 3 pages
    assert manager.lengths()[slot] == 10 and manager.mapped_pages()[slot] == 3
    maps = driver.calls("map")
    manager.grow(60)
    assert driver.calls("map") == maps           # growth found its pages mapped
    check_consistent(manager, driver)


def test_prefetch_maps_the_slot_nearest_its_last_page_first_page_by_page():
    manager, driver = make()
    roomy = manager.alloc(33)                    # 2 pages, 31 tokens to spare
    tight = manager.alloc(31)                    # 1 page, 1 token to spare
    assert manager.prefetch(64, max_pages=1) == BUFFERS     # one page, in every buffer, of the tight slot
    assert [manager.mapped_pages()[s] for s in (roomy, tight)] == [2, 2]
    assert manager.prefetch(64, max_pages=1) == BUFFERS     # now 31 vs 33 tokens to spare: the roomy one
    assert [manager.mapped_pages()[s] for s in (roomy, tight)] == [3, 2]
    assert manager.prefetch(64) == 2 * BUFFERS              # the rest: 97 and 95 tokens' worth
    assert manager.prefetch(64) == 0
    assert [manager.mapped_pages()[s] for s in (roomy, tight)] == [4, 3]
    assert [manager.lengths()[s] for s in (roomy, tight)] == [33, 31]
    check_consistent(manager, driver)


def test_prefetch_stops_quietly_at_the_budget_and_never_takes_free_slots_pages():
    manager, driver = make(budget_pages=3 * BUFFERS)
    done, slot = manager.alloc(32), manager.alloc(32)
    manager.free(done)                           # a free slot keeps its page (deferred)
    assert manager.prefetch(96) == BUFFERS      # 4 pages wanted; 1 page left in the budget
    assert manager.mapped_pages()[slot] == 2 and manager.stats()["deferred_pages"] == BUFFERS
    assert manager.prefetch(96) == 0
    check_consistent(manager, driver)


def test_memory_pressure_takes_the_spare_tail_of_a_reused_slot_but_not_its_promised_tokens():
    manager, driver = make(budget_pages=4 * BUFFERS)
    manager.free(manager.alloc(128))             # a long request leaves 4 pages with its slot
    short = manager.alloc(10, 22)                # reuses them; promised 32 tokens: 1 page, 3 spare
    assert manager.mapped_pages()[short] == 4
    other = manager.alloc(40)                    # 2 pages: the budget is spent, so 2 spare pages go
    assert manager.mapped_pages()[short] == 2 and manager.mapped_pages()[other] == 2
    with pytest.raises(OutOfPagesError):
        manager.alloc(40)                        # 1 spare page is left, not 2; nothing changes
    assert manager.mapped_pages()[short] == 2
    third = manager.alloc(1)                     # takes the last spare page
    assert manager.mapped_pages()[short] == 1 and manager.mapped_pages()[third] == 1
    assert [manager.lengths()[s] for s in (short, other, third)] == [10, 40, 1]
    with pytest.raises(OutOfPagesError):
        manager.reserve_growth(30)               # 40 tokens need the page back: none is spare now
    check_consistent(manager, driver)


def test_sizes_that_would_overflow_are_refused():
    with pytest.raises(ValueError, match="2\\*\\*48"):
        _core.PageManager(BUFFERS, 2, 2**62, TOKEN, PAGE, _core.FakeDriver(PAGE), 10 * PAGE)
    with pytest.raises(ValueError, match="2\\*\\*48"):
        _core.PageManager(BUFFERS, 2**40, CAPACITY, TOKEN, PAGE, _core.FakeDriver(PAGE), 10 * PAGE)
    with pytest.raises(ValueError, match="page_bytes"):
        _core.PageManager(BUFFERS, 2, CAPACITY, TOKEN, 2**62, _core.FakeDriver(PAGE), 10 * PAGE)


def test_counts_near_the_integer_limit_saturate_at_the_capacity():
    manager, driver = make()
    slot = manager.alloc(1, 2**64 - 1)
    assert manager.mapped_pages()[slot] == CAPACITY * TOKEN // PAGE
    manager.grow(2**64 - 1)
    assert manager.lengths()[slot] == CAPACITY
    manager.grow(2**64 - 1)
    assert manager.lengths()[slot] == CAPACITY
    manager.reserve_growth(2**64 - 1)
    assert manager.prefetch(2**64 - 1) == 0
    check_consistent(manager, driver)


def test_grow_slots_grows_each_slot_by_its_own_count_all_or_nothing():
    manager, driver = make(max_batch=3, budget_pages=5 * BUFFERS)
    manager.alloc(10), manager.alloc(31)
    manager.grow_slots([40, 1, 0])                  # a chunk of 40 into one slot, a decode into the other
    assert list(manager.lengths()) == [50, 32, 0]
    assert list(manager.mapped_pages()) == [2, 1, 0]
    before = snapshot(manager, driver)
    with pytest.raises(OutOfPagesError):
        manager.grow_slots([78, 33, 0])             # 3 + 1 more pages: over the budget of 5
    assert snapshot(manager, driver) == before
    with pytest.raises(ValueError, match="not allocated"):
        manager.grow_slots([0, 0, 1])
    with pytest.raises(ValueError, match="one count per slot"):
        manager.grow_slots([1, 1])
    assert snapshot(manager, driver) == before
