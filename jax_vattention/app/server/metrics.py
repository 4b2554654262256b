"""What the server reports: ``/metrics`` in Prometheus' text format, and one JSON log line a request.

The figures are those operators of vLLM watch, under the same names with the ``vattention:``
prefix: requests running and waiting, the KV cache's share of its budget (here: the physical
pages mapped against the page budget, the memory a virtual cache really holds), preemptions,
prefix-cache queries and hits (in tokens), and histograms of the time to the first token, the
time between output tokens and the end-to-end latency, plus prompt and generation token totals.
Gauges are read from the engine when scraped; per-request figures are added as requests end.
Everything is bounded: a histogram is a fixed list of bucket counts.

Prometheus' text format (version 0.0.4) is short enough to write here: ``# HELP`` and ``# TYPE``
lines, then ``name{labels} value`` samples; a histogram has cumulative ``_bucket{le=...}``
samples, ``_sum`` and ``_count``.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import logging
import math
import threading
import time

REQUEST_LOG = logging.getLogger("jax_vattention.server.requests")

PREFIX = "vattention:"
# Bucket upper bounds, in seconds (vLLM's, trimmed).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
                0.4, 0.5, 0.75, 1.0, 2.5)
LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                   60.0, 120.0, 300.0)


class Histogram:
    """Counts of observations per bucket (``le`` upper bounds, and +Inf), their sum and count."""

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = tuple(sorted(bounds))
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def lines(self, name: str) -> list[str]:
        lines, total = [], 0
        for bound, count in zip((*self.bounds, math.inf), self.counts):
            total += count
            lines.append(f'{name}_bucket{{le="{_number(bound)}"}} {total}')
        return lines + [f"{name}_sum {_number(self.sum)}", f"{name}_count {total}"]


@dataclasses.dataclass
class RequestRecord:
    """One request's life, for its log line and the histograms (``time.perf_counter()`` stamps)."""

    request_id: str
    endpoint: str
    arrival: float
    stream: bool = False
    user: str | None = None
    engine_id: int | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    first_token: float | None = None
    last_token: float | None = None
    finish_reason: str | None = None     # stop, length, cancelled (the client left), error
    error: str | None = None

    def token(self, now: float) -> float | None:
        """Counts a token that arrived at ``now``; returns the time since the previous one (None for
        the first)."""
        gap = None if self.last_token is None else now - self.last_token
        self.completion_tokens += 1
        if self.first_token is None:
            self.first_token = now
        self.last_token = now
        return gap

    def log_line(self, now: float) -> str:
        ttft = None if self.first_token is None else round(self.first_token - self.arrival, 6)
        return json.dumps({"event": "request", "id": self.request_id, "engine_id": self.engine_id,
                           "endpoint": self.endpoint, "stream": self.stream, "user": self.user,
                           "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                           "ttft_s": ttft, "duration_s": round(now - self.arrival, 6),
                           "finish_reason": self.finish_reason, "error": self.error})


class ServerMetrics:
    """The server's counters and histograms; :meth:`render` adds the engine's gauges.

    Example::

        metrics = ServerMetrics()
        record = RequestRecord("cmpl-1", "completions", time.perf_counter())
        ...
        metrics.finished(record)
        text = metrics.render(replicas)
    """

    def __init__(self):
        self._lock = threading.Lock()
        self.ttft = Histogram(TTFT_BUCKETS)
        self.tpot = Histogram(TPOT_BUCKETS)
        self.latency = Histogram(LATENCY_BUCKETS)
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.finished_by_reason: dict[str, int] = {}
        self.rejected_by_reason: dict[str, int] = {}

    def token_gap(self, seconds: float) -> None:
        """The time between two output tokens of a request."""
        with self._lock:
            self.tpot.observe(seconds)

    def rejected(self, code: str) -> None:
        """A request refused before it reached the engine (429 ``queue_full``, 400 ``...``)."""
        with self._lock:
            self.rejected_by_reason[code] = self.rejected_by_reason.get(code, 0) + 1

    def finished(self, record: RequestRecord) -> None:
        """Adds an ended request to the figures and logs its line."""
        now = time.perf_counter()
        with self._lock:
            if record.first_token is not None:
                self.ttft.observe(record.first_token - record.arrival)
            if record.engine_id is not None:     # it reached the engine (not refused at the door)
                self.latency.observe(now - record.arrival)
            self.prompt_tokens += record.prompt_tokens
            self.generation_tokens += record.completion_tokens
            reason = record.finish_reason or "error"
            self.finished_by_reason[reason] = self.finished_by_reason.get(reason, 0) + 1
        REQUEST_LOG.info(record.log_line(now))

    def render(self, replicas) -> str:
        """Every metric in Prometheus' text format over the server's
        :class:`~jax_vattention.app.server.replicas.Replicas` (one, or ``serve --dp``'s): each engine's
        figure is their sum (a ratio: of the sums; ``engine_healthy``: 1 while any replica can
        serve), and with more than one replica also each replica's, labelled ``replica="i"`` (so
        ``sum(metric{replica!=""})`` adds the replicas and ``metric{replica=""}`` is the total)."""
        each = [_engine_figures(loop) for loop in replicas.loops]
        total = {key: sum(figures[key] for figures in each) for key in each[0]}
        total["page_bytes"] = each[0]["page_bytes"]
        total["healthy"] = int(any(figures["healthy"] for figures in each))
        rows = [("", total)]
        if len(each) > 1:
            rows += [(f'{{replica="{index}"}}', figures) for index, figures in enumerate(each)]
        engine_metrics = [
            ("num_requests_running", "gauge", "Requests holding a slot.", lambda f: f["running"]),
            ("num_requests_waiting", "gauge", "Requests waiting for a slot.", lambda f: f["waiting"]),
            ("kv_cache_usage_perc", "gauge", "Physical KV pages mapped, as a fraction of the page budget.",
             lambda f: f["mapped_pages"] / max(f["budget_pages"], 1)),
            ("kv_cache_mapped_bytes", "gauge", "Bytes of physical KV pages mapped.", lambda f: f["mapped_bytes"]),
            ("kv_cache_budget_bytes", "gauge", "The KV cache's page budget in bytes.",
             lambda f: f["budget_pages"] * f["page_bytes"]),
            ("kv_cache_pages_mapped", "gauge", "Physical KV pages mapped (every buffer).", lambda f: f["mapped_pages"]),
            ("kv_cache_pages_budget", "gauge", "The page budget (every buffer).", lambda f: f["budget_pages"]),
            ("kv_cache_static_bytes", "gauge", "What a static cache of max_batch x max_len would hold.",
             lambda f: f["static_bytes"]),
            ("engine_healthy", "gauge", "1 while the engine can serve.", lambda f: f["healthy"]),
            ("num_preemptions_total", "counter", "Requests preempted (requeued, recomputed later).",
             lambda f: f["preemptions"]),
            ("prefix_cache_queries_total", "counter", "Context tokens of admitted requests.",
             lambda f: f["prompt_tokens"]),
            ("prefix_cache_hits_total", "counter", "Of them, tokens mapped from the prefix cache.",
             lambda f: f["shared_tokens"]),
            ("engine_steps_total", "counter", "Engine steps.", lambda f: f["steps"]),
            ("engine_step_failures_total", "counter", "Engine steps that raised (their requests failed).",
             lambda f: f["failed_steps"]),
            ("engine_driver_failures_total", "counter", "Driver failures the engine absorbed (retried or "
             "failing only the requests they touched).", lambda f: f["driver_failures"]),
            ("spec_decode_num_drafts_total", "counter", "Speculative verifications (a request's proposals checked "
             "in a step).", lambda f: f["verifications"]),
            ("spec_decode_num_draft_tokens_total", "counter", "Tokens proposed.", lambda f: f["proposed_tokens"]),
            ("spec_decode_num_accepted_tokens_total", "counter", "Proposed tokens accepted.",
             lambda f: f["accepted_tokens"]),
            ("spec_decode_acceptance_rate", "gauge", "Accepted over proposed tokens (0 before any).",
             lambda f: f["accepted_tokens"] / f["proposed_tokens"] if f["proposed_tokens"] else 0.0),
            ("spec_decode_mean_accepted_length", "gauge", "Tokens a verification streams on average, the "
             "target's own included (0 before any).",
             lambda f: 1 + f["accepted_tokens"] / f["verifications"] if f["verifications"] else 0.0),
        ]
        samples = [(name, kind, help_text, [(labels, value(figures)) for labels, figures in rows])
                   for name, kind, help_text, value in engine_metrics]
        with self._lock:
            samples += [
                ("prompt_tokens_total", "counter", "Prompt tokens of ended requests.", [("", self.prompt_tokens)]),
                ("generation_tokens_total", "counter", "Tokens generated for ended requests.",
                 [("", self.generation_tokens)]),
                ("request_success_total", "counter", "Ended requests, by finish reason.",
                 [(f'{{finished_reason="{reason}"}}', count)
                  for reason, count in sorted(self.finished_by_reason.items())]),
                ("requests_rejected_total", "counter", "Requests refused before the engine, by error code.",
                 [(f'{{code="{code}"}}', count) for code, count in sorted(self.rejected_by_reason.items())]),
            ]
            histograms = [("time_to_first_token_seconds", "Time from arrival to the first token.", self.ttft),
                          ("time_per_output_token_seconds", "Time between two output tokens.", self.tpot),
                          ("e2e_request_latency_seconds", "Time from arrival to the end.", self.latency)]
            lines = []
            for name, kind, help_text, values in samples:
                lines += [f"# HELP {PREFIX}{name} {help_text}", f"# TYPE {PREFIX}{name} {kind}"]
                lines += [f"{PREFIX}{name}{labels} {_number(value)}" for labels, value in values]
            for name, help_text, histogram in histograms:
                lines += [f"# HELP {PREFIX}{name} {help_text}", f"# TYPE {PREFIX}{name} histogram"]
                lines += histogram.lines(PREFIX + name)
        return "\n".join(lines) + "\n"


def _engine_figures(loop) -> dict:
    """One engine loop's figures that ``/metrics`` reports (read when scraped)."""
    engine, stats = loop.engine, loop.stats()
    run = engine.stats
    return dict(running=engine.running, waiting=loop.waiting, mapped_pages=stats["mapped_pages"],
                budget_pages=stats["budget_pages"], mapped_bytes=stats["mapped_bytes"], page_bytes=stats["page_bytes"],
                static_bytes=stats["static_bytes"], healthy=int(loop.health is None), preemptions=run.preemptions,
                prompt_tokens=run.prompt_tokens, shared_tokens=run.shared_tokens, steps=run.steps,
                failed_steps=loop.failed_steps, driver_failures=run.step_failures + run.map_ahead_failures,
                verifications=run.verifications, proposed_tokens=run.proposed_tokens,
                accepted_tokens=run.accepted_tokens)


def _number(value: float) -> str:
    if value == math.inf:
        return "+Inf"
    if isinstance(value, bool):
        return str(int(value))
    return repr(value) if isinstance(value, float) else str(value)
