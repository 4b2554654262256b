"""`vattention bench attention`: decode attention on the contiguous cache against paged baselines.

For every (batch, context) point of the grid the same random K/V data is laid out three ways:

* contiguous ``[batch, context, kv_heads, head_dim]``, read by our split-K decode kernel in both its
  implementations, Triton (``ours_triton``) and Mosaic GPU (``ours_mgpu``, Hopper only), and by cuDNN
  (``jax.nn.dot_product_attention(implementation="cudnn", key_value_seq_lengths=...)``); and as an FP8
  cache (the same values as e4m3 codes, scale 1: :mod:`~jax_vattention.cache.quantization`) read by
  our Triton kernel (``ours_triton_fp8``), whose bandwidth counts the one-byte codes it reads and whose
  check is against the reference over the codes' values;
* a shuffled page pool ``[num_pages, page_size, kv_heads, head_dim]`` with a block table, read by
  cuDNN's paged attention;
* a shuffled page pool ``[kv_heads, num_pages, page_size, head_dim]``, read by Pallas's
  ``paged_attention``.

Effective bandwidth is the K and V bytes of all live tokens over the time of one attention call; the
table gives it as a percentage of the ceiling, a plain device-to-device ``cudaMemcpy`` (bytes read plus
written), timed with CUDA events. ``--chunk-tokens N`` also times our two chunk kernels (a prefill chunk
of N tokens at the end of every row's context, the engine's chunked prefill) at the same points.
Each implementation is timed as ``--calls`` back-to-back calls inside one compiled program (distinct
queries, so nothing is hoisted), median over ``--repeats`` runs. Every grid point is also checked against
the float32 reference on ragged lengths (one of them 0 when batch > 1).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import itertools
import math
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from jax_vattention.app.cli import standalone
from jax_vattention.attention.kernels.reference import decode_attention_reference
from jax_vattention.cache.quantization import dequantize, quantize
from jax_vattention.bench.attention_kernels import (CHUNK_MGPU, CHUNK_TRITON, CUDNN, IMPLEMENTATIONS, OURS, OURS_FP8,
                                                    OURS_MGPU,
                                                    PAGED_CUDNN, PAGED_PALLAS, chunk_kernels, cudnn_attention,
                                                    mgpu_available, mgpu_sweep_configs, ours_attention,
                                                    ours_mgpu_attention, paged_cudnn_attention,
                                                    paged_pallas_attention, shuffled_page_pool, sweep_configs)
from jax_vattention.bench.paged_cache import pallas_paged_shipped
CSV_FIELDS = (
    "card",
    "batch",
    "context",
    "impl",
    "page_size",
    "config",
    "us",
    "tb_per_s",
    "max_abs_error",
    "note",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the benchmark's options to ``parser``."""
    parser.add_argument("--batch", type=int, nargs="+", default=None,
                        help=f"default {' '.join(map(str, GPU_GRID['batch']))} on a GPU, "
                             f"{' '.join(map(str, CPU_GRID['batch']))} elsewhere")
    parser.add_argument("--context", type=int, nargs="+", default=None,
                        help=f"default {' '.join(map(str, GPU_GRID['context']))} on a GPU, "
                             f"{' '.join(map(str, CPU_GRID['context']))} elsewhere")
    parser.add_argument(
        "--max-tokens", type=int, default=1 << 20, help="skip grid points whose batch * context exceeds this"
    )
    parser.add_argument("--q-heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    parser.add_argument("--page-sizes", type=int, nargs="+", default=None,
                        help=f"paged baselines' page sizes (default {' '.join(map(str, GPU_GRID['page_sizes']))}; "
                             f"{' '.join(map(str, CPU_GRID['page_sizes']))} off a GPU)")
    parser.add_argument("--impls", nargs="+", choices=IMPLEMENTATIONS, default=list(IMPLEMENTATIONS))
    parser.add_argument("--calls", type=int, default=None,
                        help=f"attention calls per timed program (default {GPU_GRID['calls']}; "
                             f"{CPU_GRID['calls']} off a GPU)")
    parser.add_argument("--repeats", type=int, default=None,
                        help=f"default {GPU_GRID['repeats']} ({CPU_GRID['repeats']} off a GPU)")
    parser.add_argument("--copy-gib", type=float, default=2.0, help="size of the memcpy ceiling")
    parser.add_argument("--block-k", type=int, default=None, help="our kernel's tile (tokens)")
    parser.add_argument("--num-splits", type=int, default=None)
    parser.add_argument("--num-warps", type=int, default=4)
    parser.add_argument("--num-stages", type=int, default=3)
    parser.add_argument(
        "--sweep", action="store_true",
        help="also sweep our kernels' tiles: Triton's block_k, num_warps, num_stages and num_splits, Mosaic "
             "GPU's block_k, stages and num_splits"
    )
    parser.add_argument("--chunk-tokens", type=int, default=0,
                        help="also time our chunk kernels on a chunk of this many tokens per row (0: off)")
    parser.add_argument("--out-dir", type=pathlib.Path, default=pathlib.Path("out", "bench-attention"),
                        help="folder for the CSV, table and plot (default out/bench-attention)")


# The grid a GPU measures, and the one a CPU runs as a check: there the Pallas kernels are
# interpreted and cuDNN is absent, so the GPU grid would take hours and its times say nothing.
GPU_GRID = {"batch": [1, 4, 16, 64], "context": [4096, 16384, 65536, 131072], "page_sizes": [16, 32, 64, 128],
            "calls": 20, "repeats": 10}
CPU_GRID = {"batch": [1, 4], "context": [1024], "page_sizes": [64], "calls": 2, "repeats": 2}


def apply_device_defaults(args: argparse.Namespace, on_gpu: bool) -> None:
    """Fills the options left unset with the GPU grid or, off a GPU, the small one (saying so)."""
    grid = GPU_GRID if on_gpu else CPU_GRID
    unset = [name for name in grid if getattr(args, name) is None]
    for name in unset:
        setattr(args, name, grid[name])
    if not on_gpu and unset:
        print(f"not a GPU: a small grid ({', '.join(f'{name} {grid[name]}' for name in unset)}) that checks "
              f"the kernels; interpreted Pallas times say nothing about a GPU", file=sys.stderr)


def time_per_call(attend, queries: jax.Array, *operands, repeats: int) -> float:
    """Median seconds per ``attend(query, *operands)`` over ``repeats`` runs of one program.

    The program makes one call per row of ``queries`` [calls, batch, q_heads, head_dim]; the rows are
    separate arguments, so the program holds the attention calls and nothing else.
    """
    rows = [queries[i] for i in range(queries.shape[0])]
    program = jax.jit(lambda qs, *ops: [attend(q, *ops) for q in qs])
    jax.block_until_ready(program(rows, *operands))
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(program(rows, *operands))
        seconds.append((time.perf_counter() - start) / len(rows))
    return statistics.median(seconds)


def copy_ceiling(gib: float, repeats: int = 20) -> float | None:
    """Bytes per second (read + written) of a plain device-to-device cudaMemcpy of ``gib`` GiB."""
    try:
        import cupy
    except ImportError:
        print("cupy is not importable: no memcpy ceiling", file=sys.stderr)
        return None
    size = int(gib * 2**30)
    source, destination = cupy.ones(size, cupy.uint8), cupy.empty(size, cupy.uint8)
    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    kind = cupy.cuda.runtime.memcpyDeviceToDevice
    milliseconds = []
    for i in range(repeats + 3):
        start.record()
        cupy.cuda.runtime.memcpy(destination.data.ptr, source.data.ptr, size, kind)
        stop.record()
        stop.synchronize()
        if i >= 3:
            milliseconds.append(cupy.cuda.get_elapsed_time(start, stop))
    del source, destination
    cupy.get_default_memory_pool().free_all_blocks()
    return 2 * size / (statistics.median(milliseconds) * 1e-3)


def run_chunks(recorder, args, batch, context, k_cache, v_cache, key, kv_bytes, point, keep):
    """Times our chunk kernels on a chunk of ``args.chunk_tokens`` tokens at the end of every row.

    The Mosaic GPU kernel is checked against the Triton one (both against the float32 reference in the
    tests); each chunk reads its row's whole context, so the bandwidth is over the K/V bytes."""
    tokens = min(args.chunk_tokens, context)
    calls = max(2, args.calls // 5)
    queries = jax.random.normal(key, (calls, batch, tokens, args.q_heads, args.head_dim), k_cache.dtype)
    slots = jnp.arange(batch, dtype=jnp.int32)
    positions = jnp.broadcast_to(context - tokens + jnp.arange(tokens, dtype=jnp.int32), (batch, tokens))
    lengths = jnp.full((batch,), context, jnp.int32)
    operands = (k_cache, v_cache, slots, positions, lengths)
    outputs = {}
    for name, kernel in chunk_kernels().items():
        if name == CHUNK_MGPU and not mgpu_available():
            continue
        try:
            outputs[name] = jax.jit(kernel)(queries[0], *operands).astype(jnp.float32)
            seconds = time_per_call(kernel, queries, *operands, repeats=recorder.repeats)
        except Exception as failure:  # A kernel that cannot run here is a row, not an abort.
            recorder.add(impl=name, note=f"failed: {type(failure).__name__}: {str(failure)[:200]}", **point)
            continue
        error = (f"{float(jnp.max(jnp.abs(outputs[name] - outputs[CHUNK_TRITON]))):.2e}"
                 if name != CHUNK_TRITON and CHUNK_TRITON in outputs else "")
        recorder.add(impl=name, us=f"{seconds * 1e6:.1f}", tb_per_s=f"{kv_bytes / seconds / 1e12:.3f}",
                     max_abs_error=error, config=f"chunk_tokens={tokens}",
                     note="error against chunk_triton" if error else "", **point)
        keep(name, seconds)


def ragged_lengths(batch: int, context: int, seed: int) -> jax.Array:
    """Lengths for the correctness check: not multiples of any tile, the full context, and a 0."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, context + 1, size=batch)
    lengths[0] = context
    if batch > 1:
        lengths[1] = 0
    return jnp.asarray(lengths, jnp.int32)


def max_abs_error(attend, operands, q, expected) -> float:
    return float(jnp.max(jnp.abs(jax.jit(attend)(q, *operands).astype(jnp.float32) - expected)))


class Recorder:
    """Collects rows, prints them as they come and keeps the CSV on disk up to date."""

    def __init__(self, path: pathlib.Path, card: str, repeats: int):
        self.path, self.card, self.repeats, self.rows = path, card, repeats, []

    def add(self, **row):
        row = {
            "card": self.card,
            "page_size": "",
            "config": "",
            "us": "",
            "tb_per_s": "",
            "max_abs_error": "",
            "note": "",
            **row,
        }
        self.rows.append(row)
        print(" ".join(f"{k}={row[k]}" for k in CSV_FIELDS[1:] if row[k] != ""), flush=True)
        with self.path.open("w", newline="") as f:
            writer = csv.DictWriter(f, CSV_FIELDS)
            writer.writeheader()
            writer.writerows(self.rows)


def measure(recorder, name, attend, operands, queries, kv_bytes, check, **fields):
    """Times one implementation and checks it; failures are recorded, not raised."""
    try:
        error = max_abs_error(attend, check[0], check[1], check[2]) if check else ""
        seconds = time_per_call(attend, queries, *operands, repeats=recorder.repeats)
    except Exception as failure:  # A baseline that cannot run here is a row, not an abort.
        recorder.add(impl=name, note=f"failed: {type(failure).__name__}: {str(failure)[:200]}", **fields)
        return None
    recorder.add(
        impl=name,
        us=f"{seconds * 1e6:.1f}",
        tb_per_s=f"{kv_bytes / seconds / 1e12:.3f}",
        max_abs_error=f"{error:.2e}" if check else "",
        **fields,
    )
    return seconds


def run_point(recorder, args, batch, context, key, dtype):
    """Benchmarks one (batch, context) point; returns {implementation: best seconds}."""
    scale = 1.0 / math.sqrt(args.head_dim)
    keys = jax.random.split(key, 5)
    cache_shape = (batch, context, args.kv_heads, args.head_dim)
    k_cache = jax.random.normal(keys[0], cache_shape, dtype)
    v_cache = jax.random.normal(keys[1], cache_shape, dtype)
    queries = jax.random.normal(keys[2], (args.calls, batch, args.q_heads, args.head_dim), dtype)
    full = jnp.full((batch,), context, jnp.int32)
    ragged = ragged_lengths(batch, context, seed=batch * context)
    expected = decode_attention_reference(queries[0], k_cache, v_cache, ragged)
    kv_bytes = 2 * k_cache.size * k_cache.dtype.itemsize
    point = dict(batch=batch, context=context)
    best = {}

    def keep(name, seconds):
        if seconds is not None:
            best[name] = min(best.get(name, math.inf), seconds)

    contiguous_check = ((k_cache, v_cache, ragged), queries[0], expected)
    config = dict(
        block_k=args.block_k,
        num_splits=args.num_splits,
        num_warps=args.num_warps,
        num_stages=args.num_stages,
    )
    config_text = ",".join(f"{k}={v}" for k, v in config.items() if v is not None)
    if OURS_FP8 in args.impls:
        codes = (quantize(k_cache, 1.0), quantize(v_cache, 1.0))  # [B, S, K, H] e4m3 each
        values = [dequantize(c, 1.0, jnp.float32) for c in codes]
        keep(OURS_FP8, measure(recorder, OURS_FP8, ours_attention(**config), (*codes, full), queries, kv_bytes // 2,
                               ((*codes, ragged), queries[0], decode_attention_reference(queries[0], *values, ragged)),
                               config=",".join(filter(None, [config_text, "e4m3 codes, scale 1"])), **point))
        del codes, values
    if OURS in args.impls:
        keep(
            OURS,
            measure(
                recorder,
                OURS,
                ours_attention(**config),
                (k_cache, v_cache, full),
                queries,
                kv_bytes,
                contiguous_check,
                config=config_text,
                **point,
            ),
        )
        empty = jnp.zeros((batch,), jnp.int32)
        seconds = time_per_call(
            ours_attention(**config), queries, k_cache, v_cache, empty, repeats=args.repeats
        )
        recorder.add(
            impl=f"{OURS}_length_0",
            us=f"{seconds * 1e6:.1f}",
            config=config_text,
            note="same program, all lengths 0: the fixed cost of a call",
            **point,
        )
        if args.sweep:
            for overrides in sweep_configs(batch, args.kv_heads, context, args.head_dim):
                swept = {**config, **overrides}
                measure(
                    recorder,
                    f"{OURS}_sweep",
                    ours_attention(**swept),
                    (k_cache, v_cache, full),
                    queries,
                    kv_bytes,
                    None,
                    config=",".join(f"{k}={v}" for k, v in swept.items() if v is not None),
                    **point,
                )
    if OURS_MGPU in args.impls and mgpu_available():
        keep(OURS_MGPU, measure(recorder, OURS_MGPU, ours_mgpu_attention(), (k_cache, v_cache, full), queries,
                                kv_bytes, contiguous_check, **point))
        seconds = time_per_call(ours_mgpu_attention(), queries, k_cache, v_cache, jnp.zeros((batch,), jnp.int32),
                                repeats=args.repeats)
        recorder.add(impl=f"{OURS_MGPU}_length_0", us=f"{seconds * 1e6:.1f}",
                     note="same program, all lengths 0: the fixed cost of a call", **point)
        if args.sweep:
            for config in mgpu_sweep_configs(batch, args.kv_heads, context, args.head_dim):
                measure(recorder, f"{OURS_MGPU}_sweep", ours_mgpu_attention(**config), (k_cache, v_cache, full),
                        queries, kv_bytes, None, config=",".join(f"{k}={v}" for k, v in config.items()), **point)
    if args.chunk_tokens:
        run_chunks(recorder, args, batch, context, k_cache, v_cache, keys[4], kv_bytes, point, keep)
    if CUDNN in args.impls:
        keep(
            CUDNN,
            measure(
                recorder,
                CUDNN,
                cudnn_attention(scale),
                (k_cache, v_cache, full),
                queries,
                kv_bytes,
                contiguous_check,
                **point,
            ),
        )
    for page_size in args.page_sizes:
        if context % page_size or not {PAGED_CUDNN, PAGED_PALLAS} & set(args.impls):
            continue
        k_pool, v_pool, block_table = shuffled_page_pool(k_cache, v_cache, page_size, keys[3])
        if PAGED_CUDNN in args.impls:
            operands = (k_pool, v_pool, block_table)
            keep(
                PAGED_CUDNN,
                measure(
                    recorder,
                    PAGED_CUDNN,
                    paged_cudnn_attention(scale),
                    (*operands, full),
                    queries,
                    kv_bytes,
                    ((*operands, ragged), queries[0], expected),
                    page_size=page_size,
                    **point,
                ),
            )
        if PAGED_PALLAS in args.impls:
            operands = (k_pool.transpose(2, 0, 1, 3), v_pool.transpose(2, 0, 1, 3), block_table)
            attend, config_text = paged_pallas_attention(page_size, context // page_size)
            scaled = (queries * scale).astype(dtype)  # This kernel has no scale argument.
            keep(
                PAGED_PALLAS,
                measure(
                    recorder,
                    PAGED_PALLAS,
                    attend,
                    (*operands, full),
                    scaled,
                    kv_bytes,
                    ((*operands, ragged), scaled[0], expected),
                    page_size=page_size,
                    config=config_text,
                    **point,
                ),
            )
            del operands
        del k_pool, v_pool
    return best


def summary_table(results, ceiling, card) -> str:
    """A Markdown table: µs per implementation, each one's bandwidth as % of the copy ceiling, and the
    ratios that pick the default (Mosaic GPU against Triton, ours against cuDNN and the best paged)."""
    names = (OURS, OURS_FP8, OURS_MGPU, CUDNN, PAGED_CUDNN, PAGED_PALLAS, CHUNK_TRITON, CHUNK_MGPU)
    lines = [
        f"card: {card}; copy ceiling: " + (f"{ceiling / 1e12:.3f} TB/s" if ceiling else "not measured"),
        "",
        "| batch | context | KV MiB | " + " | ".join(f"{name} µs (% copy)" for name in names)
        + " | mgpu / triton time | chunk mgpu / triton time | fp8 / 16-bit time | best ours vs cuDNN "
        "| best ours vs best paged |",
        "|---:|---:|---:|" + "---:|" * (len(names) + 5),
    ]
    for (batch, context, kv_bytes), best in results:

        def cell(name):
            if name not in best:
                return "—"
            read = kv_bytes // 2 if name == OURS_FP8 else kv_bytes  # FP8: one-byte codes
            share = f" ({100 * read / best[name] / ceiling:.0f}%)" if ceiling else ""
            return f"{best[name] * 1e6:.1f}{share}"

        ours = min((best[n] for n in (OURS, OURS_MGPU) if n in best), default=None)
        paged = min((best[n] for n in (PAGED_CUDNN, PAGED_PALLAS) if n in best), default=None)
        def ratio(mgpu, triton):
            return f"{best[mgpu] / best[triton]:.2f}" if mgpu in best and triton in best else "—"

        lines.append(
            f"| {batch} | {context} | {kv_bytes / 2**20:.0f} | " + " | ".join(cell(name) for name in names)
            + f" | {ratio(OURS_MGPU, OURS)} | {ratio(CHUNK_MGPU, CHUNK_TRITON)} | {ratio(OURS_FP8, OURS)} | "
            f"{f'{best[CUDNN] / ours:.2f}×' if ours and CUDNN in best else '—'} | "
            f"{f'{paged / ours:.2f}×' if ours and paged else '—'} |"
        )
    return "\n".join(lines)


def plot(results, ceiling, card, path: pathlib.Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not importable: no plot", file=sys.stderr)
        return
    figure, axes = plt.subplots(figsize=(8, 5))
    labels = [f"{b}×{c // 1024}K" for (b, c, _), _ in results]
    for name in (*IMPLEMENTATIONS, CHUNK_TRITON, CHUNK_MGPU):
        axes.plot(
            labels,
            [kv / (2 if name == OURS_FP8 else 1) / best[name] / 1e12 if name in best else float("nan")
             for (_, _, kv), best in results],
            marker="o",
            label=name,
        )
    if ceiling:
        axes.axhline(ceiling / 1e12, color="black", linestyle="--", label="device memcpy")
    axes.set_xlabel("batch × context")
    axes.set_ylabel("effective KV bandwidth (TB/s)")
    axes.set_title(f"decode attention, {card}")
    axes.tick_params(axis="x", rotation=60)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"plot: {path}")


def run(args: argparse.Namespace) -> int:
    """Runs the benchmark; returns the process exit status."""
    card = jax.devices()[0].device_kind
    apply_device_defaults(args, jax.default_backend() == "gpu")
    dtype = jnp.dtype(args.dtype)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    recorder = Recorder(args.out_dir / "attention.csv", card, args.repeats)
    print(f"card: {card}; jax {jax.__version__}; {datetime.date.today()}", flush=True)
    ceiling = copy_ceiling(args.copy_gib) if jax.default_backend() == "gpu" else None
    if ceiling:
        recorder.add(
            batch="",
            context="",
            impl="memcpy",
            tb_per_s=f"{ceiling / 1e12:.3f}",
            note=f"{args.copy_gib} GiB device-to-device cudaMemcpy, read + written",
        )
    if jax.default_backend() != "gpu":
        args.impls = [name for name in args.impls if name not in (CUDNN, PAGED_CUDNN)]
        print("not a GPU: cuDNN baselines skipped, Pallas kernels interpreted", file=sys.stderr)
    if PAGED_PALLAS in args.impls and not pallas_paged_shipped():
        args.impls = [name for name in args.impls if name != PAGED_PALLAS]
        print(f"jax {jax.__version__} ships no Pallas paged kernel (moved to tokamax in 0.12): {PAGED_PALLAS} "
              "skipped", file=sys.stderr)
    if not mgpu_available():
        print("not a Hopper GPU: our Mosaic GPU kernels (ours_mgpu, chunk_mgpu) skipped", file=sys.stderr)
    results = []
    key = jax.random.key(0)
    points = [(batch, context) for batch, context in itertools.product(args.batch, args.context)
              if batch * context <= args.max_tokens]
    for batch, context in tqdm(points, desc="grid points", unit="point"):
        key, point_key = jax.random.split(key)
        best = run_point(recorder, args, batch, context, point_key, dtype)
        kv_bytes = 2 * batch * context * args.kv_heads * args.head_dim * dtype.itemsize
        results.append(((batch, context, kv_bytes), best))
    table = summary_table(results, ceiling, card)
    print(table)
    (args.out_dir / "attention.md").write_text(table + "\n")
    plot(results, ceiling, card, args.out_dir / "attention.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(standalone(__doc__, add_arguments, run))
