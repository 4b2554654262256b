"""The donation check (cache/donation.py): a virtual cache passed to a jitted function must be
donated and come back in place, or the call is refused before it runs; a copied cache is reported
by the mapping op."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_vattention as jv
from caches import small_config

CPU = jax.devices("cpu")[0]


@pytest.fixture
def manager():
    with jv.CacheManager(small_config(), CPU) as manager:
        yield manager


def test_cache_jit_takes_one_more_donated_name_as_a_string(manager):
    manager.alloc(1)

    @functools.partial(jv.cache_jit, donate_argnames="counter")
    def step(cache, counter):
        return jv.grow(cache, 1), counter + 1

    cache, counter = step(manager.cache, jnp.zeros(4))
    manager.cache = cache
    np.testing.assert_array_equal(np.asarray(counter), np.ones(4))
    assert manager.lengths()[0] == 2


@pytest.mark.filterwarnings("ignore:Some donated buffers were not usable")
def test_undonated_cache_is_refused_before_it_runs(manager):
    manager.alloc(1)
    cache = manager.cache

    def step(cache):
        return jv.grow(cache, 1)

    with pytest.raises(ValueError, match="without donation"):
        jv.check_cache_donation(jax.jit(step).lower(cache), (cache,), {})
    not_returned = jax.jit(lambda cache: cache.k[0].sum(), donate_argnums=0)
    with pytest.raises(ValueError, match="not returned"):
        jv.check_cache_donation(not_returned.lower(cache), (cache,), {})
    jv.check_cache_donation(jax.jit(step, donate_argnums=0).lower(cache), (cache,), {})
    assert manager.lengths()[0] == 1


@pytest.mark.filterwarnings("ignore:Some donated buffers were not usable")
def test_another_donated_argument_cannot_stand_in_for_an_unreturned_cache_array(manager):
    cache = manager.cache
    extra = tuple(jnp.zeros_like(buffer) for buffer in cache.k)   # as many arrays as the cache's K half

    def step(cache, extra):
        return cache.v, tuple(e + 1 for e in extra)                # the K arrays alias nothing

    lowered = jax.jit(step, donate_argnums=(0, 1)).lower(cache, extra)
    with pytest.raises(ValueError, match="not returned in place"):
        jv.check_cache_donation(lowered, (cache, extra), {})


@pytest.mark.filterwarnings("ignore:Some donated buffers were not usable")
def test_a_cache_array_aliased_to_another_output_is_refused(manager):
    cache = manager.cache

    def step(cache):
        dense = tuple(jnp.ones_like(buffer) for buffer in cache.k)  # same shapes: XLA may alias them
        return dense, cache.replace(k=tuple(b + 0 for b in cache.k))

    lowered = jax.jit(step, donate_argnums=0).lower(cache)
    with pytest.raises(ValueError, match="not returned in place"):
        jv.check_cache_donation(lowered, (cache,), {})


def test_a_copied_cache_is_reported_by_the_op(manager):
    manager.alloc(1)
    with pytest.raises(Exception, match="copied the cache.*[Dd]onate"):
        jax.block_until_ready(jax.jit(lambda cache: jv.grow(cache, 1))(manager.cache))
    assert manager.lengths()[0] == 1
