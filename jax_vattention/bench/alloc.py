"""``vattention bench alloc``: how fast the manager maps and unmaps pages, beside the raw driver.

Measures, on a cache of Llama-3-8B's shape (32 layers, 8 KV heads of 128,
bf16: one 2 MiB page holds 1024 tokens of one layer's K or V):

* admission: ``alloc`` of a prompt, per page, with an empty pool (create +
  map + set access) and with a warm pool (map + set access only);
* reclamation: ``free`` + ``reclaim``, per page (waits for the device, unmaps);
* batched growth: every slot grows by a page's worth of tokens at once, in
  GB/s of physical memory mapped;
* the raw driver doing the same number of pages with one set-access call.

On a CPU the manager's pages are the operating system's, committed when first
written: there the calls are bookkeeping, and the report says so instead of
giving a bandwidth.
"""

from __future__ import annotations

import argparse
import datetime
import time

import jax
import jax.numpy as jnp

from jax_vattention.app.cli import standalone
from jax_vattention.cache.config import CacheConfig
from jax_vattention.cache.manager import CacheManager


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--max-len", type=int, default=32768)
    parser.add_argument("--repeats", type=int, default=5)


def _best(samples: list[float]) -> float:
    return sorted(samples)[len(samples) // 2]


def run(args: argparse.Namespace) -> int:
    device = jax.devices()[0]
    config = CacheConfig(num_layers=args.layers, max_batch=args.slots, max_len=args.max_len,
                         kv_heads=args.kv_heads, head_dim=args.head_dim, dtype=jnp.bfloat16)
    manager = CacheManager(config, device)
    page = manager.page_bytes
    tokens_per_page = page // config.token_bytes
    pages_per_alloc = 4 * config.num_buffers          # a prompt of 4 pages' worth of tokens
    rows = []

    cold, warm, reclaim = [], [], []
    for _ in range(args.repeats):
        manager.trim()
        start = time.perf_counter()
        slot = manager.alloc(4 * tokens_per_page)
        cold.append(time.perf_counter() - start)
        manager.free(slot)
        start = time.perf_counter()
        manager.reclaim()
        reclaim.append(time.perf_counter() - start)
        start = time.perf_counter()
        slot = manager.alloc(4 * tokens_per_page)
        warm.append(time.perf_counter() - start)
        manager.free(slot)
        manager.reclaim()
    rows.append(("alloc, empty pool (create+map+access)", _best(cold), pages_per_alloc))
    rows.append(("alloc, warm pool (map+access)", _best(warm), pages_per_alloc))
    rows.append(("free + reclaim (sync+unmap)", _best(reclaim), pages_per_alloc))

    def time_growth(warm_pool: bool) -> float:
        """Seconds for every slot to grow by a page, from an empty pool or a filled one."""
        slots = [manager.alloc(1) for _ in range(args.slots)]
        if warm_pool:
            manager.reserve_growth(tokens_per_page)
        else:
            manager.trim()
        start = time.perf_counter()
        manager.grow(tokens_per_page)
        seconds = time.perf_counter() - start
        for slot in slots:
            manager.free(slot)
        manager.reclaim()
        return seconds

    grow_cold, grow_warm = [], []
    growth_pages = args.slots * config.num_buffers
    for _ in range(args.repeats):
        grow_cold.append(time_growth(warm_pool=False))
        grow_warm.append(time_growth(warm_pool=True))
    rows.append(("grow all slots, empty pool", _best(grow_cold), growth_pages))
    rows.append(("grow all slots, warm pool", _best(grow_warm), growth_pages))
    manager.close()

    if device.platform == "gpu":
        from jax_vattention.bench.raw_driver import map_unmap_seconds  # needs the `gpu` extra
        raw = [map_unmap_seconds(device.local_hardware_id, growth_pages, page) for _ in range(args.repeats)]
        rows.append(("raw driver: create+map+one access", _best([m for m, _ in raw]), growth_pages))
        rows.append(("raw driver: unmap+release", _best([u for _, u in raw]), growth_pages))

    print(f"vattention bench alloc on {device.device_kind} ({device.platform}), "
          f"{datetime.date.today().isoformat()}, page {page >> 10} KiB, cache {config.num_layers} layers x "
          f"{config.kv_heads} KV heads x {config.head_dim}, {args.slots} slots")
    on_gpu = device.platform == "gpu"
    if not on_gpu:
        print("not a GPU: these calls do the manager's bookkeeping (and madvise) only (the operating system commits "
              "a page when it is first written, which no call below does), so the times are bookkeeping "
              "costs and no bandwidth is shown; run it on a GPU to time the driver's mapping")
    print(f"{'operation':<40} {'pages':>6} {'ms':>9} {'us/page':>9} {'GB/s' if on_gpu else '':>8}")
    for name, seconds, pages in rows:
        bandwidth = f"{pages * page / seconds / 1e9:>8.1f}" if on_gpu else ""
        print(f"{name:<40} {pages:>6} {seconds * 1e3:>9.3f} {seconds / pages * 1e6:>9.2f} {bandwidth:>8}")
    return 0


if __name__ == "__main__":
    raise SystemExit(standalone(__doc__, add_arguments, run))
