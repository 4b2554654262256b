"""Unpaged attention over a KV cache, with the kernel chosen by one argument.

Every backend reads the per-layer cache arrays ``[max_batch, capacity,
kv_heads, head_dim]`` as they are, with no slice, transpose or copy of a whole
cache array, and uses only each row's first ``kv_lengths[b]`` positions (the
``xla`` reference alone copies a layer out of an interleaved cache). That
is what lets a virtual cache, whose pages past the live tokens are unmapped,
serve unmodified kernels: switching kernels is a change of ``backend=``.

Backends
--------
``xla``
    The reference: plain einsums with float32 softmax. It reads the whole
    capacity and masks, so it is for dense caches and tests; it is refused for
    a virtual cache on a GPU (see :func:`resolve_backend`).
``blocked``
    Plain XLA too, but a loop over blocks of ``BLOCK_TOKENS`` keys with an online
    softmax that stops at the longest row, each row reading only positions below
    its own length. The default on CPU: the OS commits only the pages that hold
    live tokens, and it is safe on a partly mapped GPU cache.
``cudnn``
    ``jax.nn.dot_product_attention(implementation="cudnn")`` with
    ``key_value_seq_lengths``: it stops at each row's length, safe on a partly
    mapped cache. Prefill (``q_len > 1``) assumes each row's queries start at
    position 0 (top-left causal mask), which is how :mod:`jax_vattention.decode.generate`
    prefills.
``pallas``
    Our kernels (:mod:`jax_vattention.attention.kernels`): decode (``q_len == 1``) runs our
    decode kernel and the engine's prefill chunks our chunk kernel; other prefill falls back to
    ``cudnn`` on GPU and ``blocked`` elsewhere. Each kernel has two implementations of one
    algorithm, Triton and Mosaic GPU (TMA and wgmma, Hopper only), and ``pallas`` runs the one
    :func:`~jax_vattention.attention.kernel_implementation.pallas_implementation` picks for the
    device: Triton, or Mosaic GPU on Hopper once
    :data:`~jax_vattention.attention.kernel_implementation.PALLAS_ON_HOPPER` says so.
``pallas_triton``, ``pallas_mgpu``
    ``pallas`` pinned to one implementation, for benchmarks, tests and for a deployment that must
    not change kernels when JAX does. Why names of their own rather than an option: a backend is
    the one thing every caller (``generate``, the engine, the CLI) already passes through, so the
    pin needs no new parameter anywhere, and ``pallas`` stays the name to use for "our kernels,
    the device's best". JAX 0.11 deprecated Pallas' Triton backend; ``pallas_triton`` stays while
    JAX ships it.
``mosaic``
    JAX's Mosaic GPU flash attention (FlashAttention-3 on Hopper,
    ``jax.experimental.pallas.ops.gpu.attention_mgpu``), a kernel we did not write
    and that has no paged version, for prompt prefill from position 0: it takes no
    lengths, so it attends each prompt over the prompt's own keys and values
    (:func:`attend_prompt`, causal: a real query never sees a padding key). Hopper
    only, 16-bit caches, ``head_dim`` a multiple of 64. Decode runs cuDNN on a
    per-layer cache and the Pallas decode kernel on an interleaved one.

An FP8 cache (``float8_e4m3fn`` codes with per-tensor scales, :mod:`jax_vattention.cache.quantization`)
is read by ``pallas`` (our Triton kernels, which convert the codes tile by tile), ``pallas_triton``,
``blocked`` and ``xla``, and is refused by ``cudnn`` (JAX's cuDNN FP8 attention takes no lengths: it
would read the whole capacity), ``pallas_mgpu`` and ``mosaic`` (16-bit kernels); on a GPU its default
is ``pallas`` in both layouts (:func:`check_cache_dtype`).

Which backend may run is one rule, :func:`resolve_backend`, used by
:func:`attend`, :func:`jax_vattention.decode.generate.generate` and the engine: no
backend is given, the device and layout pick one (:func:`default_backend`);
a backend that reads past the lengths is refused for a virtual cache on a GPU.

Rows and slots: a batch row ``b`` may live in any cache slot ``slots[b]``. The
kernels pair query row ``i`` with cache row ``i``, so the (small) queries are
scattered into a ``[max_batch, ...]`` array, attended, and the rows gathered
back; the cache itself is never gathered.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax.numpy as jnp

from jax_vattention.attention.adapters import (CUDNN_DTYPES, CUDNN_FP8_REFUSAL, check_mosaic_shapes,
                                               cudnn_attention, mosaic_attention, pallas_attention)
from jax_vattention.attention.kernel_implementation import PALLAS_BACKENDS, is_hopper
from jax_vattention.attention.reference import blocked_attention, xla_attention
from jax_vattention.cache.quantization import is_quantized

BACKENDS: dict[str, Callable] = {
    "xla": xla_attention,
    "blocked": blocked_attention,
    "cudnn": cudnn_attention,
    **{name: functools.partial(pallas_attention, backend=name) for name in PALLAS_BACKENDS},
    "mosaic": mosaic_attention,
}


# Backends that read every position of the capacity, not only each row's first kv_lengths[b].
READS_WHOLE_CAPACITY = frozenset({"xla"})

# Backends whose prefill kernel takes no lengths: a prompt attends over its own keys (attend_prompt).
PROMPT_KERNELS = frozenset({"mosaic"})


def check_backend(backend: str) -> None:
    """Raises ``ValueError`` unless ``backend`` names one of :data:`BACKENDS`."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")




def check_pallas_mgpu_shapes(dtype, head_dim: int | None, capacity: int | None = None) -> None:
    """``ValueError`` unless the Mosaic GPU kernels take a cache of ``dtype``, ``head_dim`` and
    ``capacity`` tokens per slot."""
    if jnp.dtype(dtype) not in CUDNN_DTYPES:
        raise ValueError(f"backend 'pallas_mgpu' takes bfloat16 or float16 caches, not {jnp.dtype(dtype)}: use "
                         "'pallas_triton' or 'blocked'")
    if head_dim is not None and (head_dim % 64 or not 64 <= head_dim <= 256):
        raise ValueError(f"backend 'pallas_mgpu' needs head_dim a multiple of 64 up to 256 (whole 128-byte "
                         f"wgmma rows); this cache has {head_dim}: use 'pallas_triton'")
    if capacity is not None and capacity % 8:
        raise ValueError(f"backend 'pallas_mgpu' needs a capacity that is a multiple of 8 tokens (TMA reads the "
                         f"token axis in 8-row tiles); this cache has {capacity}: use 'pallas_triton'")


def default_backend(layout: str, platform: str, dtype=None) -> str:
    """The kernel a device runs when none is named: on a GPU cuDNN for per-layer caches and the
    Pallas kernel for interleaved ones, and the Pallas kernels for an FP8 cache (``dtype``) in both
    layouts (cuDNN cannot read one); ``blocked`` elsewhere, and for a float32 cache on a GPU, which
    cuDNN (and so Pallas' prefill) cannot take. ``platform`` is ``jax.Device.platform``."""
    if platform != "gpu":
        return "blocked"
    if dtype is not None and is_quantized(dtype):
        return "pallas"
    if dtype is not None and jnp.dtype(dtype) not in CUDNN_DTYPES:
        return "blocked"
    return "pallas" if layout == "interleaved" else "cudnn"


def check_cache_dtype(backend: str, dtype) -> None:
    """``ValueError`` unless ``backend`` reads a cache of ``dtype``: an FP8 cache only through the
    kernels that dequantize it (our Triton kernels, ``blocked``, ``xla``)."""
    if not is_quantized(dtype):
        return
    if backend == "cudnn":
        raise ValueError(f"backend 'cudnn': {CUDNN_FP8_REFUSAL}")
    if backend in ("pallas_mgpu", "mosaic"):
        kernels = "our Mosaic GPU kernels" if backend == "pallas_mgpu" else "JAX's Mosaic GPU flash attention"
        raise ValueError(f"backend {backend!r} cannot read an FP8 ({jnp.dtype(dtype)}) cache: {kernels} take "
                         "16-bit K/V only; use 'pallas' or 'pallas_triton' (our Triton kernels dequantize it), "
                         "or 'blocked'")


def check_backend_on(backend: str, layout: str, platform: str, virtual: bool = True, *,
                     compute_capability: str | None = None) -> None:
    """The one rule for which attention backend may read which cache; ``ValueError`` if it may not.

    ``layout`` is the cache's (``"per_layer"`` or ``"interleaved"``), ``platform`` its device's
    ``jax.Device.platform``, ``virtual`` whether a manager serves it, ``compute_capability`` the
    GPU's (``jax.Device.compute_capability``, e.g. ``"9.0"``; None: not checked). Refused: an
    unknown backend; cuDNN off a GPU, or on an interleaved cache (it cannot read one layer in
    place); Mosaic off a Hopper GPU (its kernel is written for sm_90's wgmma); and a backend in
    :data:`READS_WHOLE_CAPACITY` on a virtual cache on a GPU, whose pages past the lengths are
    unmapped: one read there kills the CUDA context.
    """
    check_backend(backend)
    if backend == "pallas_mgpu" and platform != "gpu":
        raise ValueError(f"backend 'pallas_mgpu' (our Mosaic GPU kernels) needs an NVIDIA Hopper GPU; JAX runs on "
                         f"{platform} here: use 'blocked' (or 'pallas_triton', interpreted)")
    if backend == "pallas_mgpu" and compute_capability is not None and not is_hopper(compute_capability):
        raise ValueError(f"backend 'pallas_mgpu' needs a Hopper GPU (compute capability 9.x: its kernels use TMA "
                         f"and wgmma); this GPU's is {compute_capability}: use 'pallas' or 'pallas_triton'")
    if backend == "mosaic" and platform != "gpu":
        raise ValueError(f"backend 'mosaic' (JAX's Mosaic GPU flash attention) needs an NVIDIA Hopper GPU; JAX "
                         f"runs on {platform} here: use 'blocked'")
    if backend == "mosaic" and compute_capability is not None and not is_hopper(compute_capability):
        raise ValueError(f"backend 'mosaic' needs a Hopper GPU (compute capability 9.x: its kernel uses wgmma); "
                         f"this GPU's is {compute_capability}: use 'cudnn' or 'pallas'")
    if backend == "cudnn" and platform != "gpu":
        raise ValueError(f"backend 'cudnn' needs a CUDA GPU; JAX runs on {platform} here: use 'blocked' "
                         "(or 'pallas', which is interpreted and slow off a GPU)")
    if backend == "cudnn" and layout == "interleaved":
        raise ValueError("backend 'cudnn' cannot read one layer of an interleaved cache in place: use the "
                         "per_layer layout or backend 'pallas'")
    if backend in READS_WHOLE_CAPACITY and virtual and platform == "gpu":
        raise ValueError(f"backend {backend!r} reads the whole cache capacity, which a virtual cache on a GPU "
                         "has not mapped (the read would kill the CUDA context): use 'cudnn', 'pallas' or "
                         "'blocked', or None for the device's default")


def backend_for(backend: str | None, layout: str, device, dtype=None, *, virtual: bool = True) -> str:
    """The backend that reads a cache of ``layout`` and ``dtype`` on ``device`` (a ``jax.Device``):
    ``backend``, checked by :func:`check_backend_on`, or for ``None`` the :func:`default_backend`.
    ``virtual``: a manager serves the cache. Raises ``ValueError`` for an unknown or unsafe backend."""
    if backend is None:
        return default_backend(layout, device.platform, dtype)
    check_backend_on(backend, layout, device.platform, virtual=virtual,
                     compute_capability=getattr(device, "compute_capability", None))
    if dtype is not None:
        check_cache_dtype(backend, dtype)
    if backend == "mosaic" and dtype is not None:
        check_mosaic_shapes(dtype, None)
    if backend == "pallas_mgpu" and dtype is not None:
        check_pallas_mgpu_shapes(dtype, None)
    return backend


def resolve_backend(backend: str | None, cache) -> str:
    """The backend that reads ``cache`` (a :class:`KVCache`): :func:`backend_for` its device, layout
    and dtype. Raises ``ValueError`` for an unknown or unsafe backend.
    """
    device = next(iter(cache.k[0].devices()))
    layout = "interleaved" if cache.interleaved else "per_layer"
    backend = backend_for(backend, layout, device, cache.k[0].dtype, virtual=not cache.is_dense)
    if backend == "mosaic":
        check_mosaic_shapes(cache.k[0].dtype, cache.k[0].shape[-1])
    if backend == "pallas_mgpu":
        check_pallas_mgpu_shapes(cache.k[0].dtype, cache.k[0].shape[-1], cache.k[0].shape[1])
    return backend


def prefill_attends_prompt(backend: str, interleaved: bool, softcap: float | None = None) -> bool:
    """Whether a prefill from position 0 attends over the prompt's own keys and values
    (:func:`attend_prompt`) instead of reading the cache: for every backend but the ``xla``
    reference on an interleaved cache (cuDNN cannot read one layer of it in place), and for
    backends whose prefill kernel takes no lengths (:data:`PROMPT_KERNELS`); never with a logit
    ``softcap``, which neither cuDNN nor Mosaic computes (the cache is read by a kernel that does)."""
    if softcap is not None:
        return False
    return backend in PROMPT_KERNELS or (interleaved and backend != "xla")




def default_layout(backend: str) -> str:
    """The interleaved layout unless ``backend`` cannot read it (cuDNN needs a per-layer buffer).

    Why interleaved: pages are whole (2 MiB on a GPU), and a request holds at least one page in
    every buffer it writes. Per-layer caches have 2 x layers buffers, interleaved ones two, so a
    request's minimum drops by the number of layers; the Pallas kernel (GPU) and the blocked XLA
    kernel (CPU) read one layer of it in place.
    """
    return "per_layer" if backend == "cudnn" else "interleaved"


def default_dtype(dtype: str, platform: str) -> str:
    """``dtype``, but bfloat16 on a GPU where it says float32 (cuDNN takes 16-bit caches only)."""
    return "bfloat16" if platform == "gpu" and dtype == "float32" else dtype
