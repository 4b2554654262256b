"""``vattention bench router``: a simulation of routing requests over data-parallel replicas.

What ``serve --dp`` measures only on the replicas of one host, this simulates for many: a trace of
arrivals is routed over ``--replicas`` simulated engines by each policy in turn, and the table
compares them on the prefix hit rate (prompt tokens mapped from a replica's prefix cache instead of
computed) and the load balance (the busiest replica against the mean, in tokens computed and in
requests waiting), with the time to the first token and the time to serve the whole trace.

Policies: ``prefix-aware`` is the server's own rule, imported
(:func:`~jax_vattention.app.server.routing.preference`: the longest cached prefix, else room, then
the fewest waiting and running); ``least-loaded`` the same rule told of no cached prefix;
``round-robin``; ``prefix-hash`` the first page's key hashed onto a replica (what a router that
keeps no state can do: a consistent hash of the system prompt).

The trace (seeded, synthetic; the repository holds no recorded one): ``--conversations``
conversations start as a Poisson process of ``--rate`` per second; each opens with one of
``--system-prompts`` system prompts of ``--system-tokens`` tokens, chosen with Zipf(``--zipf``)
popularity, and runs 1 to ``2 * --turns - 1`` turns (uniform); a turn sends the whole conversation
so far plus a user message of U(20, 200) tokens, asks for U(32, 256) tokens, and the next turn
arrives an exponential think time of mean ``--think`` seconds after the previous one's nominal end
(the trace is fixed before routing: an open loop). Tokens are random ids; page keys are the
engine's own (:func:`~jax_vattention.cache.prefix.page_keys`).

A simulated replica is a continuous-batching engine: ``--max-batch`` slots, a budget of
``--budget-pages`` pages of ``--tokens-per-page`` tokens, steps of at most ``--token-budget``
tokens (decodes first, then prompt chunks), a step taking ``--step-ms`` plus ``--token-us`` per
token (stated constants, not measured). A request is admitted when a slot and the pages of its
prompt and answer are free (its cached prefix mapped, not counted twice); it publishes its prompt's
full pages once prefilled and its whole context's when it ends; cached pages no request maps are
evicted least recently used when pages run short. No preemption, no failures.

Run ``python -m jax_vattention.bench.router_sim`` (or ``vattention bench router``).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import math

import numpy as np

from jax_vattention.app.cli import standalone
from jax_vattention.app.server.routing import ReplicaView, preference
from jax_vattention.cache.prefix import page_keys

POLICIES = ("prefix-aware", "least-loaded", "round-robin", "prefix-hash")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--replicas", type=int, default=4, help="data-parallel replicas (default 4)")
    parser.add_argument("--conversations", type=int, default=300, help="conversations in the trace (default 300)")
    parser.add_argument("--rate", type=float, default=4.0, help="conversations starting per second (default 4)")
    parser.add_argument("--turns", type=int, default=3, help="mean turns of a conversation (default 3)")
    parser.add_argument("--think", type=float, default=5.0, help="mean seconds between turns (default 5)")
    parser.add_argument("--system-prompts", type=int, default=16, help="distinct system prompts (default 16)")
    parser.add_argument("--system-tokens", type=int, default=1024, help="tokens of a system prompt (default 1024)")
    parser.add_argument("--zipf", type=float, default=1.2, help="Zipf exponent of system-prompt popularity (1.2)")
    parser.add_argument("--max-batch", type=int, default=32, help="slots a replica (default 32)")
    parser.add_argument("--budget-pages", type=int, default=4096, help="a replica's page budget (default 4096)")
    parser.add_argument("--tokens-per-page", type=int, default=16,
                        help="tokens a page holds (default 16: Llama-3-8B, interleaved, 2 MiB pages)")
    parser.add_argument("--token-budget", type=int, default=512, help="tokens a step (default 512)")
    parser.add_argument("--step-ms", type=float, default=6.0, help="a step's fixed time (default 6 ms)")
    parser.add_argument("--token-us", type=float, default=20.0, help="a step's time per token (default 20 us)")
    parser.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES))
    parser.add_argument("--seed", type=int, default=0)


@dataclasses.dataclass
class Arrival:
    """One request of the trace: when, its prompt's tokens, its answer's and its conversation."""

    time: float
    prompt: np.ndarray
    answer: np.ndarray
    conversation: int
    keys: list[int] = dataclasses.field(default_factory=list)   # page keys of the prompt and answer


def synthetic_trace(args: argparse.Namespace) -> list[Arrival]:
    """The seeded trace of the module docstring, in arrival order."""
    rng = np.random.default_rng(args.seed)
    systems = [rng.integers(0, 32000, args.system_tokens) for _ in range(args.system_prompts)]
    popularity = 1.0 / np.arange(1, args.system_prompts + 1) ** args.zipf
    popularity /= popularity.sum()
    arrivals, start = [], 0.0
    nominal = (args.step_ms + args.token_us * args.max_batch / 1000) / 1000     # a decode step of a full batch
    for conversation in range(args.conversations):
        start += rng.exponential(1.0 / args.rate)
        context, time = systems[rng.choice(args.system_prompts, p=popularity)], start
        for _ in range(rng.integers(1, 2 * args.turns)):
            context = np.concatenate([context, rng.integers(0, 32000, rng.integers(20, 201))])
            answer = rng.integers(0, 32000, rng.integers(32, 257))
            keys = page_keys(np.concatenate([context, answer]), args.tokens_per_page)
            arrivals.append(Arrival(time, context, answer, conversation, keys))
            context = np.concatenate([context, answer])
            time += len(answer) * nominal + rng.exponential(args.think)
    return sorted(arrivals, key=lambda arrival: arrival.time)


@dataclasses.dataclass
class SimRequest:
    arrival: Arrival
    shared: int = 0                # prompt tokens mapped from the cache
    computed: int = 0              # prompt tokens in the slot (shared or prefilled)
    generated: int = 0
    pages: int = 0                 # pages it holds of its own
    held: list = dataclasses.field(default_factory=list)    # cached pages' keys it maps
    first_token: float | None = None

    @property
    def prompt(self) -> int:
        return len(self.arrival.prompt)


class SimReplica:
    """One simulated engine (module docstring)."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.clock = 0.0
        self.waiting: collections.deque[SimRequest] = collections.deque()
        self.running: list[SimRequest] = []
        self.done: list[SimRequest] = []
        self.cache: collections.OrderedDict[int, int] = collections.OrderedDict()   # key -> requests mapping it
        self.private = 0               # pages the running requests hold of their own
        self.computed_tokens = 0
        self.hit_tokens = 0
        self.prompt_tokens = 0

    @property
    def free_pages(self) -> int:
        return self.args.budget_pages - self.private - len(self.cache)

    def cached_pages(self, keys: list[int]) -> int:
        run = 0
        for key in keys:
            if key not in self.cache:
                break
            run += 1
        return run

    def view(self, keys: list[int], tokens: int) -> ReplicaView:
        """What the server's router reads of a replica (:meth:`Replicas.views`)."""
        return ReplicaView(self.cached_pages(keys), self.free_pages, len(self.waiting), running=len(self.running),
                           needed_pages=math.ceil(tokens / self.args.tokens_per_page))

    def submit(self, request: SimRequest) -> None:
        self.waiting.append(request)
        self._admit()

    def advance(self, until: float) -> None:
        """Runs steps while there is work and the clock is before ``until``; then (idle) waits there."""
        while self.running and self.clock < until:
            self._step()
        self.clock = max(self.clock, until)

    def drain(self) -> None:
        while self.running:
            self._step()
        if self.waiting:
            raise ValueError(f"a request needs more than --budget-pages {self.args.budget_pages} pages")

    def _unused(self) -> list[int]:
        return [key for key, users in self.cache.items() if users == 0]     # least recently used first

    def _admit(self) -> None:
        per_page = self.args.tokens_per_page
        while self.waiting and len(self.running) < self.args.max_batch:
            request = self.waiting[0]
            keys = request.arrival.keys
            run = self.cached_pages(keys[:(request.prompt - 1) // per_page])
            need = math.ceil((request.prompt + len(request.arrival.answer)) / per_page) - run
            unused = self._unused()
            if need > self.free_pages + len(unused) - sum(1 for key in keys[:run] if self.cache[key] == 0):
                return
            for key in keys[:run]:
                self.cache[key] += 1
                self.cache.move_to_end(key)
            for key in self._unused()[:max(need - self.free_pages, 0)]:
                del self.cache[key]
            self.waiting.popleft()
            request.held = list(keys[:run])
            request.shared = request.computed = run * per_page
            request.pages = need
            self.private += need
            self.hit_tokens += request.shared
            self.prompt_tokens += request.prompt
            self.running.append(request)

    def _publish(self, request: SimRequest, tokens: int) -> None:
        """Offers the full pages of ``request``'s first ``tokens`` tokens to the cache: a page whose
        key is new moves from the request's own pages to the cache (it still maps it)."""
        for key in request.arrival.keys[len(request.held):tokens // self.args.tokens_per_page]:
            if key in self.cache:
                break                        # another copy is cached: this one stays private
            self.cache[key] = 1
            request.held.append(key)
            request.pages -= 1
            self.private -= 1

    def _step(self) -> None:
        """One engine step: decodes first, then prompt chunks, within the token budget."""
        budget, tokens, finished = self.args.token_budget, 0, []
        for request in self.running:
            if request.computed == request.prompt and budget:
                request.generated += 1
                budget, tokens = budget - 1, tokens + 1
                if request.generated == len(request.arrival.answer):
                    finished.append(request)
        for request in self.running:
            chunk = min(request.prompt - request.computed, budget)
            if chunk > 0:
                request.computed += chunk
                budget, tokens = budget - chunk, tokens + chunk
        self.clock += (self.args.step_ms + self.args.token_us * tokens / 1000) / 1000
        self.computed_tokens += tokens
        for request in self.running:
            if request.computed == request.prompt and request.first_token is None:
                request.first_token = self.clock    # the prefill's last chunk gives the first token
                self._publish(request, request.prompt)
        for request in finished:
            self._publish(request, request.prompt + request.generated)
            self.private -= request.pages
            for key in request.held:
                self.cache[key] -= 1
            self.running.remove(request)
            self.done.append(request)
        self._admit()


def simulate(trace: list[Arrival], policy: str, args: argparse.Namespace) -> dict:
    """Routes ``trace`` over ``args.replicas`` simulated replicas by ``policy``; the figures of the table."""
    replicas = [SimReplica(args) for _ in range(args.replicas)]
    occupancy = np.zeros(args.replicas)
    per_page = args.tokens_per_page
    for index, arrival in enumerate(trace):
        for replica in replicas:
            replica.advance(arrival.time)
        occupancy += [len(replica.waiting) + len(replica.running) for replica in replicas]
        prefix = arrival.keys[:(len(arrival.prompt) - 1) // per_page]
        tokens = len(arrival.prompt) + len(arrival.answer)
        if policy == "round-robin":
            chosen = index % args.replicas
        elif policy == "prefix-hash":
            first = prefix[0] if prefix else 0
            chosen = int.from_bytes(hashlib.blake2b(first.to_bytes(8, "little"), digest_size=8).digest(),
                                    "little") % args.replicas
        else:
            views = [replica.view(prefix if policy == "prefix-aware" else [], tokens) for replica in replicas]
            chosen = preference(views)[0]
        replicas[chosen].submit(SimRequest(arrival))
    for replica in replicas:
        replica.drain()
    done = [request for replica in replicas for request in replica.done]
    ttft = np.array([request.first_token - request.arrival.time for request in done])
    computed = np.array([replica.computed_tokens for replica in replicas], dtype=float)
    occupancy /= max(len(trace), 1)
    return dict(policy=policy, requests=len(done),
                hit_rate=sum(r.hit_tokens for r in replicas) / max(sum(r.prompt_tokens for r in replicas), 1),
                computed_tokens=int(computed.sum()), tokens_imbalance=computed.max() / max(computed.mean(), 1e-9),
                occupancy_imbalance=occupancy.max() / max(occupancy.mean(), 1e-9),
                ttft_p50=float(np.percentile(ttft, 50)), ttft_p99=float(np.percentile(ttft, 99)),
                makespan=max(replica.clock for replica in replicas))


def check_arguments(args: argparse.Namespace) -> None:
    for name in ("replicas", "conversations", "turns", "system_prompts", "system_tokens", "max_batch",
                 "budget_pages", "tokens_per_page", "token_budget"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1; got {getattr(args, name)}")
    for name in ("rate", "think", "zipf", "step_ms", "token_us"):
        if not getattr(args, name) > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive; got {getattr(args, name)}")


def run(args: argparse.Namespace) -> int:
    try:
        check_arguments(args)
    except ValueError as error:
        print(f"vattention bench router: error: {error}")
        return 2
    trace = synthetic_trace(args)
    prompt_tokens = sum(len(arrival.prompt) for arrival in trace)
    print(f"router simulation (CPU, simulated engines): {len(trace)} requests of {args.conversations} "
          f"conversations (Poisson {args.rate:g}/s, mean {args.turns} turns, think {args.think:g} s), "
          f"{args.system_prompts} system prompts of {args.system_tokens} tokens (Zipf {args.zipf:g}), "
          f"{prompt_tokens:,} prompt tokens; {args.replicas} replicas of {args.max_batch} slots, "
          f"{args.budget_pages} pages of {args.tokens_per_page} tokens, token budget {args.token_budget}, "
          f"step {args.step_ms:g} ms + {args.token_us:g} us/token; seed {args.seed}")
    header = ("policy", "prefix hit rate", "tokens computed", "tokens max/mean", "requests max/mean",
              "TTFT p50", "TTFT p99", "makespan")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
    for policy in args.policies:
        row = simulate(trace, policy, args)
        print(f"| {policy} | {row['hit_rate']:.1%} | {row['computed_tokens']:,} | {row['tokens_imbalance']:.2f} | "
              f"{row['occupancy_imbalance']:.2f} | {row['ttft_p50'] * 1000:,.0f} ms | "
              f"{row['ttft_p99'] * 1000:,.0f} ms | {row['makespan']:.1f} s |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(standalone(__doc__, add_arguments, run))
