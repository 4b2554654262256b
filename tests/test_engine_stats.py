"""The engine's state stays bounded however long it runs: per-step statistics in fixed windows with
running totals, readers that cost O(window) (counted, not timed), failed requests' errors kept for the
last ones only."""

import collections

import numpy as np
import pytest

from caches import model_manager
from jax_vattention.engine import Engine, EngineConfig, Request
from jax_vattention.engine.failures import FAILED_KEPT, FailedRequests
from jax_vattention.engine.stats import EngineStats, StepRecord
from server_harness import compile_cache

WINDOW = 32


def record(seconds, decodes=1):
    return StepRecord(decodes=decodes, chunk_tokens=0, admitted=0, seconds=seconds, mapped_pages=0,
                      blocked_by_memory=False)


class CountingDeque(collections.deque):
    """A deque that counts the items its readers walk (forwards or backwards)."""

    walked = 0

    def __iter__(self):
        for item in super().__iter__():
            CountingDeque.walked += 1
            yield item

    def __reversed__(self):
        for item in super().__reversed__():
            CountingDeque.walked += 1
            yield item


def test_windows_keep_the_last_records_and_totals_keep_everything():
    stats = EngineStats(window=4)
    for i in range(10):
        stats.record(record(float(i)))
        stats.memory_bound(i, i + 1)
        stats.sample_memory(float(i), 100 * i)
    assert [r.seconds for r in stats.records] == [6.0, 7.0, 8.0, 9.0] and stats.records_total == 10
    assert list(stats.memory_bound_batches) == [(6, 7), (7, 8), (8, 9), (9, 10)]
    assert (stats.memory_bound_total, stats.memory_bound_running, stats.memory_bound_ideal) == (10, 45, 55)
    assert len(stats.mapped_bytes) == 4 and stats.peak_mapped_bytes == 900
    assert stats.recent_seconds(2) == [8.0, 9.0] and stats.recent_seconds(9) == [6.0, 7.0, 8.0, 9.0]
    assert [r.seconds for r in stats.since(7)] == [7.0, 8.0, 9.0]
    assert [r.seconds for r in stats.since(2)] == [6.0, 7.0, 8.0, 9.0]     # older ones left the window
    assert stats.since(10) == []
    with pytest.raises(ValueError, match="window"):
        EngineStats(window=0)


def test_failed_requests_keep_the_last_errors():
    failed = FailedRequests()
    for i in range(FAILED_KEPT + 10):
        failed[i] = ValueError(str(i))
    assert len(failed) == FAILED_KEPT and 9 not in failed and 10 in failed and FAILED_KEPT + 9 in failed


def test_a_long_run_keeps_its_state_bounded_and_each_step_reads_a_window_at_most(model):
    # A small budget: admissions wait for memory, so every per-step series gets entries.
    manager, _ = model_manager(model, max_batch=4, max_len=256, budget_pages=24)
    engine = Engine(model, manager, EngineConfig(token_budget=16, chunk_tokens=4))
    with compile_cache():
        engine.compile(sampling=False)
    engine.stats = engine.memory.stats = EngineStats(window=WINDOW)
    engine.stats.records = CountingDeque(maxlen=WINDOW)
    rng = np.random.default_rng(0)
    walked, sizes = [], []
    for _ in range(12 * WINDOW):
        while engine.waiting < 3:
            engine.submit(Request(prompt=rng.integers(2, 200, int(rng.integers(2, 40))).tolist(),
                                  max_new_tokens=int(rng.integers(1, 40))))
        before = CountingDeque.walked
        engine.step()
        walked.append(CountingDeque.walked - before)
        stats = engine.stats
        sizes.append((len(stats.records), len(stats.mapped_bytes), len(stats.memory_bound_batches),
                      len(engine.failed)))
    steps = len(walked)
    assert engine.stats.records_total > 2 * WINDOW and engine.stats.memory_bound_total > WINDOW
    assert max(max(size) for size in sizes) <= WINDOW
    # The map-ahead deadline reads the last 4 records a step, whatever the engine's age.
    assert max(walked) <= 4 and max(walked[-steps // 10:]) == max(walked[:steps // 10])
    engine.run()
    manager.close()
