"""Python threads calling the cache manager while jitted steps run its mapping op, on the CPU backend."""

import random
import threading

import jax
import jax.numpy as jnp

import jax_vattention as jv
from jax_vattention import _core

KiB = 1024
CPU = jax.devices("cpu")[0]
PAGE = 64 * KiB                     # 512 tokens of 2 heads x 16 x 4 bytes


def expected_table(view, slot_bytes):
    table = {}
    for slot, pages in enumerate(view["slots"]):
        for page, handles in enumerate(pages):
            for buffer, handle in enumerate(handles):
                table[view["bases"][buffer] + slot * slot_bytes + page * PAGE] = (PAGE, handle, True)
    return table


def test_threads_and_jitted_mapping_ops_neither_deadlock_nor_lose_a_page():
    driver = _core.FakeDriver(PAGE)
    config = jv.CacheConfig(num_layers=2, max_batch=6, max_len=2048, kv_heads=2, head_dim=16, dtype=jnp.float32,
                            page_bytes=PAGE, budget_bytes=6 * 4 * 4 * PAGE)
    # The budget covers every slot full: a failed step would lose its donated cache, so the steps
    # must never run out of pages (the callers still take each other's pages through alloc).
    manager = jv.CacheManager(config, CPU, driver=driver)
    step = jv.cache_jit(lambda cache: jv.grow(cache, 7))
    stop = threading.Event()
    errors = []

    def steps():
        cache = manager.cache
        try:
            for _ in range(150):
                cache = jax.block_until_ready(step(cache))
        except Exception as error:
            errors.append(error)
        finally:
            manager.cache = cache
            stop.set()

    def caller(seed):
        rng = random.Random(seed)
        mine = []
        try:
            while not stop.is_set():
                action = rng.random()
                try:
                    if action < 0.3:
                        mine.append(manager.alloc(rng.randrange(0, 600), rng.randrange(0, 64)))
                    elif action < 0.55 and mine:
                        manager.free(mine.pop(rng.randrange(len(mine))))
                    elif action < 0.7:
                        manager.reserve_growth(rng.randrange(0, 40))
                    elif action < 0.8:
                        manager.prefetch(rng.randrange(0, 40), rng.randrange(1, 8))
                    elif action < 0.9:
                        manager.reclaim()
                    else:
                        stats = manager.stats()
                        assert stats["created_pages"] == stats["mapped_pages"] + stats["pooled_pages"]
                except (jv.OutOfPagesError, jv.NoFreeSlotError):
                    pass
        except Exception as error:
            errors.append(error)
        finally:
            for slot in mine:
                manager.free(slot)

    threads = [threading.Thread(target=steps)] + [threading.Thread(target=caller, args=(s,)) for s in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads), "deadlock: a thread never finished"
    assert not errors, errors
    stats = manager.stats()
    view = manager._core.view()
    assert driver.mappings() == expected_table(view, manager.capacity * config.token_bytes)
    assert stats["active_slots"] == 0 and stats["mapped_pages"] == stats["deferred_pages"]
    assert stats["created_pages"] == len(driver.handles()) == stats["mapped_pages"] + stats["pooled_pages"]
    assert stats["grow_calls"] > 0
    manager.close()
    assert driver.mappings() == {} and driver.handles() == []
