"""What a cache holds: layers, slots, tokens per slot, heads, dtype, memory."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax.numpy as jnp
import numpy as np

from jax_vattention.cache.quantization import check_scales, is_quantized

# How a cache lays its layers out in virtual memory:
#   "per_layer":   one K and one V buffer per layer, [max_batch, capacity, kv_heads, head_dim].
#                  Any unpaged kernel (cuDNN too) reads a layer in place. A request holds at least
#                  one page in each of the 2 x layers buffers.
#   "interleaved": one K and one V buffer, [max_batch, capacity, layers, kv_heads, head_dim]: a page
#                  holds a few tokens of every layer, so a request wastes at most one page per
#                  buffer. Decode reads a layer in place with the Pallas kernel (backend "pallas").
LAYOUTS = ("per_layer", "interleaved")
# float8_e4m3fn: an FP8 cache of codes and per-tensor scales (see jax_vattention.cache.quantization).
DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32, jnp.float8_e4m3fn)
# The dtypes XLA's CPU compiler has no native scatter or gather for: around one it converts the whole
# operand to a wider type and back, which reads every page of a cache. On the CPU backend the writes
# and the blocked kernel's reads of these go through host callbacks that touch only the live tokens.
CPU_HOST_INDEXED_DTYPES = frozenset({jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float8_e4m3fn)})
# The largest buffer (one layer's K or V, or all layers' in the interleaved layout): beyond any
# device's virtual address space, and small enough that no size derived from it overflows.
MAX_BUFFER_BYTES = 2**48

# Counts (tokens, pages, slots) at or above this are refused before they reach C++, where they
# would wrap: no cache comes near it (a buffer has at most 2**48 bytes).
COUNT_LIMIT = 2**63


def count(name: str, value) -> int:
    """``value`` as an int if it is a non-negative integer below 2**63, else ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    if value >= COUNT_LIMIT:
        raise ValueError(f"{name}={value} is too large (at least 2**63): pass a count that fits the cache")
    return int(value)


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    """The shape and memory policy of a virtual KV cache.

    Parameters
    ----------
    num_layers, max_batch, max_len, kv_heads, head_dim : int
        The cache holds ``max_batch`` slots of up to ``max_len`` tokens for
        each of ``num_layers`` layers; a token of one layer is
        ``kv_heads * head_dim`` values in K and as many in V.
    dtype : bfloat16, float16, float32 or float8_e4m3fn
        What the buffers hold. ``float8_e4m3fn``: an FP8 cache, K and V stored as codes with the
        per-tensor scales below (:mod:`jax_vattention.cache.quantization`): a token is half the
        bytes of a 16-bit one, so a page holds twice the tokens. The model computes in its own
        dtype; :func:`~jax_vattention.cache.writes.write_kv` quantizes and the attention kernels
        dequantize. (One ``dtype``, not a second ``kv_dtype``: a cache has one dtype, the one its
        buffers hold and every size here follows; what the model computes in is the model's.)
    page_bytes : int or None
        Size of one physical page; a multiple of the driver's granularity
        (2 MiB on the CUDA driver; 64 KiB on the CPU backend). None: the
        granularity.
    budget_bytes : int or None
        Physical memory the cache may map at once. None: ``budget_fraction``
        of the device's free memory when the manager is created.
    budget_fraction : float
    layout : str
        ``"per_layer"`` or ``"interleaved"`` (see ``LAYOUTS`` in this module).
    window : int or None
        The model's sliding window, in tokens: the layers in ``window_layers`` (every layer when
        None) attend only to the last ``window`` positions, a query's own included. Their pages
        wholly behind every query's window are unmapped as a request advances (the reserved range
        stays; the physical pages go back to the pool), so their memory stops growing with the
        conversation. Per-layer layout: the K and V buffers of each window layer. Interleaved
        layout: a page holds a token range of every layer, so a page can go only when every layer
        has a window (Mistral); with full layers among them (Gemma) nothing is unmapped.
    window_layers : tuple of int or None
    k_scale, v_scale : float
        An FP8 cache's static per-tensor scales (vLLM's ``k_scale`` / ``v_scale``): a key ``x``
        is stored as ``x / k_scale`` rounded to e4m3. 1.0 (the default, as vLLM's uncalibrated
        one) for any other dtype.

    Example::

        config = CacheConfig(num_layers=32, max_batch=8, max_len=4096,
                             kv_heads=8, head_dim=128)
        config.kv_bytes_per_token  # 131072: 128 KiB over all layers
    """

    num_layers: int
    max_batch: int
    max_len: int
    kv_heads: int
    head_dim: int
    dtype: Any = jnp.bfloat16
    page_bytes: int | None = None
    budget_bytes: int | None = None
    budget_fraction: float = 0.9
    layout: str = "per_layer"
    window: int | None = None
    window_layers: tuple[int, ...] | None = None
    k_scale: float = 1.0
    v_scale: float = 1.0

    def __post_init__(self):
        for name in ("num_layers", "max_batch", "max_len", "kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"CacheConfig.{name} must be a positive integer, got {value!r}")
            if value > MAX_BUFFER_BYTES:
                raise ValueError(f"CacheConfig.{name}={value} is larger than 2**48: no cache can be that large")
        if jnp.dtype(self.dtype) not in [jnp.dtype(d) for d in DTYPES]:
            raise ValueError(f"CacheConfig.dtype must be bfloat16, float16, float32 or float8_e4m3fn, "
                             f"got {self.dtype!r}")
        check_scales(self.dtype, self.k_scale, self.v_scale, "CacheConfig")
        if self.page_bytes is not None and (not isinstance(self.page_bytes, (int, np.integer))
                                            or isinstance(self.page_bytes, bool) or not
                                            0 < self.page_bytes <= MAX_BUFFER_BYTES):
            raise ValueError(f"CacheConfig.page_bytes must be a positive integer of at most 2**48 or None, "
                             f"got {self.page_bytes!r}")
        if self.budget_bytes is not None and (not isinstance(self.budget_bytes, (int, np.integer))
                                              or isinstance(self.budget_bytes, bool)
                                              or not 0 <= self.budget_bytes < 2**63):
            raise ValueError(f"CacheConfig.budget_bytes must be a non-negative integer below 2**63 or None, "
                             f"got {self.budget_bytes!r}")
        if not 0.0 < self.budget_fraction <= 1.0:
            raise ValueError(f"CacheConfig.budget_fraction must be in (0, 1], got {self.budget_fraction!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"CacheConfig.layout {self.layout!r} is not supported; choose one of {LAYOUTS}")
        if self.window is not None and (isinstance(self.window, bool) or not isinstance(self.window, (int, np.integer))
                                        or not 0 < self.window < COUNT_LIMIT):
            raise ValueError(f"CacheConfig.window must be a positive number of tokens or None, got {self.window!r}")
        if self.window_layers is not None:
            if self.window is None:
                raise ValueError("CacheConfig.window_layers needs a window")
            if any(isinstance(layer, bool) or not isinstance(layer, (int, np.integer))
                   or not 0 <= layer < self.num_layers for layer in self.window_layers):
                raise ValueError(f"CacheConfig.window_layers must be layers 0..{self.num_layers - 1}, "
                                 f"got {self.window_layers!r}")
        self.check_buffer_bytes(self.capacity(self.page_bytes or 1))

    def check_buffer_bytes(self, capacity: int) -> None:
        """Raises ``ValueError`` if a buffer of ``capacity`` tokens per slot exceeds 2**48 bytes."""
        buffer_bytes = self.max_batch * capacity * self.token_bytes
        if buffer_bytes > MAX_BUFFER_BYTES:
            raise ValueError(f"a cache buffer of {self.max_batch} slots x {capacity} tokens x {self.token_bytes} "
                             f"bytes is {buffer_bytes} bytes, more than 2**48: lower max_batch, max_len or "
                             f"page_bytes")

    @property
    def quantized(self) -> bool:
        """Whether the buffers hold FP8 codes (see ``dtype``)."""
        return is_quantized(self.dtype)

    @property
    def interleaved(self) -> bool:
        return self.layout == "interleaved"

    def layer_window(self, layer: int) -> int | None:
        """The window behind which ``layer``'s pages are unmapped (None: the layer keeps every page)."""
        if self.window is None or (self.window_layers is not None and layer not in self.window_layers):
            return None
        return self.window

    @property
    def windowed_buffers(self) -> tuple[bool, ...]:
        """One flag per buffer (K then V): whether pages behind the window are unmapped in it. An
        interleaved buffer holds every layer, so it is windowed only when every layer is."""
        windowed = [self.layer_window(layer) is not None for layer in range(self.num_layers)]
        if self.interleaved:
            return (all(windowed),) * 2
        return tuple(windowed) * 2

    @property
    def num_buffers(self) -> int:
        """K and V of every layer (per-layer layout), or one K and one V (interleaved)."""
        return 2 if self.interleaved else 2 * self.num_layers

    @property
    def token_bytes(self) -> int:
        """Bytes of one token in one buffer: one layer's K (or V), or every layer's (interleaved)."""
        layers = self.num_layers if self.interleaved else 1
        return layers * self.kv_heads * self.head_dim * jnp.dtype(self.dtype).itemsize

    def buffer_shape(self, capacity: int) -> tuple[int, ...]:
        """``[max_batch, capacity, (layers,) kv_heads, head_dim]``."""
        layers = (self.num_layers,) if self.interleaved else ()
        return (self.max_batch, capacity, *layers, self.kv_heads, self.head_dim)

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of one token over all layers, K and V."""
        return self.token_bytes * self.num_buffers

    def capacity(self, page_bytes: int) -> int:
        """Tokens per slot: ``max_len`` rounded up so that a slot is whole pages.

        Slots then never share a page, so each one's memory is mapped and
        reclaimed on its own.
        """
        quantum = page_bytes // math.gcd(page_bytes, self.token_bytes)
        return -(-self.max_len // quantum) * quantum

    def static_bytes(self) -> int:
        """What a static contiguous cache of ``max_batch`` x ``max_len`` tokens would hold."""
        return self.max_batch * self.max_len * self.kv_bytes_per_token
