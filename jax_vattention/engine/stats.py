"""What the engine did, for reports: one :class:`StepRecord` per step and the run's :class:`EngineStats`."""

from __future__ import annotations

import dataclasses


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
    """What the engine did, for reports."""

    steps: int = 0
    prefills: int = 0          # prompts whose last chunk ran
    preemptions: int = 0
    tokens: int = 0
    prefetch_seconds: float = 0.0     # time spent mapping on the host while the device computed
    map_ahead_failures: int = 0       # driver failures while mapping ahead (best effort: no request failed)
    records: list = dataclasses.field(default_factory=list)               # a StepRecord per step
    # At each admission the budget stopped: (requests running, requests an ideal allocator would run).
    memory_bound_batches: list = dataclasses.field(default_factory=list)
    mapped_bytes: list = dataclasses.field(default_factory=list)   # (time, bytes) after each step
    # Prefix sharing. Every admission counts: a preempted request's readmission too.
    admissions: int = 0
    shared_admissions: int = 0    # admissions that mapped at least one cached page
    prompt_tokens: int = 0        # context tokens of the requests admitted
    prefill_tokens: int = 0       # of them, computed by prefill chunks (the rest was shared)
    shared_tokens: int = 0        # mapped from the prefix cache at admission
    shared_pages: int = 0         # the same in pages (counted in every buffer, as the manager counts)
    prefix_waits: int = 0         # steps whose admission waited for a running request to publish a prefix
    peak_bytes_saved: int = 0     # the most memory the shared pages saved at once (manager's bytes_saved)
