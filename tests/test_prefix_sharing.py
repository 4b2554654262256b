"""Prefix sharing in the page manager, on the fake driver: one physical page at several addresses.

Pages hold 32 tokens (fake_checks' geometry: 4 pages a slot, 4 buffers). Every test asserts the
handles at the addresses, the reference counts (mappings of each cached page) and the statistics.
"""

import pytest

from fake_checks import BUFFERS, PAGE, SLOT_BYTES, addresses_of, check_view, make
from jax_vattention import _core
from jax_vattention._core import OutOfPagesError

TOKENS_PER_PAGE = 32
KEYS = [101, 102, 103]


def address(manager, buffer, slot, page):
    return manager.buffer_bases()[buffer] + slot * SLOT_BYTES + page * PAGE


def entries(manager):
    return {e["key"]: e for e in manager.view()["cache"]}


def shared_setup(max_batch=3, budget_pages=1000):
    """Slot a: 70 tokens (3 pages), its 2 full pages published; slot b shares them."""
    manager, driver = make(max_batch, budget_pages)
    a = manager.alloc(70)
    assert manager.publish(a, KEYS[:2]) == 2
    b, shared = manager.alloc_shared(80, 0, KEYS[:2])
    assert shared == 2
    return manager, driver, a, b


def test_tokens_per_page():
    manager, _ = make()
    assert manager.tokens_per_page() == TOKENS_PER_PAGE


def test_a_shared_page_is_one_physical_page_mapped_in_both_slots():
    manager, driver = make()
    a = manager.alloc(70)
    assert manager.publish(a, KEYS[:2]) == 2
    maps, accesses = driver.calls("map"), driver.calls("set_access")
    b, shared = manager.alloc_shared(80, 0, KEYS[:2])
    assert (b, shared) == (1, 2)
    # 2 shared pages and 1 private in every buffer; one set_access per buffer and run.
    assert driver.calls("map") - maps == 3 * BUFFERS
    assert driver.calls("set_access") - accesses == 2 * BUFFERS
    view = check_view(manager, driver)
    assert view["slots"][b][:2] == view["slots"][a][:2]
    assert not set(view["slots"][b][2]) & set(view["slots"][a][2])
    for page in range(2):
        for buffer in range(BUFFERS):
            handle = view["slots"][a][page][buffer]
            assert addresses_of(driver, handle) == [address(manager, buffer, a, page), address(manager, buffer, b, page)]
    assert {key: (e["page"], e["mappings"]) for key, e in entries(manager).items()} == {101: (0, 2), 102: (1, 2)}
    stats = manager.stats()
    assert stats["created_pages"] == 4 * BUFFERS           # 3 of a's, 1 of b's own
    assert stats["mapped_pages"] == 6 * BUFFERS
    assert stats["cached_pages"] == stats["shared_pages"] == 2 * BUFFERS
    assert stats["bytes_saved"] == 2 * BUFFERS * PAGE


def test_writes_into_shared_pages_are_refused():
    manager, _, a, b = shared_setup()
    assert manager.writable_from(a) == manager.writable_from(b) == 2 * TOKENS_PER_PAGE
    with pytest.raises(ValueError, match="would overwrite its shared prefix.*start at token 64"):
        manager.check_write(b, 63)
    manager.check_write(b, 64)
    assert manager.writable_from(manager.alloc(5)) == 0


def test_misuse_is_refused_with_nothing_changed():
    manager, driver, a, b = shared_setup()
    before = manager.view()
    with pytest.raises(ValueError, match="more than the prompt's 63"):
        manager.alloc_shared(63, 0, KEYS[:2])
    with pytest.raises(ValueError, match="publish only full pages"):
        manager.publish(b, KEYS)                           # 80 tokens: 2 full pages
    with pytest.raises(ValueError, match="cached under another key"):
        manager.publish(b, [7, 8])
    manager.free(b)
    with pytest.raises(ValueError, match="holds no request"):
        manager.publish(b, KEYS[:1])
    after = manager.view()
    assert (after["slots"], after["cache"]) == (before["slots"], before["cache"])
    check_view(manager, driver)


def test_publishing_again_or_the_same_key_elsewhere_adds_nothing():
    manager, driver, a, b = shared_setup()
    assert manager.publish(b, KEYS[:2]) == 0
    c = manager.alloc(64)                                  # the same tokens computed privately
    assert manager.publish(c, KEYS[:2]) == 0               # no duplicate: c keeps its own pages
    assert manager.writable_from(c) == 0
    assert entries(manager)[101]["mappings"] == 2
    check_view(manager, driver)


def test_only_the_matching_run_is_shared():
    manager, driver, a, b = shared_setup()
    manager.free(b)
    slot, shared = manager.alloc_shared(100, 0, [101, 999, 103])
    assert shared == 1
    view = check_view(manager, driver)
    assert view["slots"][slot][0] == view["slots"][a][0] and view["slots"][slot][1] != view["slots"][a][1]


def test_a_freed_slot_that_maps_the_prefix_is_reused_without_mapping_it_again():
    manager, driver, a, b = shared_setup()
    manager.free(b)
    maps = driver.calls("map")
    slot, shared = manager.alloc_shared(90, 0, KEYS[:2])
    assert (slot, shared) == (b, 2)
    assert driver.calls("map") == maps                     # 3 pages there already
    check_view(manager, driver)


def test_reusing_a_slot_for_another_prompt_unmaps_its_shared_pages_only_there():
    manager, driver, a, b = shared_setup()
    manager.free(b)
    waits = driver.calls("synchronize")
    slot = manager.alloc(20)                               # the only free slot with pages is b...
    assert slot == 2                                       # ...but an empty one keeps as much: it wins
    slot = manager.alloc(20)
    assert slot == b
    assert driver.calls("synchronize") > waits             # b's last request may still read them
    view = check_view(manager, driver)
    assert len(view["slots"][b]) == 1 and view["slots"][b][0][0] not in {h for e in view["cache"] for h in e["handles"]}
    assert {key: e["mappings"] for key, e in entries(manager).items()} == {101: 1, 102: 1}
    stats = manager.stats()
    assert stats["shared_pages"] == 0 and stats["bytes_saved"] == 0 and stats["cached_pages"] == 2 * BUFFERS


def test_freed_and_reclaimed_pages_stay_cached_until_evicted():
    manager, driver, a, b = shared_setup()
    manager.free(a)
    manager.free(b)
    manager.reclaim()
    view = check_view(manager, driver)
    assert all(pages == [] for pages in view["slots"])
    assert {key: e["mappings"] for key, e in entries(manager).items()} == {101: 0, 102: 0}
    stats = manager.stats()
    assert stats["created_pages"] == 4 * BUFFERS and stats["pooled_pages"] == 2 * BUFFERS
    slot, shared = manager.alloc_shared(64, 0, KEYS[:2])   # the prefix comes back: nothing created
    assert shared == 2 and manager.stats()["created_pages"] == 4 * BUFFERS
    manager.free(slot)
    manager.reclaim()
    assert manager.evict() == 2 * BUFFERS
    assert manager.view()["cache"] == [] and manager.stats()["pages_evicted_total"] == 2 * BUFFERS
    check_view(manager, driver)


def cached_and_unmapped(budget_pages):
    """2 cached pages that no slot maps, with a budget of `budget_pages` pages per buffer."""
    manager, driver = make(budget_pages=budget_pages * BUFFERS)
    a = manager.alloc(64)
    manager.publish(a, KEYS[:2])
    manager.free(a)
    manager.reclaim()
    return manager, driver


def test_pressure_evicts_the_least_recently_used_deepest_page_first():
    manager, driver = cached_and_unmapped(budget_pages=4)
    manager.alloc(96)                                      # 3 pages: 1 must be evicted
    assert list(entries(manager)) == [101]                 # the prefix that stays is still a prefix
    assert manager.stats()["pages_evicted_total"] == BUFFERS
    manager.alloc(32)
    assert manager.view()["cache"] == []
    assert manager.stats()["created_pages"] == 4 * BUFFERS
    check_view(manager, driver)


def test_recently_used_prefixes_stay_longest():
    manager, driver = make(budget_pages=5 * BUFFERS)
    for keys in ([1], [2]):
        slot = manager.alloc(40)
        manager.publish(slot, keys)
        manager.free(slot)
    manager.free(manager.alloc_shared(40, 0, [1])[0])      # [1] is used again: [2] is older now
    manager.reclaim()
    manager.alloc(128)                                     # 4 pages, budget 5: 1 of 2 cached pages goes
    assert list(entries(manager)) == [1]
    check_view(manager, driver)


def test_the_cache_goes_before_an_active_slots_spare_tail():
    manager, driver = cached_and_unmapped(budget_pages=6)
    manager.free(manager.alloc(128))                       # 4 pages; the budget is spent
    tail = manager.alloc(10)                               # reuses them: 3 spare
    other = manager.alloc(40)                              # 2 pages: the cache's
    assert manager.mapped_pages()[tail] == 4 and manager.mapped_pages()[other] == 2
    assert manager.view()["cache"] == []
    manager.alloc(60)                                      # and now the spare tail
    assert manager.mapped_pages()[tail] == 2
    check_view(manager, driver)


def test_a_shared_prefix_is_never_evicted_for_its_own_request():
    manager, driver = cached_and_unmapped(budget_pages=4)
    slot, shared = manager.alloc_shared(128, 0, KEYS[:2])  # 2 cached + 2 new: fits without evicting
    assert shared == 2 and manager.stats()["pages_evicted_total"] == 0
    check_view(manager, driver)
    manager.free(slot)
    other, shared = manager.alloc_shared(128, 0, [5, 6])  # another prompt: a free slot's mappings do not hold
    assert other != slot and shared == 0 and manager.view()["cache"] == []
    check_view(manager, driver)


def test_out_of_pages_counts_what_eviction_frees():
    manager, driver = cached_and_unmapped(budget_pages=3)
    with pytest.raises(OutOfPagesError, match="needs 16 pages"):
        manager.alloc(128)
    assert len(entries(manager)) == 2                      # nothing was evicted for a request that failed
    manager.alloc(96)
    check_view(manager, driver)


def test_release_frees_shared_and_cached_pages():
    manager, driver, a, b = shared_setup()
    manager.free(b)
    manager.release()
    assert driver.mappings() == {} and driver.handles() == [] and driver.reservations() == []


def test_the_host_driver_does_not_share():
    manager = _core.PageManager(BUFFERS, 2, 128, 64 * 1024, PAGE, _core.host_driver(), 100 * PAGE)
    assert manager.tokens_per_page() == 0


def test_publish_and_evict_make_no_driver_call():
    manager, driver = make()
    slot = manager.alloc(100)
    operations = ("create", "release", "map", "set_access", "unmap", "synchronize")
    before = [driver.calls(op) for op in operations]
    manager.publish(slot, KEYS)
    manager.free(slot)
    manager.evict()                                        # nothing: its pages are still mapped
    assert [driver.calls(op) for op in operations] == before
    assert len(manager.view()["cache"]) == 3
