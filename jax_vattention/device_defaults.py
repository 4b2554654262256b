"""What runs on a device when the user does not say: the model's dtype, the cache layout and the
attention kernel; and the combinations a device cannot run, refused before anything compiles
(the rule itself is :func:`jax_vattention.attention.check_backend_on`)."""

from __future__ import annotations

import jax

from jax_vattention import attention


def default_dtype(dtype: str, device: jax.Device) -> str:
    """``dtype``, but bfloat16 on a GPU where it says float32."""
    return "bfloat16" if device.platform == "gpu" and dtype == "float32" else dtype


def default_backend(layout: str, device: jax.Device) -> str:
    """cuDNN for per-layer caches and the Pallas kernel for interleaved ones on a GPU; the blocked
    XLA kernel elsewhere (:func:`jax_vattention.attention.default_backend`)."""
    return attention.default_backend(layout, device.platform)


def default_layout(backend: str) -> str:
    """The interleaved layout unless ``backend`` cannot read it (cuDNN needs a per-layer buffer).

    Why interleaved: pages are whole (2 MiB on a GPU), and a request holds at least one page in
    every buffer it writes. Per-layer caches have 2 x layers buffers, interleaved ones two, so a
    request's minimum drops by the number of layers; the Pallas kernel (GPU) and the blocked XLA
    kernel (CPU) read one layer of it in place.
    """
    return "per_layer" if backend == "cudnn" else "interleaved"


def check_backend_on(backend: str, layout: str, device: jax.Device) -> None:
    """Raises ``ValueError`` for a kernel that cannot read a virtual cache of ``layout`` on ``device``."""
    attention.check_backend_on(backend, layout, device.platform, virtual=True,
                               compute_capability=getattr(device, "compute_capability", None))
