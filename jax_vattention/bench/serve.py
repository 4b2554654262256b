"""``vattention serve-bench``: the engine under a synthetic serving workload.

Requests arrive as a Poisson process; prompt and output lengths are drawn
uniformly from the given ranges. The engine runs with the chosen memory
policies on a model of a named shape (random weights) and a cache under a
fixed page budget. The report gives throughput, per-token latency
percentiles, mapped memory over time (a PNG where matplotlib is installed,
always a CSV), pages mapped and unmapped, the time spent mapping and how much
of it was hidden behind device work, the time of decode-only and mixed
(decode + prefill chunk) steps, the warm-up (compiling the engine's two step
programs), and the batch the engine sustained against what an ideal allocator
(exact tokens, no page rounding) would fit.

``--shared-prefix N`` puts one random N-token system prompt before every
request's own tokens (drawn from ``--prompt-len``); the report then says how
many prompt tokens the prefills computed against the prompts' total, how many
were mapped from the prefix cache, and the memory that sharing saved.
``--no-prefix-sharing`` runs the same workload with every prompt computed in
full, for the comparison. Each request's tokens go to ``tokens.json`` in
``--out``, so two runs can be compared token for token.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import pathlib
import sys
import tempfile
import time

import jax
import numpy as np
from flax import nnx
from tqdm import tqdm

from jax_vattention.bench.profile import KINDS, breakdown, traced_kernels
from jax_vattention.app.cli import standalone
from jax_vattention.cache.config import LAYOUTS
from jax_vattention.app.assembly import (add_speculation_arguments, cache_config_for, cache_dtype, choose_kernel,
                                         mesh_for, speculation_options)
from jax_vattention.app.commands.model_source import add_kv_dtype_argument
from jax_vattention.app.processes import add_process_arguments, initialize
from jax_vattention.engine import Engine, EngineConfig, Request
from jax_vattention.engine.lockstep import KeyValueChannel, LockstepLeader, ProcessGroupError, follow
from jax_vattention.app.memory_fit import check_fits
from jax_vattention.bench.device_memory import device_lines
from jax_vattention.cache.manager import CacheManager
from jax_vattention.models import Llama, config_for_device
from jax_vattention.cache.sharded_manager import ShardedCacheManager
from jax_vattention.decode.mesh import init_sharded
from jax_vattention.models.sharding import check_divisible


# --profile traces this window of engine steps: past the first admissions, short enough that the
# profiler's own cost and its trace stay small.
PROFILE_FIRST_STEP = 64
PROFILE_STEPS = 32


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="tiny", help="model shape (tiny, yi-6b, llama-3-8b, yi-34b)")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--rate", type=float, default=50.0, help="mean arrivals per second (Poisson)")
    parser.add_argument("--prompt-len", type=int, nargs=2, default=(16, 128), metavar=("MIN", "MAX"))
    parser.add_argument("--output-len", type=int, nargs=2, default=(16, 128), metavar=("MIN", "MAX"))
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--budget-mib", type=int, default=None, help="cache budget (default: 90%% of free)")
    parser.add_argument("--page-kib", type=int, default=None, help="page size (default: the driver's)")
    parser.add_argument("--token-budget", type=int, default=EngineConfig.token_budget,
                        help="tokens per engine step (decodes + chunks)")
    parser.add_argument("--chunk-tokens", type=int, default=64, help="the width of a prefill chunk row")
    parser.add_argument("--prefetch-tokens", type=int, default=None,
                        help="with overlap: tokens mapped ahead of each running slot (default 16)")
    parser.add_argument("--layout", choices=LAYOUTS, default="interleaved",
                        help="cache layout (interleaved: pages of a few tokens in every layer, the one for serving)")
    parser.add_argument("--backend", default=None, help="attention backend (default on GPU: pallas for the "
                        "interleaved layout, cudnn for per_layer; xla on CPU)")
    parser.add_argument("--no-overlap", action="store_true")
    parser.add_argument("--no-deferred-reclamation", action="store_true")
    parser.add_argument("--no-eager-allocation", action="store_true")
    parser.add_argument("--shared-prefix", type=int, default=0, metavar="N",
                        help="a common N-token system prompt before each request's --prompt-len tokens")
    parser.add_argument("--no-prefix-sharing", action="store_true",
                        help="compute every prompt in full (no pages mapped from the prefix cache)")
    parser.add_argument("--no-pipeline", action="store_true",
                        help="read each step's tokens before dispatching the next (EngineConfig.pipeline off; "
                             "by default each step is dispatched before the previous one's tokens are read)")
    parser.add_argument("--profile", action="store_true",
                        help=f"trace {PROFILE_STEPS} engine steps from step {PROFILE_FIRST_STEP} of the timed run "
                             "with the JAX profiler and print the device's busy and idle time per step by kernel "
                             "kind (see vattention bench profile); the figures outside those steps stay untraced")
    add_kv_dtype_argument(parser)
    parser.add_argument("--seed", type=int, default=0)
    add_speculation_arguments(parser)
    add_process_arguments(parser)
    parser.add_argument("--tp", type=int, default=1,
                        help="tensor-parallel degree: the model (random weights made in their shards) and the cache "
                             "split over the first TP devices (default 1)")
    parser.add_argument("--out", default=os.path.join("out", "serve-bench"),
                        help="folder for the CSV and PNG (default out/serve-bench)")


def validate(args: argparse.Namespace) -> None:
    """Raises ``ValueError`` for options the run would trip over later, before anything compiles."""
    for name in ("requests", "max_batch", "max_len", "token_budget", "chunk_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1; got {getattr(args, name)}")
    if not args.rate > 0:
        raise ValueError(f"--rate must be above 0 arrivals per second; got {args.rate}")
    for name in ("prompt_len", "output_len"):
        low, high = getattr(args, name)
        if not 1 <= low <= high:
            raise ValueError(f"--{name.replace('_', '-')} MIN MAX needs 1 <= MIN <= MAX; got {low} {high}")
    if args.shared_prefix < 0:
        raise ValueError(f"--shared-prefix must be at least 0; got {args.shared_prefix}")
    longest = args.shared_prefix + args.prompt_len[1] + args.output_len[1] - 1
    if longest > args.max_len or args.max_len < 3:
        raise ValueError(f"--max-len {args.max_len} is too short: a request may need {max(longest, 3)} positions "
                         f"(shared prefix + longest prompt + longest output - 1, and at least 3 for the warm-up)")
    for name in ("budget_mib", "page_kib", "prefetch_tokens"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1; got {getattr(args, name)}")
    if args.tp < 1 or args.tp > len(jax.devices()):
        raise ValueError(f"--tp must be between 1 and the {len(jax.devices())} devices JAX sees; got {args.tp}")
    if speculation_options(args)["speculate"] == "draft":
        raise ValueError("serve-bench's models are random weights: it takes --speculate ngram")
    check_writable(args.out)


def check_writable(folder: str) -> None:
    """Creates ``folder`` and checks that a file can be written there (before a long run, not after)."""
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise ValueError(f"--out {folder}: cannot write there ({error.strerror or error})") from None


def _workload(args, vocab: int) -> list[tuple[float, Request]]:
    rng = np.random.default_rng(args.seed)
    arrivals = np.cumsum(rng.exponential(1.0 / args.rate, args.requests))
    # Drawn from its own generator: the same workload with or without a system prompt.
    system = np.random.default_rng([args.seed, 1]).integers(2, vocab, args.shared_prefix).tolist()
    requests = []
    for arrival in arrivals:
        prompt_len = int(rng.integers(args.prompt_len[0], args.prompt_len[1] + 1))
        output_len = int(rng.integers(args.output_len[0], args.output_len[1] + 1))
        prompt = system + rng.integers(2, vocab, prompt_len).tolist()
        requests.append((float(arrival), Request(prompt=prompt, max_new_tokens=output_len)))
    return requests


def run(args: argparse.Namespace) -> int:
    processes = initialize(args)   # before anything asks JAX for its devices
    validate(args)
    device = jax.devices()[0]
    model_config = config_for_device(args.config, device)
    backend, _ = choose_kernel(args.backend, args.layout, device, cache_dtype(model_config, args.kv_dtype))
    mesh = mesh_for(args.tp)
    devices = list(mesh.devices.flat) if mesh is not None else [device]
    if mesh is not None:
        check_divisible(model_config, args.tp)
    check_fits(model_config, args.config, devices, args.budget_mib << 20 if args.budget_mib is not None else None)
    if mesh is None:
        model = Llama(model_config, rngs=nnx.Rngs(args.seed))
    else:  # each device makes only its share of the weights
        model = init_sharded(Llama, model_config, mesh, seed=args.seed)
    cache_config = cache_config_for(model_config, max_batch=args.max_batch, max_len=args.max_len, layout=args.layout,
                                    budget_bytes=args.budget_mib << 20 if args.budget_mib is not None else None,
                                    page_bytes=args.page_kib * 1024 if args.page_kib else None, kv_dtype=args.kv_dtype)
    manager = CacheManager(cache_config, device) if mesh is None else ShardedCacheManager(cache_config, mesh)
    engine_config = EngineConfig(token_budget=args.token_budget, chunk_tokens=args.chunk_tokens,
                                 prefetch_tokens=args.prefetch_tokens, backend=backend,
                                 # over several processes, no map-ahead: its timing would differ between them
                                 overlap=not args.no_overlap and processes.count == 1,
                                 deferred_reclamation=not args.no_deferred_reclamation,
                                 eager_allocation=not args.no_eager_allocation,
                                 prefix_sharing=not args.no_prefix_sharing, seed=args.seed,
                                 pipeline=not args.no_pipeline, **speculation_options(args))
    engine = Engine(model, manager, engine_config)
    # The longest request the workload can draw, through the engine's own check (budget, max_len),
    # before anything compiles; it is withdrawn at once.
    try:
        engine.cancel(engine.submit(Request(prompt=[2] * (args.shared_prefix + args.prompt_len[1]),
                                            max_new_tokens=args.output_len[1])))
    except ValueError as error:
        manager.close()
        raise ValueError(f"the workload's longest request ({args.shared_prefix + args.prompt_len[1]} prompt + "
                         f"{args.output_len[1]} "
                         f"output tokens) cannot run: {error}") from None
    workload = _workload(args, model_config.vocab_size)

    # Warm-up: the engine's two programs (a mixed step and a decode-only one), outside the timed run.
    warm_start = time.perf_counter()
    engine.compile(sampling=False)   # the workload's requests are greedy
    engine.submit(Request(prompt=[2] * min(args.chunk_tokens + 1, args.max_len - 2), max_new_tokens=2))
    engine.run()
    manager.reclaim()
    reuse = ("" if jax.config.jax_compilation_cache_dir
             else "; set JAX_COMPILATION_CACHE_DIR to a folder to reuse these compiles in later runs")
    print(f"warm-up (compiling the mixed and the decode-only step): {time.perf_counter() - warm_start:.1f} s"
          f"{reuse}", flush=True)
    warm_stats = manager.stats()
    engine.reset_stats()
    if not processes.leader:   # the workload's arrivals are timed on process 0: the others replay its calls
        return _follow(engine, processes)
    lockstep = None
    if processes.count > 1:
        lockstep = LockstepLeader(KeyValueChannel(), processes.followers, processes.timeout)

    # The engine keeps only a window of its per-step records (it serves for days); the report wants
    # every step of this finite run, so the bench copies them (and the memory after each step).
    records: list = []
    memory: list[tuple[float, int]] = []
    token_times: dict[int, list[float]] = {}
    outputs: dict[int, list[int]] = {}
    arrival_of: dict[int, float] = {}
    pending = list(workload)
    os.makedirs(args.out, exist_ok=True)
    trace_folder = tempfile.mkdtemp(prefix="trace-", dir=args.out) if args.profile else None
    traced_window: list[float] = []   # when the traced steps began and ended
    start = time.perf_counter()
    with tqdm(total=len(workload), desc="requests", unit="req") as progress:
        while pending or not engine.idle:
            now = time.perf_counter() - start
            while pending and pending[0][0] <= now:
                arrival, request = pending.pop(0)
                request_id = engine.submit(request)
                if lockstep is not None:
                    lockstep.record_submit(request, 1, [request_id])
                arrival_of[request_id] = start + arrival
                token_times[request_id] = []
                outputs[request_id] = []
            if engine.idle:
                if lockstep is not None:
                    lockstep.keep_alive(engine)
                time.sleep(max(0.0, min(pending[0][0] - now, 0.05)))
                continue
            if trace_folder and engine.stats.steps in (PROFILE_FIRST_STEP, PROFILE_FIRST_STEP + PROFILE_STEPS):
                if traced_window:
                    jax.profiler.stop_trace()
                else:
                    jax.profiler.start_trace(trace_folder, create_perfetto_trace=True)
                traced_window.append(time.perf_counter())
            seen = engine.stats.records_total
            if lockstep is not None:
                lockstep.before_step(engine)
            events = engine.step()
            stamp = time.perf_counter()
            records += engine.stats.since(seen)
            memory.append(engine.stats.mapped_bytes[-1])
            for event in events:
                token_times[event.request_id].append(stamp)
                if event.error is None:
                    outputs[event.request_id].append(event.token)
                progress.update(int(event.finished))
    elapsed = time.perf_counter() - start
    if lockstep is not None:
        lockstep.stop(engine)
    if len(traced_window) == 1:   # the run ended inside the window
        jax.profiler.stop_trace()
        traced_window.append(time.perf_counter())
    stats = manager.stats()

    tokens = sum(len(times) for times in token_times.values())
    # Time per output token: the gaps between a request's tokens (each step delivers one).
    per_token = np.concatenate([np.diff(times) for times in token_times.values() if len(times) > 1] or [[np.nan]])
    first = np.array([times[0] - arrival_of[i] for i, times in token_times.items() if times])
    mixed = np.array([r.chunk_tokens > 0 for r in records], bool)
    seconds = np.array([r.seconds for r in records])
    mapping = np.array([r.mapped_pages > 0 for r in records], bool)
    map_seconds = stats["map_seconds"] - warm_stats["map_seconds"]
    hidden = engine.stats.prefetch_seconds

    os.makedirs(args.out, exist_ok=True)
    memory_csv = os.path.join(args.out, "mapped_memory.csv")
    with open(memory_csv, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["seconds", "mapped_mib"])
        for stamp, mapped in memory:
            writer.writerow([f"{stamp - start:.4f}", f"{mapped / 2**20:.1f}"])
    plot = _plot(memory, start, stats, os.path.join(args.out, "mapped_memory.png"))
    tokens_json = os.path.join(args.out, "tokens.json")
    with open(tokens_json, "w") as file:   # in submission order: the workload's order
        json.dump([outputs[request_id] for request_id in sorted(outputs)], file)

    policies = ", ".join(f"{name}={'on' if on else 'off'}" for name, on in (
        ("overlap", engine_config.overlap), ("deferred_reclamation", engine_config.deferred_reclamation),
        ("eager_allocation", engine_config.eager_allocation), ("pipeline", engine_config.pipeline),
        ("prefix_sharing", engine.prefixes.active)))
    print(f"\nvattention serve-bench on {device.device_kind} ({device.platform}), {datetime.date.today()}"
          + (f", tensor parallel over {args.tp} devices" if mesh is not None else ""))
    print(f"model {args.config} (random weights), {args.layout} cache of {np.dtype(cache_config.dtype).name}, "
          f"backend {engine_config.backend}, "
          f"token budget {args.token_budget}, chunk rows of {args.chunk_tokens}, "
          f"{args.max_batch} slots x {manager.capacity} tokens, page {manager.page_bytes >> 10} KiB, "
          f"budget {stats['budget_pages'] * manager.page_bytes >> 20} MiB"
          + (f" ({stats['budget_pages'] * manager.page_bytes // args.tp >> 20} MiB a device)" if mesh is not None else "")
          + f"; {policies}")
    shared = f"{args.shared_prefix}-token shared prefix + " if args.shared_prefix else ""
    print(f"workload: {len(workload)} requests, Poisson {args.rate}/s, prompt {shared}U{tuple(args.prompt_len)}, "
          f"output U{tuple(args.output_len)}")
    print(f"throughput          {tokens / elapsed:10.1f} tokens/s ({tokens} tokens in {elapsed:.2f} s)")
    print(f"time per output token p50 {np.percentile(per_token, 50) * 1e3:.2f} ms, "
          f"p90 {np.percentile(per_token, 90) * 1e3:.2f} ms, p99 {np.percentile(per_token, 99) * 1e3:.2f} ms")
    print(f"first-token latency p50 {np.percentile(first, 50) * 1e3:.1f} ms, p99 {np.percentile(first, 99) * 1e3:.1f} ms")
    print(f"pages mapped {stats['pages_mapped_total'] - warm_stats['pages_mapped_total']}, unmapped "
          f"{stats['pages_unmapped_total'] - warm_stats['pages_unmapped_total']}, peak mapped "
          f"{engine.stats.peak_mapped_bytes >> 20} MiB")
    print(f"mapping time {map_seconds * 1e3:.1f} ms, of it done while the device computed {hidden * 1e3:.1f} ms "
          f"({100 * hidden / map_seconds if map_seconds else 100:.0f}% hidden)")
    dispatch = np.array([r.dispatch_seconds for r in records])
    for name, chosen in (("decode-only", ~mixed), ("mixed", mixed)):
        if chosen.any():
            print(f"{name} steps {chosen.sum()}: {seconds[chosen].mean() * 1e3:.2f} ms mean, "
                  f"p50 {np.percentile(seconds[chosen], 50) * 1e3:.2f} ms from dispatch to tokens read; "
                  f"the dispatch call {dispatch[chosen].mean() * 1e3:.2f} ms mean")
    print(f"wall time {elapsed * 1e3 / max(len(records), 1):.2f} ms a step over all {len(records)} steps")
    if mapping.any() and (~mapping).any():
        print(f"steps {seconds[~mapping].mean() * 1e3:.2f} ms when no page was mapped, "
              f"{seconds[mapping].mean() * 1e3:.2f} ms when pages were mapped (before or during them): "
              f"{mapping.sum()} of {len(seconds)} steps")
    decodes = np.array([r.decodes for r in records])
    decodes = decodes[decodes > 0]
    if decodes.size:   # the batch a budget sustains: what --kv-dtype float8_e4m3fn should double
        print(f"decode batch: mean {decodes.mean():.1f}, p50 {np.percentile(decodes, 50):.0f}, peak {decodes.max()} "
              "requests a step (over the steps that decoded any)")
    print(f"preemptions {engine.stats.preemptions}, prefills {engine.stats.prefills}")
    if engine.config.speculate:
        print(f"speculation ({engine.config.speculate}, k <= {engine.config.num_speculative_tokens}): "
              f"{engine.stats.verifications} verifications, acceptance rate {engine.stats.acceptance_rate:.1%}, "
              f"mean accepted length {engine.stats.mean_accepted_length:.2f} tokens")
    print(_prefix_report(engine, manager, stats))
    held = engine.stats.memory_bound_total
    if held:
        running, ideal = engine.stats.memory_bound_running, engine.stats.memory_bound_ideal
        print(f"admissions the budget held back: {held}; in them the engine ran {running / held:.1f} "
              f"requests where an ideal allocator (exact tokens, no page rounding) would run {ideal / held:.1f}: "
              f"batch {running / ideal:.3f}x the ideal")
    else:
        print("admission was never held back by memory (raise --rate or lower --budget-mib to measure it)")
    print("\n".join(device_lines(manager, devices)))
    print(f"mapped memory over time: {memory_csv}" + (f", {plot}" if plot else " (no matplotlib: no PNG)")
          + f"; tokens: {tokens_json}")
    if traced_window:
        first, last = PROFILE_FIRST_STEP, min(PROFILE_FIRST_STEP + PROFILE_STEPS, len(records))
        _print_device_time(trace_folder, traced_window[1] - traced_window[0], records[first:last])
    elif trace_folder:
        print(f"profile: the run ended before step {PROFILE_FIRST_STEP}, where the traced steps begin")
    manager.close()
    return 0


def _follow(engine: Engine, processes) -> int:
    """A process other than 0: replays process 0's engine calls until it stops; 0, or 1 when process
    0 stalled or the plans diverged."""
    try:
        steps = follow(engine, KeyValueChannel(), processes.process_id, processes.timeout)
    except ProcessGroupError as error:
        print(f"vattention serve-bench: error: {error}", file=sys.stderr)
        return 1
    finally:
        engine.manager.close()
    print(f"process {processes.process_id} of {processes.count}: followed process 0 for {steps} steps")
    return 0


def _prefix_report(engine: Engine, manager: CacheManager, stats: dict) -> str:
    """Prefill tokens computed against the prompts' and what prefix sharing mapped and saved."""
    run = engine.stats
    computed = f"prefill tokens computed {run.prefill_tokens} of {run.prompt_tokens} prompt tokens admitted " \
               f"({100 * run.prefill_tokens / max(run.prompt_tokens, 1):.1f}%)"
    if not engine.prefixes.active:
        why = ("off" if not engine.config.prefix_sharing else
               "not possible here (tokens_per_page 0: the driver cannot map one page at several addresses, "
               "or a page does not hold a whole number of tokens)")
        return f"{computed}; prefix sharing {why}"
    return (f"{computed}; prefix sharing ({engine.prefixes.tokens_per_page} tokens a page): "
            f"{run.shared_admissions} of {run.admissions} admissions shared {run.shared_tokens} tokens "
            f"({run.shared_pages} pages), {run.prefix_waits} admission waits for a prefix being computed; "
            f"peak memory saved {run.peak_bytes_saved / 2**20:.1f} MiB; prefix cache at the end "
            f"{stats['cached_pages']} pages, {stats['pages_evicted_total']} evicted")


def _print_device_time(folder: str, elapsed: float, records: list) -> None:
    """The device's busy time over the traced steps, by kernel kind, per engine step; the rest is
    idle (the device waited for the host)."""
    path, kernels = traced_kernels(pathlib.Path(folder))
    if not kernels or not records:
        print("profile: no device kernel events in the trace (not a GPU?)")
        return
    steps = len(records)
    by_kind, idle, top = breakdown(kernels, steps, elapsed)
    per_step = elapsed * 1e3 / steps
    mixed = sum(r.chunk_tokens > 0 for r in records)
    print(f"profile of steps {PROFILE_FIRST_STEP}-{PROFILE_FIRST_STEP + steps - 1} ({steps - mixed} decode-only, "
          f"{mixed} mixed; {sum(r.decodes for r in records) / steps:.1f} decodes a step; {path}):")
    print(f"  per step {per_step:.2f} ms, device busy {1 - idle / per_step:.0%}; "
          + ", ".join(f"{kind} {by_kind[kind]:.2f}" for kind in KINDS) + f", idle {idle:.2f} ms")
    for name, kind, ms, calls in top[:8]:
        print(f"  {ms:8.3f} ms/step {calls:6.1f} calls/step  {kind:9s} {name[:80]}")


def _plot(samples, start, stats, path) -> str | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    seconds = [stamp - start for stamp, _ in samples]
    mapped = [value / 2**20 for _, value in samples]
    figure, axis = plt.subplots(figsize=(8, 3.5))
    axis.plot(seconds, mapped, label="mapped")
    axis.axhline(stats["budget_pages"] * stats["page_bytes"] / 2**20, color="gray", linestyle="--", label="budget")
    axis.set_xlabel("seconds")
    axis.set_ylabel("MiB")
    axis.set_title("KV cache memory mapped over time")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


if __name__ == "__main__":
    raise SystemExit(standalone(__doc__, add_arguments, run))
