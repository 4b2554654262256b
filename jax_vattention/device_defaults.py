"""What runs on a device when the user does not say: the model's dtype and the attention kernel."""

from __future__ import annotations

import jax

from jax_vattention import attention
from jax_vattention.models.configs import LlamaConfig, get_config


def default_dtype(dtype: str, device: jax.Device) -> str:
    """``dtype``, but bfloat16 on a GPU where it says float32."""
    return "bfloat16" if device.platform == "gpu" and dtype == "float32" else dtype


def named_model_config(name: str, device: jax.Device) -> LlamaConfig:
    """The named model shape in its :func:`default_dtype` for ``device``."""
    config = get_config(name)
    return config.replace(dtype=default_dtype(config.dtype, device))


def default_backend(layout: str, device: jax.Device) -> str:
    """cuDNN for per-layer caches and the Pallas kernel for interleaved ones on a GPU; the blocked
    XLA kernel elsewhere (:func:`jax_vattention.attention.default_backend`)."""
    return attention.default_backend(layout, device.platform)
