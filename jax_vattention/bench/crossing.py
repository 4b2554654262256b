"""``vattention bench crossing``: what a decode step that crosses a page costs.

Every slot of a Llama-shaped cache starts ``--before`` tokens short of a page
boundary, so all of them write their first token into a new page at the same
decode step. Each step is one compiled engine chunk of one decode step, timed
from dispatch to its tokens on the host. The new pages are mapped three ways:

* ``premapped``: at admission; nothing is mapped during the run, so what is
  left is the kernels' own cost of reading a new page;
* ``in-graph``: by the mapping op inside the step, on the host while the step
  is dispatched (the device waits for it);
* ``prefetched``: by the host while the device computes earlier steps, up to
  ``--prefetch`` tokens ahead of every slot (default: the engine's horizon
  for one-step chunks), one slot's page at a time while the step in flight
  lasts (the engine's overlap policy).

For each, the report gives the median step time away from the boundary, the
crossing step's and their ratio, the slowest step's ratio (where a mapping
that did not hide would show), the slowest step against a premapped plain
step (mapping that hid by slowing every step shows here), and the host time
the mapping calls took per page. Setting
``XLA_FLAGS=--xla_gpu_enable_command_buffer=`` before the run turns XLA's
CUDA graphs off, for comparison.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from jax_vattention.app.cli import standalone
from jax_vattention.cache.config import LAYOUTS, CacheConfig
from jax_vattention.attention.backends import backend_for
from jax_vattention.engine.config import EngineConfig
from jax_vattention.engine.memory import expected_end
from jax_vattention.bench.decode_chunk import decode_chunk_fn
from jax_vattention.cache.manager import CacheManager, default_driver
from jax_vattention.models import Llama, config_for_device

MODES = ("premapped", "in-graph", "prefetched")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None,
                        help="model shape (tiny, yi-6b, llama-3-8b, yi-34b); default llama-3-8b on a GPU, "
                             "tiny elsewhere (a CPU takes minutes a step for a Llama-3-8B shape)")
    parser.add_argument("--layout", choices=LAYOUTS, default="per_layer", help="cache layout")
    parser.add_argument("--backend", default=None, help="attention backend (default: cudnn for per_layer, "
                        "pallas for interleaved on GPU; xla on CPU)")
    parser.add_argument("--batch", type=int, default=16, help="slots, all crossing together")
    parser.add_argument("--pages", type=int, default=1, help="pages each slot fills before the boundary")
    parser.add_argument("--before", type=int, default=20, help="decode steps before the crossing one")
    parser.add_argument("--after", type=int, default=6, help="decode steps after it")
    parser.add_argument("--prefetch", type=int, default=EngineConfig().prefetch_horizon,
                        help="tokens mapped ahead in the prefetched mode (default: the engine's, for one-step chunks)")
    parser.add_argument("--repeats", type=int, default=10, help="runs of each mode; the report takes medians")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))


def _run_mode(mode, args, manager, decode, state, start_len) -> tuple[np.ndarray, float, int]:
    """Step times [repeats, steps] of one mode, and the host seconds and pages its mapping took."""
    batch, steps = args.batch, args.before + 1 + args.after
    ones = np.ones(batch, np.int32)
    times = np.zeros((args.repeats, steps))
    map_seconds, pages = 0.0, 0
    for repeat in tqdm(range(args.repeats), desc=mode, unit="run", leave=False):
        lookahead = steps if mode == "premapped" else 0
        slots = [manager.alloc(start_len, lookahead=lookahead) for _ in range(batch)]
        lengths = np.full(batch, start_len, np.int32)
        last = np.full(batch, 2, np.int32)
        before = manager.stats()
        for step in range(steps):
            manager.reserve_growth(1)             # creates (not maps) the step's pages, as the engine does
            begin = time.perf_counter()
            outputs = decode(state, manager.cache, jnp.asarray(last), jnp.asarray(lengths), jnp.ones(batch, bool),
                             jnp.zeros(batch, jnp.int32), jnp.asarray(ones * (steps + 1)),
                             jnp.full((batch, 1), -1, jnp.int32), jnp.zeros(batch, jnp.float32),
                             jnp.zeros(batch, jnp.int32), jnp.ones(batch, jnp.float32), jax.random.key(step))
            manager.cache = outputs[0]
            if mode == "prefetched":
                deadline = expected_end(begin, times[repeat, :step])
                manager.prefetch_while_busy(outputs[5], args.prefetch, deadline)
            last, lengths = np.asarray(outputs[1]), np.asarray(outputs[2])
            times[repeat, step] = time.perf_counter() - begin
        after = manager.stats()
        map_seconds += after["map_seconds"] - before["map_seconds"]
        pages += after["pages_mapped_total"] - before["pages_mapped_total"]
        for slot in slots:
            manager.free(slot)
        manager.reclaim()                         # the next repeat maps its pages afresh
    return times, map_seconds, pages


def _plain_step(median: np.ndarray, before: int) -> float:
    """The median step time away from the first (compiling) step and the crossing one."""
    return float(np.median(np.delete(median, [0, before])))


def run(args: argparse.Namespace) -> int:
    device = jax.devices()[0]
    if args.config is None:
        args.config = "llama-3-8b" if device.platform == "gpu" else "tiny"
        if device.platform != "gpu":
            print("not a GPU: the tiny shape (pass --config for another); step times on a CPU say little "
                  "about the cost of mapping a GPU page", file=sys.stderr)
    model_config = config_for_device(args.config, device)
    backend = backend_for(args.backend, args.layout, device, model_config.jnp_dtype)
    cache_config = CacheConfig(
        num_layers=model_config.num_layers, max_batch=args.batch, max_len=1, kv_heads=model_config.num_kv_heads,
        head_dim=model_config.head_dim, dtype=model_config.jnp_dtype, layout=args.layout)
    tokens_per_page = default_driver(device).granularity // cache_config.token_bytes
    if args.before >= args.pages * tokens_per_page:
        raise SystemExit(f"--before {args.before} must be below the {args.pages * tokens_per_page} tokens "
                         f"of --pages {args.pages}")
    start_len = args.pages * tokens_per_page - args.before
    max_len = (args.pages + 1) * tokens_per_page
    cache_config = dataclasses.replace(cache_config, max_len=max_len)
    graphdef, state = nnx.split(Llama(model_config, rngs=nnx.Rngs(0)))
    decode = decode_chunk_fn(graphdef, backend, 1, sampling=False)

    print(f"vattention bench crossing on {device.device_kind} ({device.platform}), {datetime.date.today()}")
    print(f"model {args.config} (random weights), {args.layout} cache, backend {backend}, batch {args.batch}, "
          f"{tokens_per_page} tokens per page, boundary at token {args.pages * tokens_per_page}; "
          f"one decode step per call, {args.repeats} repeats")
    print(f"{'mode':<11} {'plain ms':>9} {'crossing ms':>12} {'ratio':>7} {'slowest':>8} {'slow/premap':>11} "
          f"{'map µs/page':>12}  "
          f"median step times around the crossing (ms)")
    with CacheManager(cache_config, device) as manager:
        warm_up, _, _ = _run_mode("premapped", args, manager, decode, state, start_len)  # compiles, fills the pool
        baseline = _plain_step(np.median(warm_up, axis=0), args.before)
        for mode in args.modes:
            times, map_seconds, pages = _run_mode(mode, args, manager, decode, state, start_len)
            median = np.median(times, axis=0)          # [steps]
            plain = _plain_step(median, args.before)
            if mode == "premapped":
                baseline = plain
            crossing = median[args.before]
            per_page = f"{map_seconds / pages * 1e6:.1f}" if pages else "-"
            profile = " ".join(f"[{t * 1e3:.2f}]" if i == args.before else f"{t * 1e3:.2f}"
                               for i, t in enumerate(median))
            slowest = median[1:].max()
            print(f"{mode:<11} {plain * 1e3:9.2f} {crossing * 1e3:12.2f} {crossing / plain:7.3f} "
                  f"{slowest / plain:8.3f} {slowest / baseline:11.3f} {per_page:>12}  {profile}")
    return 0


if __name__ == "__main__":
    raise SystemExit(standalone(__doc__, add_arguments, run))
