"""What runs on a device when the user does not say: the model's dtype and the attention kernel."""

from __future__ import annotations

import jax


def default_dtype(dtype: str, device: jax.Device) -> str:
    """``dtype``, but bfloat16 on a GPU where it says float32."""
    return "bfloat16" if device.platform == "gpu" and dtype == "float32" else dtype


def default_backend(layout: str, device: jax.Device) -> str:
    """cuDNN for per-layer caches and the Pallas kernel for interleaved ones on a GPU; XLA elsewhere."""
    if device.platform != "gpu":
        return "xla"
    return "pallas" if layout == "interleaved" else "cudnn"
