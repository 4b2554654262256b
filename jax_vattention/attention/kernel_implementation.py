"""Which implementation of our Pallas kernels a ``pallas*`` backend runs: Triton or Mosaic GPU.

Our decode and chunk kernels each exist twice, one algorithm on two Pallas backends
(:mod:`jax_vattention.attention.kernels`). The backend names pick between them:
``pallas_triton`` and ``pallas_mgpu`` pin one, ``pallas`` takes the device's best. Both the
backend rule (:mod:`~jax_vattention.attention.backends`) and the kernel calls
(:mod:`~jax_vattention.attention.adapters`) ask this one module, so the choice is made in one place.
"""

from __future__ import annotations

import jax

# Our Pallas kernels' backend names and the implementation each pins (None: the device's, see
# pallas_implementation).
PALLAS_BACKENDS: dict[str, str | None] = {"pallas": None, "pallas_triton": "triton", "pallas_mgpu": "mosaic_gpu"}

# The implementation backend "pallas" runs on a Hopper GPU: "triton" until `vattention bench
# attention` measures Mosaic GPU faster on the same card (docs/benchmarks.md), then "mosaic_gpu".
PALLAS_ON_HOPPER = "triton"


def is_hopper(compute_capability) -> bool:
    """Whether ``compute_capability`` (``jax.Device.compute_capability``, e.g. ``"9.0"``) is sm_90's."""
    return compute_capability is not None and str(compute_capability).split(".")[0] == "9"


def pallas_implementation(backend: str | None, dtype, head_dim: int, group: int, max_len: int = 0,
                          compute_capability=None) -> str:
    """``"triton"`` or ``"mosaic_gpu"``: which implementation of our kernels ``backend`` runs for a cache
    of ``dtype``, ``head_dim`` and ``max_len`` tokens per slot with ``group`` query heads per kv head.

    ``pallas_triton`` and ``pallas_mgpu`` pin theirs; ``pallas`` (or None) takes :data:`PALLAS_ON_HOPPER`
    on a Hopper GPU (``compute_capability``, by default the first device's) where the Mosaic GPU kernels
    take the shapes (16-bit, ``head_dim`` a multiple of 64 up to 256, ``max_len`` a multiple of 8), and
    Triton everywhere else.
    """
    pinned = PALLAS_BACKENDS.get(backend or "pallas")
    if pinned is not None:
        return pinned
    if PALLAS_ON_HOPPER != "mosaic_gpu":
        return "triton"
    from jax_vattention.attention.kernels.mosaic_decode_attention import supported
    if compute_capability is None:
        device = jax.devices()[0]
        compute_capability = getattr(device, "compute_capability", None) if device.platform == "gpu" else None
    mosaic = is_hopper(compute_capability) and supported(dtype, head_dim, group, max_len)
    return "mosaic_gpu" if mosaic else "triton"
