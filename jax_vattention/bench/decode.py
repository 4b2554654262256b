"""`vattention bench decode`: the model's decode step through a static cache and the virtual one.

For every (batch, context) point the same model (random weights) decodes ``--steps`` steps in one
compiled loop (the engine's decode program, :func:`~jax_vattention.engine.steps.decode_chunk_fn`,
with the in-graph mapping op on a virtual cache) from ``context`` cached tokens per slot, through:

* ``static``: a plain contiguous cache (``KVCache.dense``), per-layer;
* ``virtual_per_layer`` and ``virtual_interleaved``: a :class:`CacheManager`'s cache, mapped up to
  the lengths.

Each row gives the step time (median over ``--repeats`` loops, divided by the steps), tokens per
second, and the roofline: the weights plus the live KV bytes over the device's copy bandwidth
(measured: a device-to-device memcpy, read plus written), with the step's ratio to it. Off a GPU
the grid is tiny and the numbers say nothing about a GPU (the report says so). Paged caches
through the model code are not part of this benchmark (``vattention bench attention`` compares
the paged kernels alone).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_vattention.attention import default_backend
from jax_vattention.bench.attention import copy_ceiling
from jax_vattention.cache import KVCache
from jax_vattention.cli import standalone
from jax_vattention.config import CacheConfig
from jax_vattention.engine.steps import decode_chunk_fn
from jax_vattention.manager import CacheManager

MODES = ("static", "virtual_per_layer", "virtual_interleaved")
GPU_GRID = {"config": "llama-3-8b", "batch": (1, 16, 64), "context": (2048, 8192)}
CPU_GRID = {"config": "tiny", "batch": (1, 4), "context": (64,)}
FIELDS = ("card", "date", "config", "batch", "context", "mode", "backend", "step_ms", "tokens_per_s",
          "roofline_ms", "vs_roofline")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="model shape (default llama-3-8b on a GPU, tiny elsewhere)")
    parser.add_argument("--batch", type=int, nargs="+", default=None)
    parser.add_argument("--context", type=int, nargs="+", default=None)
    parser.add_argument("--steps", type=int, default=16, help="decode steps per timed loop")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--copy-gib", type=float, default=2.0, help="size of the memcpy that sets the roofline")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("out") / "bench-decode")


def make_cache(mode: str, model_config, batch: int, capacity: int, context: int, device):
    """The cache of ``mode`` with ``context`` tokens in each of ``batch`` slots; (cache, manager or None)."""
    dtype = model_config.jnp_dtype
    if mode == "static":
        return KVCache.dense(num_layers=model_config.num_layers, max_batch=batch, capacity=capacity,
                             kv_heads=model_config.num_kv_heads, head_dim=model_config.head_dim, dtype=dtype,
                             device=device), None
    layout = mode.removeprefix("virtual_")
    manager = CacheManager(CacheConfig(num_layers=model_config.num_layers, max_batch=batch, max_len=capacity,
                                       kv_heads=model_config.num_kv_heads, head_dim=model_config.head_dim,
                                       dtype=dtype, layout=layout), device)
    for _ in range(batch):
        manager.alloc(context)
    return manager.cache, manager


def time_step(model, mode: str, batch: int, context: int, steps: int, repeats: int, device):
    """Median seconds per decode step, and the backend that ran it."""
    config = model.config
    capacity = context + (repeats + 2) * steps
    cache, manager = make_cache(mode, config, batch, capacity, context, device)
    backend = default_backend("interleaved" if cache.interleaved else "per_layer", device.platform)
    graphdef, state = nnx.split(model)
    decode = decode_chunk_fn(graphdef, backend, steps)
    lengths = jnp.full((batch,), context, jnp.int32)
    ints = jnp.zeros((batch,), jnp.int32)
    arguments = (ints, lengths, jnp.ones((batch,), bool), ints, jnp.full((batch,), 1 << 30, jnp.int32),
                 jnp.full((batch, 1), -1, jnp.int32), jnp.zeros((batch,), jnp.float32), ints,
                 jnp.ones((batch,), jnp.float32), jax.random.key(0))
    seconds = []
    try:
        for i in range(repeats + 1):
            if manager is not None:
                manager.reserve_growth(steps)
            start = time.perf_counter()
            outputs = decode(state, cache, *arguments)
            cache = outputs[0]
            jax.block_until_ready(outputs[5])
            if i:  # the first call compiles
                seconds.append((time.perf_counter() - start) / steps)
    finally:
        if manager is not None:
            manager.cache = cache
            manager.close()
    return statistics.median(seconds), backend


def roofline_seconds(model, batch: int, context: int, bandwidth: float | None) -> float | None:
    """(weights + live KV bytes) / copy bandwidth, or None without a measured bandwidth."""
    if not bandwidth:
        return None
    weights = sum(x.nbytes for x in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param)))
    config = model.config
    kv = 2 * config.num_layers * batch * context * config.num_kv_heads * config.head_dim * \
        jnp.dtype(config.jnp_dtype).itemsize
    # The bandwidth counts the copy's bytes read plus written, as the design's roofline does.
    return (weights + kv) / bandwidth


def run(args: argparse.Namespace) -> int:
    from jax_vattention.models import Llama, config_for_device

    device = jax.devices()[0]
    on_gpu = device.platform == "gpu"
    grid = GPU_GRID if on_gpu else CPU_GRID
    config_name = args.config or grid["config"]
    batches, contexts = args.batch or grid["batch"], args.context or grid["context"]
    card, today = device.device_kind, datetime.date.today().isoformat()
    print(f"vattention bench decode on {card} ({device.platform}), jax {jax.__version__}, {today}")
    if not on_gpu:
        print("NOT A GPU: a tiny grid on the CPU backend; the numbers say nothing about a GPU")
    model = Llama(config_for_device(config_name, device), rngs=nnx.Rngs(0))
    bandwidth = copy_ceiling(args.copy_gib) if on_gpu else None
    if bandwidth:
        print(f"device copy: {bandwidth / 1e12:.2f} TB/s (read + written)")
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for batch in batches:
        for context in contexts:
            roof = roofline_seconds(model, batch, context, bandwidth)
            for mode in args.modes:
                step, backend = time_step(model, mode, batch, context, args.steps, args.repeats, device)
                rows.append(dict(card=card, date=today, config=config_name, batch=batch, context=context, mode=mode,
                                 backend=backend, step_ms=f"{step * 1e3:.3f}", tokens_per_s=f"{batch / step:.1f}",
                                 roofline_ms=f"{roof * 1e3:.3f}" if roof else "",
                                 vs_roofline=f"{step / roof:.3f}" if roof else ""))
                print(f"batch {batch:4d} context {context:6d} {mode:20s} {backend:8s} {step * 1e3:9.3f} ms/step "
                      f"{batch / step:10.1f} tok/s" + (f"  roofline {roof * 1e3:.3f} ms ({step / roof:.2f}x)"
                                                        if roof else ""), flush=True)
    path = args.out / "decode.csv"
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    print(f"CSV: {path}" + _plot(rows, args.out / "decode.png", card))
    return 0


def _plot(rows, path: pathlib.Path, card: str) -> str:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return " (no matplotlib: no PNG)"
    figure, axis = plt.subplots(figsize=(8, 4.5))
    points = sorted({(r["batch"], r["context"]) for r in rows})
    labels = [f"{b}x{c}" for b, c in points]
    for mode in MODES:
        values = {(r["batch"], r["context"]): float(r["step_ms"]) for r in rows if r["mode"] == mode}
        if values:
            axis.plot(labels, [values.get(p, np.nan) for p in points], marker="o", label=mode)
    roof = {(r["batch"], r["context"]): float(r["roofline_ms"]) for r in rows if r["roofline_ms"]}
    if roof:
        axis.plot(labels, [roof.get(p, np.nan) for p in points], linestyle="--", color="gray", label="roofline")
    axis.set_xlabel("batch x context")
    axis.set_ylabel("ms per decode step")
    axis.set_title(f"decode step, {card}, {datetime.date.today()}")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path)
    return f", PNG: {path}"


if __name__ == "__main__":
    raise SystemExit(standalone(__doc__, add_arguments, run))
