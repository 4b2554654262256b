"""Memory per device for the benchmarks that split a model over a mesh: what the weights take,
whether they and the cache budget fit, and what each device holds after a run.

Why a check before anything is built: a model that does not fit fails deep inside XLA's
allocator (or, for the cache, in the driver) after minutes of compiling and initialising;
the weights' share per device is known from the config alone.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

GiB = 1 << 30
# What a GPU keeps free beside the weights and the cache: the step's activations and logits,
# cuBLAS and cuDNN workspaces, XLA's own buffers.
GPU_HEADROOM = 2 * GiB


def weight_bytes_per_device(config, count: int) -> int:
    """Bytes of the weights one device holds when ``config``'s Llama is split over ``count``
    devices Megatron-style (the split weights' share plus every replicated weight)."""
    from jax_vattention.models.llama import Llama
    from jax_vattention.tensor_parallel import param_specs

    abstract = nnx.state(nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0))))
    specs = param_specs(abstract, "tp")
    total = 0
    for value, spec in zip(jax.tree_util.tree_leaves(abstract),
                           jax.tree_util.tree_leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))):
        size = int(np.prod(value.shape)) * np.dtype(value.dtype).itemsize
        total += size // count if any(axis is not None for axis in spec) else size
    return total


def free_bytes(device: jax.Device) -> int:
    """The device's free memory as the cache's driver sees it (the CUDA driver on a GPU)."""
    from jax_vattention.manager import default_driver

    return int(default_driver(device).memory_info()[0])


def check_fits(config, name: str, devices: list[jax.Device], budget_bytes: int | None) -> None:
    """Raises ``ValueError`` (one line) when ``config``'s weights split over ``devices`` plus the cache
    budget per device (``budget_bytes``; None: at least a GiB) and the headroom cannot fit the free
    memory of the fullest device. GPUs only: a CPU device's memory is the host's."""
    if devices[0].platform != "gpu":
        return
    count = len(devices)
    weights = weight_bytes_per_device(config, count)
    cache = budget_bytes if budget_bytes is not None else GiB
    free = min(free_bytes(device) for device in devices)
    needed = weights + cache + GPU_HEADROOM
    if needed > free:
        more = -(-needed * count // max(free, 1))
        raise ValueError(f"{name} ({config.dtype}) over {count} device(s) needs {weights / GiB:.1f} GiB of weights "
                         f"per device + {cache / GiB:.1f} GiB of cache budget + {GPU_HEADROOM / GiB:.0f} GiB of "
                         f"headroom = {needed / GiB:.1f} GiB, but {free / GiB:.1f} GiB is free on "
                         f"{devices[0].device_kind}: use --tp {more} or more (heads permitting) or a smaller "
                         f"--budget-mib")


def device_lines(manager, devices: list[jax.Device]) -> list[str]:
    """One line per device: the cache's mapped memory and peak, and the device memory in use (XLA's
    allocator, from ``memory_stats`` where the backend has it; and the driver's whole-card view on a GPU,
    which counts the cache's pages too: they are mapped outside XLA)."""
    stats = manager.stats()
    per_device = stats.get("per_device", [stats])
    lines = []
    for device, device_stats in zip(devices, per_device):
        line = (f"device {device.id} ({device.device_kind}): cache mapped {device_stats['mapped_bytes'] / 2**20:,.1f} MiB "
                f"in {device_stats['mapped_pages']} pages")
        memory = device.memory_stats() if hasattr(device, "memory_stats") else None
        if memory and "bytes_in_use" in memory:
            line += (f"; XLA in use {memory['bytes_in_use'] / GiB:.2f} GiB, peak "
                     f"{memory.get('peak_bytes_in_use', 0) / GiB:.2f} GiB")
        if device.platform == "gpu":
            from jax_vattention.manager import default_driver
            free, total = default_driver(device).memory_info()
            line += f"; card in use {(total - free) / GiB:.2f} of {total / GiB:.2f} GiB"
        lines.append(line)
    return lines
