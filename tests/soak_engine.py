"""Soak of the engine at a tight page budget with random preemptions, run in its own process.

Run by ``tests/test_soak.py`` (a fault kills only this process); by hand::

    python tests/soak_engine.py --device gpu --steps 20000

It keeps submitting random requests until the engine has run ``--steps`` decode steps, preempts
a random running request now and then, and checks: no error, a sample of the requests yield
exactly what they yield alone on a dense cache, and after reclaim and trim nothing is mapped and
no page exists. Prints one line ``SOAK OK ...`` on success; exits non-zero otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jax_vattention as jv
from jax_vattention.engine import Engine, EngineConfig, Request
from jax_vattention.decode.generate import generate
from jax_vattention.models.configs import get_config
from jax_vattention.models.llama import Llama


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--steps", type=int, default=300, help="decode steps to run at least")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sample", type=int, default=12, help="requests compared with running alone")
    parser.add_argument("--preempt", type=float, default=0.2, help="chance of a preemption per engine step")
    parser.add_argument("--max-prompt", type=int, default=40, help="longest prompt (fewer compiles when short)")
    parser.add_argument("--pipeline", action="store_true", help="the pipelined engine (EngineConfig.pipeline)")
    args = parser.parse_args(argv)
    # Requests are compared token for token with running alone, in float32: on a GPU, XLA's default
    # float32 matmuls round their inputs to TF32, whose result depends on the batch around a row.
    jax.config.update("jax_default_matmul_precision", "highest")

    device = jax.devices(args.device)[0]
    rng = np.random.default_rng(args.seed)
    config = get_config("tiny")                    # float32: the same tokens in any batch
    model = Llama(config, rngs=nnx.Rngs(args.seed))
    max_batch, max_len, chunk = 4, 96, 8
    cache_config = jv.CacheConfig(num_layers=config.num_layers, max_batch=max_batch, max_len=max_len,
                                  kv_heads=config.num_kv_heads, head_dim=config.head_dim, dtype=jnp.float32,
                                  budget_bytes=0)
    probe = jv.CacheManager(cache_config, device)
    page_bytes = probe.page_bytes
    tokens_per_page = page_bytes // cache_config.token_bytes
    probe.close()
    # Tight: the pages of about two full slots, so admission blocks and steps preempt.
    pages_per_slot = -(-max_len // tokens_per_page)
    budget = 2 * pages_per_slot * cache_config.num_buffers * page_bytes
    manager = jv.CacheManager(dataclasses.replace(cache_config, budget_bytes=budget), device)
    engine = Engine(model, manager, EngineConfig(token_budget=2 * chunk, chunk_tokens=chunk, pipeline=args.pipeline))
    requests: dict[int, Request] = {}
    outputs: dict[int, list[int]] = {}
    while engine.stats.records_total < args.steps or not engine.idle:
        if engine.stats.records_total < args.steps:
            while engine.waiting < 3:
                prompt_len = int(rng.integers(1, args.max_prompt + 1))
                request = Request(prompt=rng.integers(2, config.vocab_size, prompt_len).tolist(),
                                  max_new_tokens=int(rng.integers(1, max_len - prompt_len + 1)))
                requests[engine.submit(request)] = request
        if engine.running > 1 and rng.random() < args.preempt:
            victims = list(engine._by_slot.values())
            engine._preempt(victims[int(rng.integers(len(victims)))])
        for event in engine.step():
            if event.error is not None:
                print(f"request {event.request_id} failed: {event.error}", file=sys.stderr)
                return 1
            outputs.setdefault(event.request_id, []).append(event.token)
    steps = engine.stats.records_total
    sample = rng.choice(sorted(requests), size=min(args.sample, len(requests)), replace=False)
    for request_id in sample:
        request = requests[int(request_id)]
        dense = jv.KVCache.dense(num_layers=config.num_layers, max_batch=1, capacity=manager.capacity,
                                 kv_heads=config.num_kv_heads, head_dim=config.head_dim, dtype=jnp.float32,
                                 device=device)
        result, _ = generate(model, dense, [request.prompt], max_new_tokens=request.max_new_tokens,
                             backend=engine.backend)
        if outputs.get(int(request_id)) != result.tokens[0]:
            print(f"request {request_id}: engine {outputs.get(int(request_id))} != alone {result.tokens[0]}",
                  file=sys.stderr)
            return 1
    manager.reclaim()
    manager.trim()
    stats = manager.stats()
    if stats["mapped_pages"] or stats["created_pages"]:
        print(f"after reclaim and trim: {stats['mapped_pages']} pages mapped, {stats['created_pages']} exist",
              file=sys.stderr)
        return 1
    manager.close()
    print(f"SOAK OK {steps} decode steps, {len(requests)} requests, {engine.stats.preemptions} preemptions, "
          f"{len(sample)} compared, backend {engine.backend}, device {device.platform}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
