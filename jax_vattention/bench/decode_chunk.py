"""A chunk of decode steps for all slots in one compiled loop (the page-crossing benchmark's program).

It donates the cache and returns it. The decode chunk runs ``steps`` decode
steps over every slot of the cache in a ``fori_loop``; each step first calls
the mapping op (``grow``) and then writes one token per running slot, so the
host's mirror of the lengths, which adds one token per step to every
allocated slot, is never behind the device. Slots that are free or finished
write nothing and attend over nothing.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from jax_vattention.cache.mapping_op import grow
from jax_vattention.cache.kv_cache import KVCache
from jax_vattention.cache.donation import cache_jit
from jax_vattention.decode.mesh import CACHE
from jax_vattention.decode.sampling import SamplingParams
from jax_vattention.decode.step_batch import decode_batch, model_step


def _decode_chunk(graphdef, backend: str, steps: int, sampling: bool | None, state, cache: KVCache, last,
                  lengths, running, generated, max_new, stops, temperature, top_k, top_p, key):
    """One chunk of ``steps`` decode steps over all ``max_batch`` slots.

    ``sampling`` (static): False when every slot is greedy, which leaves no conditional in the loop
    (see :func:`~jax_vattention.decode.sampling.sample_tokens`); True or None as there.

    last, lengths, generated, max_new : int32 [S]; running : bool [S]; stops : int32 [S, W]
    (padded with -1); temperature, top_p : float32 [S]; top_k : int32 [S].
    Returns the cache, the updated per-slot arrays and the tokens int32 [S, steps] (-1 where
    a slot produced nothing).
    """
    model = nnx.merge(graphdef, state)
    slots = lengths.shape[0]
    params = SamplingParams.simple(temperature, top_k, top_p)

    def body(i, carry):
        cache, last, lengths, running, generated, tokens, key = carry
        cache = grow(cache, tokens=1)
        count = running.astype(jnp.int32)  # [S]; free and finished slots write nothing
        key, step_key = jax.random.split(key)
        token, _, _, cache = model_step(model, cache, decode_batch(last, jnp.arange(slots, dtype=jnp.int32),
                                                                   lengths * count, count),
                                        params, step_key, backend=backend, sampling=sampling)  # [S]
        token = jnp.where(running, token, -1)  # [S]
        tokens = tokens.at[:, i].set(token)  # [S, steps]
        generated = generated + count  # [S]
        stopped = jnp.any(token[:, None] == stops, axis=-1)  # [S]
        running = running & ~stopped & (generated < max_new)  # [S]
        return cache, jnp.where(count > 0, token, last), lengths + count, running, generated, tokens, key

    tokens = jnp.full((slots, steps), -1, jnp.int32)
    carry = (cache, last, lengths, running, generated, tokens, key)
    cache, last, lengths, running, generated, tokens, key = lax.fori_loop(0, steps, body, carry)
    return cache, last, lengths, running, generated, tokens, key


@functools.lru_cache(maxsize=16)
def decode_chunk_fn(graphdef, backend: str, steps: int, sampling: bool | None = None, specs=None):
    """Jitted decode chunk; compiles once per chunk length (and ``sampling``, see :func:`_decode_chunk`).
    With ``specs`` (:class:`~jax_vattention.decode.mesh.MeshSpecs`) it runs inside ``shard_map``."""
    body = functools.partial(_decode_chunk, graphdef, backend, steps, sampling)
    if specs is None:
        return cache_jit(body)
    # last, lengths, running, generated, max_new, stops, 3 sampling knobs, key
    return specs.shard_jit(body, 10, (CACHE, None, None, None, None, None, None))
