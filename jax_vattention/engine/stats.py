"""What the engine did, for reports: a window of recent :class:`StepRecord`\\ s and running totals.

Why windows: an engine serves for days. A list that gains an entry every step grows by
millions, and a reader that walks it (the map-ahead deadline reads the recent steps' times
before every step) costs more with every step. So per-step samples live in fixed-size
windows (``collections.deque`` with ``maxlen``), whole-run figures are running totals, and
every reader costs O(window) at most; nothing here grows with the number of steps.
A report that wants every step (``serve-bench``) copies the new records after each step
(:meth:`EngineStats.since`).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools

# Steps kept in each window: enough for percentiles over the last minutes of serving.
WINDOW = 1024


@dataclasses.dataclass(frozen=True)
class StepRecord:
    """What one step did: its decodes and chunk tokens, admissions, time and pages mapped."""

    decodes: int
    chunk_tokens: int
    admitted: int
    seconds: float          # from its dispatch (or the previous step's read, if later) to its tokens read
    mapped_pages: int       # before dispatch for the step's growth, and ahead while it ran
    blocked_by_memory: bool
    dispatch_seconds: float = 0.0   # the host's time in the compiled step's call


@dataclasses.dataclass
class EngineStats:
    """What the engine did: running totals, and the last ``window`` samples of each per-step series.

    Example::

        stats = EngineStats(window=256)
        stats.record(StepRecord(decodes=4, chunk_tokens=0, admitted=0, seconds=0.01, mapped_pages=0,
                                blocked_by_memory=False))
        stats.records_total, len(stats.records)   # (1, 1); after 1000 records: (1000, 256)
    """

    window: int = WINDOW
    steps: int = 0
    prefills: int = 0          # prompts whose last chunk ran (a sample group's once, at its fork)
    preemptions: int = 0
    tokens: int = 0
    prefetch_seconds: float = 0.0     # time spent mapping on the host while the device computed
    map_ahead_failures: int = 0       # driver failures while mapping ahead (best effort: no request failed)
    step_failures: int = 0            # driver failures during a step (the requests they touched failed)
    # Windows: the last ``window`` StepRecords, (running, ideal) admissions the budget stopped
    # (requests running, requests an ideal allocator would run), (time, bytes) after each step.
    records: collections.deque = dataclasses.field(default=None)
    memory_bound_batches: collections.deque = dataclasses.field(default=None)
    mapped_bytes: collections.deque = dataclasses.field(default=None)
    records_total: int = 0            # StepRecords ever recorded
    # Running totals of memory_bound_batches: admissions held back, and their sums of running and ideal.
    memory_bound_total: int = 0
    memory_bound_running: int = 0
    memory_bound_ideal: int = 0
    peak_mapped_bytes: int = 0
    # Prefix sharing. Every admission counts: a preempted request's readmission too.
    admissions: int = 0
    shared_admissions: int = 0    # admissions that mapped at least one cached page
    prompt_tokens: int = 0        # context tokens of the requests admitted
    prefill_tokens: int = 0       # of them, computed by prefill chunks (the rest was shared)
    shared_tokens: int = 0        # mapped from the prefix cache at admission
    shared_pages: int = 0         # the same in pages (counted in every buffer, as the manager counts)
    prefix_waits: int = 0         # steps whose admission waited for a running request to publish a prefix
    peak_bytes_saved: int = 0     # the most memory the shared pages saved at once (manager's bytes_saved)
    # Speculative decoding: verifications, the tokens they proposed and the proposals accepted.
    verifications: int = 0
    proposed_tokens: int = 0
    accepted_tokens: int = 0
    # Samples (Engine.submit_samples) that ran as requests of their own instead of forks.
    unforked_samples: int = 0

    def __post_init__(self):
        if self.window < 1:
            raise ValueError(f"window must be at least 1, got {self.window}")
        self.records = collections.deque(self.records or (), maxlen=self.window)
        self.memory_bound_batches = collections.deque(self.memory_bound_batches or (), maxlen=self.window)
        self.mapped_bytes = collections.deque(self.mapped_bytes or (), maxlen=self.window)

    def record(self, record: StepRecord) -> None:
        """Adds a step's record (the oldest leaves the window)."""
        self.records.append(record)
        self.records_total += 1

    def verified(self, proposed: int, accepted: int) -> None:
        """A verification of ``proposed`` tokens that accepted the first ``accepted``."""
        self.verifications += 1
        self.proposed_tokens += proposed
        self.accepted_tokens += accepted

    @property
    def acceptance_rate(self) -> float:
        """The share of proposed tokens accepted (0 before any verification)."""
        return self.accepted_tokens / self.proposed_tokens if self.proposed_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens a verification streams on average: its accepted proposals and the target's own
        token after them (vLLM's mean acceptance length; 0 before any verification)."""
        return 1 + self.accepted_tokens / self.verifications if self.verifications else 0.0

    def memory_bound(self, running: int, ideal: int) -> None:
        """An admission the page budget stopped, with ``running`` requests where an ideal allocator
        would run ``ideal``."""
        self.memory_bound_batches.append((running, ideal))
        self.memory_bound_total += 1
        self.memory_bound_running += running
        self.memory_bound_ideal += ideal

    def sample_memory(self, stamp: float, mapped: int) -> None:
        """The bytes mapped after a step, at ``stamp`` (``time.perf_counter()``)."""
        self.mapped_bytes.append((stamp, mapped))
        self.peak_mapped_bytes = max(self.peak_mapped_bytes, mapped)

    def recent_seconds(self, count: int) -> list[float]:
        """The ``seconds`` of the last ``count`` records, oldest first: O(count)."""
        recent = list(itertools.islice(reversed(self.records), count))
        return [record.seconds for record in reversed(recent)]

    def since(self, total: int) -> list[StepRecord]:
        """The records added after the first ``total`` (``records_total`` when last read), oldest
        first; O(new records). Records that already left the window are not there."""
        new = min(self.records_total - total, len(self.records))
        return list(itertools.islice(reversed(self.records), max(new, 0)))[::-1]
