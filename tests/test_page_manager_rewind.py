"""Rewinding a slot (its rejected speculative tokens dropped): the length goes down, the pages stay.

A speculative step grows a slot by its proposals before dispatch; once the step is read the
tokens the target rejected are dropped by lowering the slot's length. No driver call: the pages
stay mapped, and the next growth maps nothing until it passes them. What must never happen: a
length below a shared prefix (the next write would overwrite pages other slots read) or below
what a sliding window already unmapped (the next query would read an unmapped page).
"""

import pytest

from fake_checks import BUFFERS, check_released, check_view, make, state
from jax_vattention._core import CacheManagerPoisonedError, DriverError

LAYER_0 = [True, False, True, False]   # layer 0's K and V keep a window


def test_rewind_lowers_the_length_keeps_the_pages_and_the_next_growth_maps_nothing():
    manager, driver = make()
    slot = manager.alloc(30)
    other = manager.alloc(10)
    manager.grow_slots([5 if s == slot else 1 if s == other else 0 for s in range(3)])  # 35 tokens: 2 pages
    maps = driver.calls("map")
    manager.rewind(slot, 31)
    assert manager.lengths()[slot] == 31 and manager.lengths()[other] == 11
    assert manager.mapped_pages()[slot] == 2 and driver.calls("map") == maps     # no driver call
    assert manager.stats()["used_tokens"] == 31 + 11
    manager.grow_slots([4 if s == slot else 0 for s in range(3)])               # 35 again: the same pages
    assert driver.calls("map") == maps and manager.lengths()[slot] == 35
    manager.rewind(slot, 35)                                                     # to its own length: nothing
    assert manager.lengths()[slot] == 35
    check_view(manager, driver)


@pytest.mark.parametrize("slot, length, match", [
    (1, 0, "not allocated"),
    (0, 41, "only lowers"),
    (5, 0, "does not exist"),
])
def test_bad_rewinds_are_refused_and_change_nothing(slot, length, match):
    manager, driver = make()
    manager.alloc(40)
    before = state(manager)
    with pytest.raises(ValueError, match=match):
        manager.rewind(slot, length)
    assert state(manager) == before
    check_view(manager, driver)


def test_a_rewind_into_a_shared_prefix_is_refused():
    manager, driver = make()
    first = manager.alloc(70)
    manager.publish(first, [1, 2])                       # its 2 full pages (64 tokens) are cached
    slot, shared = manager.alloc_shared(80, 0, [1, 2])   # maps them: tokens 0..63 are read-only
    assert shared == 2
    with pytest.raises(ValueError, match="shared pages"):
        manager.rewind(slot, 63)
    manager.rewind(slot, 64)                             # the first writable token
    assert manager.lengths()[slot] == 64
    check_view(manager, driver)


def test_a_rewind_behind_a_sliding_window_is_refused():
    manager, driver = make()
    manager.set_window(40, LAYER_0)
    slot = manager.alloc(64)
    manager.grow_slots([46, 0, 0])     # 110 tokens
    manager.grow_slots([1, 0, 0])      # its first query saw token 71 on: pages 0 and 1 are unmapped
    assert manager.stats()["window_unmapped_pages"] == 2 * LAYER_0.count(True)
    with pytest.raises(ValueError, match="window"):
        manager.rewind(slot, 100)      # its next query would see token 61, on page 1
    manager.rewind(slot, 105)          # token 66 on: page 2, mapped
    assert manager.lengths()[slot] == 105
    check_view(manager, driver)


def test_a_poisoned_manager_refuses_a_rewind():
    manager, driver = make()
    slot = manager.alloc(40)         # 2 pages
    driver.fail_on("map", 6)         # a later buffer of the 2 pages the growth maps
    driver.fail_on("unmap", 1)       # and undoing the first buffer's fails: the manager is poisoned
    with pytest.raises(DriverError, match="fake map failed"):
        manager.grow_slots([80, 0, 0])
    assert manager.stats()["poisoned"]
    with pytest.raises(CacheManagerPoisonedError):
        manager.rewind(slot, 10)
    manager.release()
    check_released(driver)


def test_a_rewound_tail_is_spare_under_memory_pressure():
    manager, driver = make(budget_pages=5 * BUFFERS)
    manager.alloc(70)                  # slot 0: 3 pages promised
    manager.alloc(32)                  # slot 1: 1 page
    manager.grow_slots([40, 0, 0])     # slot 0: 110 tokens on 4 pages; the budget is spent
    manager.rewind(0, 75)              # its 4th page holds nothing now
    manager.grow_slots([0, 1, 0])      # slot 1's second page is that one
    assert list(manager.mapped_pages()[:2]) == [3, 2]
    assert list(manager.lengths()[:2]) == [75, 33]
    check_view(manager, driver)
