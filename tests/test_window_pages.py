"""Pages behind a sliding window go back to the pool as a request advances (the fake driver).

The promise: nothing still in a window is unmapped (every page that holds a key some query of the
slot's next step may read stays mapped), and everything wholly behind every window is unmapped
at the next growth, in the windowed buffers only; the manager's view equals the driver's table.
The failure sweeps of ``test_page_manager_failures.py`` cover the growths that unmap, the reuse,
reclaim and release of a slot with unmapped pages, and a cached page behind a window.
"""

import numpy as np
import pytest

import jax.numpy as jnp

import jax_vattention as jv
from fake_checks import BUFFERS, CAPACITY, NO_PAGE, PAGE, TOKEN, check_released, check_view, make
from jax_vattention import _core

TOKENS_PER_PAGE = PAGE // TOKEN  # 32
LAYER_0 = [True, False, True, False]  # k[0], k[1], v[0], v[1]: layer 0 slides


def first_read(length: int, window: int) -> int:
    """The first key a query of the slot's next step (at position ``length`` or later) may read."""
    return max(length - window + 1, 0)


def check_windows(manager, window, windowed, lengths):
    """After a growth from ``lengths``: every active slot's pages wholly below the window of its
    step's first query (at its length before the growth) are unmapped in the windowed buffers, every
    other page is mapped in every buffer, and the unwindowed buffers keep all."""
    view = manager.view()
    for slot, (length, active) in enumerate(zip(lengths, manager.active())):
        if not active:
            continue
        dead = first_read(length, window) * TOKEN // PAGE
        for page, handles in enumerate(view["slots"][slot]):
            for buffer, handle in enumerate(handles):
                unmapped = windowed[buffer] and page < dead
                assert (handle == NO_PAGE) == unmapped, (slot, page, buffer, length)


def test_a_growth_unmaps_the_windowed_buffers_pages_behind_every_window():
    manager, driver = make(max_batch=3)
    manager.set_window(40, LAYER_0)
    assert manager.window == 40
    short, long = manager.alloc(20), manager.alloc(100)
    assert manager.stats()["window_unmapped_pages"] == 0   # alloc unmaps nothing: the prefill reads it all
    manager.grow(1)
    check_windows(manager, 40, LAYER_0, [20, 100, 0])
    view = check_view(manager, driver)
    assert view["slots"][long][0][0] == view["slots"][long][0][2] == NO_PAGE  # page 0 of k[0] and v[0]
    assert NO_PAGE not in view["slots"][short][0]
    stats = manager.stats()
    assert stats["window_unmapped_pages"] == stats["window_pages_unmapped_total"] == 2
    assert stats["pooled_pages"] == 2   # back in the pool, not released
    manager.grow_slots([60, 26, 0])
    check_windows(manager, 40, LAYER_0, [21, 101, 0])
    check_view(manager, driver)
    used = manager.stats()["used_bytes"]
    expected = sum(n * TOKEN * BUFFERS for n in manager.lengths())
    dead = sum(first_read(n, 40) * TOKEN // PAGE for n in (21, 101)) * 2 * PAGE
    assert used == expected - dead   # the tokens behind a window no longer count as held
    manager.release()
    check_released(driver)


def test_nothing_in_a_window_is_unmapped_over_random_operations():
    """Random allocations, growths, frees, reclaims and prefetches; after each, the windows hold."""
    rng = np.random.default_rng(0)
    for window, windowed in ((40, LAYER_0), (17, [True] * BUFFERS), (64, [False, True, False, True])):
        manager, driver = make(max_batch=4, budget_pages=60)
        manager.set_window(window, windowed)
        for _ in range(300):
            active = [s for s, a in enumerate(manager.active()) if a]
            lengths = manager.lengths()
            choice = rng.integers(5)
            try:
                if choice == 0 or not active:
                    manager.alloc(int(rng.integers(1, 60)), int(rng.integers(0, 8)))
                elif choice == 1:
                    counts = [int(rng.integers(0, 20)) if a and lengths[s] < CAPACITY - 20 else 0
                              for s, a in enumerate(manager.active())]
                    manager.grow_slots(counts)
                elif choice == 2 and max(lengths) < CAPACITY - 1:
                    manager.grow(1)
                elif choice == 3:
                    manager.free(int(rng.choice(active)))
                else:
                    manager.reclaim() if rng.integers(2) else manager.prefetch(8)
            except (_core.OutOfPagesError, _core.NoFreeSlotError):
                pass
            check_view(manager, driver)
            for slot in active:   # growth or not, what lies in a window stays mapped
                if manager.active()[slot]:
                    dead = first_read(manager.lengths()[slot], window) * TOKEN // PAGE
                    for page, handles in enumerate(manager.view()["slots"][slot][dead:], dead):
                        assert NO_PAGE not in handles, (slot, page)
        assert manager.stats()["window_pages_unmapped_total"] > 0
        manager.release()
        check_released(driver)


def test_a_free_slot_with_unmapped_pages_is_reused_from_page_zero():
    manager, driver = make(max_batch=1)
    manager.set_window(40, [True] * BUFFERS)
    slot = manager.alloc(100)
    manager.grow(1)
    assert manager.view()["slots"][slot][0] == [NO_PAGE] * BUFFERS
    manager.free(slot)
    assert manager.alloc(90) == slot       # the new request writes from token 0: every page mapped again
    assert all(NO_PAGE not in page for page in manager.view()["slots"][slot])
    check_view(manager, driver)
    manager.free(slot)
    manager.grow_slots([0])
    assert manager.reclaim() == 3 * BUFFERS
    check_view(manager, driver)
    manager.release()
    check_released(driver)


def test_a_cached_page_behind_a_window_loses_only_that_mapping():
    """Prefix sharing: a cached page behind one slot's window stays cached, mapped in the slots
    whose windows still hold it, and a new request maps it whole."""
    manager, driver = make(max_batch=3)
    manager.set_window(40, LAYER_0)
    first = manager.alloc(70)
    manager.publish(first, [1, 2])
    second, shared = manager.alloc_shared(64, 0, [1, 2])   # its window still holds page 0
    assert shared == 2
    manager.grow_slots([40, 0, 0])
    manager.grow_slots([1, 0, 0])    # a step from 110 tokens: pages 0 and 1 (cached) are behind its window
    view = check_view(manager, driver)
    assert view["slots"][first][0][0] == NO_PAGE and view["slots"][second][0][0] != NO_PAGE
    assert manager.stats()["cached_pages"] == 2 * BUFFERS
    third, shared = manager.alloc_shared(64, 0, [1, 2])
    assert shared == 2 and NO_PAGE not in manager.view()["slots"][third][0]
    check_view(manager, driver)
    assert manager.publish(first, [1, 2, 3]) == 0   # its page 0 is unmapped behind the window: nothing to share
    manager.release()
    check_released(driver)


def test_set_window_is_for_a_fresh_manager():
    manager, _ = make()
    with pytest.raises(ValueError, match="one flag per buffer"):
        manager.set_window(40, [True])
    manager.alloc(5)
    with pytest.raises(RuntimeError, match="before the first alloc"):
        manager.set_window(40, LAYER_0)
    manager.release()


def test_a_long_conversation_holds_its_window_not_its_history():
    """A 32K-token conversation on a model with a 4K window (per-layer layout; one layer slides and
    one attends to everything, as Gemma's alternate), scaled to run in a second: the fake driver and a page of 128 tokens (a 2 MiB page of
    16 KiB tokens; on a GPU a Mistral-7B page holds 1,024 tokens, where a 4K window spans 5-6
    pages). Turns of a prompt, prefilled in steps of at most 256 tokens (an engine's token budget),
    then its answer, one token a step, up to 32,768 tokens; at every step the window layers hold at
    most 1.1x the pages of 4,096 tokens, and a full layer holds the whole history. (A step of ``C``
    tokens holds ``window + C`` tokens while it runs: its first query's window and its own keys.)"""
    page, token, window, length = 2 << 20, 16 << 10, 4096, 32 * 1024
    layers = 2
    flags = [True, False] * 2  # k[0], k[1], v[0], v[1]: layer 0 slides, layer 1 is full (Gemma-like)
    driver = _core.FakeDriver(page)
    manager = _core.PageManager(2 * layers, 1, length, token, page, driver, 1 << 40)
    manager.reserve_buffers()
    manager.set_window(window, flags)
    slot = manager.alloc(1000, 16)
    in_window = -(-window * token // page)  # the pages of 4,096 tokens
    most = 0
    rng = np.random.default_rng(1)
    while manager.lengths()[slot] < length:
        prompt = int(rng.integers(200, 2000))
        turn = [256] * (prompt // 256) + [prompt % 256] + [1] * int(rng.integers(100, 600))  # a prompt, its answer
        for tokens in turn:
            tokens = min(tokens, length - manager.lengths()[slot])
            if tokens == 0:
                continue
            manager.grow_slots([tokens])
            pages = manager.view()["slots"][slot]
            most = max(most, sum(p[0] != NO_PAGE for p in pages))   # k[0]'s pages (v[0]'s are the same)
            assert all(p[1] != NO_PAGE for p in pages)   # the full layer keeps the whole history
    assert manager.lengths()[slot] == length
    assert most <= 1.1 * in_window, (most, in_window)
    stats = manager.stats()
    assert stats["window_unmapped_pages"] >= 2 * (length - 2000 - 2 * window) * token // page
    check_view_generic(manager, driver, page, length * token)
    manager.release()
    assert driver.mappings() == {} and driver.handles() == []


def check_view_generic(manager, driver, page, slot_bytes):
    """The driver's table equals the manager's view (any geometry)."""
    view = manager.view()
    table = {}
    for slot, pages in enumerate(view["slots"]):
        for index, handles in enumerate(pages):
            for buffer, handle in enumerate(handles):
                if handle != NO_PAGE:
                    table[view["bases"][buffer] + slot * slot_bytes + index * page] = (page, handle, True)
    assert driver.mappings() == table


def test_cache_config_windows_the_layers_it_names_and_interleaved_only_when_all_slide():
    config = jv.CacheConfig(num_layers=3, max_batch=2, max_len=64, kv_heads=2, head_dim=16, window=8,
                            window_layers=(0, 2))
    assert config.windowed_buffers == (True, False, True) * 2
    assert [config.layer_window(layer) for layer in range(3)] == [8, None, 8]
    every = jv.CacheConfig(num_layers=3, max_batch=2, max_len=64, kv_heads=2, head_dim=16, window=8)
    assert every.windowed_buffers == (True,) * 6
    mixed = jv.CacheConfig(num_layers=3, max_batch=2, max_len=64, kv_heads=2, head_dim=16, window=8,
                           window_layers=(0, 2), layout="interleaved")
    assert mixed.windowed_buffers == (False, False)   # a page holds every layer's tokens: none can go
    assert dataclass_replace(mixed, window_layers=None).windowed_buffers == (True, True)
    for bad, message in ((dict(window=0), "window must be"), (dict(window_layers=(1,)), "needs a window"),
                         (dict(window=8, window_layers=(3,)), "window_layers must be")):
        with pytest.raises(ValueError, match=message):
            jv.CacheConfig(num_layers=3, max_batch=2, max_len=64, kv_heads=2, head_dim=16, **bad)


def dataclass_replace(config, **changes):
    import dataclasses
    return dataclasses.replace(config, **changes)


def test_the_manager_unmaps_behind_the_windows_its_config_names():
    config = jv.CacheConfig(num_layers=2, max_batch=2, max_len=256, kv_heads=2, head_dim=16, dtype=jnp.float32,
                            page_bytes=4096, window=40, window_layers=(1,), budget_bytes=1 << 24)
    with jv.CacheManager(config, driver=_core.FakeDriver(4096, host_pages=True)) as manager:
        assert manager.page_manager.window == 40
        slot = manager.alloc(200)
        manager.grow_slots([1, 0])
        pages = manager.page_manager.view()["slots"][slot]
        dead = (200 - 40 + 1) * config.token_bytes // 4096
        assert [p[1] for p in pages[:dead]] == [NO_PAGE] * dead and all(p[0] != NO_PAGE for p in pages)
        assert manager.stats()["window_unmapped_pages"] == 2 * dead


def test_a_slot_with_pages_unmapped_behind_its_window_cannot_be_forked():
    manager, driver = make(max_batch=3)
    manager.set_window(40, [True] * BUFFERS)
    young, old = manager.alloc(50), manager.alloc(100)
    manager.grow(1)
    assert manager.fork(young) not in (young, old)   # nothing behind its window yet: forked as ever
    with pytest.raises(ValueError, match="unmapped behind its sliding window"):
        manager.fork(old)
    check_view(manager, driver)
    manager.release()
    check_released(driver)
