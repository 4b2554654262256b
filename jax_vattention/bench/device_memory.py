"""Memory per device for the benchmarks that split a model over a mesh: what the weights take,
whether they and the cache budget fit, and what each device holds after a run.

Why a check before anything is built: a model that does not fit fails deep inside XLA's
allocator (or, for the cache, in the driver) after minutes of compiling and initialising;
the weights' share per device is known from the config alone.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from flax import nnx

GiB = 1 << 30
# What a GPU keeps free beside the weights and the cache: the step's activations and logits,
# cuBLAS and cuDNN workspaces, XLA's own buffers.
GPU_HEADROOM = 2 * GiB


@functools.lru_cache(maxsize=8)
def _weight_bytes(config) -> tuple[int, int]:
    """``(split, replicated)``: bytes of the weights a Megatron-style split divides over the devices,
    and of those every device holds whole (embeddings, norms, ``lm_head``)."""
    from jax_vattention.models.llama import Llama
    from jax_vattention.models.sharding import partition_specs

    abstract = nnx.state(nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0))))
    specs = partition_specs(abstract, "tp")
    split = replicated = 0
    is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)  # noqa: E731
    for value, spec in zip(jax.tree_util.tree_leaves(abstract), jax.tree_util.tree_leaves(specs, is_leaf=is_spec)):
        size = int(np.prod(value.shape)) * np.dtype(value.dtype).itemsize
        if any(axis is not None for axis in spec):
            split += size
        else:
            replicated += size
    return split, replicated


def weight_bytes_per_device(config, count: int) -> int:
    """Bytes of the weights one device holds when ``config``'s Llama is split over ``count``
    devices Megatron-style (the split weights' share plus every replicated weight)."""
    split, replicated = _weight_bytes(config)
    return split // count + replicated


def free_bytes(device: jax.Device) -> int:
    """The device's free memory as the cache's driver sees it (the CUDA driver on a GPU)."""
    from jax_vattention.cache.manager import default_driver

    return int(default_driver(device).memory_info()[0])


def check_fits(config, name: str, devices: list[jax.Device], budget_bytes: int | None) -> None:
    """Raises ``ValueError`` (one line) when ``config``'s weights split over ``devices``, the cache
    budget per device (``budget_bytes``; None: at least a GiB) and the headroom cannot fit the free
    memory of the fullest GPU. CPU devices share the host's memory: there every device's weights
    together must fit it (the cache is committed page by page as it is written, so it is not counted)."""
    count = len(devices)
    weights = weight_bytes_per_device(config, count)
    if devices[0].platform != "gpu":
        free = free_bytes(devices[0])
        if weights * count + GPU_HEADROOM > free:
            raise ValueError(f"{name} ({config.dtype}) over {count} CPU device(s) needs {weights * count / GiB:.1f} "
                             f"GiB of weights in host memory, but {free / GiB:.1f} GiB is free")
        return
    cache = budget_bytes if budget_bytes is not None else GiB
    free = min(free_bytes(device) for device in devices)
    needed = weights + cache + GPU_HEADROOM
    if needed > free:
        split, replicated = _weight_bytes(config)
        fitting = [d for d in range(count + 1, config.num_kv_heads + 1)
                   if not (config.num_heads % d or config.num_kv_heads % d or config.intermediate_size % d)
                   and split // d + replicated + cache + GPU_HEADROOM <= free]
        advice = f"use --tp {fitting[0]}" if fitting else "no degree fits these devices"
        raise ValueError(f"{name} ({config.dtype}) over {count} device(s) needs {weights / GiB:.1f} GiB of weights "
                         f"per device + {cache / GiB:.1f} GiB of cache budget + {GPU_HEADROOM / GiB:.0f} GiB of "
                         f"headroom = {needed / GiB:.1f} GiB, but {free / GiB:.1f} GiB is free on "
                         f"{devices[0].device_kind}: {advice} (or a smaller --budget-mib)")


def device_lines(manager, devices: list[jax.Device]) -> list[str]:
    """One line per device: the cache's mapped memory and peak, and the device memory in use (XLA's
    allocator, from ``memory_stats`` where the backend has it; and the driver's whole-card view on a GPU,
    which counts the cache's pages too: they are mapped outside XLA)."""
    stats = manager.stats()
    per_device = stats.get("per_device", [stats])
    lines = []
    for device, device_stats in zip(devices, per_device):
        line = (f"device {device.id} ({device.device_kind}): cache mapped "
                f"{device_stats['mapped_bytes'] / 2**20:,.1f} MiB in {device_stats['mapped_pages']} pages")
        memory = device.memory_stats() if hasattr(device, "memory_stats") else None
        if memory and "bytes_in_use" in memory:
            line += (f"; XLA in use {memory['bytes_in_use'] / GiB:.2f} GiB, peak "
                     f"{memory.get('peak_bytes_in_use', 0) / GiB:.2f} GiB")
        if device.platform == "gpu":
            from jax_vattention.cache.manager import default_driver
            free, total = default_driver(device).memory_info()
            line += f"; card in use {(total - free) / GiB:.2f} of {total / GiB:.2f} GiB"
        lines.append(line)
    return lines
