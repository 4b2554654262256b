"""A stateful property test of the page manager on the fake driver, against a model of its slots.

Hypothesis drives random sequences of alloc / free / grow / reserve_growth /
prefetch / reclaim / trim, of prefix sharing (alloc_shared / publish / evict),
of forks and of rewinds (speculation's rejected tokens), with driver failures injected among them. After every
step the fake driver's table must equal the manager's view, and the slots,
lengths and reservations must equal the model's: a failed call changes nothing
(but a cached page that a fork's failed copy may have written, which stays
evicted, with the free slots' mappings of it). No active slot's cached or forked (read-only) pages
ever reach its length.
"""

import pytest
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from fake_checks import BUFFERS, CAPACITY, PAGE, TOKEN, check_released, check_view, make, state
from jax_vattention._core import CacheManagerPoisonedError, DriverError, NoFreeSlotError, OutOfPagesError

SLOTS = 4
PER_PAGE = 32
FAMILIES = 3     # prompts of one family share every token: the keys of page p are family * 1000 + p
FAILING = ("create", "release", "map", "set_access", "unmap", "copy", "synchronize")


def pages_for(tokens):
    return -(-min(tokens, CAPACITY) * TOKEN // PAGE)


class PageManagerMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.manager, self.driver = make(max_batch=SLOTS, budget_pages=7 * BUFFERS)
        self.lengths = {}        # active slot -> length
        self.reserved = {}       # active slot -> tokens promised
        self.families = {}       # active slot -> the family of its tokens
        self.next_family = FAMILIES
        self.poisoned = False
        self.error = None        # the type of the last call's error

    def call(self, function, atomic=True):
        """Runs `function` on the manager; returns its result, or None where it failed (and must
        then have changed nothing, but pooled pages where it is not `atomic`)."""
        before = state(self.manager) if not self.poisoned else None
        thrown = self.driver.failures_thrown
        self.error = None
        try:
            return function()
        except CacheManagerPoisonedError:
            assert self.poisoned
            self.error = CacheManagerPoisonedError
        except (OutOfPagesError, NoFreeSlotError, DriverError) as error:
            self.error = type(error)
            self.poisoned = self.manager.stats()["poisoned"]
            if not self.poisoned:
                after = state(self.manager)
                assert (after["lengths"], after["active"]) == (before["lengths"], before["active"])
                alone = self.driver.failures_thrown - thrown <= 1
                if alone and "fake copy failed" in str(error):
                    # A fork's copy may have gone to a cached or forked page it evicted: that one
                    # stays evicted, and free slots that mapped it keep fewer pages.
                    active = [s for s, a in enumerate(before["active"]) if a]
                    assert [after["slots"][s] for s in active] == [before["slots"][s] for s in active]
                    assert set(map(repr, after["cache"])) <= set(map(repr, before["cache"]))
                elif atomic and alone:
                    # Only where undoing failed too may the pages differ (a page left listed, say).
                    assert after == before
        return None

    @rule(prompt=st.integers(0, CAPACITY), lookahead=st.integers(0, 64))
    def alloc(self, prompt, lookahead):
        slot = self.call(lambda: self.manager.alloc(prompt, lookahead))
        if slot is not None:
            assert slot not in self.lengths
            self.lengths[slot] = prompt
            self.reserved[slot] = min(prompt + lookahead, CAPACITY)
            self.families[slot] = self.next_family     # tokens no other slot has
            self.next_family += 1

    @rule(prompt=st.integers(0, CAPACITY), lookahead=st.integers(0, 64), family=st.integers(0, FAMILIES - 1))
    def alloc_shared(self, prompt, lookahead, family):
        keys = [family * 1000 + p for p in range(prompt // PER_PAGE)]
        placed = self.call(lambda: self.manager.alloc_shared(prompt, lookahead, keys))
        if placed is not None:
            slot, shared = placed
            assert slot not in self.lengths and shared <= len(keys)
            self.lengths[slot] = prompt
            self.reserved[slot] = min(prompt + lookahead, CAPACITY)
            self.families[slot] = family
            assert self.manager.writable_from(slot) == shared * PER_PAGE

    @precondition(lambda self: self.lengths)
    @rule(data=st.data())
    def publish(self, data):
        slot = data.draw(st.sampled_from(sorted(self.lengths)))
        family = self.families[slot]
        self.call(lambda: self.manager.publish(slot, [family * 1000 + p for p in range(self.lengths[slot] // PER_PAGE)]))

    @precondition(lambda self: self.lengths)
    @rule(data=st.data(), lookahead=st.integers(0, 64))
    def fork(self, data, lookahead):
        parent = data.draw(st.sampled_from(sorted(self.lengths)))
        child = self.call(lambda: self.manager.fork(parent, lookahead))
        if child is not None:
            assert child not in self.lengths
            self.lengths[child] = self.lengths[parent]
            self.reserved[child] = min(self.lengths[parent] + lookahead, CAPACITY)
            self.families[child] = self.families[parent]      # the same tokens: it may publish them
            view = self.manager.view()
            full = self.lengths[parent] // PER_PAGE
            assert view["slots"][child][:full] == view["slots"][parent][:full]
            assert self.manager.writable_from(child) == self.manager.writable_from(parent) == full * PER_PAGE

    @precondition(lambda self: self.lengths)
    @rule(data=st.data())
    def rewind(self, data):
        """A speculative step's rejected tokens: the length goes back, never into read-only pages."""
        slot = data.draw(st.sampled_from(sorted(self.lengths)))
        length = data.draw(st.integers(0, self.lengths[slot]))
        if self.poisoned:
            with pytest.raises(CacheManagerPoisonedError):
                self.manager.rewind(slot, length)
            return
        readonly = self.manager.writable_from(slot)
        before = state(self.manager)
        try:
            self.manager.rewind(slot, length)
        except ValueError as error:
            assert length < readonly, error          # refused only inside its shared pages
            assert state(self.manager) == before
        else:
            assert length >= readonly
            self.lengths[slot] = length

    @rule()
    def evict(self):
        self.call(self.manager.evict)

    @precondition(lambda self: self.lengths)
    @rule(data=st.data())
    def free(self, data):
        slot = data.draw(st.sampled_from(sorted(self.lengths)))
        self.call(lambda: self.manager.free(slot))
        if not self.poisoned:
            del self.lengths[slot], self.reserved[slot], self.families[slot]

    @rule(tokens=st.integers(0, 40))
    def grow(self, tokens):
        within = all(self.lengths[s] + tokens <= self.reserved[s] for s in self.lengths)
        done = self.call(lambda: self.manager.grow(tokens) or True)
        if within:
            assert self.error is not OutOfPagesError, "a growth within every reservation ran out of pages"
        if done:
            for slot in self.lengths:
                self.lengths[slot] = min(self.lengths[slot] + tokens, CAPACITY)

    @rule(tokens=st.integers(0, 64))
    def reserve_growth(self, tokens):
        if self.call(lambda: self.manager.reserve_growth(tokens) or True):
            for slot in self.lengths:
                self.reserved[slot] = max(self.reserved[slot], min(self.lengths[slot] + tokens, CAPACITY))

    @rule(tokens=st.integers(0, 64), max_pages=st.integers(1, 3 * BUFFERS))
    def prefetch(self, tokens, max_pages):
        self.call(lambda: self.manager.prefetch(tokens, max_pages))

    @rule()
    def reclaim(self):
        self.call(self.manager.reclaim)

    @rule()
    def trim(self):
        self.call(self.manager.trim, atomic=False)   # what it released stays released

    @rule(operation=st.sampled_from(FAILING), nth=st.integers(1, 6))
    def inject_failure(self, operation, nth):
        self.driver.fail_on(operation, nth)

    @invariant()
    def view_equals_the_driver_and_the_model(self):
        view = check_view(self.manager, self.driver)
        if view["poisoned"] is not None:
            self.poisoned = True
            return
        lengths, active = self.manager.lengths(), self.manager.active()
        assert {s for s, a in enumerate(active) if a} == set(self.lengths)
        for slot, length in self.lengths.items():
            assert lengths[slot] == length
            # Nothing the slot holds, nor anything promised to it, is out of reach.
            assert len(view["slots"][slot]) >= pages_for(length)
            # It never writes a page that other slots may read.
            assert self.manager.writable_from(slot) <= length

    def teardown(self):
        for _ in range(10):
            try:
                self.manager.release()
                break
            except DriverError:
                pass
        check_released(self.driver)


PageManagerMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=50, deadline=None)
test_page_manager_states = PageManagerMachine.TestCase
