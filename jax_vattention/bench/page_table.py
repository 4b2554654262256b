"""``vattention bench pages``: tokens per page and the worst-case waste of a request (the paper's Table 8).

For each model shape, tensor-parallel degree and page size, one :class:`CacheManager` is built the
way a tensor-parallel worker would hold its cache: its share of the KV heads (``kv_heads / tp``),
on a fake driver whose granularity is the page size (the CUDA driver maps 2 MiB pages; the
smaller sizes are what the paper's patched driver allowed). Nothing is computed by hand: the tokens
a page holds come from the manager's page size and the cache's token size, and the worst case is
the largest of the manager's own ``waste_bytes`` over the request lengths of one period, summed
over the ``tp`` workers.

Needs no GPU and touches no physical memory: the fake driver only keeps a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import math

import jax
import jax.numpy as jnp

import jax_vattention._core as _core
from jax_vattention.app.cli import standalone
from jax_vattention.cache.config import LAYOUTS, CacheConfig
from jax_vattention.cache.manager import CacheManager
from jax_vattention.models import get_config

KiB = 1024
MiB = 1024 * KiB
SHAPES = ("yi-6b", "llama-3-8b", "yi-34b", "llama-3-70b")
PAGE_SIZES = (64 * KiB, 128 * KiB, 256 * KiB, 2 * MiB)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), metavar="NAME",
                        help=f"named model shapes (default: {' '.join(SHAPES)})")
    parser.add_argument("--tp", nargs="+", type=int, default=[1, 2, 4], metavar="N",
                        help="tensor-parallel degrees (default: 1 2 4)")
    parser.add_argument("--page-kib", nargs="+", type=int, default=[p // KiB for p in PAGE_SIZES],
                        metavar="KIB", help="page sizes in KiB (default: 64 128 256 2048)")
    parser.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=list(LAYOUTS))


def measure(shape: str, tp: int, page_bytes: int, layout: str) -> tuple[float, int]:
    """(tokens one page holds, the most bytes one request can waste, over all ``tp`` workers).

    The waste of a request repeats with its length every ``page / gcd(page, token)`` tokens, so
    one request of each length in that period, placed in turn in one manager, finds the worst.
    """
    model = get_config(shape)
    if model.num_kv_heads % tp:
        raise ValueError(f"{shape} has {model.num_kv_heads} KV heads, which {tp} workers cannot share")
    config = CacheConfig(num_layers=model.num_layers, max_batch=1, max_len=1,
                         kv_heads=model.num_kv_heads // tp, head_dim=model.head_dim, dtype=jnp.bfloat16,
                         page_bytes=page_bytes, budget_bytes=1 << 40, layout=layout)
    period = page_bytes // math.gcd(page_bytes, config.token_bytes)
    config = dataclasses.replace(config, max_len=period)
    worst = 0
    with CacheManager(config, jax.devices("cpu")[0], driver=_core.FakeDriver(page_bytes)) as manager:
        for length in range(1, period + 1):
            slot = manager.alloc(length)
            worst = max(worst, manager.stats()["waste_bytes"])
            manager.free(slot)
            manager.reclaim()
        return manager.page_bytes / config.token_bytes, tp * worst


def _tokens(count: float) -> str:
    return f"{count:g}" if count == int(count) else f"{count:.2f}"


def _size(nbytes: int) -> str:
    return f"{nbytes / MiB:.4g} MiB" if nbytes >= MiB else f"{nbytes / KiB:.4g} KiB"


def run(args: argparse.Namespace) -> int:
    for value in (*args.tp, *args.page_kib):
        if value <= 0:
            raise ValueError(f"--tp and --page-kib take positive integers; got {value}")
    pages = [kib * KiB for kib in args.page_kib]
    for layout in args.layouts:
        print(f"\n{layout}: tokens per page / worst-case waste per request (bf16, all workers)")
        print("| model | TP | " + " | ".join(_size(p) for p in pages) + " |")
        print("|---|---:|" + "---:|" * len(pages))
        for shape in args.shapes:
            for tp in args.tp:
                cells = []
                for page in pages:
                    tokens, waste = measure(shape, tp, page, layout)
                    cells.append(f"{_tokens(tokens)} / {_size(waste)}")
                print(f"| {shape} | {tp} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(standalone(__doc__, add_arguments, run))
