"""`vattention bench speculate`: what speculative decoding gains, with and without it, on the engine.

For each workload and batch size, the same prompts run through an engine without speculation and
through one with prompt lookup (``EngineConfig(speculate="ngram")``), all submitted at once, every
request generating exactly ``--max-new-tokens`` tokens (no stop token, so both runs do the same
work). Each row gives the wall time, tokens per second, the time per output token (each request's
time from its first token to its last over its tokens after the first, averaged), the speed-up
against no speculation, the acceptance rate and mean accepted length, and whether every greedy
output equals the plain engine's token for token.

With ``--draft PATH`` a third engine speculates with that draft model
(:class:`~jax_vattention.engine.draft.DraftProposer`, its own cache), and its rows add the draft's
time a step (``draft_ms_per_step``) beside the step's own (``verify_ms_per_step``: the median step,
dispatch to tokens read).

Workloads:

* ``grounded``: the continuation copies the input, as in "repeat / correct / reformat this text"
  requests: a passage, then an instruction to repeat it and the repetition's first words, so the
  model (real weights, e.g. ``--model smollm2-135m``) goes on copying;
* ``random``: prompts of random token ids, where nothing the prompt holds predicts the output:
  speculation must cost little there (the speculator switches itself off per request).

The first run of each engine (compiling) is not timed; prefix sharing is off so that no run finds
an earlier run's prompt pages cached.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import time

import jax
import numpy as np

from jax_vattention.app.assembly import assemble, open_draft
from jax_vattention.app.cli import standalone
from jax_vattention.bench.rows_csv import write_rows
from jax_vattention.app.commands.model_source import add_model_arguments
from jax_vattention.attention import BACKENDS
from jax_vattention.cache.config import LAYOUTS
from jax_vattention.engine import Engine, EngineConfig, Request

WORKLOADS = ("grounded", "random")

# Passages the grounded prompts ask the model to repeat (written for this benchmark).
PASSAGES = (
    "The virtual cache reserves one contiguous range of addresses for every sequence and maps physical "
    "pages into it only as the sequence grows, so attention kernels read it as an ordinary array.",
    "To bake bread, mix flour, water, salt and yeast, knead the dough for ten minutes, let it rise for "
    "an hour, shape the loaf, let it rise again and bake it in a hot oven until the crust is brown.",
    "Meeting notes: the team agreed to ship the new release on Friday, to move the design review to "
    "Tuesday morning, and to ask the support group for the three most common customer questions.",
    "def add(a, b):\n    return a + b\n\n\ndef multiply(a, b):\n    return a * b\n\n\n"
    "def subtract(a, b):\n    return a - b\n",
    "Rivers carry water from the mountains to the sea. Along the way they shape valleys, feed forests "
    "and farms, and give towns their water, their trade routes and often their names.",
    "Shopping list: two liters of milk, a dozen eggs, one loaf of bread, three apples, a bag of rice, "
    "a bottle of olive oil, some fresh basil and a small piece of parmesan cheese.",
    "The committee reviewed the budget line by line, approved the spending on the new library wing, "
    "postponed the decision on the parking lot, and asked for a revised estimate by next month.",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen. It happens in the "
    "chloroplasts of plant cells, and nearly all life on Earth depends on the energy it stores.",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--backend", choices=("auto", *BACKENDS), default="auto",
                        help="attention kernel; auto: the device's default")
    parser.add_argument("--layout", choices=("auto", *LAYOUTS), default="auto")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8], metavar="B",
                        help="requests submitted together (default 1 2 4 8)")
    parser.add_argument("--workloads", choices=WORKLOADS, nargs="+", default=list(WORKLOADS))
    parser.add_argument("--max-new-tokens", type=int, default=128, help="tokens each request generates")
    parser.add_argument("--num-speculative-tokens", type=int, default=4, metavar="K")
    parser.add_argument("--draft", metavar="PATH", default=None,
                        help="also speculate with this draft model (PATH as --model takes it; it must share the "
                             "model's tokenizer): its cost per step and its acceptance")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each point (the best is kept)")
    parser.add_argument("--out", default=os.path.join("out", "bench-speculate.csv"), help="CSV of the rows")


def grounded_prompts(loaded, count: int) -> list[list[int]]:
    """``count`` prompts that ask for a passage back and start the answer (token ids)."""
    prompts = []
    for i in range(count):
        passage = PASSAGES[i % len(PASSAGES)]
        opening = " ".join(passage.split()[:4])
        prompts.append(loaded.encode(f"Text:\n{passage}\n\nThe same text, repeated word for word:\n{opening}"))
    return prompts


def random_prompts(vocab: int, count: int, length: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, length).tolist() for _ in range(count)]


def timed_run(engine: Engine, prompts: list[list[int]], max_new_tokens: int) -> dict:
    """Runs ``prompts`` at once to ``max_new_tokens`` each; returns the tokens, the wall time and the
    mean time per output token."""
    engine.reset_stats()
    ids = [engine.submit(Request(prompt=prompt, max_new_tokens=max_new_tokens)) for prompt in prompts]
    stamps: dict[int, list[float]] = {request_id: [] for request_id in ids}
    outputs: dict[int, list[int]] = {request_id: [] for request_id in ids}
    start = time.perf_counter()
    while not engine.idle:
        events = engine.step()
        now = time.perf_counter()
        for event in events:
            if event.error is not None:
                raise RuntimeError(f"request {event.request_id} failed: {event.error}")
            stamps[event.request_id].append(now)
            outputs[event.request_id].append(event.token)
    elapsed = time.perf_counter() - start
    per_token = [(times[-1] - times[0]) / (len(times) - 1) for times in stamps.values() if len(times) > 1]
    stats = engine.stats
    # A step's own time (dispatch to tokens read): with speculation, a verifying step's cost.
    step_ms = float(np.median([record.seconds for record in stats.records])) * 1e3 if stats.records else 0.0
    return dict(tokens=[outputs[i] for i in ids], seconds=elapsed, tpot=float(np.mean(per_token)),
                acceptance=stats.acceptance_rate, accepted_length=stats.mean_accepted_length,
                verifications=stats.verifications, step_ms=step_ms)


def run(args: argparse.Namespace) -> int:
    if min(args.batches) < 1 or args.max_new_tokens < 2 or args.repeats < 1:
        raise ValueError("--batches must be at least 1, --max-new-tokens at least 2 and --repeats at least 1")
    args.tp = 1
    largest = max(args.batches)
    built = assemble(args, max_batch=largest, max_len=1024 + args.max_new_tokens + args.num_speculative_tokens + 16)
    loaded = built.loaded
    vocab = loaded.model.config.vocab_size
    device = jax.devices()[0]
    print(f"vattention bench speculate on {device.device_kind} ({device.platform}), {datetime.date.today()}; "
          f"model {loaded.source}, {built.layout} cache, backend {built.backend}, k <= {args.num_speculative_tokens}")
    rows = []
    args.speculate = f"draft:{args.draft}" if args.draft else None
    with built.open() as manager, contextlib.ExitStack() as closing:
        draft, draft_host = open_draft(args, built)
        if draft_host is not None:
            closing.enter_context(draft_host)
        engines = {
            mode: Engine(loaded.model, manager, EngineConfig(
                backend=built.backend, prefix_sharing=False, speculate=mode,
                num_speculative_tokens=args.num_speculative_tokens), draft=draft if mode == "draft" else None)
            for mode in (None, "ngram", *(("draft",) if draft is not None else ()))}
        for workload in args.workloads:
            for batch in args.batches:
                if workload == "grounded":
                    if loaded.tokenizer is None:
                        raise ValueError("the grounded workload needs a model with a tokenizer (or a byte vocabulary)")
                    prompts = grounded_prompts(loaded, batch)
                else:
                    prompts = random_prompts(vocab, batch, 64, seed=batch)
                results = {}
                for mode, engine in engines.items():
                    timed_run(engine, prompts, args.max_new_tokens)   # compiles (first time) and warms up
                    runs = []
                    for _ in range(args.repeats):
                        calls, seconds = (draft.calls, draft.seconds) if mode == "draft" else (0, 0.0)
                        runs.append(timed_run(engine, prompts, args.max_new_tokens))
                        if mode == "draft":
                            runs[-1]["draft_ms"] = (draft.seconds - seconds) * 1e3 / max(draft.calls - calls, 1)
                    results[mode] = min(runs, key=lambda result: result["seconds"])
                plain = results[None]
                for mode, result in results.items():
                    tokens = sum(len(t) for t in result["tokens"])
                    row = dict(workload=workload, batch=batch, speculate=mode or "off",
                               seconds=round(result["seconds"], 4), tokens_per_s=round(tokens / result["seconds"], 1),
                               tpot_ms=round(result["tpot"] * 1e3, 3),
                               speedup=round(plain["seconds"] / result["seconds"], 3),
                               acceptance_rate=round(result["acceptance"], 3),
                               mean_accepted_length=round(result["accepted_length"], 3),
                               same_tokens=result["tokens"] == plain["tokens"],
                               draft_ms_per_step=round(result.get("draft_ms", 0.0), 3),
                               verify_ms_per_step=round(result["step_ms"], 3))
                    rows.append(row)
                    print(f"{workload:8s} batch {batch:2d} {row['speculate']:5s} {row['tokens_per_s']:9.1f} tokens/s  "
                          f"TPOT {row['tpot_ms']:7.3f} ms  x{row['speedup']:.2f}  acceptance "
                          f"{row['acceptance_rate']:.1%}  mean accepted length {row['mean_accepted_length']:.2f}  "
                          f"same tokens: {row['same_tokens']}  step {row['verify_ms_per_step']:.3f} ms"
                          + (f"  draft {row['draft_ms_per_step']:.3f} ms" if mode == "draft" else ""), flush=True)
    write_rows(args.out, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(standalone(__doc__, add_arguments, run))
