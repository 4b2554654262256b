"""Checks shared by the page manager's failure tests: its view against the fake driver's table."""

from jax_vattention import _core

MiB = 1 << 20
PAGE = 2 * MiB
TOKEN = 64 * 1024        # 32 tokens per page
CAPACITY = 128           # 4 pages per slot
LAYERS = 2
BUFFERS = 2 * LAYERS
SLOT_BYTES = CAPACITY * TOKEN


def make(max_batch=3, budget_pages=1000, driver=None):
    driver = driver or _core.FakeDriver(PAGE)
    manager = _core.PageManager(BUFFERS, max_batch, CAPACITY, TOKEN, PAGE, driver, budget_pages * PAGE)
    manager.reserve_buffers()
    return manager, driver


def expected_table(view):
    """{address: (bytes, handle, accessible)}: what the driver must map, by the manager's view."""
    table = {}
    for slot, pages in enumerate(view["slots"]):
        for page, handles in enumerate(pages):
            for buffer, handle in enumerate(handles):
                if handle != NO_PAGE:  # unmapped behind a sliding window
                    table[view["bases"][buffer] + slot * SLOT_BYTES + page * PAGE] = (PAGE, handle, True)
    for address, size, handle, accessible in view["strays"]:
        table[address] = (size, handle, accessible)
    return table


NO_PAGE = 0  # a windowed buffer's page unmapped behind the window


def maps_entry(page, handles) -> bool:
    """Whether a slot's page maps a cached page: its handles, where the page is mapped (a windowed
    buffer's may be unmapped behind the window), in at least one buffer."""
    return any(h != NO_PAGE for h in page) and all(h in (NO_PAGE, e) for h, e in zip(page, handles))


def check_view(manager, driver):
    """The driver's table equals the manager's view page for page; every live handle is mapped or
    pooled, exactly once; the statistics count the same pages. Returns the view."""
    view = manager.view()
    assert driver.mappings() == expected_table(view)
    mapped = [handle for pages in view["slots"] for page in pages for handle in page if handle != NO_PAGE]
    stray = [handle for _, _, handle, _ in view["strays"]]
    # A page of the prefix cache (cached or forked) may be mapped at several addresses; any other
    # handle is held once.
    cached = [handle for entry in view["cache"] for handle in entry["handles"]]
    assert len(set(cached)) == len(cached), "a handle is cached twice"
    held = [h for h in mapped + stray if h not in set(cached)] + list(view["pooled"])
    assert len(set(held)) == len(held), "a handle is held twice"
    assert sorted(set(held) | set(cached)) == sorted(driver.handles())
    for entry in view["cache"]:
        assert entry["mappings"] == sum(maps_entry(page, entry["handles"]) for pages in view["slots"] for page in pages)
        assert all(len(pages) <= entry["page"] or maps_entry(pages[entry["page"]], entry["handles"]) or
                   not set(pages[entry["page"]]) & set(entry["handles"]) for pages in view["slots"])
    stats = manager.stats()
    forked = [handle for entry in view["cache"] if entry["key"] is None for handle in entry["handles"]]
    assert stats["cached_pages"] == len(cached) - len(forked) and stats["forked_pages"] == len(forked)
    # A forked page goes back to the pool with its last mapping.
    assert all(entry["mappings"] > 0 for entry in view["cache"] if entry["key"] is None) or view["strays"]
    assert stats["created_pages"] == len(driver.handles()) <= stats["budget_pages"]
    assert stats["pooled_pages"] == len(view["pooled"])
    assert stats["mapped_pages"] == len(mapped)
    assert stats["poisoned"] == (view["poisoned"] is not None)
    if view["poisoned"] is None:
        counters = manager.counters()   # the cheap part of the stats, kept as running totals
        assert counters == {key: stats[key] for key in counters}, (counters, stats)
        # Pages owed to reservations are always there to take.
        headroom = stats["pooled_pages"] + stats["budget_pages"] - stats["created_pages"]
        assert headroom >= stats["reserved_pages"]
    return view


def state(manager):
    """Everything an operation may change, but timings and call counts."""
    stats = manager.stats()
    for key in ("map_seconds", "unmap_seconds", "grow_calls"):
        stats.pop(key)
    view = manager.view()
    cache = [(e["key"], e["page"], e["handles"], e["mappings"], e["last_used"]) for e in view["cache"]]
    return dict(stats=stats, lengths=manager.lengths(), active=manager.active(), slots=view["slots"],
                pooled=sorted(view["pooled"]), cache=cache)


def check_released(driver):
    assert driver.mappings() == {}
    assert driver.handles() == []
    assert driver.reservations() == []


def addresses_of(driver, handle):
    """Every address the driver maps ``handle`` at, in order."""
    return [address for address, (_, mapped, _) in driver.mappings().items() if mapped == handle]
