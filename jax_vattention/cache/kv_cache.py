"""The KV cache pytree that flows through jitted code.

A :class:`KVCache` holds one ``k`` and one ``v`` array per layer, each shaped
``[max_batch, capacity, kv_heads, head_dim]`` — or, in the interleaved layout,
one ``k`` and one ``v`` array for all layers, ``[max_batch, capacity, layers,
kv_heads, head_dim]``. For a cache made by a
:class:`~jax_vattention.CacheManager` these arrays are views of reserved
virtual ranges (GPU) or XLA-owned buffers the OS commits lazily (CPU): only
the pages that hold live tokens use physical memory. They must be donated to
every jitted function that takes them and returned from it, so that XLA
updates them in place.

``manager_id`` names the manager whose mapping op serves the cache; it is
static (part of the tree structure), so changing managers retraces. A dense
cache (``manager_id == 0``) is an ordinary zero-filled cache with the same
interface: the reference that tests compare against.

An FP8 cache (``float8_e4m3fn`` arrays) holds codes; ``k_scale`` and ``v_scale`` (static, like
``manager_id``) turn them back into keys and values (:mod:`jax_vattention.cache.quantization`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jax_vattention.cache.quantization import as_stored, check_scales, is_quantized


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Per-layer key and value arrays, each ``[max_batch, capacity, kv_heads, head_dim]``.

    Example::

        cache = KVCache.dense(num_layers=2, max_batch=4, capacity=128,
                              kv_heads=2, head_dim=16, dtype=jnp.float32)
        cache.k[0].shape  # (4, 128, 2, 16)
    """

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    manager_id: int = dataclasses.field(default=0, metadata=dict(static=True))
    interleaved: bool = dataclasses.field(default=False, metadata=dict(static=True))
    k_scale: float = dataclasses.field(default=1.0, metadata=dict(static=True))
    v_scale: float = dataclasses.field(default=1.0, metadata=dict(static=True))

    @property
    def quantized(self) -> bool:
        """Whether the arrays hold FP8 codes, read back with ``k_scale`` and ``v_scale``."""
        return is_quantized(self.k[0].dtype)

    @property
    def kv_scales(self) -> dict[str, float]:
        """``dict(k_scale=..., v_scale=...)``: what :func:`~jax_vattention.attention.attend` takes to
        read this cache."""
        return dict(k_scale=self.k_scale, v_scale=self.v_scale)

    def as_stored(self, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
        """New keys and values as a kernel reading this cache sees them once written: cast to its
        dtype, or for an FP8 cache quantized and dequantized back to their own dtype."""
        dtype = self.k[0].dtype
        return as_stored(k, dtype, self.k_scale), as_stored(v, dtype, self.v_scale)

    @property
    def num_layers(self) -> int:
        return self.k[0].shape[2] if self.interleaved else len(self.k)

    def layer(self, index: int) -> tuple[jax.Array, jax.Array, int | None]:
        """``(k, v, layer)`` to read layer ``index``: its own arrays and None (per-layer layout),
        or the shared 5-D arrays and ``index`` (interleaved). Nothing is sliced or copied."""
        if not 0 <= index < self.num_layers:
            raise ValueError(f"layer {index} is out of range for a cache of {self.num_layers} layers")
        if self.interleaved:
            return self.k[0], self.v[0], index
        return self.k[index], self.v[index], None

    @property
    def max_batch(self) -> int:
        return self.k[0].shape[0]

    @property
    def capacity(self) -> int:
        """Tokens a slot can hold: the second axis of every array."""
        return self.k[0].shape[1]

    @property
    def is_dense(self) -> bool:
        """True for a plain zero-filled cache that no manager serves."""
        return self.manager_id == 0

    def replace(self, **changes) -> "KVCache":
        return dataclasses.replace(self, **changes)

    @staticmethod
    def dense(*, num_layers: int, max_batch: int, capacity: int, kv_heads: int,
              head_dim: int, dtype=jnp.bfloat16, device=None, interleaved: bool = False,
              k_scale: float = 1.0, v_scale: float = 1.0) -> "KVCache":
        """A plain contiguous cache of zeros: the reference for the virtual one (an FP8 one with
        ``k_scale`` and ``v_scale``)."""
        k_scale, v_scale = check_scales(dtype, k_scale, v_scale, "KVCache")
        layers = (num_layers,) if interleaved else ()
        shape = (max_batch, capacity, *layers, kv_heads, head_dim)
        def zeros():
            array = jnp.zeros(shape, dtype)
            return jax.device_put(array, device) if device is not None else array
        buffers = 1 if interleaved else num_layers
        return KVCache(k=tuple(zeros() for _ in range(buffers)),
                       v=tuple(zeros() for _ in range(buffers)), interleaved=interleaved, k_scale=k_scale,
                       v_scale=v_scale)
