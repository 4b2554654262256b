"""`vattention bench decode`: the model's decode step through a static cache and the virtual one.

For every (batch, context) point the same model (random weights) decodes ``--steps`` steps in one
compiled loop (the engine's decode program, :func:`~jax_vattention.bench.decode_chunk.decode_chunk_fn`,
with the in-graph mapping op on a virtual cache) from ``context`` cached tokens per slot, through:

* ``static``: a plain contiguous cache (``KVCache.dense``), per-layer;
* ``virtual_per_layer`` and ``virtual_interleaved``: a :class:`CacheManager`'s cache, mapped up to
  the lengths;
* ``paged_cudnn`` and ``paged_pallas``: a paged cache (:class:`~jax_vattention.bench.paged_cache.PagedKVCache`:
  block pools and a shuffled block table) through the same model code, read by JAX's paged kernels,
  cuDNN's and Pallas'; blocks of ``--block-size`` tokens (default per kernel, :data:`BLOCK_SIZES`).
  Off a GPU both run the paged reference (backend ``xla``).

Each row gives the step time (median over ``--repeats`` loops, divided by the steps), tokens per
second, and the roofline: the weights plus the live KV bytes over the device's copy bandwidth
(measured: a device-to-device memcpy, read plus written), with the step's ratio to it, and
``vs_best_paged``: the faster paged row's step time over this row's (at least 1: this row is as
fast as the best paged cache or faster). A point that does not fit in memory is recorded with the
note ``out of memory`` and no time. Off a GPU the grid is tiny and the numbers say nothing about a
GPU (the report says so).

``--kv-dtype bfloat16 float8_e4m3fn`` times the static and virtual modes of every point with each cache
dtype (an FP8 cache: :mod:`~jax_vattention.cache.quantization`; the paged kernels take 16-bit caches, so
their rows are timed with the model's dtype only) and prints each dtype's step time against the first's:
what an FP8 cache saves in the step, where the roofline's KV bytes halve too.

``--tp 1 2`` times every point at each tensor-parallel degree (the model made in its shards and a
:class:`~jax_vattention.ShardedCacheManager` over the first N devices; virtual caches only above
TP 1) and prints each degree's step time against TP 1's.
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

from jax_vattention._core import OutOfPagesError
from jax_vattention.cache import jax_internals
from jax_vattention.attention import default_backend
from jax_vattention.bench.attention import copy_ceiling
from jax_vattention.cache.kv_cache import KVCache
from jax_vattention.app.cli import standalone
from jax_vattention.cache.config import CacheConfig
from jax_vattention.cache.quantization import is_quantized
from jax_vattention.app.commands.model_source import KV_DTYPES
from jax_vattention.bench.decode_chunk import decode_chunk_fn
from jax_vattention.app.memory_fit import weight_bytes_per_device
from jax_vattention.cache.manager import CacheManager
from jax_vattention.bench.paged_cache import PagedKVCache, pallas_paged_shipped
from jax_vattention.cache.sharded_manager import ShardedCacheManager
from jax_vattention.decode.mesh import init_sharded, place, tp_mesh
from jax_vattention.models.sharding import check_divisible

MODES = ("static", "virtual_per_layer", "virtual_interleaved", "paged_cudnn", "paged_pallas")
PAGED_MODES = ("paged_cudnn", "paged_pallas")
# Tokens per block of each paged kernel by default: the sizes `bench attention` found best at most
# points of 64K tokens or more (docs/benchmarks.md).
BLOCK_SIZES = {"paged_cudnn": 64, "paged_pallas": 128}
GPU_GRID = {"config": "llama-3-8b", "batch": (1, 16, 64), "context": (2048, 8192)}
CPU_GRID = {"config": "tiny", "batch": (1, 4), "context": (64,)}
FIELDS = ("card", "date", "config", "batch", "context", "mode", "backend", "step_ms", "tokens_per_s",
          "roofline_ms", "vs_roofline", "vs_best_paged", "block_size", "note", "tp", "kv_dtype")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="model shape (default llama-3-8b on a GPU, tiny elsewhere)")
    parser.add_argument("--batch", type=int, nargs="+", default=None)
    parser.add_argument("--context", type=int, nargs="+", default=None)
    parser.add_argument("--steps", type=int, default=16, help="decode steps per timed loop")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--block-size", type=int, default=None,
                        help="tokens per block of the paged caches (default: 64 for cuDNN, 128 for Pallas)")
    parser.add_argument("--copy-gib", type=float, default=2.0, help="size of the memcpy that sets the roofline")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("out") / "bench-decode")
    parser.add_argument("--tp", type=int, nargs="+", default=[1],
                        help="tensor-parallel degrees to time (default 1); above 1: virtual caches only")
    parser.add_argument("--kv-dtype", nargs="+", choices=KV_DTYPES, default=None,
                        help="what the cache stores (default the model's dtype); several: each point is timed with "
                             "each, e.g. bfloat16 float8_e4m3fn (the paged modes: the model's dtype only)")


def make_cache(mode: str, model_config, batch: int, capacity: int, context: int, device,
               block_size: int | None = None, mesh=None, kv_dtype=None):
    """The cache of ``mode`` with ``context`` tokens in each of ``batch`` slots; (cache, manager or None).

    The static and paged caches hold zeros (the step's work does not depend on the values); a
    paged cache gets ``block_size`` tokens per block (default :data:`BLOCK_SIZES`). Over a
    ``mesh``: a :class:`ShardedCacheManager`'s (virtual modes only). ``kv_dtype``: what the cache
    holds (None: the model's dtype)."""
    dtype = jnp.dtype(kv_dtype) if kv_dtype else model_config.jnp_dtype
    shape = dict(num_layers=model_config.num_layers, max_batch=batch, capacity=capacity,
                 kv_heads=model_config.num_kv_heads, head_dim=model_config.head_dim, dtype=dtype, device=device)
    if mode == "static":
        return KVCache.dense(**shape), None
    if mode in PAGED_MODES:
        return PagedKVCache.allocate(**shape, block_size=block_size or BLOCK_SIZES[mode],
                                     heads_first=mode == "paged_pallas"), None
    layout = mode.removeprefix("virtual_")
    config = CacheConfig(num_layers=model_config.num_layers, max_batch=batch, max_len=capacity,
                         kv_heads=model_config.num_kv_heads, head_dim=model_config.head_dim, dtype=dtype, layout=layout)
    manager = CacheManager(config, device) if mesh is None else ShardedCacheManager(config, mesh)
    for _ in range(batch):
        manager.alloc(context)
    return manager.cache, manager


def mode_backend(mode: str, platform: str, kv_dtype=None) -> str:
    """The attention backend a mode runs: the paged kernel it names on a GPU (the paged reference
    elsewhere), else the device's default for the layout and the cache's dtype (``kv_dtype``)."""
    if mode in PAGED_MODES:
        return mode.removeprefix("paged_") if platform == "gpu" else "xla"
    return default_backend("interleaved" if mode == "virtual_interleaved" else "per_layer", platform, kv_dtype)


def time_step(model, mode: str, batch: int, context: int, steps: int, repeats: int, device,
              block_size: int | None = None, mesh=None, kv_dtype=None):
    """Median seconds per decode step, and the backend that ran it (over ``mesh``: the model must
    be split over it; ``kv_dtype``: the cache's, None for the model's)."""
    config = model.config
    capacity = context + (repeats + 2) * steps
    cache, manager = make_cache(mode, config, batch, capacity, context, device, block_size, mesh, kv_dtype)
    backend = mode_backend(mode, device.platform, kv_dtype)
    model, specs = place(model, manager)
    graphdef, state = nnx.split(model)
    decode = decode_chunk_fn(graphdef, backend, steps, sampling=False, specs=specs)
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


def out_of_memory(error: Exception) -> bool:
    """Whether ``error`` says the device (or the cache's page budget) ran out of memory."""
    return isinstance(error, (MemoryError, OutOfPagesError)) or jax_internals.out_of_memory(error)


def roofline_seconds(model, batch: int, context: int, bandwidth: float | None, tp: int = 1,
                     kv_dtype=None) -> float | None:
    """(weights + live KV bytes) / copy bandwidth, or None without a measured bandwidth; at ``tp``
    devices, one device's share of them (the devices read theirs at once). ``kv_dtype``: the cache's
    (None: the model's)."""
    if not bandwidth:
        return None
    config = model.config
    weights = weight_bytes_per_device(config, tp)
    kv = 2 * config.num_layers * batch * context * config.num_kv_heads * config.head_dim * \
        jnp.dtype(kv_dtype or config.jnp_dtype).itemsize // tp
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
    model_config = config_for_device(config_name, device)
    degrees = list(dict.fromkeys(args.tp))
    for degree in degrees:
        if degree < 1 or degree > len(jax.devices()):
            raise ValueError(f"--tp must be between 1 and the {len(jax.devices())} devices JAX sees; got {degree}")
        check_divisible(model_config, degree)
    print(f"vattention bench decode on {card} ({device.platform}), jax {jax.__version__}, {today}")
    if on_gpu and "paged_pallas" in args.modes and not pallas_paged_shipped():
        args.modes = [mode for mode in args.modes if mode != "paged_pallas"]
        print(f"jax {jax.__version__} ships no Pallas paged kernel (moved to tokamax in 0.12): paged_pallas skipped")
    if not on_gpu:
        print("NOT A GPU: a tiny grid on the CPU backend; the numbers say nothing about a GPU")
    bandwidth = copy_ceiling(args.copy_gib) if on_gpu else None
    if bandwidth:
        print(f"device copy: {bandwidth / 1e12:.2f} TB/s (read + written)")
    args.out.mkdir(parents=True, exist_ok=True)
    kv_dtypes = list(dict.fromkeys(args.kv_dtype or [None]))
    rows = []
    for degree in degrees:
        mesh = tp_mesh(degree) if degree > 1 else None
        modes = [m for m in args.modes if mesh is None or m.startswith("virtual_")]
        if mesh is not None and len(modes) < len(args.modes):
            print(f"TP {degree}: the static and paged caches run at TP 1 only; timing {', '.join(modes)}")
        model = (Llama(model_config, rngs=nnx.Rngs(0)) if mesh is None
                 else init_sharded(Llama, model_config, mesh, seed=0))
        for batch in batches:
            for context in contexts:
                point = []
                for kv_dtype in kv_dtypes:
                    roof = roofline_seconds(model, batch, context, bandwidth, degree, kv_dtype)
                    fields = dict(card=card, date=today, config=config_name, tp=degree,
                                  kv_dtype=np.dtype(kv_dtype or model_config.jnp_dtype).name)
                    point += [measure(model, mode, batch, context, roof, args, device, mesh, fields, kv_dtype)
                              for mode in modes if not (mode in PAGED_MODES and kv_dtype and is_quantized(kv_dtype))]
                add_paged_ratio(point)
                rows.extend(point)
                write_csv(rows, args.out / "decode.csv")  # after every point: a run cut short keeps what it measured
        del model
    print(paged_summary(rows))
    for line in tp_ratios(rows) + kv_dtype_ratios(rows):
        print(line)
    print(f"CSV: {args.out / 'decode.csv'}" + _plot(rows, args.out / "decode.png", card))
    return 0


def write_csv(rows: list[dict], path: pathlib.Path) -> None:
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def measure(model, mode: str, batch: int, context: int, roof: float | None, args, device, mesh,
            fields: dict, kv_dtype=None) -> dict:
    """One CSV row: ``mode``'s decode step at (``batch``, ``context``), or the note ``out of memory``."""
    block_size = (args.block_size or BLOCK_SIZES[mode]) if mode in PAGED_MODES else ""
    row = dict(fields, batch=batch, context=context, mode=mode, backend=mode_backend(mode, device.platform, kv_dtype),
               step_ms="", tokens_per_s="", roofline_ms=f"{roof * 1e3:.3f}" if roof else "", vs_roofline="",
               vs_best_paged="", block_size=block_size, note="")
    label = ((f"tp {mesh.size} " if mesh is not None else "") + f"batch {batch:4d} context {context:6d} {mode:20s}"
             + (f" {fields['kv_dtype']:14s}" if args.kv_dtype else ""))
    try:
        step, row["backend"] = time_step(model, mode, batch, context, args.steps, args.repeats, device,
                                         args.block_size, mesh, kv_dtype)
    except Exception as error:  # a point that does not fit in memory is a result, not a crash
        if not out_of_memory(error):
            raise
        print(f"{label} out of memory", flush=True)
        return dict(row, note="out of memory")
    row.update(step_ms=f"{step * 1e3:.3f}", tokens_per_s=f"{batch / step:.1f}",
               vs_roofline=f"{step / roof:.3f}" if roof else "")
    print(f"{label} {row['backend']:8s} {step * 1e3:9.3f} ms/step {batch / step:10.1f} tok/s"
          + (f"  roofline {roof * 1e3:.3f} ms ({step / roof:.2f}x)" if roof else ""), flush=True)
    return row


def add_paged_ratio(point: list[dict]) -> None:
    """Fills ``vs_best_paged`` of one grid point's rows: the faster paged row's step time over each row's."""
    paged = [float(r["step_ms"]) for r in point if r["mode"] in PAGED_MODES and r["step_ms"]]
    if not paged:
        return
    for row in point:
        if row["step_ms"]:
            row["vs_best_paged"] = f"{min(paged) / float(row['step_ms']):.3f}"


def paged_summary(rows: list[dict]) -> str:
    """One line per grid point: the faster virtual layout against the faster paged kernel (caches of
    one dtype: the paged ones')."""
    lines = ["virtual / best paged (the best paged step time over the best virtual one; >= 1: virtual is faster):"]
    paged_dtypes = {r["kv_dtype"] for r in rows if r["mode"] in PAGED_MODES}
    for batch, context in sorted({(r["batch"], r["context"]) for r in rows}):
        here = [r for r in rows if (r["batch"], r["context"]) == (batch, context) and r["step_ms"] and r["tp"] == 1
                and r["kv_dtype"] in paged_dtypes]
        virtual = min((r for r in here if r["mode"].startswith("virtual_")), default=None,
                      key=lambda r: float(r["step_ms"]))
        paged = min((r for r in here if r["mode"] in PAGED_MODES), default=None, key=lambda r: float(r["step_ms"]))
        if virtual and paged:
            lines.append(f"  batch {batch:4d} context {context:6d}: {virtual['mode']} {virtual['step_ms']} ms, "
                         f"{paged['mode']} {paged['step_ms']} ms: "
                         f"{float(paged['step_ms']) / float(virtual['step_ms']):.3f}x")
    if len(lines) == 1:
        return "virtual / best paged: not measured (a virtual and a paged mode are needed)"
    return "\n".join(lines)


def tp_ratios(rows: list[dict]) -> list[str]:
    """Each TP degree's step time over TP 1's at the same point and mode (the issue's target: TP 2
    at most 0.60x TP 1 for Llama-3-8B, batch 32, context 4K)."""
    one = {(r["batch"], r["context"], r["mode"], r["kv_dtype"]): float(r["step_ms"]) for r in rows
           if r["tp"] == 1 and r["step_ms"]}
    lines = []
    for r in rows:
        base = one.get((r["batch"], r["context"], r["mode"], r["kv_dtype"]))
        if r["tp"] > 1 and base and r["step_ms"]:
            lines.append(f"TP {r['tp']} / TP 1, batch {r['batch']} context {r['context']} {r['mode']}: "
                         f"{float(r['step_ms']):.3f} / {base:.3f} ms = {float(r['step_ms']) / base:.3f}x")
    return lines


def kv_dtype_ratios(rows: list[dict]) -> list[str]:
    """Each cache dtype's step time over the first dtype's at the same point, mode and degree (the
    issue's FP8 targets are read beside them: attention alone by ``bench attention``)."""
    dtypes = list(dict.fromkeys(r["kv_dtype"] for r in rows))
    first = {(r["tp"], r["batch"], r["context"], r["mode"]): r for r in rows if r["kv_dtype"] == dtypes[0] and r["step_ms"]}
    lines = []
    for r in rows:
        base = first.get((r["tp"], r["batch"], r["context"], r["mode"]))
        if r["kv_dtype"] != dtypes[0] and base and r["step_ms"]:
            lines.append(f"{r['kv_dtype']} / {dtypes[0]}, tp {r['tp']} batch {r['batch']} context {r['context']} "
                         f"{r['mode']}: {float(r['step_ms']):.3f} / {float(base['step_ms']):.3f} ms = "
                         f"{float(r['step_ms']) / float(base['step_ms']):.3f}x")
    return lines


def _plot(rows, path: pathlib.Path, card: str) -> str:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return " (no matplotlib: no PNG)"
    figure, axis = plt.subplots(figsize=(9, 5))
    points = sorted({(r["batch"], r["context"]) for r in rows})
    labels = [f"{b}x{c}" for b, c in points]
    degrees = sorted({r["tp"] for r in rows})
    dtypes = list(dict.fromkeys(r["kv_dtype"] for r in rows))
    for degree in degrees:
        suffix = f" TP {degree}" if degrees != [1] else ""
        for mode in MODES:
            for dtype in dtypes:
                values = {(r["batch"], r["context"]): float(r["step_ms"]) for r in rows
                          if r["mode"] == mode and r["tp"] == degree and r["kv_dtype"] == dtype and r["step_ms"]}
                if values:
                    axis.plot(labels, [values.get(p, np.nan) for p in points], marker="o",
                              label=mode + suffix + (f" {dtype}" if len(dtypes) > 1 else ""),
                              linestyle=":" if mode in PAGED_MODES else "-")
        roof = {(r["batch"], r["context"]): float(r["roofline_ms"]) for r in rows
                if r["roofline_ms"] and r["tp"] == degree}
        if roof:
            axis.plot(labels, [roof.get(p, np.nan) for p in points], linestyle="--", label="roofline" + suffix)
    axis.set_xlabel("batch x context")
    axis.set_ylabel("ms per decode step")
    axis.set_title(f"decode step, {card}, {datetime.date.today()}")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path)
    return f", PNG: {path}"


if __name__ == "__main__":
    raise SystemExit(standalone(__doc__, add_arguments, run))
