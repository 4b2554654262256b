"""Whether a model's weights and its cache fit the memory a run has, checked before anything is built.

Why a check first: a model that does not fit fails deep inside XLA's allocator (or, for the cache,
in the driver) after minutes of compiling and initialising, or on a CPU, where the weights live in
host memory, it is killed by the operating system with other processes' memory. The weights' bytes
per device are known from the config alone (in the dtype the run uses), the cache's from its
budget.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from flax import nnx

GiB = 1 << 30
# What a device keeps free beside the weights and the cache: the step's activations and logits,
# cuBLAS and cuDNN workspaces, XLA's own buffers (on a CPU: the process, JAX and Python).
HEADROOM = 2 * GiB


@functools.lru_cache(maxsize=8)
def _weight_bytes(config) -> tuple[int, int]:
    """``(split, replicated)``: bytes of the weights a Megatron-style split divides over the devices,
    and of those every device holds whole (embeddings, norms, ``lm_head``)."""
    from jax_vattention.models.llama import Llama

    abstract = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0)))
    state = nnx.state(abstract)
    specs = abstract.partition_specs("tp", 1)
    split = replicated = 0
    is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)  # noqa: E731
    for value, spec in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(specs, is_leaf=is_spec)):
        size = int(np.prod(value.shape)) * np.dtype(value.dtype).itemsize
        if any(axis is not None for axis in spec):
            split += size
        else:
            replicated += size
    return split, replicated


def weight_bytes_per_device(config, count: int) -> int:
    """Bytes of the weights one device holds when ``config``'s model is split over ``count``
    devices Megatron-style (the split weights' share plus every replicated weight)."""
    split, replicated = _weight_bytes(config)
    return split // count + replicated


def free_bytes(device: jax.Device) -> int:
    """The device's free memory as the cache's driver sees it (the CUDA driver on a GPU, the host's
    available memory on a CPU)."""
    from jax_vattention.cache.manager import default_driver

    return int(default_driver(device).memory_info()[0])


def check_fits(config, name: str, devices: list[jax.Device], cache_bytes: int | None) -> None:
    """Raises ``ValueError`` (one line, with what would fit) when ``config``'s weights in their dtype,
    split over ``devices``, the cache (``cache_bytes`` per device; None: a GiB) and the headroom cannot
    fit the free memory of the fullest device.

    CPU devices share the host's memory: every device's weights and cache together must fit it.
    """
    count = len(devices)
    weights = weight_bytes_per_device(config, count)
    cache = cache_bytes if cache_bytes is not None else GiB
    if devices[0].platform != "gpu":
        free = free_bytes(devices[0])
        needed = (weights + cache) * count + HEADROOM
        if needed > free:
            room = free - weights * count - HEADROOM
            advice = (f"a cache budget of {room / GiB:.1f} GiB would fit (--budget-mib {room >> 20})" if room > 0 else
                      "use a smaller model or dtype (--dtype bfloat16 halves float32 weights), or a GPU")
            raise ValueError(f"{name} ({config.dtype}) needs {weights * count / GiB:.1f} GiB of weights + "
                             f"{cache * count / GiB:.1f} GiB of cache + {HEADROOM / GiB:.0f} GiB of headroom = "
                             f"{needed / GiB:.1f} GiB of host memory, but {free / GiB:.1f} GiB is free: {advice}")
        return
    free = min(free_bytes(device) for device in devices)
    needed = weights + cache + HEADROOM
    if needed > free:
        split, replicated = _weight_bytes(config)
        fitting = [d for d in range(count + 1, config.num_kv_heads + 1)
                   if not (config.num_heads % d or config.num_kv_heads % d or config.intermediate_size % d)
                   and split // d + replicated + cache + HEADROOM <= free]
        room = free - weights - HEADROOM
        advice = (f"use --tp {fitting[0]}" if fitting else
                  f"a cache of {room / GiB:.1f} GiB would fit (--budget-mib {room >> 20})" if room > 0 else
                  "no degree fits these devices")
        raise ValueError(f"{name} ({config.dtype}) over {count} device(s) needs {weights / GiB:.1f} GiB of weights "
                         f"per device + {cache / GiB:.1f} GiB of cache + {HEADROOM / GiB:.0f} GiB of "
                         f"headroom = {needed / GiB:.1f} GiB, but {free / GiB:.1f} GiB is free on "
                         f"{devices[0].device_kind}: {advice}")
