"""What the benchmarks that run a model choose for a device: its dtype and its attention kernel."""

from __future__ import annotations

import jax

from jax_vattention.models.configs import get_config


def bench_model_config(name: str, device: jax.Device):
    """The named model shape, in bfloat16 on a GPU where the shape says float32."""
    config = get_config(name)
    if device.platform == "gpu" and config.dtype == "float32":
        config = config.replace(dtype="bfloat16")
    return config


def default_backend(layout: str, device: jax.Device) -> str:
    """cuDNN for per-layer caches and the Pallas kernel for interleaved ones on a GPU; XLA elsewhere."""
    if device.platform != "gpu":
        return "xla"
    return "pallas" if layout == "interleaved" else "cudnn"
