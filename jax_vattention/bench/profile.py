"""`vattention bench profile`: where a decode step's time goes, from the JAX profiler's trace.

It runs the decode loop of ``vattention bench decode`` (the engine's decode program on a cache of
``--mode``) under :func:`jax.profiler.trace` with a Perfetto trace, reads the device's kernel
events back, and sums them per step by kind:

* ``matmul``: the weight projections and the output head (cuBLAS / cuBLASLt / Triton GEMMs);
* ``attention``: the attention kernels (ours, cuDNN, Pallas, Mosaic);
* ``sampling``: sorts, arg-maxes and reductions over the vocabulary;
* ``copy``: memcpy / memset;
* ``other``: XLA's fused elementwise kernels (norms, RoPE, residuals, cache writes);

and ``idle``: the step's wall time that no kernel covers (launch gaps, host work, the mapping
op). Beside them, the roofline of ``bench decode`` (weights plus live KV over the measured copy
bandwidth) and each kind's share, so what stands between the step and the roofline is a
number per kind. The kernels that take most time are listed by name.

Off a GPU (or where the profiler records no device kernels) it says so and prints no table.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import gzip
import json
import pathlib
import re
import tempfile
import time

import jax
import jax.numpy as jnp
from flax import nnx

from jax_vattention.attention import default_backend
from jax_vattention.bench.attention import copy_ceiling
from jax_vattention.bench.decode import make_cache, roofline_seconds
from jax_vattention.app.cli import standalone
from jax_vattention.bench.decode_chunk import decode_chunk_fn

KINDS = ("matmul", "attention", "sampling", "copy", "other")
# Kernel-name patterns, tried in this order (a name is of the first kind that matches).
_PATTERNS = (
    ("copy", re.compile(r"memcpy|memset|MemcpyD|MemsetD", re.I)),
    ("attention", re.compile(r"attention|attend|fmha|flash|cudnn|mosaic|decode_kernel|blocked|paged", re.I)),
    ("matmul", re.compile(r"gemm|cublas|cutlass|xmma|nvjet|matmul|\bdot|_dot_|triton_gemm|wgmma", re.I)),
    ("sampling", re.compile(r"sort|argmax|arg_max|top_?k|radix|cub::|reduce|reduction", re.I)),
)


def kind_of(kernel: str) -> str:
    """The kind of a device kernel, by its name (see the module docstring)."""
    for kind, pattern in _PATTERNS:
        if pattern.search(kernel):
            return kind
    return "other"


def device_kernels(trace: dict) -> list[tuple[str, float, float]]:
    """The kernels of the trace's device processes: ``(name, start_us, duration_us)``.

    A device process is one whose ``process_name`` metadata names a GPU (``/device:GPU:0``), not
    the host's threads. Its ``Stream`` threads hold the kernels; its other lines (XLA modules and
    ops) span the same time again and are left out, unless it has no stream line.
    """
    events = trace.get("traceEvents", [])
    metadata = [event for event in events if event.get("ph") == "M"]
    devices = {event["pid"] for event in metadata if event.get("name") == "process_name"
               and re.search(r"GPU", str(event.get("args", {}).get("name", "")))}
    streams = {(event["pid"], event.get("tid")) for event in metadata
               if event.get("name") == "thread_name" and event["pid"] in devices
               and str(event.get("args", {}).get("name", "")).startswith("Stream")}
    stream_pids = {pid for pid, _ in streams}
    return [(event["name"], float(event["ts"]), float(event.get("dur", 0.0))) for event in events
            if event.get("ph") == "X" and event.get("pid") in devices
            and ((event["pid"], event.get("tid")) in streams or event["pid"] not in stream_pids)]


def breakdown(kernels: list[tuple[str, float, float]], steps: int, wall_seconds: float):
    """Per step: milliseconds by kind, idle milliseconds, and the top kernels by total time.

    Returns ``(by_kind: dict kind -> ms per step, idle_ms, top: list of (name, kind, ms per step,
    calls per step))``.
    """
    by_kind = dict.fromkeys(KINDS, 0.0)
    by_name: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for name, _, duration in kernels:
        by_kind[kind_of(name)] += duration / 1e3 / steps
        by_name[name][0] += duration / 1e3 / steps
        by_name[name][1] += 1
    busy = sum(by_kind.values())
    idle = max(0.0, wall_seconds * 1e3 / steps - busy)
    top = sorted(((name, kind_of(name), ms, calls / steps) for name, (ms, calls) in by_name.items()),
                 key=lambda row: -row[2])
    return by_kind, idle, top


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="model shape (default llama-3-8b on a GPU, tiny elsewhere)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--mode", default="virtual_interleaved",
                        choices=("static", "virtual_per_layer", "virtual_interleaved"))
    parser.add_argument("--steps", type=int, default=16, help="decode steps per loop (one loop is traced)")
    parser.add_argument("--top", type=int, default=12, help="kernels listed by name")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("out") / "bench-profile",
                        help="folder for the trace (Perfetto JSON, open it at ui.perfetto.dev)")


def trace_file(folder: pathlib.Path) -> pathlib.Path | None:
    """The trace JSON the profiler wrote under ``folder`` (the newest), or None."""
    found = sorted(folder.rglob("*.trace.json.gz")) or sorted(folder.rglob("perfetto_trace.json.gz"))
    return found[-1] if found else None


def traced_kernels(folder: pathlib.Path) -> tuple[pathlib.Path | None, list[tuple[str, float, float]]]:
    """The trace file under ``folder`` and its device kernels (:func:`device_kernels`; none without a file)."""
    path = trace_file(folder)
    return path, device_kernels(json.loads(gzip.open(path).read())) if path else []


def run(args: argparse.Namespace) -> int:
    from jax_vattention.models import Llama, config_for_device

    if min(args.batch, args.context, args.steps) < 1:
        raise ValueError("--batch, --context and --steps must be at least 1")
    device = jax.devices()[0]
    on_gpu = device.platform == "gpu"
    config_name = args.config or ("llama-3-8b" if on_gpu else "tiny")
    model = Llama(config_for_device(config_name, device), rngs=nnx.Rngs(0))
    print(f"vattention bench profile on {device.device_kind} ({device.platform}), jax {jax.__version__}, "
          f"{datetime.date.today()}: {config_name}, batch {args.batch}, context {args.context}, {args.mode}")
    cache, manager = make_cache(args.mode, model.config, args.batch, args.context + 4 * args.steps,
                                args.context, device)
    backend = default_backend("interleaved" if cache.interleaved else "per_layer", device.platform)
    graphdef, state = nnx.split(model)
    decode = decode_chunk_fn(graphdef, backend, args.steps, sampling=False)
    batch = args.batch
    ints = jnp.zeros((batch,), jnp.int32)
    arguments = (ints, jnp.full((batch,), args.context, jnp.int32), jnp.ones((batch,), bool), ints,
                 jnp.full((batch,), 1 << 30, jnp.int32), jnp.full((batch, 1), -1, jnp.int32),
                 jnp.zeros((batch,), jnp.float32), ints, jnp.ones((batch,), jnp.float32), jax.random.key(0))
    args.out.mkdir(parents=True, exist_ok=True)
    folder = pathlib.Path(tempfile.mkdtemp(prefix="trace-", dir=args.out))
    try:
        for traced in (False, True):  # the first loop compiles
            if manager is not None:
                manager.reserve_growth(args.steps)
            if traced:
                jax.profiler.start_trace(str(folder), create_perfetto_trace=True)
            start = time.perf_counter()
            outputs = decode(state, cache, *arguments)
            cache = outputs[0]
            jax.block_until_ready(outputs[5])
            wall = time.perf_counter() - start
            if traced:
                jax.profiler.stop_trace()
    finally:
        if manager is not None:
            manager.cache = cache
            manager.close()
    path, kernels = traced_kernels(folder)
    step_ms = wall * 1e3 / args.steps
    print(f"step {step_ms:.3f} ms (wall, traced), backend {backend}; trace: {path or 'none written'}")
    if not kernels:
        print("no device kernel events in the trace (not a GPU, or the profiler could not record the "
              "device): nothing to break down")
        return 0
    bandwidth = copy_ceiling(2.0) if on_gpu else None
    roof = roofline_seconds(model, batch, args.context, bandwidth)
    by_kind, idle, top = breakdown(kernels, args.steps, wall)
    print(f"{'kind':10s} {'ms/step':>9s} {'share':>7s}")
    for kind in (*KINDS, "idle"):
        ms = idle if kind == "idle" else by_kind[kind]
        print(f"{kind:10s} {ms:9.3f} {ms / step_ms:7.1%}")
    if roof:
        print(f"roofline {roof * 1e3:.3f} ms (weights + live KV at {bandwidth / 1e12:.2f} TB/s): the step is "
              f"{step_ms / (roof * 1e3):.2f}x; matmuls alone {by_kind['matmul'] / (roof * 1e3):.2f}x of it")
    print(f"top {args.top} kernels by time:")
    for name, kind, ms, calls in top[:args.top]:
        print(f"  {ms:8.3f} ms/step {calls:6.1f} calls/step  {kind:9s} {name[:90]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(standalone(__doc__, add_arguments, run))
