"""``vattention generate``'s memory report: mapped against a static cache, and why when pages decide."""

import jax.numpy as jnp

import jax_vattention as jv
from jax_vattention.app.commands.generate import memory_report

MiB = 1 << 20


def report(page_bytes, max_len, layout="interleaved"):
    """The tiny model's cache (bf16, as on a GPU) with four requests of 30 + 64 tokens alive."""
    config = jv.CacheConfig(num_layers=2, max_batch=4, max_len=max_len, kv_heads=2, head_dim=16,
                            dtype=jnp.bfloat16, layout=layout, page_bytes=page_bytes)
    with jv.CacheManager(config) as manager:
        prompts, outputs = [[1] * 30] * 4, [[2] * 64] * 4
        slots = [manager.alloc(len(p) + len(o) - 1) for p, o in zip(prompts, outputs)]
        lines = memory_report(manager, prompts, outputs)
        for slot in slots:
            manager.free(slot)
    return lines


def test_gpu_pages_dominate_a_small_model_and_the_report_says_why():
    lines = report(2 * MiB, max_len=2048)
    assert "mapped 16.0 MiB of physical memory in 8 pages of 2 MiB" in lines[0]
    assert "a static cache of 4 x 2048 tokens holds 2.0 MiB (800.0% of it mapped)" in lines[0]
    assert lines[1].startswith("pages are 2 MiB: these 4 requests (up to 93 tokens) need at least 8 pages")
    assert "a static cache is smaller here, until max_len passes about 16,384 tokens a slot" in lines[1]


def test_per_layer_needs_a_page_in_every_layer():
    lines = report(2 * MiB, max_len=2048, layout="per_layer")
    assert "(per_layer, 4 buffers)" in lines[0] and "in 16 pages of 2 MiB" in lines[0]


def test_small_pages_map_less_than_a_static_cache():
    lines = report(64 << 10, max_len=2048)
    assert "(25.0% of it mapped)" in lines[0]
    assert all("a static cache is smaller" not in line for line in lines)


def test_the_default_max_len_makes_a_gpu_page_cheaper_than_a_static_cache():
    """The main job's default slot length (a server's): with 2 MiB pages, the tiny model's four short
    requests map less than the static cache of the same max_len, and the report says so."""
    from jax_vattention.app.commands.generate import DEFAULT_MAX_LEN

    lines = report(2 * MiB, max_len=DEFAULT_MAX_LEN)
    assert "mapped 16.0 MiB of physical memory in 8 pages of 2 MiB" in lines[0]
    assert f"a static cache of 4 x {DEFAULT_MAX_LEN} tokens holds 64.0 MiB (25.0% of it mapped)" in lines[0]
    assert all("a static cache is smaller" not in line for line in lines)
