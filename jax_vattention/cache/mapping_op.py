"""The in-graph mapping op."""

from __future__ import annotations

import jax
import numpy as np

from jax_vattention.cache import _ffi
from jax_vattention.cache.kv_cache import KVCache


def grow(cache: KVCache, tokens: int = 1) -> KVCache:
    """Maps the pages that adding ``tokens`` to every active slot needs; returns the cache.

    Call it inside the jitted step (a ``lax.while_loop`` or ``fori_loop``
    body too) before the step writes its new keys and values, and use the
    cache it returns: the op takes every buffer as an operand aliased to its
    result, which orders it before those writes. It runs on the host each
    time the step runs, advancing the manager's mirror of the slot lengths by
    ``tokens`` (up to the capacity) and mapping pages ahead of the writes.
    For a dense cache it is the identity.

    Parameters
    ----------
    cache : KVCache
        A cache donated to the enclosing jitted function. A copied cache
        (not donated) makes the op fail with an error that says so.
    tokens : int
        Static: the tokens every active slot gains in this step.

    Example::

        @functools.partial(jax.jit, donate_argnames="cache")
        def step(cache, k, v, lengths):
            cache = jax_vattention.grow(cache, tokens=1)
            return jax_vattention.write_kv(cache, 0, k, v, start=lengths, count=jnp.ones_like(lengths))
    """
    if isinstance(tokens, bool) or not isinstance(tokens, (int, np.integer)) or tokens < 0:
        raise ValueError(f"tokens must be a static non-negative integer, got {tokens!r}")
    if cache.is_dense:
        return cache
    buffers = (*cache.k, *cache.v)
    grown = jax.ffi.ffi_call(
        _ffi.GROW_TARGET,
        tuple(jax.ShapeDtypeStruct(buffer.shape, buffer.dtype) for buffer in buffers),
        input_output_aliases={i: i for i in range(len(buffers))},
        # No declared side effect: JAX dispatches a jitted function with effects through its slow
        # Python path. The call stays because its results are the cache the caller returns, and its
        # handlers do not claim command-buffer compatibility, so CUDA graphs never capture it.
        has_side_effect=False,
    )(*buffers, manager=np.uint64(cache.manager_id), tokens=np.int64(tokens))
    half = len(cache.k)
    return cache.replace(k=tuple(grown[:half]), v=tuple(grown[half:]))
