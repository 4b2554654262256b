"""``vattention bench samples``: ``n`` samples of one prompt, forked against prefilled ``n`` times.

Three runs of one prompt of ``--prompt-len`` tokens on one engine, each sample generating exactly
``--max-new-tokens`` tokens (no stop token), sampled (temperature 1, a seed, so the samples differ):

* ``n=1``: one request;
* ``n=N forked``: :meth:`Engine.submit_samples <jax_vattention.engine.Engine.submit_samples>`, which
  prefills the prompt once and forks its slot into ``N`` (:mod:`~jax_vattention.engine.groups`);
* ``N independent``: ``N`` requests of the same prompt (seeds ``seed + i``, as the forked samples
  draw), each prefilling it: what a system without forks pays.

For each: the time to first token from submit (the first sample's, and until every sample has
one), the total time, the prefills the engine ran, and the peak memory over the steps. Memory is
physical: ``mapped_bytes`` counts a page once per address it is mapped at, so a page a fork shares
counts ``N`` times there; the physical bytes are ``mapped_bytes - bytes_saved`` (the manager's
count of every mapping beyond a page's first). Both are reported.

The target (issue 22), from the page arithmetic of the cache host (:meth:`CacheHost.pages_for`)::

    prompt pages   = pages_for(prompt_len)
    a tail         = pages_for(prompt_len + max_new_tokens - 1) - pages_for(prompt_len)
    target pages   = prompt pages + N tails
    memory ratio   = peak physical bytes (forked) / (target pages * page_bytes)     <= 1.15
    TTFT ratio     = time until every forked sample has a token / TTFT (n=1)        <= 1.2
    prefills       = 1 for the forked run

(the last generated token is never written, so a sample holds ``prompt_len + max_new_tokens - 1``
tokens). The memory ratio is above 1 by what the page arithmetic leaves out: each fork's private
copy of the prompt's partly filled last page.

Why one engine for all three, compiled and warmed up first: the three runs then differ only in
how the prompt reaches its samples. Prefix sharing is off, so no run finds an earlier run's prompt
pages cached; forks do not depend on it (they need only a host whose pages alias:
``tokens_per_page > 0``). Between runs the pages of the finished slots are unmapped
(:meth:`reclaim`), so every run starts from nothing mapped. Times are the best of ``--repeats``
runs, memory the largest.

Forks need pages that one physical page backs at several addresses: CUDA's driver. The CPU
backend's own memory cannot (``tokens_per_page`` 0), and the benchmark refuses there; with
``--fake-driver`` it runs on the fake driver, whose pages are host memory that aliases: its page
counts are the page manager's own and hold on any driver, its times are a CPU's and say nothing
about the target's.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import time
from typing import Callable

import jax
import numpy as np
from flax import nnx

from jax_vattention.app.assembly import cache_config_for, cache_dtype, check_memory, choose_kernel, mesh_for, open_host
from jax_vattention.app.cli import standalone
from jax_vattention.bench.rows_csv import write_rows
from jax_vattention.attention import BACKENDS
from jax_vattention.cache.config import LAYOUTS
from jax_vattention.decode.mesh import init_sharded
from jax_vattention.engine import Engine, EngineConfig, Request
from jax_vattention.engine.groups import sample_requests
from jax_vattention.models import Llama, config_for_device

MEMORY_TARGET = 1.15   # forked peak memory / (one prompt's pages + N tails)
TTFT_TARGET = 1.2      # forked time to every sample's first token / n=1's
FAKE_PAGE_KIB = 4      # the fake driver's page where --page-kib is not given


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None,
                        help="model shape, random weights (default: llama-3-8b on a GPU, tiny on a CPU)")
    parser.add_argument("--prompt-len", type=int, default=2048, help="prompt tokens (default 2048)")
    parser.add_argument("--samples", type=int, default=8, metavar="N", help="samples of the prompt (default 8)")
    parser.add_argument("--max-new-tokens", type=int, default=64,
                        help="tokens each sample generates, exactly (no stop token; default 64)")
    parser.add_argument("--layout", choices=LAYOUTS, default="interleaved")
    parser.add_argument("--backend", choices=("auto", *BACKENDS), default="auto",
                        help="attention kernel; auto: the device's default for the layout")
    parser.add_argument("--page-kib", type=int, default=None,
                        help=f"page size (default: the driver's; {FAKE_PAGE_KIB} KiB with --fake-driver)")
    parser.add_argument("--token-budget", type=int, default=EngineConfig.token_budget,
                        help="tokens per engine step (decodes + prompt chunks)")
    parser.add_argument("--chunk-tokens", type=int, default=EngineConfig.chunk_tokens,
                        help="the width of a prefill chunk row")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed runs of each case: times are the best, memory the largest (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="weights and the samples' seed")
    parser.add_argument("--tp", type=int, default=1,
                        help="tensor-parallel degree: model and cache split over the first TP devices (default 1)")
    parser.add_argument("--fake-driver", action="store_true",
                        help="CPU only: pages from the fake driver, host memory that aliases, so forks run; "
                             "its page counts are real, its times are not the target's")
    parser.add_argument("--out", default=os.path.join("out", "bench-samples.csv"), help="CSV of the rows")


@dataclasses.dataclass
class SampleRun:
    """One measured case: its times (seconds from submit) and its peak memory over the steps."""

    case: str
    requests: int
    prefills: int              # prompts whose last chunk ran (engine.stats.prefills)
    prefill_tokens: int        # tokens the prefill chunks computed
    ttft_first: float          # until the first request's first token
    ttft_all: float            # until every request has its first token
    seconds: float             # until the last token
    peak_mapped_bytes: int     # every mapping counted (a shared page once per address)
    peak_physical_bytes: int   # mapped_bytes - bytes_saved: each physical page once
    outputs: list[list[int]]   # each request's tokens, in submit order


def measure(engine: Engine, case: str, submit: Callable[[], list[int]]) -> SampleRun:
    """Runs ``submit()`` (it submits and returns the request ids) to the end on an engine with
    nothing mapped; the times from before ``submit`` and the memory after every step."""
    host = engine.manager
    host.reclaim()   # the previous run's slots unmap: every run starts from nothing mapped
    before = host.stats()
    base_mapped, base_physical = before["mapped_bytes"], before["mapped_bytes"] - before["bytes_saved"]
    engine.reset_stats()
    start = time.perf_counter()
    ids = submit()
    first: dict[int, float] = {}
    outputs: dict[int, list[int]] = {request_id: [] for request_id in ids}
    peak_mapped = peak_physical = 0
    while not engine.idle:
        events = engine.step()
        now = time.perf_counter() - start
        stats = host.stats()
        peak_mapped = max(peak_mapped, stats["mapped_bytes"] - base_mapped)
        peak_physical = max(peak_physical, stats["mapped_bytes"] - stats["bytes_saved"] - base_physical)
        for event in events:
            if event.error is not None:
                raise RuntimeError(f"{case}: request {event.request_id} failed: {event.error}")
            first.setdefault(event.request_id, now)
            outputs[event.request_id].append(event.token)
    seconds = time.perf_counter() - start
    return SampleRun(case=case, requests=len(ids), prefills=engine.stats.prefills,
                     prefill_tokens=engine.stats.prefill_tokens, ttft_first=first[ids[0]],
                     ttft_all=max(first.values()), seconds=seconds, peak_mapped_bytes=peak_mapped,
                     peak_physical_bytes=peak_physical, outputs=[outputs[i] for i in ids])


def best_of(runs: list[SampleRun]) -> SampleRun:
    """The runs of one case as one: the least of each time, the most of each memory figure."""
    return dataclasses.replace(runs[-1], ttft_first=min(r.ttft_first for r in runs),
                               ttft_all=min(r.ttft_all for r in runs), seconds=min(r.seconds for r in runs),
                               peak_mapped_bytes=max(r.peak_mapped_bytes for r in runs),
                               peak_physical_bytes=max(r.peak_physical_bytes for r in runs))


def target_pages(host, prompt_len: int, samples: int, max_new_tokens: int) -> dict:
    """The page arithmetic of the target: one prompt's pages and ``samples`` generated tails."""
    prompt = host.pages_for(prompt_len)
    tail = host.pages_for(prompt_len + max_new_tokens - 1) - prompt
    return dict(prompt_pages=prompt, tail_pages=tail, target_pages=prompt + samples * tail)


def check_forks(host) -> None:
    """``ValueError`` where ``host`` cannot fork (its samples would each prefill the prompt)."""
    if host.tokens_per_page == 0:
        raise ValueError("forks are unavailable here: this cache's pages cannot be mapped at several addresses "
                         "(tokens_per_page 0; the CPU backend's own memory), so n samples would prefill n times. "
                         "Run on a GPU (CUDA's driver), or on a CPU with --fake-driver for the page counts "
                         "(its times are not the target's)")


def bench_samples(engine: Engine, prompt: list[int], samples: int, max_new_tokens: int, *, seed: int = 0,
                  repeats: int = 1) -> dict[str, SampleRun]:
    """The three cases (``n=1``, ``n=N forked``, ``N independent``) of ``prompt`` on ``engine``, each
    run once untimed (compiling, warming up) and then ``repeats`` times; by case name."""
    check_forks(engine.manager)
    request = Request(prompt=list(prompt), max_new_tokens=max_new_tokens, temperature=1.0, seed=seed)
    cases = {
        "n=1": lambda: [engine.submit(request)],
        f"n={samples} forked": lambda: engine.submit_samples(request, samples),
        f"{samples} independent": lambda: [engine.submit(one) for one in sample_requests(request, samples)],
    }
    results = {}
    for case, submit in cases.items():
        measure(engine, case, submit)   # compiles (first time) and warms up
        results[case] = best_of([measure(engine, case, submit) for _ in range(repeats)])
    return results


def rows_of(results: dict[str, SampleRun], pages: dict, page_bytes: int, samples: int) -> list[dict]:
    """The CSV's rows: each case's figures, and its ratios against n=1 and the target."""
    single, forked, independent = results.values()
    target_bytes = pages["target_pages"] * page_bytes
    rows = []
    for run in results.values():
        rows.append(dict(
            case=run.case, requests=run.requests, prefills=run.prefills, prefill_tokens=run.prefill_tokens,
            ttft_first_ms=round(run.ttft_first * 1e3, 3), ttft_all_ms=round(run.ttft_all * 1e3, 3),
            seconds=round(run.seconds, 4),
            peak_mapped_pages=run.peak_mapped_bytes // page_bytes,
            peak_physical_pages=run.peak_physical_bytes // page_bytes,
            peak_physical_mib=round(run.peak_physical_bytes / 2**20, 3),
            distinct_outputs=len({tuple(tokens) for tokens in run.outputs}),
            memory_vs_target=round(run.peak_physical_bytes / target_bytes, 4),
            memory_vs_n1=round(run.peak_physical_bytes / single.peak_physical_bytes, 4),
            ttft_all_vs_n1=round(run.ttft_all / single.ttft_all, 4),
            same_tokens_as_independent=(run.outputs == independent.outputs[:run.requests]
                                        if run is not independent else ""),
            page_bytes=page_bytes, samples=samples, **pages))
    return rows


def run(args: argparse.Namespace, model: Llama | None = None) -> int:
    """The benchmark of ``args``; ``model``: one built already, of the shape ``--config`` names (the
    tests pass their session's tiny model instead of building its random weights again)."""
    validate(args)
    device = jax.devices()[0]
    if args.fake_driver and device.platform != "cpu":
        raise ValueError(f"--fake-driver is for a CPU (its pages are host memory); this device is a "
                         f"{device.platform}: run without it")
    name = args.config or ("tiny" if device.platform == "cpu" else "llama-3-8b")
    model_config = config_for_device(name, device) if model is None else model.config
    backend, layout = choose_kernel(None if args.backend == "auto" else args.backend, args.layout, device,
                                    cache_dtype(model_config))
    mesh = mesh_for(args.tp)
    page_kib = args.page_kib or (FAKE_PAGE_KIB if args.fake_driver else None)
    cache_config = cache_config_for(model_config, max_batch=args.samples,
                                    max_len=args.prompt_len + args.max_new_tokens, layout=layout,
                                    page_bytes=page_kib * 1024 if page_kib else None)
    check_memory(model_config, name, cache_config, mesh)
    if model is None:   # over a mesh, each device makes only its share of the weights
        model = (Llama(model_config, rngs=nnx.Rngs(args.seed)) if mesh is None
                 else init_sharded(Llama, model_config, mesh, seed=args.seed))
    elif mesh is not None:
        raise ValueError("a model built already runs on one device: --tp 1")
    factory = None
    if args.fake_driver:
        from jax_vattention._core import FakeDriver
        factory = lambda _device: FakeDriver(page_kib * 1024, host_pages=True)  # noqa: E731
    prompt = np.random.default_rng([args.seed, 1]).integers(2, model_config.vocab_size, args.prompt_len).tolist()
    with open_host(cache_config, mesh, driver_factory=factory) as host:
        check_forks(host)
        engine = Engine(model, host, EngineConfig(backend=backend, prefix_sharing=False, seed=args.seed,
                                                  token_budget=args.token_budget, chunk_tokens=args.chunk_tokens))
        results = bench_samples(engine, prompt, args.samples, args.max_new_tokens, seed=args.seed,
                                repeats=args.repeats)
        pages = target_pages(host, args.prompt_len, args.samples, args.max_new_tokens)
        page_bytes, tokens_per_page = host.page_bytes, host.tokens_per_page
    rows = rows_of(results, pages, page_bytes, args.samples)
    where = (f"{device.device_kind} ({device.platform})" + (f", tensor parallel over {args.tp}" if mesh else "")
             + (", FAKE DRIVER: host pages that alias; page counts hold, times are a CPU's" if args.fake_driver
                else ""))
    print(f"vattention bench samples on {where}, {datetime.date.today()}; model {name} (random weights), "
          f"{layout} cache, backend {backend}, page {page_bytes >> 10} KiB ({tokens_per_page} tokens), "
          f"prompt {args.prompt_len} tokens, {args.max_new_tokens} new tokens a sample, prefix sharing off")
    print(f"{'case':>16s} {'prefills':>8s} {'TTFT first':>11s} {'TTFT all':>10s} {'total':>9s} "
          f"{'mapped':>7s} {'physical':>8s} {'MiB':>9s} {'distinct':>8s}")
    for row in rows:
        print(f"{row['case']:>16s} {row['prefills']:8d} {row['ttft_first_ms']:8.1f} ms {row['ttft_all_ms']:7.1f} ms "
              f"{row['seconds']:7.3f} s {row['peak_mapped_pages']:7d} {row['peak_physical_pages']:8d} "
              f"{row['peak_physical_mib']:9.1f} {row['distinct_outputs']:8d}")
    print("(pages: the peak over the steps, every mapping counted / each physical page once)")
    print(verdict(rows, fake_driver=args.fake_driver))
    write_rows(args.out, rows)
    return 0


def verdict(rows: list[dict], *, fake_driver: bool) -> str:
    """The target's three figures against its bounds, one line each."""
    single, forked, independent = rows
    samples = forked["samples"]
    prefills_ok = forked["prefills"] == 1
    memory_ok = forked["memory_vs_target"] <= MEMORY_TARGET
    ttft_ok = forked["ttft_all_vs_n1"] <= TTFT_TARGET
    ttft = ("not judged: fake driver on a CPU" if fake_driver else ("holds" if ttft_ok else "MISSED"))
    lines = [
        f"target pages: one prompt {forked['prompt_pages']} + {samples} tails of {forked['tail_pages']} = "
        f"{forked['target_pages']} pages ({forked['target_pages'] * forked['page_bytes'] / 2**20:.1f} MiB)",
        f"prefills of the forked run: {forked['prefills']} (target 1: {'holds' if prefills_ok else 'MISSED'});"
        f" independent: {independent['prefills']}",
        f"memory forked / target pages: {forked['memory_vs_target']:.3f} (target <= {MEMORY_TARGET}: "
        f"{'holds' if memory_ok else 'MISSED'}); forked / n=1: {forked['memory_vs_n1']:.3f}; "
        f"independent / n=1: {independent['memory_vs_n1']:.3f}",
        f"TTFT forked (every sample) / n=1: {forked['ttft_all_vs_n1']:.3f} (target <= {TTFT_TARGET}: {ttft}); "
        f"independent / n=1: {independent['ttft_all_vs_n1']:.3f}",
        f"forked samples' tokens equal the independent requests' (seeds seed + i): "
        f"{forked['same_tokens_as_independent']}",
    ]
    return "\n".join(lines)


def validate(args: argparse.Namespace) -> None:
    """``ValueError`` for options the run would trip over, before anything is built."""
    for name, least in (("prompt_len", 2), ("samples", 2), ("max_new_tokens", 1), ("repeats", 1),
                        ("token_budget", 1), ("chunk_tokens", 1)):
        if getattr(args, name) < least:
            raise ValueError(f"--{name.replace('_', '-')} must be at least {least}; got {getattr(args, name)}")
    if args.page_kib is not None and args.page_kib < 1:
        raise ValueError(f"--page-kib must be at least 1; got {args.page_kib}")


if __name__ == "__main__":
    raise SystemExit(standalone(__doc__, add_arguments, run))
