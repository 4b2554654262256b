"""What goes into the engine and what comes out of it."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class Request:
    """One generation request.

    Parameters
    ----------
    prompt : token ids
    max_new_tokens : how many tokens to generate at most
    stop_tokens : generation ends after any of these (it is emitted)
    temperature, top_k, top_p : sampling; temperature 0 is greedy
    """

    prompt: list[int]
    max_new_tokens: int = 32
    stop_tokens: tuple[int, ...] = ()
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0


@dataclasses.dataclass(frozen=True)
class TokenEvent:
    """A token of request ``request_id``; ``finished`` on its last one.

    A request that failed ends with an event whose ``error`` says why (its ``token`` is -1).
    """

    request_id: int
    token: int
    finished: bool
    error: str | None = None


@dataclasses.dataclass
class RequestState:
    """The engine's record of a request: what it generated so far and where it lives."""

    request_id: int
    request: Request
    arrival: float
    generated: list[int] = dataclasses.field(default_factory=list)
    slot: int | None = None
    admitted_at: int = 0      # engine step of the (latest) admission; youngest is preempted first
    preemptions: int = 0
    computed: int = 0         # context tokens in the slot's cache (a prefill may start at an offset)
    prefilled: bool = False   # the whole context is in the cache: the request decodes
    # Tokens sampled by dispatched steps that the host has not read yet (the pipelined engine
    # has at most two: the last step's, read while the next one runs), and the row of the
    # latest one in its step's outputs (None when none is in flight): the next step's input.
    in_flight: int = 0
    pending_row: int | None = None
    done: bool = False        # finished, failed or cancelled: any token still in flight is dropped
    admission_failures: int = 0   # admissions the driver failed (engine.failures: retried, then failed)
    retry_at: float = 0.0         # not admitted before this time.perf_counter() (after such a failure)

    @property
    def remaining(self) -> int:
        """Tokens still to generate, counting a token in flight as generated."""
        return self.request.max_new_tokens - len(self.generated) - self.in_flight

    @property
    def context(self) -> list[int]:
        """What prefill must process: the prompt and, after a preemption, what was generated."""
        return list(self.request.prompt) + self.generated
