"""Prefix sharing from Python: page keys (the hash chain) and the CacheManager's sharing API.

On the CPU backend pages cannot be aliased (the buffers are XLA's memory), so the manager's
bookkeeping is checked with the fake driver here; the values read through aliased pages are
checked on a GPU (tests/test_gpu_prefix.py).
"""

import hashlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_vattention as jv
from jax_vattention import _core
from jax_vattention.cache.prefix import SharedAlloc, page_keys

KiB = 1024
CPU = jax.devices("cpu")[0]
PER_PAGE = 64           # 2 kv heads x 128 x float32 = 1 KiB a token, 64 KiB pages
BUFFERS = 4


def config(**overrides):
    settings = dict(num_layers=2, max_batch=3, max_len=256, kv_heads=2, head_dim=128, dtype=jnp.float32,
                    page_bytes=64 * KiB, budget_bytes=64 * 64 * KiB)
    settings.update(overrides)
    return jv.CacheConfig(**settings)


def reference_keys(tokens, per_page):
    key = hashlib.blake2b(b"jax_vattention prefix v1", digest_size=8).digest()
    keys = []
    for start in range(0, len(tokens) // per_page * per_page, per_page):
        block = np.asarray(tokens[start:start + per_page], "<i8").tobytes()
        key = hashlib.blake2b(key + block, digest_size=8).digest()
        keys.append(int.from_bytes(key, "little"))
    return keys


def test_a_page_key_stands_for_every_token_before_the_end_of_its_page():
    tokens = np.random.default_rng(0).integers(0, 128_000, 100)
    keys = page_keys(tokens, 32)
    assert keys == reference_keys(tokens, 32) and len(keys) == 3     # the partial page has no key
    assert page_keys(list(tokens[:64]), 32) == keys[:2]               # a prefix's keys are a prefix
    changed = tokens.copy()
    changed[40] += 1
    assert page_keys(changed, 32)[0] == keys[0] and page_keys(changed, 32)[1:] != keys[1:]
    assert page_keys(np.concatenate([tokens[32:64], tokens[:32]]), 32)[1] != keys[1]   # order matters
    assert page_keys(tokens, 32, salt=b"adapter") != keys
    assert all(0 <= key < 2**64 for key in keys)


@pytest.mark.parametrize("tokens, per_page", [([1.5], 1), ([[1]], 1), ([1], 0), ([1], True)])
def test_bad_page_key_inputs_are_refused(tokens, per_page):
    with pytest.raises(ValueError):
        page_keys(tokens, per_page)


def test_the_cpu_backend_shares_nothing():
    with jv.CacheManager(config(), CPU) as manager:
        assert manager.tokens_per_page == 0
        prompt = np.arange(200)
        placed = manager.alloc_shared(200, prefix=prompt)
        assert manager.publish(placed.slot, prompt) == 0
        assert manager.alloc_shared(200, prefix=prompt).shared_tokens == 0


@pytest.fixture
def manager():
    # host_pages: the fake driver shares pages in CPU buffers only where it carries their bytes along.
    with jv.CacheManager(config(), CPU, driver=_core.FakeDriver(64 * KiB, host_pages=True)) as manager:
        yield manager


def test_requests_with_a_common_prompt_start_share_its_full_pages(manager):
    assert manager.tokens_per_page == PER_PAGE
    prompt = np.random.default_rng(1).integers(0, 32_000, 200)
    first = manager.alloc_shared(200, prefix=prompt)
    assert first == SharedAlloc(slot=0, shared_tokens=0)
    assert manager.publish(first.slot, prompt) == 3                    # 200 tokens: 3 full pages
    created = manager.stats()["created_pages"]
    second = manager.alloc_shared(200, 16, prefix=prompt)
    assert second == SharedAlloc(slot=1, shared_tokens=192)
    manager.check_write(second.slot, 192)
    with pytest.raises(ValueError, match="start at token 192"):
        manager.check_write(second.slot, 191)
    stats = manager.stats()
    assert stats["created_pages"] - created == BUFFERS                 # only the 4th, private page
    assert stats["shared_pages"] == stats["cached_pages"] == 3 * BUFFERS
    assert stats["bytes_saved"] == stats["cached_bytes"] == 3 * BUFFERS * 64 * KiB
    other = prompt.copy()
    other[100] += 1                                                     # in the second page
    assert manager.alloc_shared(200, prefix=other).shared_tokens == 64


def test_the_prompts_last_token_is_always_computed(manager):
    prompt = np.arange(192)
    manager.publish(manager.alloc_shared(192, prefix=prompt).slot, prompt)
    assert manager.alloc_shared(192, prefix=prompt).shared_tokens == 128   # not 192: its logits are needed
    assert manager.alloc_shared(193, prefix=prompt).shared_tokens == 192


def test_only_written_pages_are_published(manager):
    prompt = np.arange(256)
    slot = manager.alloc_shared(100, prefix=prompt[:100]).slot
    assert manager.publish(slot, prompt) == 1                          # 100 tokens written: 1 full page
    manager.grow(100)
    assert manager.publish(slot, prompt) == 2                          # 200 now: 2 more, 1 of them new
    assert manager.writable_from(slot) == 192


def test_sharing_misuse_is_refused(manager):
    with pytest.raises(ValueError, match="more than prompt_len"):
        manager.alloc_shared(10, prefix=np.arange(11))
    with pytest.raises(ValueError, match="1-D integer"):
        manager.alloc_shared(10, prefix=np.zeros(3))
    with pytest.raises(ValueError, match="holds no request"):
        manager.publish(2, np.arange(100))
    with pytest.raises(ValueError, match="slot must be"):
        manager.check_write(-1, 0)


def test_evict_returns_unmapped_cached_pages(manager):
    prompt = np.arange(200)
    slot = manager.alloc_shared(200, prefix=prompt).slot
    manager.publish(slot, prompt)
    assert manager.evict() == 0                                        # still mapped
    manager.free(slot)
    manager.reclaim()
    assert manager.evict() == 3 * BUFFERS
    assert manager.stats()["cached_pages"] == 0
