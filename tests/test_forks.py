"""Forks in the page manager, on the fake driver: a second slot with the parent's tokens, its full
pages shared and its partly filled last page copied.

Pages hold 32 tokens (fake_checks' geometry: 4 pages a slot, 4 buffers). The fake driver keeps the
bytes written to its pages (``write``/``read``), so the tests check contents through both slots'
addresses, besides the handles, the reference counts and the statistics.
"""

import random

import pytest

from fake_checks import BUFFERS, PAGE, SLOT_BYTES, TOKEN, addresses_of, check_view, make, state
from jax_vattention import _core
from jax_vattention._core import NoFreeSlotError, OutOfPagesError

TOKENS_PER_PAGE = PAGE // TOKEN


def address(manager, buffer, slot, token):
    return manager.buffer_bases()[buffer] + slot * SLOT_BYTES + token * TOKEN


def write_tokens(manager, driver, slot, start, count, seed):
    """Writes `count` tokens of distinct bytes from `start` in every buffer; returns them by buffer."""
    written = []
    rng = random.Random(seed)
    for buffer in range(BUFFERS):
        data = rng.randbytes(count * TOKEN)
        driver.write(address(manager, buffer, slot, start), data)
        written.append(data)
    return written


def read_tokens(manager, driver, slot, start, count):
    return [driver.read(address(manager, buffer, slot, start), count * TOKEN) for buffer in range(BUFFERS)]


def test_a_fork_shares_the_full_pages_and_copies_the_last_one():
    manager, driver = make()
    parent = manager.alloc(70)                              # 2 full pages and 6 tokens
    tokens = write_tokens(manager, driver, parent, 0, 70, seed=1)
    maps, accesses, copies = driver.calls("map"), driver.calls("set_access"), driver.calls("copy")
    child = manager.fork(parent)
    assert child == 1 and list(manager.lengths()) == [70, 70, 0]
    # 2 shared pages and the copy's page in every buffer: one set_access per buffer and run.
    assert driver.calls("map") - maps == 3 * BUFFERS
    assert driver.calls("set_access") - accesses == 2 * BUFFERS
    assert driver.calls("copy") - copies == BUFFERS
    view = check_view(manager, driver)
    assert view["slots"][child][:2] == view["slots"][parent][:2]
    assert not set(view["slots"][child][2]) & set(view["slots"][parent][2])
    for page in range(2):
        for buffer in range(BUFFERS):
            handle = view["slots"][parent][page][buffer]
            assert addresses_of(driver, handle) == [address(manager, buffer, parent, page * TOKENS_PER_PAGE),
                                                    address(manager, buffer, child, page * TOKENS_PER_PAGE)]
    assert read_tokens(manager, driver, child, 0, 70) == tokens
    assert [(e["key"], e["page"], e["mappings"]) for e in view["cache"]] == [(None, 0, 2), (None, 1, 2)]
    stats = manager.stats()
    assert stats["created_pages"] == 4 * BUFFERS and stats["mapped_pages"] == 6 * BUFFERS
    assert stats["forked_pages"] == stats["shared_pages"] == 2 * BUFFERS and stats["cached_pages"] == 0
    assert stats["bytes_saved"] == 2 * BUFFERS * PAGE


def test_after_a_fork_the_two_slots_write_only_their_own_pages():
    manager, driver = make()
    parent = manager.alloc(70)
    tokens = write_tokens(manager, driver, parent, 0, 70, seed=2)
    child = manager.fork(parent)
    for slot in (parent, child):
        assert manager.writable_from(slot) == 2 * TOKENS_PER_PAGE
        with pytest.raises(ValueError, match="would overwrite its shared prefix.*start at token 64"):
            manager.check_write(slot, 63)
        manager.check_write(slot, 64)
    mine = write_tokens(manager, driver, child, 70, 1, seed=3)
    theirs = write_tokens(manager, driver, parent, 66, 5, seed=4)   # into the parent's own last page
    assert read_tokens(manager, driver, child, 0, 70) == tokens     # the copy is the child's
    assert read_tokens(manager, driver, child, 70, 1) == mine
    assert read_tokens(manager, driver, parent, 66, 5) == theirs


@pytest.mark.parametrize("length, shared, copies", [(64, 2, 0), (0, 0, 0), (5, 0, 1), (128, 4, 0)])
def test_a_fork_copies_only_a_partly_filled_page(length, shared, copies):
    manager, driver = make()
    parent = manager.alloc(length)
    write_tokens(manager, driver, parent, 0, length, seed=5)
    before = driver.calls("copy")
    child = manager.fork(parent)
    assert driver.calls("copy") - before == copies * BUFFERS
    assert manager.lengths()[child] == length
    assert manager.mapped_pages()[child] == -(-length // TOKENS_PER_PAGE)
    view = check_view(manager, driver)
    assert view["slots"][child][:shared] == view["slots"][parent][:shared]
    assert read_tokens(manager, driver, child, 0, length) == read_tokens(manager, driver, parent, 0, length)


def test_lookahead_maps_private_pages_for_the_childs_growth():
    manager, driver = make(budget_pages=6 * BUFFERS)
    parent = manager.alloc(40)
    child = manager.fork(parent, 50)                        # 90 tokens: 3 pages, 1 shared
    assert manager.mapped_pages()[child] == 3
    for _ in range(50):
        manager.grow_slots([0, 1, 0])                       # within its reservation: no page to create
    assert manager.stats()["created_pages"] == 4 * BUFFERS
    with pytest.raises(OutOfPagesError):
        manager.fork(parent, 128)                           # 3 private pages more: 1 is left
    check_view(manager, driver)


def test_a_child_can_fork_and_every_page_stays_until_its_last_mapping_goes():
    manager, driver = make(max_batch=4)
    parent = manager.alloc(70)
    child = manager.fork(parent)
    grandchild = manager.fork(child)
    view = check_view(manager, driver)
    assert [e["mappings"] for e in view["cache"]] == [3, 3]
    for slot in (parent, child):
        manager.free(slot)
    manager.reclaim()                                       # the grandchild still maps the shared pages
    view = check_view(manager, driver)
    assert [e["mappings"] for e in view["cache"]] == [1, 1]
    assert view["slots"][grandchild][:2] == [e["handles"] for e in view["cache"]]
    assert manager.writable_from(grandchild) == 64          # still read-only
    manager.free(grandchild)
    manager.reclaim()
    view = check_view(manager, driver)
    assert view["cache"] == [] and manager.stats()["pooled_pages"] == manager.stats()["created_pages"]


def test_a_fork_prefers_a_free_slot_that_maps_the_parents_pages_already():
    manager, driver = make(max_batch=4)
    parent = manager.alloc(70)
    manager.free(manager.fork(parent))                      # slot 1 keeps the shared pages and its copy
    manager.free(manager.alloc(5))                          # slot 2: one private page
    maps = driver.calls("map")
    child = manager.fork(parent)
    assert child == 1 and driver.calls("map") == maps       # all 3 pages there already: only the copy
    view = check_view(manager, driver)
    assert view["slots"][child][:2] == view["slots"][parent][:2]


def test_a_new_request_in_a_freed_child_slot_never_writes_the_shared_pages():
    manager, driver = make(max_batch=2)
    parent = manager.alloc(70)
    manager.free(manager.fork(parent))
    slot = manager.alloc(100)                               # the only free slot: its shared pages go
    assert slot == 1
    view = check_view(manager, driver)
    shared = {h for e in view["cache"] for h in e["handles"]}
    assert not shared & {h for page in view["slots"][slot] for h in page}
    assert manager.writable_from(slot) == 0
    assert [e["mappings"] for e in view["cache"]] == [1, 1]


def test_publish_gives_forked_pages_their_keys_and_the_cache_keeps_them():
    manager, driver = make()
    parent = manager.alloc(70)
    child = manager.fork(parent)
    assert manager.publish(child, [101, 102]) == 2
    assert manager.publish(parent, [101, 102]) == 0          # the same pages: nothing new
    assert [(e["key"], e["mappings"]) for e in manager.view()["cache"]] == [(101, 2), (102, 2)]
    manager.free(parent)
    manager.free(child)
    manager.reclaim()
    assert manager.stats()["cached_pages"] == 2 * BUFFERS and manager.stats()["forked_pages"] == 0
    slot, shared = manager.alloc_shared(80, 0, [101, 102])
    assert shared == 2
    check_view(manager, driver)


def test_a_fork_of_a_shared_prefix_maps_the_cached_pages_and_forks_the_rest():
    manager, driver = make()
    first = manager.alloc(64)
    manager.publish(first, [101])                           # page 0 cached, page 1 private
    parent, shared = manager.alloc_shared(100, 0, [101])    # page 0 cached; pages 1-3 its own
    child = manager.fork(parent)
    view = check_view(manager, driver)
    assert view["slots"][child][:3] == view["slots"][parent][:3]
    assert [(e["key"], e["mappings"]) for e in view["cache"]] == [(101, 3), (None, 2), (None, 2)]


def test_a_fork_takes_free_slots_pages_first_then_the_cache():
    manager, driver = make(max_batch=4, budget_pages=5 * BUFFERS)
    cached = manager.alloc(40)
    manager.publish(cached, [101])
    manager.free(cached)
    manager.reclaim()                                       # page 101 cached, mapped nowhere
    parent = manager.alloc(40)                              # a private page 0: 101 is not shared
    manager.free(manager.alloc(64))                         # 2 deferred pages; the budget of 5 is spent
    child = manager.fork(parent, 40)                        # the copy's page and 1 more: the free slot's
    assert manager.mapped_pages()[child] == 3 and [e["key"] for e in manager.view()["cache"]] == [101, None]
    manager.free(child)
    creates = driver.calls("create")
    assert manager.fork(parent, 40) == child                # the same again, in the freed child slot
    assert driver.calls("create") == creates
    manager.free(child)
    assert manager.fork(parent, 70) == child                # 4 pages: the slot's 3, and 101's
    assert [e["key"] for e in manager.view()["cache"]] == [None]
    assert manager.mapped_pages()[child] == 4
    check_view(manager, driver)


def test_misuse_and_back_pressure_change_nothing():
    manager, driver = make(max_batch=2, budget_pages=4 * BUFFERS)
    parent = manager.alloc(70)
    before = state(manager)
    with pytest.raises(ValueError, match="slot 1 holds no request to fork"):
        manager.fork(1)
    with pytest.raises(ValueError, match="slot 7 does not exist"):
        manager.fork(7)
    with pytest.raises(OutOfPagesError, match="forking slot 0 .70 tokens. needs 8 pages"):
        manager.fork(parent, 64)                            # the copy and 1 more page: 1 is left
    assert state(manager) == before
    manager.fork(parent)
    before = state(manager)
    with pytest.raises(NoFreeSlotError, match="all 2 slots are in use: free one before forking slot 0"):
        manager.fork(parent)
    assert state(manager) == before
    check_view(manager, driver)


def test_the_host_driver_cannot_fork():
    manager = _core.PageManager(BUFFERS, 2, 128, TOKEN, PAGE, _core.host_driver(), 100 * PAGE)
    manager.adopt_buffers([1 << 30] * BUFFERS)              # addresses only: no page is touched
    slot = manager.alloc(0)
    with pytest.raises(ValueError, match="host driver cannot"):
        manager.fork(slot)


def test_release_frees_forked_pages():
    manager, driver = make()
    parent = manager.alloc(70)
    manager.free(manager.fork(parent))
    manager.release()
    assert driver.mappings() == {} and driver.handles() == [] and driver.reservations() == []


@pytest.mark.parametrize("nth", [1, 2])
def test_a_cached_page_a_failed_copy_may_have_written_is_not_given_back(nth):
    # The budget is spent and the only page the copy can go to is a cached one, evicted for it.
    manager, driver = make(budget_pages=4 * BUFFERS)
    first = manager.alloc(70)
    tokens = write_tokens(manager, driver, first, 0, 64, seed=6)
    manager.publish(first, [101, 102])
    manager.free(first)
    manager.reclaim()                                       # 101, 102 cached and mapped nowhere; 1 pooled
    parent = manager.alloc(40)                              # 2 pages: the pooled one and the last of the budget
    write_tokens(manager, driver, parent, 0, 40, seed=7)
    before = state(manager)
    driver.fail_on("copy", nth)
    with pytest.raises(_core.DriverError, match="fake copy failed"):
        manager.fork(parent)
    view = check_view(manager, driver)
    after = state(manager)
    assert view["poisoned"] is None
    assert (after["slots"], after["lengths"], after["active"]) == (before["slots"], before["lengths"], before["active"])
    # 102 (the deepest, least recently used page) was evicted for the copy: its bytes may be gone, so
    # it stays in the pool; 101 is as it was, and shares its bytes as before.
    assert [e["key"] for e in view["cache"]] == [101]
    assert len(view["pooled"]) == BUFFERS
    slot, shared = manager.alloc_shared(64, 0, [101, 102])
    assert shared == 1
    assert read_tokens(manager, driver, slot, 0, 32) == [data[:32 * TOKEN] for data in tokens]

